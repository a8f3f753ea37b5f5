"""Per-request overhead of agxguard's Batcher against offline batching, on the CPU.

One run measures, side by side, for each emulated batch function ``fn``:

    offline   1 thread calling fn on a ready-made batch of N requests, in a loop
    batcher   N client threads, each calling ``batcher(x)`` with one request in a loop
              (max_batch=N, so every batch waits for all N clients: a closed loop)

and reports requests/s, the ratio batcher/offline, and the overhead per request in
microseconds: (1 / batcher req/s - 1 / offline req/s). That overhead is everything the
Batcher adds: the client call, queueing, waking the dispatcher, torch.cat, splitting the
output, waking each client, and the GIL handoffs between the N + 1 threads.

The functions emulate a GPU batch without a GPU:

    sleep300us  time.sleep(300e-6): releases the GIL for a fixed time, as a device sync
                does (a story_transformer batch of 8 on an H200 takes about 520 us)
    sleep50us   time.sleep(50e-6) (small_mlp's batch of 8 on an H200 takes about 50 us;
                Linux timer slack makes it ~100 us here)
    zero        returns its input: the pure cost of batching

It also measures the floor of this closed loop on Python threads: the same N clients and
one dispatcher exchanging bare ``_thread`` locks, with no torch and no Batcher code.

``--pin-cpus 0`` also measures the current Batcher with ``pin_cpus={0}`` (its dispatcher
and client threads on one CPU). Each Batcher's client threads are fresh threads.

``--baseline REV`` also measures ``agxguard/batcher.py`` as it was at git revision REV
(loaded from ``git show``) in the same run, so before/after figures come from one run
on one machine. torch runs with one intra-op thread so that it does not compete with
the client threads for the cores.

Usage:
    python3 benchmarks/batcher_overhead.py [--clients 8] [--duration 1.0] [--repeats 3]
        [--fns sleep300us,sleep50us,zero] [--baseline REV ...] [--baseline-file PATH ...]
        [--pin-cpus 0] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_batcher_module(path: str, name: str) -> Any:
    """Import a batcher.py by path, as a module of the agxguard package (so its
    relative imports, e.g. ``._affinity``, resolve against the installed tree)."""
    sys.path.insert(0, ROOT)
    import agxguard  # noqa: F401  (the parent package of the module made below)
    spec = importlib.util.spec_from_file_location(f"agxguard.{name}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "agxguard"
    spec.loader.exec_module(module)
    return module


def baseline_module(rev: str) -> Any:
    """agxguard/batcher.py as of git revision ``rev``."""
    text = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:agxguard/batcher.py"],
                          capture_output=True, text=True, check=True).stdout
    fd, path = tempfile.mkstemp(suffix="_batcher.py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        return load_batcher_module(path, f"batcher_at_{rev.replace('~', '_').replace('^', '_')}")
    finally:
        os.unlink(path)


def make_fns() -> Dict[str, Callable[[Any], Any]]:
    sleep = time.sleep

    def sleep300us(x: Any) -> Any:
        sleep(300e-6)
        return x

    def sleep50us(x: Any) -> Any:
        sleep(50e-6)
        return x

    def zero(x: Any) -> Any:
        return x

    return {"sleep300us": sleep300us, "sleep50us": sleep50us, "zero": zero}


def timed_threads(n: int, step_for: Callable[[int], Callable[[], Any]], duration: float,
                  warmup: int) -> tuple:
    """Run step_for(i)() in n threads for ``duration`` s after a barrier; (calls, seconds)."""
    barrier = threading.Barrier(n + 1)
    stop = threading.Event()
    counts = [0] * n
    ends = [0.0] * n
    errors: List[BaseException] = []

    def worker(i: int) -> None:
        try:
            step = step_for(i)
            for _ in range(warmup):
                step()
            barrier.wait()
            k = 0
            is_set = stop.is_set
            while not is_set():
                step()
                k += 1
            ends[i] = time.perf_counter()
            counts[i] = k
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    stop.wait(duration)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts), max(ends) - t0


def measure_floor(n: int, duration: float) -> Dict[str, Any]:
    """The same closed loop with nothing but _thread locks: n clients each announce a
    request under a mutex (the last one wakes the dispatcher) and block on their own lock;
    the dispatcher releases all n. What any design on Python threads pays per request in
    wake-ups and GIL handoffs, with no torch and no Batcher code."""
    import _thread

    locks = [_thread.allocate_lock() for _ in range(n)]
    for lk in locks:
        lk.acquire()
    wake = _thread.allocate_lock()
    wake.acquire()
    mutex = _thread.allocate_lock()
    state = {"arrived": 0, "stop": False, "cycles": 0}

    def client(i: int) -> None:
        mine = locks[i]
        while not state["stop"]:
            with mutex:
                state["arrived"] += 1
                if state["arrived"] == n:
                    state["arrived"] = 0
                    wake.release()
            mine.acquire()

    def dispatcher() -> None:
        while True:
            wake.acquire()
            state["cycles"] += 1
            for lk in locks:
                lk.release()
            if state["stop"]:
                return

    threads = [threading.Thread(target=dispatcher, daemon=True)]
    threads += [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    c0, t0 = state["cycles"], time.perf_counter()
    time.sleep(duration)
    c1, t1 = state["cycles"], time.perf_counter()
    state["stop"] = True
    for t in threads:
        t.join(1.0)  # daemon threads: a straggler cannot hang the run
    return {"req_s": (c1 - c0) * n / (t1 - t0)}


def measure_offline(fn: Callable[[Any], Any], xb: Any, n: int, duration: float) -> Dict[str, Any]:
    calls, secs = timed_threads(1, lambda i: (lambda: fn(xb)), duration, warmup=20)
    return {"req_s": calls * n / secs, "batch_us": 1e6 * secs / calls}


def measure_batcher(module: Any, fn: Callable[[Any], Any], xs: List[Any], n: int,
                    duration: float, delay_ms: float, **kwargs: Any) -> Dict[str, Any]:
    b = module.Batcher(fn, max_batch=n, max_delay_ms=delay_ms, name="overhead", **kwargs)
    try:
        def step_for(i: int) -> Callable[[], Any]:
            x = xs[i]
            return lambda: b(x)

        timed_threads(n, step_for, 0.1, warmup=20)  # warm up, then measure afresh
        b.reset_stats()
        calls, secs = timed_threads(n, step_for, duration, warmup=0)
        st = b.stats()
    finally:
        b.close()
    return {"req_s": calls / secs, "mean_batch": st["mean_batch_size"],
            "p50_ms": st["latency_p50_ms"], "p99_ms": st["latency_p99_ms"]}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="client threads = max_batch (default 8)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per point (default 1.0)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats; median reported")
    p.add_argument("--fns", default="sleep300us,sleep50us,zero", help="comma list of emulated fns")
    p.add_argument("--delay-ms", type=float, default=2.0, help="Batcher max_delay_ms (default 2.0)")
    p.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--features", type=int, default=256, help="features per row (default 256)")
    p.add_argument("--baseline", action="append", default=[], metavar="REV",
                   help="also measure agxguard/batcher.py as of this git revision (repeatable)")
    p.add_argument("--baseline-file", action="append", default=[], metavar="PATH",
                   help="also measure this copy of batcher.py (repeatable)")
    p.add_argument("--pin-cpus", default=None, metavar="CPUS",
                   help="also measure the current Batcher with pin_cpus set to these CPUs, e.g. 0")
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    fns = make_fns()
    names = [f.strip() for f in a.fns.split(",") if f.strip()]
    bad = [f for f in names if f not in fns]
    if bad:
        p.error(f"unknown fn(s) {', '.join(bad)}; allowed: {', '.join(fns)}")
    impls = {"current": load_batcher_module(os.path.join(ROOT, "agxguard", "batcher.py"),
                                            "batcher_current")}
    if a.baseline:
        impls = {**{f"at {rev}": baseline_module(rev) for rev in a.baseline}, **impls}
    if a.baseline_file:
        impls = {**{os.path.basename(path): load_batcher_module(path, f"batcher_file_{k}")
                    for k, path in enumerate(a.baseline_file)}, **impls}
    pinned = None
    if a.pin_cpus:
        pinned = {int(c) for c in a.pin_cpus.split(",")}
        impls[f"current pin_cpus={a.pin_cpus}"] = impls["current"]
    n = a.clients
    xs = [torch.randn(a.rows, a.features) for _ in range(n)]
    xb = torch.cat(xs, 0)

    print(f"Batcher overhead: {n} clients, max_batch {n}, max_delay_ms {a.delay_ms}, request "
          f"({a.rows}, {a.features}) float32; {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, torch {torch.__version__}; {a.duration} s x "
          f"{a.repeats} repeats, medians", flush=True)
    runs: Dict[tuple, List[Dict[str, Any]]] = {}
    for _ in range(a.repeats):
        runs.setdefault(("floor", ""), []).append(measure_floor(n, a.duration))
        for fname in names:
            fn = fns[fname]
            runs.setdefault((fname, "offline"), []).append(measure_offline(fn, xb, n, a.duration))
            for label, mod in impls.items():
                kw = {"pin_cpus": pinned} if label.startswith("current pin_cpus") else {}
                runs.setdefault((fname, label), []).append(
                    measure_batcher(mod, fn, xs, n, a.duration, a.delay_ms, **kw))

    def med(rs: List[Dict[str, Any]], k: str) -> Any:
        vals = [r[k] for r in rs if r.get(k) is not None]
        return statistics.median(vals) if vals else None

    rows = []
    print(f"\n{'fn':<11} {'config':<22} {'req/s':>10} {'x offline':>10} {'us/req over':>12} "
          f"{'us/batch over':>14} {'mean batch':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for fname in names:
        off = med(runs[(fname, "offline")], "req_s")
        print(f"{fname:<11} {'offline batch of ' + str(n):<22} {off:>10,.0f} {1.0:>10.2f} {0.0:>12.1f} "
              f"{0.0:>14.1f}   (batch takes {med(runs[(fname, 'offline')], 'batch_us'):.0f} us)")
        rows.append({"fn": fname, "config": "offline", "req_s": off,
                     "runs": [r["req_s"] for r in runs[(fname, "offline")]]})
        for label in impls:
            rs = runs[(fname, label)]
            rate = med(rs, "req_s")
            over = 1e6 * (1.0 / rate - 1.0 / off)
            row = {"fn": fname, "config": f"batcher {label}", "req_s": rate, "ratio": rate / off,
                   "overhead_us_per_request": over, "overhead_us_per_batch": over * n,
                   "mean_batch": med(rs, "mean_batch"), "p50_ms": med(rs, "p50_ms"),
                   "p99_ms": med(rs, "p99_ms"), "runs": [r["req_s"] for r in rs]}
            rows.append(row)
            print(f"{'':<11} {'batcher ' + label:<22} {rate:>10,.0f} {rate / off:>10.2f} {over:>12.1f} "
                  f"{over * n:>14.1f} {row['mean_batch'] or 0:>11.2f} {row['p50_ms'] or 0:>8.3f} "
                  f"{row['p99_ms'] or 0:>8.3f}")
    fl = med(runs[("floor", "")], "req_s")
    print(f"\nthreads floor (bare _thread locks, {n} clients + 1 dispatcher, no torch): {fl:,.0f} req/s "
          f"= {1e6 / fl:.1f} us per request of wake-ups and GIL handoffs")
    rows.append({"fn": None, "config": "threads floor", "req_s": fl, "us_per_request": 1e6 / fl,
                 "runs": [r["req_s"] for r in runs[("floor", "")]]})
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "batcher_overhead", "options": vars(a), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
