"""comprehensive: four chapters over four workloads at 1-8 threads, under each mode.

- correctness: each thread's output against a CPU float64 reference (max abs diff);
- thread_safety: every request completes, outputs are finite, and each thread's last
  output equals its first (same input, same answer);
- throughput: requests/s at each thread count (efficiency = speedup / threads);
- stress: twice the requests (or twice the duration); every one must complete.

Workloads: small_mlp (Linear 256->256, input 32x256), medium_mlp (512->1024->512,
input 32x512), large_transformer (6 layers, d_model 512, 8 heads, input 4x128x512),
matmul (512x512).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from ..report import Report
from . import common

SUITE = "comprehensive"
CHAPTERS = ("correctness", "thread_safety", "throughput", "stress")
WORKLOADS = ("small_mlp", "medium_mlp", "large_transformer", "matmul")
GPU_DEVICES = ("cuda", "mps")

# Requests per thread, by device class: a CPU (or the driver model) is slow on the
# transformer, a GPU is not. ``--iterations`` replaces them all.
_ITERATIONS = {
    "cpu": {"small_mlp": 400, "medium_mlp": 40, "large_transformer": 1, "matmul": 20},
    "gpu": {"small_mlp": 400, "medium_mlp": 200, "large_transformer": 20, "matmul": 200},
    "model": {"small_mlp": 2000, "medium_mlp": 1000, "large_transformer": 200, "matmul": 500},
}
STRESS_FACTOR = 2


def default_iterations(device: str, workload: str) -> int:
    kind = "gpu" if device in GPU_DEVICES else ("model" if device == "model" else "cpu")
    return _ITERATIONS[kind].get(workload, 10)


def cases(mode: str, *, device: str, chapters: List[str], workloads: List[str],
          threads: List[int], iterations: Optional[int], duration: Optional[float]) -> List[Dict[str, Any]]:
    """The runs of one mode, chapter by chapter."""
    out = []
    for chapter in chapters:
        for wl in workloads:
            n = iterations or default_iterations(device, wl)
            for t in threads:
                case = {"chapter": chapter, "workload": wl, "threads": t, "batch": 1}
                if chapter == "correctness":
                    case["iterations"] = 1
                elif chapter == "thread_safety":
                    case["iterations"] = n
                elif chapter == "throughput":
                    case.update(iterations=None if duration else n, duration=duration, scaling=True)
                else:  # stress
                    case.update(iterations=None if duration else n * STRESS_FACTOR,
                                duration=duration * STRESS_FACTOR if duration else None)
                out.append(case)
    return out


def run_chapter(backend, case: Dict[str, Any]) -> Dict[str, Any]:
    """Child side: run one case of the comprehensive suite."""
    chapter, mode, wl = case["chapter"], case["mode"], case["workload"]
    common.warm_up(backend, wl)
    keep = True  # every chapter checks that its outputs are there and sane
    r = common.run_threads(backend, wl, mode, case["threads"], iterations=case.get("iterations"),
                           duration=case.get("duration"), keep=keep)
    return common.finish_case(backend, wl, r, keep,
                              against_reference=(chapter == "correctness"),
                              repeatable=(chapter == "thread_safety"))


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target: one case of the comprehensive suite, in a child process."""
    return common.run_case(case, run_chapter)


def comprehensive(device: Optional[str] = None, mode: Any = "all", *,
                  chapter: Any = None, threads: Any = (1, 2, 4, 8),
                  iterations: Optional[int] = None, duration: Optional[float] = None,
                  retries: int = 2, json_path: Optional[str] = None, workloads: Any = None,
                  timeout: float = 120.0, progress: Any = sys.stderr, plot: bool = True,
                  model_options: Optional[Dict[str, Any]] = None) -> Report:
    """Run the comprehensive suite; return its :class:`~agxguard.lab.report.Report`.

    Options as for :func:`agxguard.lab.story`; ``chapter`` picks among
    correctness, thread_safety, throughput, stress, and ``workloads`` among small_mlp,
    medium_mlp, large_transformer, matmul (default all). ``iterations`` replaces the
    per-workload defaults (requests per thread; stress does twice as many).
    """
    device = common.resolve_device(device)
    modes = common.parse_modes(mode)
    chapters = common.parse_choice("chapter", chapter, CHAPTERS)
    names = common.parse_choice("workload", workloads, WORKLOADS)
    thread_counts = common.parse_threads(threads)
    iterations = common.parse_positive("iterations", iterations)
    duration = common.parse_positive("duration", duration, integer=False)
    retries = common.parse_positive("retries", retries, allow_zero=True)
    options = {"chapter": chapters, "workloads": names, "threads": thread_counts,
               "iterations": iterations or {w: default_iterations(device, w) for w in names},
               "stress_factor": STRESS_FACTOR, "duration": duration, "retries": retries,
               "timeout": timeout}
    return common.run_suite(
        SUITE, device, modes,
        lambda m: cases(m, device=device, chapters=chapters, workloads=names,
                        threads=thread_counts, iterations=iterations, duration=duration),
        options, target=run_case, retries=retries, timeout=timeout, json_path=json_path, progress=progress,
        plot=plot, backend_options=model_options)
