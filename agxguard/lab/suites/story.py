"""story: the seeds' four-chapter suite (complete_story_test_suite.py, with the claims of
test_mps_parallel_story.py), run under each mode.

1. thread_safety: 8 threads x 20 requests of the story transformer (2 layers, d_model
   256, 4 heads, feed-forward 1024, no dropout, input 4x32x256), a model per thread:
   how many of the 160 ops completed.
2. efficiency: throughput at 1, 2, 4, 8 threads, 20 requests per thread as the seeds
   (then on to the sample floor), repeated; efficiency = speedup / threads.
3. batching: in samples of 1x32x256 as the seeds count them, 30 requests per thread:
   1 thread with batch 8, 8 threads with batch 1, 4 threads with batch 2 (the seeds'
   three), and 1 thread with batch 1 (the base of test_mps_parallel_story's batch-8
   efficiency), in samples/s.
4. correctness: each thread's output against a CPU float64 reference (max abs diff,
   tolerance 1e-3 as the seeds).

The seeds' story runs every request under ``Semaphore(1)``: its figures are those of
agxguard's ``global`` mode. The claims both seed files make are evaluated per mode by
:mod:`agxguard.lab.claims`.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from ..report import Report
from . import common

SUITE = "story"
CHAPTERS = ("thread_safety", "efficiency", "batching", "correctness")
WORKLOAD = "story_transformer"
BATCHING = ((1, 8), (8, 1), (4, 2), (1, 1))  # (threads, batch): the seeds' three, then the base
SAMPLE_ROWS = 1  # a batching sample is 1x32x256, as the seeds count samples
GPU_DEVICES = ("cuda", "mps")
#: The seeds' requests per thread, per chapter (complete_story_test_suite.py).
SEED_ITERATIONS = {"thread_safety": 20, "efficiency": 20, "batching": 30, "correctness": 1}
#: The driver model's requests are microseconds: its throughput chapters do more.
MODEL_ITERATIONS = {"efficiency": 2000, "batching": 2000}
#: The note the report carries on how the seeds' protection maps to agxguard's modes.
PROTECTION_NOTE = ("the seeds' story (complete_story_test_suite.py) runs every request under "
                   "threading.Semaphore(1), one request at a time in the process: its figures "
                   "are agxguard's 'global' mode, not 'off'")


def default_iterations(device: str, chapter: str) -> int:
    """Requests per thread: the seeds' (20 thread safety, 20 efficiency, 30 batching, 1
    correctness request per thread); the driver model does more in the throughput chapters."""
    if device == "model" and chapter in MODEL_ITERATIONS:
        return MODEL_ITERATIONS[chapter]
    return SEED_ITERATIONS[chapter]


def cases(mode: str, *, device: str, chapters: List[str], threads: List[int],
          iterations: Optional[int], duration: Optional[float], min_sample_s: float = common.MIN_SAMPLE_S,
          min_requests: Optional[int] = None, repeats: int = common.REPEATS,
          shared_model: bool = False, workload: str = WORKLOAD) -> List[Dict[str, Any]]:
    """The runs of one mode, in chapter order (``iterations`` None: the defaults).
    Throughput cases (efficiency, batching) carry the sample floor and the repeats."""
    out: List[Dict[str, Any]] = []
    top = max(threads)
    given = iterations
    sample = {"min_sample_s": min_sample_s, "min_requests": min_requests, "repeats": repeats}
    for chapter in chapters:
        iterations = given or default_iterations(device, chapter)
        if chapter == "thread_safety":
            out.append({"chapter": chapter, "workload": workload, "threads": top, "batch": 1,
                        "iterations": iterations})
        elif chapter == "efficiency":
            for t in threads:
                out.append(dict(sample, chapter=chapter, workload=workload, threads=t, batch=1,
                                iterations=None if duration else iterations, duration=duration,
                                scaling=True))
        elif chapter == "batching":
            for t, b in BATCHING:
                out.append(dict(sample, chapter=chapter, workload=workload, threads=t, batch=b,
                                rows=SAMPLE_ROWS, iterations=None if duration else iterations,
                                duration=duration))
        elif chapter == "correctness":
            out.append({"chapter": chapter, "workload": workload, "threads": top, "batch": 1,
                        "iterations": 1})
    if shared_model:
        for c in out:
            c["shared_model"] = True
    return out


def run_chapter(backend, case: Dict[str, Any]) -> Dict[str, Any]:
    """Child side: run one case of the story."""
    chapter, mode, wl = case["chapter"], case["mode"], case["workload"]
    batch = case.get("batch", 1)
    common.warm_up(backend, wl, batch, case.get("rows"))
    keep = True  # every chapter checks its outputs
    if chapter in ("efficiency", "batching"):
        r = common.measure(backend, wl, mode, case, keep=keep)
    else:
        r = common.run_threads(backend, wl, mode, case["threads"], batch=batch,
                               iterations=case.get("iterations"), duration=case.get("duration"),
                               keep=keep, shared_model=bool(case.get("shared_model")))
    return common.finish_case(backend, wl, r, keep, against_reference=(chapter == "correctness"))


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target: one case of the story, in a child process."""
    return common.run_case(case, run_chapter)


