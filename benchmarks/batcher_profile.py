"""Where a Batcher's time goes per batch: the dispatcher's steps, timed in its own thread.

N closed-loop client threads call one Batcher (max_batch=N) with the workloads of
benchmarks/serving.py (CPU requests in, CPU answers out); a subclass of the Batcher times
each step of its dispatcher with time.perf_counter and reports the mean per batch:

    take        in RequestQueue._q_take: from asking for the next batch to having it, i.e.
                the time the clients need after their answers to queue the next batch
                (waking, taking the GIL back, their own Python, the C call); the
                dispatcher waits with the GIL released
    collate     the batch into pinned host memory and its host-to-device copy launched
    fn          the model's forward (launching its kernels)
    to_host     the device-to-host copies launched and the completion event recorded
    split       cutting the outputs into one answer per request (and the rest of _launch)
    sync        waiting for the completion event (the device's remaining work)
    answer      RequestQueue._q_complete: every caller's answer set and woken

and the cycle (wall time / batches) beside it; the steps and the Python between them
sum to the cycle. Usage:

    python3 benchmarks/batcher_profile.py [--device cuda] [--clients 8] [--seconds 2]
        [--workloads story_transformer,small_mlp,story_var]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import serving  # noqa: E402  (the workloads and client loop of the serving benchmark)
from agxguard.batcher import Batcher  # noqa: E402

STEPS = ("take", "collate", "fn", "to_host", "split", "sync", "answer")


class TimedBatcher(Batcher):
    """A Batcher whose dispatcher adds each step's time to ``self.spent`` (seconds)."""

    def __init__(self, fn: Any, **kw: Any):
        self.spent = dict.fromkeys(STEPS, 0.0)
        self._fn_time = 0.0

        def timed_fn(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._fn_time += time.perf_counter() - t

        super().__init__(timed_fn, **kw)

    def _add(self, step: str, t0: float) -> None:
        self.spent[step] += time.perf_counter() - t0

    def _q_take(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return super()._q_take(*args)
        finally:
            self._add("take", t)

    def _q_take_ready(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return super()._q_take_ready(*args)
        finally:
            self._add("take", t)

    def _collate(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return super()._collate(*args)
        finally:
            self._add("collate", t)

    def _to_host(self, t_: Any) -> Any:
        t = time.perf_counter()
        try:
            return super()._to_host(t_)
        finally:
            self._add("to_host", t)

    def _record_event(self) -> Any:
        t = time.perf_counter()
        try:
            return super()._record_event()
        finally:
            self._add("to_host", t)

    def _launch(self, *args: Any) -> Any:
        t = time.perf_counter()
        before = dict(self.spent)
        fn0 = self._fn_time
        try:
            return super()._launch(*args)
        finally:
            total = time.perf_counter() - t
            inner = sum(self.spent[k] - before[k] for k in ("collate", "to_host"))
            fn = self._fn_time - fn0
            self.spent["fn"] += fn
            self.spent["split"] += total - inner - fn

    def _q_complete(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return super()._q_complete(*args)
        finally:
            self._add("answer", t)

    def _complete(self, flight: Any) -> None:
        if flight.event is not None and flight.error is None:
            t = time.perf_counter()
            try:
                flight.event.synchronize()
            except BaseException as exc:  # the real _complete hands it to the callers
                flight.error = exc
            self._add("sync", t)
            flight.event = None
        super()._complete(flight)


def profile(work: Any, clients: int, seconds: float) -> dict:
    dev = work.device.type if work.device.type in ("cuda", "mps") else None
    kw = {"pad_dim": 1} if work.variable else {}
    b = TimedBatcher(work.fn, max_batch=clients, max_delay_ms=2.0, max_queue=4096, device=dev,
                     name=work.name, **kw)
    try:
        serving.run_threads(work, clients, min(1.0, seconds), b)  # warm up
        b.reset_stats()
        for k in b.spent:
            b.spent[k] = 0.0
        t0 = time.perf_counter()
        out = serving.run_threads(work, clients, seconds, b)
        wall = time.perf_counter() - t0
        s = b.stats()
        spent = dict(b.spent)
    finally:
        b.close(timeout=60)
    # run_threads warms up for min(0.5, seconds/2) before it measures; the step times
    # cover that too, so they are per batch over every batch since the reset
    batches = max(1, s["batches"])
    per = {k: 1e6 * v / batches for k, v in spent.items()}
    return {"req_s": out["req_s"], "mean_batch": s["mean_batch_size"],
            "cycle_us": 1e6 * wall / batches, "steps_us": per}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--workloads", default="story_transformer,small_mlp,story_var")
    a = p.parse_args(argv)
    names = [w for w in a.workloads.split(",") if w]
    bad = [w for w in names if w not in serving.WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; allowed: {', '.join(serving.WORKLOADS)}")
    print(f"Batcher per-batch profile: {a.clients} client threads, max_batch {a.clients}, "
          f"device {a.device}; {serving.machine()}; microseconds per batch (mean)")
    print(f"{'workload':18} {'req/s':>8} {'batch':>6} {'cycle':>8} "
          + " ".join(f"{k:>8}" for k in STEPS) + f" {'other':>8}")
    threading.current_thread().name = "profile-main"
    for w in names:
        work = serving.Work(w, a.device)
        r = profile(work, a.clients, a.seconds)
        steps = r["steps_us"]
        other = r["cycle_us"] - sum(steps.values())
        print(f"{w:18} {r['req_s']:8.0f} {r['mean_batch']:6.2f} {r['cycle_us']:8.1f} "
              + " ".join(f"{steps[k]:8.1f}" for k in STEPS) + f" {other:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
