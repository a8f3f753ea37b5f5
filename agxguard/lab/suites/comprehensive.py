"""comprehensive: the seeds' comprehensive_test_suite.py, four chapters over its
workloads at 1-8 threads, under each mode.

- correctness: each thread's output against a CPU float64 reference (max abs diff,
  tolerance 1e-3 as the seeds);
- thread_safety: 20 requests per thread (the seeds' default); every request completes,
  outputs are finite, and each thread's last output equals its first;
- throughput: requests/s at each thread count, 20 requests per thread as the seeds, then
  on to the sample floor, repeated (efficiency = speedup / threads), with per-request
  latency (mean, p50, p99; the seeds report the mean);
- stress: 5 seconds per case, as the seeds; every request must complete.

Workloads (the seeds' defaults): small_mlp (Linear 256->256, input 32x256), matmul
(512x512), large_transformer (6 layers, d_model 512, 8 heads, feed-forward 2048, input
4x128x512); medium_mlp (512->1024->512, input 32x512) on request, as in the seeds.
Every thread runs its own model, as the seeds do. The seeds' suite takes no lock of its
own around a request; its claim (best speedup over 1 thread >= 1.0x, else WARN) is
evaluated per mode by :mod:`agxguard.lab.claims`.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from ..report import Report
from . import common

SUITE = "comprehensive"
CHAPTERS = ("correctness", "thread_safety", "throughput", "stress")
WORKLOADS = ("small_mlp", "matmul", "large_transformer", "medium_mlp")
DEFAULT_WORKLOADS = ("small_mlp", "matmul", "large_transformer")  # the seeds' --models default
GPU_DEVICES = ("cuda", "mps")
SEED_ITERATIONS = 20  # the seeds' --iterations default, for every workload
STRESS_S = 5.0  # the seeds' seconds per stress case

# The driver model's requests are microseconds: its requests per thread.
_MODEL_ITERATIONS = {"small_mlp": 2000, "medium_mlp": 1000, "large_transformer": 200, "matmul": 500}
PROTECTION_NOTE = ("the seeds' comprehensive suite takes no lock of its own around a request "
                   "(with the seeds' driver fix loaded, its protection is per driver call, "
                   "agxguard's 'op'; without it, 'off')")


def default_iterations(device: str, workload: str) -> int:
    """Requests per thread: the seeds' 20 (the driver model does more)."""
    if device == "model":
        return _MODEL_ITERATIONS.get(workload, 500)
    return SEED_ITERATIONS


def cases(mode: str, *, device: str, chapters: List[str], workloads: List[str],
          threads: List[int], iterations: Optional[int], duration: Optional[float],
          stress_s: float = STRESS_S, min_sample_s: float = common.MIN_SAMPLE_S,
          min_requests: Optional[int] = None, repeats: int = common.REPEATS,
          shared_model: bool = False) -> List[Dict[str, Any]]:
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
                    case.update(iterations=None if duration else n, duration=duration, scaling=True,
                                min_sample_s=min_sample_s, min_requests=min_requests, repeats=repeats)
                else:  # stress: a time budget, as the seeds
                    case.update(iterations=None, duration=stress_s)
                if shared_model:
                    case["shared_model"] = True
                out.append(case)
    return out


def run_chapter(backend, case: Dict[str, Any]) -> Dict[str, Any]:
    """Child side: run one case of the comprehensive suite."""
    chapter, mode, wl = case["chapter"], case["mode"], case["workload"]
    common.warm_up(backend, wl)
    keep = True  # every chapter checks that its outputs are there and sane
    if chapter == "throughput":
        r = common.measure(backend, wl, mode, case, keep=keep)
    else:
        r = common.run_threads(backend, wl, mode, case["threads"], iterations=case.get("iterations"),
                               duration=case.get("duration"), keep=keep,
                               shared_model=bool(case.get("shared_model")))
    return common.finish_case(backend, wl, r, keep,
                              against_reference=(chapter == "correctness"),
                              repeatable=(chapter == "thread_safety"))


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target: one case of the comprehensive suite, in a child process."""
    return common.run_case(case, run_chapter)


def comprehensive(device: Optional[str] = None, mode: Any = "all", *,
                  chapter: Any = None, threads: Any = (1, 2, 4, 8),
                  iterations: Optional[int] = None, duration: Optional[float] = None,
                  stress_s: Any = STRESS_S, min_sample_s: Any = common.MIN_SAMPLE_S,
                  min_requests: Optional[int] = None, repeats: Any = common.REPEATS,
                  shared_model: bool = False, torch_threads: Optional[int] = None,
                  retries: int = 2, json_path: Optional[str] = None, workloads: Any = None,
                  timeout: float = 600.0, progress: Any = sys.stderr, plot: bool = True,
                  model_options: Optional[Dict[str, Any]] = None) -> Report:
    """Run the comprehensive suite; return its :class:`~agxguard.lab.report.Report`.

    Options as for :func:`agxguard.lab.story`; ``chapter`` picks among
    correctness, thread_safety, throughput, stress, and ``workloads`` among small_mlp,
    matmul, large_transformer, medium_mlp (default the seeds' three: small_mlp, matmul,
    large_transformer). ``iterations`` replaces the seeds' 20 requests per thread;
    ``stress_s`` the seeds' 5 seconds per stress case. ``timeout`` (seconds per run,
    default 600) is long because the seeds' budgets are: on a 2-core CPU one
    large_transformer throughput run at 8 threads (160 requests, 3 samples) takes minutes.
    """
    device = common.resolve_device(device)
    modes = common.parse_modes(mode)
    chapters = common.parse_choice("chapter", chapter, CHAPTERS)
    names = common.parse_choice("workload", workloads if workloads is not None else DEFAULT_WORKLOADS,
                                WORKLOADS)
    o = common.parse_run_options(threads, iterations, duration, min_sample_s, min_requests, repeats,
                                 torch_threads, retries)
    stress = common.parse_positive("stress_s", stress_s, integer=False)
    thread_counts, iterations, duration, floor = o["threads"], o["iterations"], o["duration"], o["min_sample_s"]
    min_requests, repeats, torch_threads, retries = o["min_requests"], o["repeats"], o["torch_threads"], o["retries"]
    options = {"chapter": chapters, "workloads": names, "threads": thread_counts,
               "iterations": iterations or {w: default_iterations(device, w) for w in names},
               "stress_s": stress, "duration": duration, "min_sample_s": floor,
               "min_requests": min_requests, "repeats": repeats,
               "models": "shared" if shared_model else "one per thread",
               "torch_threads": torch_threads or "torch default",
               "retries": retries, "timeout": timeout}
    return common.run_suite(
        SUITE, device, modes,
        lambda m: cases(m, device=device, chapters=chapters, workloads=names,
                        threads=thread_counts, iterations=iterations, duration=duration,
                        stress_s=stress, min_sample_s=floor, min_requests=min_requests,
                        repeats=repeats, shared_model=shared_model),
        options, target=run_case, retries=retries, timeout=timeout, json_path=json_path, progress=progress,
        plot=plot, backend_options=common.backend_options(device, model_options, torch_threads),
        notes=[PROTECTION_NOTE])
