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
sum to the cycle. --bare runs it again with clients that only call the Batcher in a loop
(no latency bookkeeping), to show the benchmark client's own share of ``take``.

--ops times, on the device, each torch call a batch of fixed-length requests costs the
dispatcher (and offline batching), one at a time in a loop: the pinned allocation, the
concatenation into it (fresh or reused), the copy in, the forward, the copies back
(into a fresh pinned tensor, or ``.to("cpu", non_blocking=True)``), the event, the
split; and the offline loop's whole cycle beside them. Usage:

    python3 benchmarks/batcher_profile.py [--device cuda] [--clients 8] [--seconds 2]
        [--workloads story_transformer,small_mlp,story_var] [--bare] [--ops]
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def _timed(method: str, step: str) -> Any:
    """A TimedBatcher method that calls the Batcher's ``method`` and adds its time to
    ``step``."""
    inner = getattr(Batcher, method)

    def timed(self: Any, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(self, *args)
        finally:
            self._add(step, t)

    timed.__name__ = method
    return timed


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

    # the dispatcher's steps that are one Batcher method each, timed around the call
    _q_take = _timed("_q_take", "take")
    _q_take_ready = _timed("_q_take_ready", "take")
    _collate = _timed("_collate", "collate")
    _to_host = _timed("_to_host", "to_host")
    _record_event = _timed("_record_event", "to_host")
    _q_complete = _timed("_q_complete", "answer")

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


def bare_clients(work: Any, clients: int, seconds: float, call: Any) -> dict:
    """``clients`` threads calling ``call(x)`` in a plain loop for ``seconds``: no clock
    reads, no latency lists (serving.run_threads' bookkeeping left out)."""
    stop = threading.Event()
    counts = [0] * clients

    def client(i: int) -> None:
        xs, n, k = work.inputs, len(work.inputs), 0
        while not stop.is_set():
            call(xs[(i + k * clients) % n])
            k += 1
        counts[i] = k

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - t0
    return {"req_s": sum(counts) / wall}


def profile(work: Any, clients: int, seconds: float, bare: bool = False,
            spin_us: Any = None) -> dict:
    dev = work.device.type if work.device.type in ("cuda", "mps") else None
    kw = {"pad_dim": 1} if work.variable else {}
    if spin_us is not None:
        kw["spin_us"] = spin_us
    b = TimedBatcher(work.fn, max_batch=clients, max_delay_ms=2.0, max_queue=4096, device=dev,
                     name=work.name, **kw)
    try:
        serving.run_threads(work, clients, min(1.0, seconds), b)  # warm up
        b.reset_stats()
        for k in b.spent:
            b.spent[k] = 0.0
        t0 = time.perf_counter()
        if bare:
            out = bare_clients(work, clients, seconds, b)
        else:
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


class Spinners:
    """``n`` threads that spin (GIL released, in agxguard's C wait) as the Batcher's waiting
    callers do, on a Wakeup nobody sets, until stopped."""

    def __init__(self, n: int, spin_us: float = 2000.0):
        from agxguard import _C

        self.stop = threading.Event()
        w = _C.Wakeup(spin_us=spin_us)

        def spin() -> None:
            while not self.stop.is_set():
                w.wait(spin_us / 1e6)

        self.threads = [threading.Thread(target=spin, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def time_ops(work: Any, reps: int = 2000, rounds: int = 5) -> list:
    """(step, microseconds per call: median of ``rounds`` loops of ``reps``) for the torch
    calls of one batch of 8 fixed-length requests on ``work``'s device (cuda)."""
    import torch

    dev = work.device
    xs = work.inputs[:8]
    sizes = [x.shape[0] for x in xs]
    shape = (sum(sizes),) + tuple(xs[0].shape[1:])
    staging = torch.empty(shape, pin_memory=True)
    torch.cat(xs, 0, out=staging)
    d = staging.to(dev, non_blocking=True)
    out = work.fn(d)
    back = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    ev = torch.cuda.Event()
    ev.record()
    torch.cuda.synchronize()

    def offline_cycle() -> None:
        h = torch.empty(shape, pin_memory=True)
        torch.cat(xs, 0, out=h)
        o = work.fn(h.to(dev, non_blocking=True))
        b = torch.empty(o.shape, dtype=o.dtype, pin_memory=True)
        b.copy_(o, non_blocking=True)
        e = torch.cuda.Event()
        e.record()
        e.synchronize()
        b.split(sizes, 0)

    steps = [
        ("pinned alloc: torch.empty(pin_memory=True)", lambda: torch.empty(shape, pin_memory=True)),
        ("torch.cat(xs, out=reused pinned)", lambda: torch.cat(xs, 0, out=staging)),
        ("pinned alloc + cat (the Batcher's collate)",
         lambda: torch.cat(xs, 0, out=torch.empty(shape, pin_memory=True))),
        ("copy in: pinned.to(dev, non_blocking)", lambda: staging.to(dev, non_blocking=True)),
        ("forward fn(d)", lambda: work.fn(d)),
        ("copy back: pinned alloc + copy_(non_blocking)",
         lambda: torch.empty(out.shape, dtype=out.dtype, pin_memory=True).copy_(out, non_blocking=True)),
        ("copy back: reused pinned copy_(non_blocking)", lambda: back.copy_(out, non_blocking=True)),
        ("copy back: out.to('cpu', non_blocking)", lambda: out.to("cpu", non_blocking=True)),
        ("event: Event() + record()", lambda: torch.cuda.Event().record()),
        ("split: back.chunk(8)", lambda: back.chunk(8, 0)),
        ("split: back.unbind(0)", lambda: back.unbind(0)),
        ("offline cycle (sync, all of the above once)", offline_cycle),
        ("offline cycle, 8 other threads spinning", offline_cycle),
    ]
    rows = []
    for name, f in steps:
        spinners = Spinners(8) if "spinning" in name else None
        for _ in range(50):
            f()
        torch.cuda.synchronize()
        per = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                f()
            per.append((time.perf_counter() - t) / reps * 1e6)
            torch.cuda.synchronize()
        if spinners is not None:
            spinners.close()
        rows.append((name, statistics.median(per), min(per), max(per)))
    return rows


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--workloads", default="story_transformer,small_mlp,story_var")
    p.add_argument("--bare", action="store_true",
                   help="also profile with bare clients (no latency bookkeeping)")
    p.add_argument("--spin-us", default=None, metavar="LIST",
                   help="comma list of Batcher(spin_us=...) to profile (default: its default)")
    p.add_argument("--ops", action="store_true",
                   help="also time each torch call of a batch on the device (cuda only)")
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
    try:
        spins = [None] if a.spin_us is None else [float(v) for v in a.spin_us.split(",")]
    except ValueError:
        p.error(f"--spin-us must be a comma list of numbers, got {a.spin_us!r}")
    for w in names:
        work = serving.Work(w, a.device)
        for spin in spins:
            r = profile(work, a.clients, a.seconds, spin_us=spin)
            steps = r["steps_us"]
            other = r["cycle_us"] - sum(steps.values())
            label = w if spin is None else f"{w} spin {spin:g}"
            print(f"{label:18} {r['req_s']:8.0f} {r['mean_batch']:6.2f} {r['cycle_us']:8.1f} "
                  + " ".join(f"{steps[k]:8.1f}" for k in STEPS) + f" {other:8.1f}", flush=True)
        if a.bare:
            r = profile(work, a.clients, a.seconds, bare=True)
            steps = r["steps_us"]
            other = r["cycle_us"] - sum(steps.values())
            print(f"{w + ' (bare)':18} {r['req_s']:8.0f} {r['mean_batch']:6.2f} "
                  f"{r['cycle_us']:8.1f} " + " ".join(f"{steps[k]:8.1f}" for k in STEPS)
                  + f" {other:8.1f}", flush=True)
    if a.ops:
        if not a.device.startswith("cuda"):
            p.error("--ops needs --device cuda")
        for w in names:
            if w == "story_var":
                continue  # fixed-length batches only
            print(f"\n{w}: one call at a time, microseconds per call (median [min-max] of 5 "
                  f"loops of 2000)")
            for name, med, lo, hi in time_ops(serving.Work(w, a.device)):
                print(f"  {name:48} {med:8.1f} [{lo:.1f}-{hi:.1f}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
