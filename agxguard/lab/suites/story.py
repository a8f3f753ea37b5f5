"""story: the seeds' four-chapter suite, run under each mode.

1. thread_safety: 8 threads x 20 requests of the story transformer (2 layers, d_model
   256, 4 heads, input 4x32x256): how many of the 160 ops completed.
2. efficiency: throughput at 1, 2, 4, 8 threads; efficiency = speedup / threads.
3. batching: 1 thread with batch 8, 8 threads with batch 1, 4 threads with batch 2,
   the same number of samples each, in samples/s.
4. correctness: each thread's output against a CPU float64 reference (max abs diff).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from ..report import Report
from . import common

SUITE = "story"
CHAPTERS = ("thread_safety", "efficiency", "batching", "correctness")
WORKLOAD = "story_transformer"
BATCHING = ((1, 8), (8, 1), (4, 2))  # (threads, batch), as in the seeds
GPU_DEVICES = ("cuda", "mps")


def default_iterations(device: str, chapter: str) -> int:
    """Requests per thread: the seeds' 20 for thread safety and correctness; for the
    throughput chapters enough to time (a GPU request is short, a model request shorter)."""
    if chapter in ("thread_safety", "correctness"):
        return 20
    return {"model": 2000}.get(device, 50 if device in GPU_DEVICES else 20)


def cases(mode: str, *, device: str, chapters: List[str], threads: List[int],
          iterations: Optional[int], duration: Optional[float],
          workload: str = WORKLOAD) -> List[Dict[str, Any]]:
    """The runs of one mode, in chapter order (``iterations`` None: the defaults)."""
    out: List[Dict[str, Any]] = []
    top = max(threads)
    given = iterations
    for chapter in chapters:
        iterations = given or default_iterations(device, chapter)
        if chapter == "thread_safety":
            out.append({"chapter": chapter, "workload": workload, "threads": top, "batch": 1,
                        "iterations": iterations})
        elif chapter == "efficiency":
            for t in threads:
                out.append({"chapter": chapter, "workload": workload, "threads": t, "batch": 1,
                            "iterations": None if duration else iterations, "duration": duration,
                            "scaling": True})
        elif chapter == "batching":
            samples = 8 * iterations  # the same work for each configuration
            for t, b in BATCHING:
                out.append({"chapter": chapter, "workload": workload, "threads": t, "batch": b,
                            "iterations": None if duration else max(1, samples // (t * b)),
                            "duration": duration})
        elif chapter == "correctness":
            out.append({"chapter": chapter, "workload": workload, "threads": top, "batch": 1,
                        "iterations": 1})
    return out


def run_chapter(backend, case: Dict[str, Any]) -> Dict[str, Any]:
    """Child side: run one case of the story."""
    chapter, mode, wl = case["chapter"], case["mode"], case["workload"]
    batch = case.get("batch", 1)
    common.warm_up(backend, wl, batch)
    keep = True  # every chapter checks its outputs
    r = common.run_threads(backend, wl, mode, case["threads"], batch=batch,
                           iterations=case.get("iterations"), duration=case.get("duration"),
                           keep=keep)
    return common.finish_case(backend, wl, r, keep, against_reference=(chapter == "correctness"))


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target: one case of the story, in a child process."""
    return common.run_case(case, run_chapter)


def story(device: Optional[str] = None, mode: Any = "all", *,
          chapter: Any = None, threads: Any = (1, 2, 4, 8),
          iterations: Optional[int] = None, duration: Optional[float] = None,
          retries: int = 2, json_path: Optional[str] = None,
          timeout: float = 120.0, progress: Any = sys.stderr, plot: bool = True,
          model_options: Optional[Dict[str, Any]] = None) -> Report:
    """Run the story suite; return its :class:`~agxguard.lab.report.Report`.

    ``device``: mps, cuda, cpu or model (default: the best present). ``mode``: one mode,
    several (comma-separated or a list) or ``"all"``. ``chapter``: chapters to run
    (default all: thread_safety, efficiency, batching, correctness). ``threads``: thread
    counts for the efficiency chapter (the largest also drives thread_safety and
    correctness). ``iterations``: requests per thread; ``duration``: seconds per
    throughput run instead. ``retries``: fresh-process retries of a run that did not
    pass (every attempt stays in the report). ``json_path``: where the report is
    written, atomically after every run. ``progress``: a stream for progress lines, or None.
    ``model_options`` (device model): bugs (default on), window_yields, window_spins,
    internal_every; see agxguard.lab.suites.model_backend.
    """
    device = common.resolve_device(device)
    modes = common.parse_modes(mode)
    chapters = common.parse_choice("chapter", chapter, CHAPTERS)
    thread_counts = common.parse_threads(threads)
    iterations = common.parse_positive("iterations", iterations)
    duration = common.parse_positive("duration", duration, integer=False)
    retries = common.parse_positive("retries", retries, allow_zero=True)
    options = {"chapter": chapters, "threads": thread_counts,
               "iterations": iterations or {c: default_iterations(device, c) for c in chapters},
               "duration": duration, "retries": retries, "timeout": timeout,
               "workload": WORKLOAD}
    return common.run_suite(
        SUITE, device, modes,
        lambda m: cases(m, device=device, chapters=chapters, threads=thread_counts,
                        iterations=iterations, duration=duration),
        options, target=run_case, retries=retries, timeout=timeout, json_path=json_path, progress=progress,
        plot=plot, backend_options=model_options)