def story(device: Optional[str] = None, mode: Any = "all", *,
          chapter: Any = None, threads: Any = (1, 2, 4, 8),
          iterations: Optional[int] = None, duration: Optional[float] = None,
          min_sample_s: Any = common.MIN_SAMPLE_S, min_requests: Optional[int] = None,
          repeats: Any = common.REPEATS, shared_model: bool = False,
          torch_threads: Optional[int] = None,
          retries: int = 2, json_path: Optional[str] = None,
          timeout: float = 120.0, progress: Any = sys.stderr, plot: bool = True,
          model_options: Optional[Dict[str, Any]] = None) -> Report:
    """Run the story suite; return its :class:`~agxguard.lab.report.Report`.

    ``device``: mps, cuda, cpu or model (default: the best present). ``mode``: one mode,
    several (comma-separated or a list) or ``"all"``. ``chapter``: chapters to run
    (default all: thread_safety, efficiency, batching, correctness). ``threads``: thread
    counts for the efficiency chapter (the largest also drives thread_safety and
    correctness). ``iterations``: requests per thread (default the seeds': 20, and 30 in
    batching); ``duration``: seconds per throughput sample instead. Every throughput
    sample then runs on to ``min_sample_s`` seconds (default 0.5) or ``min_requests``
    requests in all, whichever comes first, and is taken ``repeats`` times (default 3;
    the report keeps each rate and the spread; a sample under both floors is marked
    short and its rate is never the result). ``shared_model``: one model for all threads
    (default: one per thread, as the seeds). ``torch_threads``: set torch's intra-op
    threads on cpu (default: torch's own, as the seeds). ``retries``: fresh-process retries
    of a run that did not pass (every attempt stays in the report). ``json_path``: where
    the report is written, atomically after every run. ``progress``: a stream for
    progress lines, or None. ``model_options`` (device model): bugs (default on),
    window_yields, window_spins, internal_every; see agxguard.lab.suites.model_backend.
    """
    device = common.resolve_device(device)
    modes = common.parse_modes(mode)
    chapters = common.parse_choice("chapter", chapter, CHAPTERS)
    o = common.parse_run_options(threads, iterations, duration, min_sample_s, min_requests, repeats,
                                 torch_threads, retries)
    thread_counts, iterations, duration, floor = o["threads"], o["iterations"], o["duration"], o["min_sample_s"]
    min_requests, repeats, torch_threads, retries = o["min_requests"], o["repeats"], o["torch_threads"], o["retries"]
    options = {"chapter": chapters, "threads": thread_counts,
               "iterations": iterations or {c: default_iterations(device, c) for c in chapters},
               "duration": duration, "min_sample_s": floor, "min_requests": min_requests,
               "repeats": repeats, "models": "shared" if shared_model else "one per thread",
               "torch_threads": torch_threads or "torch default",
               "retries": retries, "timeout": timeout, "workload": WORKLOAD,
               "batching_sample": "1x32x256"}
    return common.run_suite(
        SUITE, device, modes,
        lambda m: cases(m, device=device, chapters=chapters, threads=thread_counts,
                        iterations=iterations, duration=duration, min_sample_s=floor,
                        min_requests=min_requests, repeats=repeats, shared_model=shared_model),
        options, target=run_case, retries=retries, timeout=timeout, json_path=json_path, progress=progress,
        plot=plot, backend_options=common.backend_options(device, model_options, torch_threads),
        notes=[PROTECTION_NOTE])
