"""Efficiency vs threads, side by side, for every way of running GPU work from threads.

One run measures, on the same models (agxguard.lab.workloads) and the same device:

    free        N threads, no lock                     (one model per thread)
    lock        N threads, one threading.Lock around each request
    semaphore2  N threads, threading.Semaphore(2) around each request
    op          N threads, agxguard mode "op": every torch op under the op lock
                (``with agxguard.ops():`` entered in each worker thread)
    op_dispatch  mode "op" through ``agxguard.ops(level="dispatch")``: the lock per ATen
                operator at torch's Python dispatch key (fused operators stay fused)
    ops_unlocked  the same function mode in mode "off" (it takes no lock): what the mode
                itself costs, apart from locking (on cuda it also turns off torch's fused
                transformer path, which mps never takes)
    stream      N threads, mode "stream", ``with agxguard.guard():`` around each request
    global      N threads, mode "global", ``with agxguard.guard():`` around each request
    batcher     N client threads calling one agxguard Batcher (max_batch=N)
    batcher_nospin  the same with Batcher(spin_us=0): waits sleep at once, as on _thread locks
    offline     1 thread running a batch of N requests per call

A request is one forward pass of the workload's per-request input followed by a sync
of the thread's stream (cuda) or the device (mps): the seeds' method. A workload
written ``NAME@server`` runs the server pattern instead: the request starts on the
host, and copying it to the device, the forward pass and a synchronous copy of the
result back to the host all run inside the region (or lock).

``global@VARIANT`` runs ``global`` with another way for Python waiters to wait, to
compare them with threading.Lock in one run: VARIANT is a wait (watch, grace, direct:
agxguard._model._set_region_wait) and/or modifiers joined by '+': noseat (no heir seat),
noclaim (no claim: only the op lock's heir claims, so this changes op mode only),
nospin (the heir does not spin), e.g. grace+noseat.

Throughput is requests completed per second, speedup is against 1 free thread, efficiency is
speedup / threads (offline batching runs 1 thread). Latency percentiles are per request
(per call for offline).

On cuda and cpu each worker thread gets its own stream (a torch.cuda.Stream, or an
agxguard stream key on cpu), so ``stream`` mode protects per stream as designed; on mps
all threads share torch's one command queue. --streams shared changes that.

It ends with the issue's targets as PASS/FAIL lines, writes every raw figure to JSON
(default benchmarks/results/efficiency_<device>.json) and a PNG plot beside it when
matplotlib is installed.

Usage:
    python3 benchmarks/efficiency.py [--device cuda] [--workloads small_mlp,matmul]
        [--threads 1,2,4,8] [--duration 1.0 | --iterations 50] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _paired import bootstrap_ci, total_ratio  # noqa: E402

try:  # the package with its C core
    import agxguard  # noqa: E402
    from agxguard.lab import workloads as W  # noqa: E402
    from agxguard.batcher import Batcher  # noqa: E402
    AGX_ERROR: Optional[str] = None
except ImportError as exc:  # not built: measure what does not need the C core
    agxguard = None
    AGX_ERROR = f"agxguard could not be imported ({exc}); build it with " \
                f"`python3 setup.py build_ext --inplace`"

    def _load(name: str, filename: str) -> Any:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "agxguard", filename))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    W = _load("agxguard_workloads", os.path.join("lab", "workloads.py"))
    Batcher = _load("agxguard_batcher", "batcher.py").Batcher

DEFAULT_WORKLOADS = ("small_mlp", "story_transformer", "large_transformer", "medium_mlp", "matmul")
THREAD_CONFIGS = ("free", "lock", "semaphore2", "op", "op_dispatch", "ops_unlocked", "stream", "global")
MODE_CONFIGS = ("op", "stream", "global")
BATCHER_CONFIGS = ("batcher", "batcher_nospin")
CONFIGS = THREAD_CONFIGS + BATCHER_CONFIGS + ("offline",)
GLOBAL_WAITS = ("watch", "grace", "direct")
GLOBAL_MODIFIERS = ("noseat", "noclaim", "nospin")
PATTERNS = ("seeds", "server")
# the configs --slice interleaves: their worker threads hold the same context (the stream)
INTERLEAVABLE = ("free", "lock", "semaphore2", "stream", "global")


def split_workload(w: str) -> tuple:
    """'NAME' -> (NAME, 'seeds'); 'NAME@server' -> (NAME, 'server')."""
    name, _, pattern = w.partition("@")
    return name, pattern or "seeds"


def base_config(c: str) -> str:
    """'global@grace' -> 'global'."""
    return c.partition("@")[0]


def describe(w: str) -> str:
    name, pattern = split_workload(w)
    text = W.DESCRIPTIONS[name]
    return text + ("; server pattern: host input copied in, result copied back, inside the region"
                   if pattern == "server" else "")
TARGET_N = 8  # the issue states its targets at 8 threads


def log(msg: str) -> None:
    """Progress on stdout, flushed so a remote run shows it as it goes."""
    print(msg, flush=True)


# ---------------------------------------------------------------- options

def parse_int_list(text: str) -> List[int]:
    """'1,2,4,8' or '1-8' (or a mix) -> sorted unique ints >= 1."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be ints >= 1, got {text!r}")
    return sorted(out)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best present)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma list from {', '.join(W.WORKLOADS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list from {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=parse_int_list, default=None,
                   help="thread counts, e.g. 1,2,4,8 or 1-8 (default 1,2,4,8; --quick 1,8)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per measurement (default 1.0; --quick 0.25)")
    p.add_argument("--iterations", type=int, default=None,
                   help="requests per thread per measurement instead of --duration")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests per thread (default 3; --quick 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every point this many times, round robin; report the median")
    p.add_argument("--batcher-delay-ms", type=float, default=2.0, help="Batcher max_delay_ms")
    p.add_argument("--batcher-spin-us", type=float, default=None,
                   help="Batcher spin_us for the batcher config (default: the Batcher's default)")
    p.add_argument("--batcher-pin-cpus", default=None, metavar="CPUS",
                   help="pin the Batcher's dispatcher and client threads to these CPUs, e.g. 0 "
                        "(Batcher(pin_cpus=...); Linux)")
    p.add_argument("--op-pin-cpus", default=None, metavar="CPUS",
                   help="op config: agxguard.ops(pin_cpus=...) in each worker, e.g. 0 (Linux)")
    p.add_argument("--heir-seat", choices=("on", "off"), default="on",
                   help="off: every Python waiter watches a contended lock (measuring what the "
                        "heir seat buys; agxguard._model._set_heir_seat)")
    p.add_argument("--batcher-guard", default=None, metavar="MODE",
                   help="run the Batcher's batches inside agxguard.guard() in this mode")
    p.add_argument("--streams", choices=("auto", "per-thread", "shared"), default="auto",
                   help="per-thread streams (auto: cuda and cpu) or all threads on one")
    p.add_argument("--slice", type=float, default=None, metavar="SECONDS",
                   help="interleave: one pool of threads runs the thread configs (free, lock, "
                        "semaphore2, stream, global, global@...) in turn, SECONDS each, --repeats "
                        "rounds, the order reversed every other round; each round's ratios compare "
                        "slices measured seconds apart, so a machine whose speed drifts (shared "
                        "hosts) moves both sides of a ratio alike")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/efficiency_<device>.json)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quick", action="store_true", help="short run: threads 1,8, 0.25 s per point")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    a = p.parse_args(argv)
    for flag in ("batcher_pin_cpus", "op_pin_cpus"):
        text = getattr(a, flag)
        if text is None:
            continue
        name = "--" + flag.replace("_", "-")
        try:
            cpus = sorted({int(c) for c in text.split(",") if c.strip()})
        except ValueError:
            p.error(f"{name} takes CPU numbers like 0 or 0,1, not {text!r}")
        if not cpus or min(cpus) < 0:
            p.error(f"{name} takes CPU numbers >= 0, like 0 or 0,1")
        setattr(a, flag, cpus)

    if a.threads is None:
        a.threads = [1, 8] if a.quick else [1, 2, 4, 8]
    if a.duration is None:
        a.duration = 0.25 if a.quick else 1.0
    if a.warmup is None:
        a.warmup = 1 if a.quick else 3
    if a.slice is not None and a.slice <= 0:
        p.error(f"--slice must be > 0 seconds, not {a.slice}")
    if a.duration <= 0 or (a.iterations is not None and a.iterations < 1) or a.warmup < 0 or a.repeats < 1:
        p.error("--duration must be > 0, --iterations >= 1, --warmup >= 0, --repeats >= 1")
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if split_workload(w)[0] not in W.WORKLOADS or split_workload(w)[1] not in PATTERNS]
    if bad:
        p.error(f"unknown workload(s) {', '.join(bad)}; allowed: {', '.join(W.WORKLOADS)}, "
                f"each optionally with @{' or @'.join(PATTERNS)}")
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.configs if c not in CONFIGS and not (
        base_config(c) == "global" and all(v in GLOBAL_WAITS + GLOBAL_MODIFIERS for v in c.partition("@")[2].split("+")))]
    if bad:
        p.error(f"unknown config(s) {', '.join(bad)}; allowed: {', '.join(CONFIGS)}, "
                f"global@VARIANT ('+'-joined from {', '.join(GLOBAL_WAITS + GLOBAL_MODIFIERS)})")
    if a.device is None:
        a.device = W.best_device()
    try:
        a.torch_device = W._check_device(a.device)
        a.torch_dtype = W._check_dtype(a.dtype)
    except ValueError as exc:
        p.error(str(exc))
    if a.batcher_guard is not None and agxguard is None:
        p.error(f"--batcher-guard needs agxguard: {AGX_ERROR}")
    if a.batcher_guard is not None and a.batcher_guard not in agxguard.MODES:
        p.error(f"unknown mode {a.batcher_guard!r}; allowed: {', '.join(agxguard.MODES)}")
    if a.streams == "auto":
        a.streams = "shared" if a.torch_device.type == "mps" else "per-thread"
    kind = a.torch_device.type
    if a.json is None:
        a.json = os.path.join(HERE, "results", f"efficiency_{kind}.json")
    return a


# ---------------------------------------------------------------- measuring

class Measurement:
    """What one point of the run produced: counts, wall time, per-request latencies."""

    def __init__(self, requests: int, elapsed: float, latencies: List[float],
                 per_thread: Optional[List[int]] = None):
        self.requests = requests
        self.elapsed = elapsed
        self.latencies = latencies
        self.per_thread = per_thread or []  # requests each thread completed

    @property
    def throughput(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0


def run_threads(n: int, make_step: Callable[[int], Callable[[], Any]],
                thread_context: Callable[[int], Any], opts: argparse.Namespace,
                requests_per_step: int = 1,
                barrier_action: Optional[Callable[[], None]] = None) -> Measurement:
    """Run ``make_step(i)()`` in n threads: warm up, start together, stop together.

    Each thread enters ``thread_context(i)`` for its whole life, builds its step inside
    it, runs --warmup untimed steps, waits at a barrier, then runs timed steps until
    --duration has passed (or --iterations steps). Wall time runs from the barrier to
    the last thread's last step.
    """
    barrier = threading.Barrier(n + 1, action=barrier_action)
    stop = threading.Event()
    counts = [0] * n
    ends = [0.0] * n
    lats: List[List[float]] = [[] for _ in range(n)]
    errors: List[BaseException] = []
    iterations = opts.iterations

    def worker(i: int) -> None:
        try:
            with thread_context(i):
                step = make_step(i)
                for _ in range(opts.warmup):
                    step()
                barrier.wait()
                pc = time.perf_counter
                lat = lats[i]
                k = 0
                if iterations is not None:
                    for _ in range(iterations):
                        t0 = pc()
                        step()
                        lat.append(pc() - t0)
                    k = iterations
                else:
                    while not stop.is_set():
                        t0 = pc()
                        step()
                        lat.append(pc() - t0)
                        k += 1
                ends[i] = pc()
                counts[i] = k
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), name=f"bench-{i}") for i in range(n)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    try:
        barrier.wait()
        t_start = time.perf_counter()
        if iterations is None:
            stop.wait(opts.duration)  # a timer: workers stop when it is set
    except threading.BrokenBarrierError:
        pass
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = max(ends) - t_start
    latencies = [v for lat in lats for v in lat]
    return Measurement(sum(counts) * requests_per_step, elapsed, latencies, list(counts))


class Bench:
    """The models of one workload on the device, and how to measure each config on them."""

    def __init__(self, name: str, opts: argparse.Namespace, max_threads: int):
        import torch

        self.torch = torch
        name, self.pattern = split_workload(name)
        self.name = name
        self.opts = opts
        self.device = opts.torch_device
        # One model per thread, as in the table (same weights, own copy).
        self.models = [W.build(name, self.device, opts.torch_dtype, seed=0) for _ in range(max_threads)]
        self.inputs = [m.make_input(seed=i + 1) for i, m in enumerate(self.models)]
        self.host_inputs = [x.cpu() for x in self.inputs]  # the server pattern's requests
        self.batched_inputs: Dict[int, Any] = {}
        for m, x in zip(self.models, self.inputs):
            m.model(x)
        W.sync(self.device)

    # -- per-thread pieces
    def thread_sync(self) -> Callable[[], None]:
        """The per-request sync for the calling thread: its cuda stream, the mps device."""
        kind = self.device.type
        if kind == "cuda":
            return self.torch.cuda.current_stream(self.device).synchronize
        if kind == "mps":
            return self.torch.mps.synchronize
        return lambda: None

    def thread_context(self, i: int, config: str) -> Any:
        """What a worker thread holds for its whole life: its stream, the op mode."""
        stack = contextlib.ExitStack()
        if self.opts.streams == "per-thread":
            if self.device.type == "cuda":
                stack.enter_context(self.torch.cuda.stream(self.torch.cuda.Stream(self.device)))
            elif agxguard is not None:
                stack.enter_context(agxguard.use_stream(i + 1))
        if config in ("op", "op_dispatch", "ops_unlocked"):
            stack.enter_context(agxguard.ops(pin_cpus=set(self.opts.op_pin_cpus)
                                             if self.opts.op_pin_cpus else None,
                                             level="dispatch" if config == "op_dispatch" else "function"))
        return stack

    def make_step(self, i: int, config: str) -> Callable[[], None]:
        """One request of worker i under ``config``'s protection."""
        model = self.models[i].model
        x = self.inputs[i]
        sync = self.thread_sync()
        if self.pattern == "server":
            return self._make_server_step(i, config)

        def plain() -> None:
            model(x)
            sync()

        if config in ("free", "op", "op_dispatch", "ops_unlocked"):
            return plain
        if config == "lock":
            region: Any = self._lock
        elif config == "semaphore2":
            region = self._semaphore
        else:  # stream, global: an agxguard region per request
            guard = agxguard.guard

            def guarded() -> None:
                with guard():
                    model(x)
                    sync()

            return guarded

        def locked() -> None:
            with region:
                model(x)
                sync()

        return locked

    def _make_server_step(self, i: int, config: str) -> Callable[[], None]:
        """The server pattern: copy the request in, run, copy the result back
        (synchronous), all inside the region."""
        model = self.models[i].model
        xh = self.host_inputs[i]
        device, dtype = self.device, self.opts.torch_dtype

        def serve() -> Any:
            y = model(xh.to(device=device, dtype=dtype))
            return y.cpu() if hasattr(y, "cpu") else y

        if config in ("free", "op", "op_dispatch", "ops_unlocked"):
            return serve
        if config == "lock" or config == "semaphore2":
            region: Any = self._lock if config == "lock" else self._semaphore

            def locked() -> None:
                with region:
                    serve()

            return locked
        guard = agxguard.guard

        def guarded() -> None:
            with guard():
                serve()

        return guarded

    # -- configs
    def measure(self, config: str, n: int) -> Dict[str, Any]:
        """Measure ``config`` at n threads (clients, or batch size for offline)."""
        extra: Dict[str, Any] = {}
        if base_config(config) in THREAD_CONFIGS:
            self._lock = threading.Lock()
            self._semaphore = threading.Semaphore(2)
            if agxguard is not None:
                apply_config(config)
                agxguard.reset_stats()
                wait_counts(True)
            try:
                m = run_threads(n, lambda i: self.make_step(i, config),
                                lambda i: self.thread_context(i, config), self.opts)
            finally:
                if agxguard is not None:
                    set_variant(None)
            if agxguard is not None and base_config(config) == "global":
                extra["lock_stats"] = global_lock_stats()
            threads, batch = n, 1
        elif config == "offline":
            if n not in self.batched_inputs:
                self.batched_inputs[n] = self.models[0].make_input(batch=n, seed=1)
            xb = self.batched_inputs[n]
            model = self.models[0].model
            device = self.device

            def offline_step() -> None:
                model(xb)
                W.sync(device)

            m = run_threads(1, lambda i: offline_step, lambda i: contextlib.nullcontext(),
                            self.opts, requests_per_step=n)
            threads, batch = 1, n
        else:  # batcher, batcher_nospin
            model = self.models[0].model
            device = self.device

            def fn(x: Any) -> Any:
                y = model(x)
                W.sync(device)
                return y

            guard = False
            if self.opts.batcher_guard is not None:
                agxguard.set_mode(self.opts.batcher_guard)
                guard = True
            pin = set(self.opts.batcher_pin_cpus) if self.opts.batcher_pin_cpus else None
            spin: Dict[str, float] = {}
            if config == "batcher_nospin":
                spin["spin_us"] = 0.0
            elif self.opts.batcher_spin_us is not None:
                spin["spin_us"] = self.opts.batcher_spin_us
            b = Batcher(fn, max_batch=n, max_delay_ms=self.opts.batcher_delay_ms,
                        max_queue=max(1024, 4 * n), guard=guard, name=f"bench-{self.name}", pin_cpus=pin,
                        **spin)
            try:
                def client_step(i: int) -> Callable[[], None]:
                    x = self.inputs[i]
                    return lambda: b(x)

                m = run_threads(n, client_step, lambda i: contextlib.nullcontext(), self.opts,
                                barrier_action=b.reset_stats)
                extra["batcher"] = b.stats()
                extra["batcher"].update(max_batch=n, max_delay_ms=self.opts.batcher_delay_ms,
                                        guard_mode=self.opts.batcher_guard, spin_us=b.spin_us,
                                        pin_cpus=sorted(pin) if pin else None)
            finally:
                b.close()
            threads, batch = n, 1
        return dict(requests=m.requests, elapsed_s=m.elapsed, throughput=m.throughput,
                    threads=threads, batch=batch, latencies=m.latencies, per_thread=m.per_thread, **extra)

    def measure_interleaved(self, configs: List[str], n: int, rounds: int,
                            on_slice: Callable[[int, str, Dict[str, Any]], None]) -> Dict[str, List[Dict[str, Any]]]:
        """--slice: n threads, built once, run every config in ``configs`` for one slice
        in turn, ``rounds`` times (odd rounds in reverse order). Returns each config's
        slices in round order, shaped as measure()'s results."""
        self._lock = threading.Lock()
        self._semaphore = threading.Semaphore(2)
        slice_s = self.opts.slice
        start, end = threading.Barrier(n + 1), threading.Barrier(n + 1)
        stop = threading.Event()
        state: Dict[str, Any] = {"config": None, "quit": False}
        counts = [0] * n
        lats: List[List[float]] = [[] for _ in range(n)]
        errors: List[BaseException] = []

        def worker(i: int) -> None:
            try:
                with self.thread_context(i, configs[0]):  # the same for every interleavable config
                    steps = {c: self.make_step(i, c) for c in configs}
                    while True:
                        start.wait()
                        if state["quit"]:
                            return
                        step, lat, pc = steps[state["config"]], lats[i], time.perf_counter
                        k = 0
                        for _ in range(self.opts.warmup if state.get("warm") else 0):
                            step()
                        while not stop.is_set():
                            t0 = pc()
                            step()
                            lat.append(pc() - t0)
                            k += 1
                        counts[i] = k
                        end.wait()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                start.abort()
                end.abort()

        def run_slice(config: str, warm: bool) -> Dict[str, Any]:
            if agxguard is not None:
                apply_config(config)
            state.update(config=config, warm=warm)
            for i in range(n):
                counts[i] = 0
                lats[i] = []
            stop.clear()
            start.wait()
            if agxguard is not None:
                agxguard.reset_stats()
                wait_counts(True)
            t0 = time.perf_counter()
            time.sleep(self.opts.duration if warm else slice_s)
            stop.set()
            end.wait()
            elapsed = time.perf_counter() - t0
            r: Dict[str, Any] = dict(requests=sum(counts), elapsed_s=elapsed, throughput=sum(counts) / elapsed,
                                     threads=n, batch=1, latencies=[v for lat in lats for v in lat],
                                     per_thread=list(counts))
            if agxguard is not None and base_config(config) == "global":
                r["lock_stats"] = global_lock_stats()
            return r

        threads = [threading.Thread(target=worker, args=(i,), name=f"bench-{i}") for i in range(n)]
        for t in threads:
            t.start()
        out: Dict[str, List[Dict[str, Any]]] = {c: [] for c in configs}
        try:
            for c in configs:  # untimed: warm every config up once
                run_slice(c, warm=True)
            for rnd in range(rounds):
                for c in (configs if rnd % 2 == 0 else configs[::-1]):
                    r = run_slice(c, warm=False)
                    out[c].append(r)
                    on_slice(rnd, c, r)
        except threading.BrokenBarrierError:
            pass
        finally:
            state["quit"] = True
            stop.set()
            try:
                start.wait(timeout=5)
            except threading.BrokenBarrierError:
                pass
            for t in threads:
                t.join()
            if agxguard is not None:
                set_variant(None)
        if errors:
            raise errors[0]
        return out

    def close(self) -> None:
        del self.models, self.inputs, self.batched_inputs
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def apply_config(config: str) -> None:
    """agxguard's mode (and global@VARIANT's wait) for a thread config."""
    agxguard.set_mode("op" if config == "op_dispatch" else
                      base_config(config) if base_config(config) in MODE_CONFIGS else "off")
    set_variant(config.partition("@")[2] or None)


def global_lock_stats() -> Dict[str, Any]:
    """The global lock's handoffs, acquisitions, contentions and wait counts since the
    last reset (the wait counts are read and reset)."""
    g = agxguard.stats()["domains"]["global"]
    return dict(handoffs=g.get("handoffs"), acquisitions=g["acquisitions"],
                contentions=g["contentions"], **(wait_counts(False) or {}))


def set_variant(variant: Optional[str]) -> None:
    """How Python waiters wait for the global lock (None: the build's defaults,
    with the --heir-seat choice). See global@VARIANT in the module docstring."""
    C = _knobs()
    parts = variant.split("+") if variant else []
    if not hasattr(C, "_set_region_wait"):  # a build without the measuring knobs
        if parts not in ([], ["watch"]):
            raise RuntimeError(f"this agxguard build cannot run global@{variant}")
        return
    wait = next((p for p in parts if p in GLOBAL_WAITS), DEFAULT_WAIT[0])
    C._set_region_wait(wait)
    C._set_heir_seat(HEIR_SEAT[0] and "noseat" not in parts)
    C._set_claim("noclaim" not in parts)
    C._set_heir_spin_us(0 if "nospin" in parts else DEFAULT_SPIN_US[0])


def wait_counts(reset: bool) -> Optional[Dict[str, int]]:
    f = getattr(_knobs(), "_wait_counts", None)
    return f(reset) if f else None


def _knobs() -> Any:
    """The measuring knobs: agxguard._model, the lab's module (the product exports none)."""
    from agxguard import _model
    return _model


DEFAULT_WAIT = ["grace"]  # read from the build at start (main)
HEIR_SEAT = [True]
DEFAULT_SPIN_US = [200.0]  # read from the build at start (main)


def percentile(values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (0-100) of unsorted values, None if empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(q / 100.0 * len(s)))) - 1]


def points_for(config: str, threads: List[int]) -> List[int]:
    """The N values measured for a config (free always includes 1: the baseline)."""
    if config == "free":
        return sorted(set(threads) | {1})
    return list(threads)


def run_workload(name: str, opts: argparse.Namespace, progress: Dict[str, int]) -> List[Dict[str, Any]]:
    """Every config at every N for one workload; one row per point."""
    configs = list(opts.configs)
    skipped: Dict[str, str] = {}
    if agxguard is None:
        for c in MODE_CONFIGS + ("op_dispatch", "ops_unlocked") + BATCHER_CONFIGS:
            if c in configs:
                skipped[c] = AGX_ERROR or "agxguard missing"
    points = [(c, n) for c in configs for n in points_for(c, opts.threads)]
    max_threads = max(n for c, n in points if c != "offline") if any(c != "offline" for c, n in points) else 1
    log(f"{name}: {describe(name)}; building {max_threads} model(s) on {opts.torch_device}")
    bench = Bench(name, opts, max_threads)
    runs: Dict[tuple, List[Dict[str, Any]]] = {}

    def note(c: str, n: int, r: Dict[str, Any]) -> None:
        progress["done"] += 1
        tag = f"[{progress['done']}/{progress['total']}] {name} {c} N={n}"
        runs.setdefault((c, n), []).append(r)
        if "error" in r:
            log(f"{tag}: ERROR {r['error']}")
            return
        extra = ""
        if "lock_stats" in r:
            ls = r["lock_stats"]
            extra = (f", handoffs {ls['handoffs']}/{ls['acquisitions']}, contended "
                     f"{ls['contentions']}, gil trips {ls.get('gil_trips')} "
                     f"(lost {ls.get('gil_trips_lost')}), grace retaken {ls.get('grace_retaken')}")
        if "batcher" in r:
            st = r["batcher"]
            extra = (f", mean batch {st['mean_batch_size'] or 0:.2f}, "
                     f"p50 {1000 * (percentile(r['latencies'], 50) or 0):.2f} ms, "
                     f"p99 {1000 * (percentile(r['latencies'], 99) or 0):.2f} ms")
        if len(r.get("per_thread") or []) > 1 and r["requests"]:
            extra += f", busiest thread {100 * max(r['per_thread']) / sum(r['per_thread']):.0f}%"
        log(f"{tag}: {r['throughput']:,.0f} req/s ({r['requests']} in {r['elapsed_s']:.2f} s{extra})")

    try:
        if opts.slice is not None:  # the thread configs interleaved, one pool of threads per N
            for n in sorted({n for c, n in points}):
                group = [c for c, m in points if m == n and base_config(c) in INTERLEAVABLE and c not in skipped]
                if not group:
                    continue
                try:
                    bench.measure_interleaved(group, n, opts.repeats, lambda rnd, c, r, n=n: note(c, n, r))
                except Exception as exc:  # keep the other results
                    for c in group:
                        runs[(c, n)] = [{"error": f"{type(exc).__name__}: {exc}"}]
                    log(f"{name} interleaved N={n}: ERROR {type(exc).__name__}: {exc}")
            points_left = [(c, n) for c, n in points if (c, n) not in runs]
        else:
            points_left = points
        for rep in range(opts.repeats):
            # odd repeats run the points in reverse, so no config always follows another
            for c, n in (points_left if rep % 2 == 0 else points_left[::-1]):
                if c in skipped:
                    progress["done"] += 1
                    log(f"[{progress['done']}/{progress['total']}] {name} {c} N={n}: skipped ({skipped[c]})")
                    continue
                if rep > 0 and runs.get((c, n)) and "error" in runs[(c, n)][0]:
                    progress["done"] += 1
                    continue
                try:
                    r = bench.measure(c, n)
                except Exception as exc:  # keep the other results
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                note(c, n, r)
    finally:
        bench.close()
        if agxguard is not None:
            agxguard.set_mode("off")

    rows = []
    for c, n in points:
        row: Dict[str, Any] = {"workload": name, "config": c, "n": n}
        if c in skipped:
            row["skipped"] = skipped[c]
            rows.append(row)
            continue
        rs = runs.get((c, n), [])
        if not rs or any("error" in r for r in rs):
            row["error"] = next((r["error"] for r in rs if "error" in r), "not measured")
            rows.append(row)
            continue
        lats = [v for r in rs for v in r["latencies"]]
        row.update(
            threads=rs[0]["threads"], batch=rs[0]["batch"],
            throughput=statistics.median(r["throughput"] for r in rs),
            throughput_runs=[r["throughput"] for r in rs],
            requests_runs=[r["requests"] for r in rs],
            elapsed_s_runs=[r["elapsed_s"] for r in rs],
            latency_mean_ms=1000 * sum(lats) / len(lats) if lats else None,
            latency_p50_ms=1000 * percentile(lats, 50) if lats else None,
            latency_p99_ms=1000 * percentile(lats, 99) if lats else None,
        )
        if "lock_stats" in rs[0]:
            row["lock_stats_runs"] = [r["lock_stats"] for r in rs]
        if "batcher" in rs[0]:
            row["batcher_runs"] = [r["batcher"] for r in rs]
            row["batcher"] = rs[-1]["batcher"]
        rows.append(row)
    base = next((r.get("throughput") for r in rows if r["config"] == "free" and r["n"] == 1), None)
    for r in rows:
        if base and r.get("throughput") is not None:
            r["speedup"] = r["throughput"] / base
            r["efficiency"] = r["speedup"] / r["threads"]
    return rows


# ---------------------------------------------------------------- reporting

def machine_info(opts: argparse.Namespace) -> Dict[str, Any]:
    """Where and with what this ran."""
    import torch

    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device": str(opts.torch_device),
        "dtype": str(opts.torch_dtype).replace("torch.", ""),
        "agxguard": getattr(agxguard, "__version__", None) if agxguard is not None else None,
        "agxguard_error": AGX_ERROR,
    }
    if opts.torch_device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(opts.torch_device)
    elif opts.torch_device.type == "mps":
        info["device_name"] = "Apple MPS"
    else:
        info["device_name"] = info["processor"] or info["machine"]
    info["git_commit"] = os.environ.get("AGXGUARD_BENCH_COMMIT")  # a copy of the tree without its .git
    try:
        if not info["git_commit"]:
            info["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def find(rows: List[Dict[str, Any]], workload: str, config: str, n: int, key: str = "throughput") -> Any:
    for r in rows:
        if r["workload"] == workload and r["config"] == config and r["n"] == n:
            return r.get(key)
    return None


def evaluate_targets(rows: List[Dict[str, Any]], opts: argparse.Namespace) -> List[Dict[str, Any]]:
    """The issue's targets, at the run's largest thread count (8 unless --threads says less)."""
    n = max(opts.threads)
    specs = [
        # (config, reference, ratio, workloads or None for all)
        ("stream", "free", 0.95, None),
        ("op", "free", 0.90, None),
        ("op_dispatch", "free", 0.90, None),  # the same target for ops(level="dispatch")
        ("global", "lock", 1.00, None),
    ] + [(c, "lock", 1.00, None) for c in opts.configs if c.startswith("global@")] + [
        ("batcher", "offline", 0.80, ("story_transformer", "small_mlp")),
        ("batcher", "free", 4.00, ("story_transformer", "small_mlp")),
    ]
    out = []
    for workload in opts.workloads:
        for config, ref, ratio, only in specs:
            if only is not None and workload not in only:
                continue
            if config not in opts.configs or ref not in opts.configs:
                continue
            a, b = find(rows, workload, config, n), find(rows, workload, ref, n)
            t: Dict[str, Any] = {"workload": workload, "config": config, "reference": ref, "n": n,
                                 "min_ratio": ratio, "throughput": a, "reference_throughput": b}
            ar, br = find(rows, workload, config, n, "throughput_runs"), find(rows, workload, ref, n, "throughput_runs")
            if a is None or b is None or b <= 0:
                t.update(ratio=None, result="N/A")
            else:
                # each repeat measured both in the same round: the ratio is the median of
                # the paired ratios, and their spread is reported beside it
                runs = [x / y for x, y in zip(ar or [a], br or [b]) if y > 0] or [a / b]
                r = statistics.median(runs)
                t.update(ratio=r, ratio_runs=runs, ratio_min=min(runs), ratio_max=max(runs),
                         result="PASS" if r >= ratio else "FAIL")
                # the ratio of the totals (all requests over all time, each side) and its
                # 95% bootstrap interval over the rounds: robust where single rounds swing
                aq, ae = find(rows, workload, config, n, "requests_runs"), find(rows, workload, config, n, "elapsed_s_runs")
                bq, be = find(rows, workload, ref, n, "requests_runs"), find(rows, workload, ref, n, "elapsed_s_runs")
                if aq and bq and len(aq) == len(bq) and len(aq) > 1:
                    t.update(total_ratio=total_ratio(aq, ae, bq, be),
                             total_ratio_ci95=bootstrap_ci(aq, ae, bq, be))
            out.append(t)
    return out


def label(config: str) -> str:
    if "@" in config:
        return f"global@{config.partition('@')[2]}"
    return {"free": "free threads", "lock": "threading.Lock", "semaphore2": "Semaphore(2)",
            "op": "agxguard op", "op_dispatch": "agxguard op, dispatch",
            "ops_unlocked": "ops() in mode off", "stream": "agxguard stream", "global": "agxguard global",
            "batcher": "Batcher", "batcher_nospin": "Batcher, no spin",
            "offline": "offline batch"}[config]


def print_table(rows: List[Dict[str, Any]], opts: argparse.Namespace, info: Dict[str, Any]) -> None:
    """One block per workload: req/s, speedup and efficiency per config and N."""
    ns = sorted(set(opts.threads) | {1})
    log("")
    log(f"Efficiency on {info['device_name']} ({info['device']}, {info['dtype']}), torch {info['torch']}, "
        f"python {info['python']}; streams: {opts.streams}")
    log("cell = requests/s  speedup vs 1 free thread  efficiency (speedup/threads; offline runs 1 thread)")
    for w in opts.workloads:
        base = find(rows, w, "free", 1)
        log("")
        log(f"{w}: {describe(w)}" + (f"; 1 thread = {base:,.0f} req/s" if base else ""))
        log(f"  {'N (threads / batch)':<20}" + "".join(f"{'N=' + str(n):>26}" for n in ns))
        for c in opts.configs:
            cells = []
            for n in ns:
                r = next((r for r in rows if r["workload"] == w and r["config"] == c and r["n"] == n), None)
                if r is None:
                    cells.append(f"{'':>26}")
                elif "skipped" in r:
                    cells.append(f"{'skipped':>26}")
                elif "error" in r:
                    cells.append(f"{'error':>26}")
                else:
                    sp = r.get("speedup")
                    eff = r.get("efficiency")
                    tail = f" {sp:5.2f}x {eff:5.0%}" if sp is not None else ""
                    cells.append(f"{r['throughput']:>13,.0f}{tail}")
            log(f"  {label(c):<20}" + "".join(cells))
            if c in BATCHER_CONFIGS:
                lat = []
                for n in ns:
                    r = next((r for r in rows if r["workload"] == w and r["config"] == c and r["n"] == n), None)
                    if r and r.get("latency_p50_ms") is not None:
                        lat.append(f"{r['latency_p50_ms']:>9.2f} / {r['latency_p99_ms']:.2f} ms".rjust(26))
                    else:
                        lat.append(" " * 26)
                log(f"  {'  p50 / p99 latency':<20}" + "".join(lat))


def print_targets(targets: List[Dict[str, Any]], opts: argparse.Namespace) -> None:
    n = max(opts.threads)
    log("")
    log(f"Targets at {n} threads (global vs lock: issue 12; the others: issue 6)" +
        ("" if n == TARGET_N else f" (the issue states them at {TARGET_N}; this run's largest N is {n})") + ":")
    for t in targets:
        what = f"{label(t['config'])} >= {t['min_ratio']:.2f}x {label(t['reference'])}"
        if t["ratio"] is None:
            log(f"  N/A   {t['workload']:<18} {what}: not measured")
        else:
            spread = (f" [{t['ratio_min']:.2f}-{t['ratio_max']:.2f} over {len(t['ratio_runs'])}]"
                      if len(t.get("ratio_runs", [])) > 1 else "")
            total = (f"; totals {t['total_ratio']:.3f}x, 95% CI {t['total_ratio_ci95'][0]:.3f}-"
                     f"{t['total_ratio_ci95'][1]:.3f}" if t.get("total_ratio") else "")
            log(f"  {t['result']:<5} {t['workload']:<18} {what}: {t['ratio']:.2f}x{spread} "
                f"({t['throughput']:,.0f} vs {t['reference_throughput']:,.0f} req/s{total})")
    passed = sum(t["result"] == "PASS" for t in targets)
    failed = sum(t["result"] == "FAIL" for t in targets)
    log(f"  {passed} passed, {failed} failed, {len(targets) - passed - failed} not measured")


def plot(rows: List[Dict[str, Any]], opts: argparse.Namespace, info: Dict[str, Any], path: str) -> Optional[str]:
    """Throughput vs N per config, one panel per workload; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k = len(opts.workloads)
    cols = min(3, k)
    nrows = (k + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, w in zip(axes.flat, opts.workloads):
        for c in opts.configs:
            pts = sorted((r["n"], r["throughput"]) for r in rows
                         if r["workload"] == w and r["config"] == c and r.get("throughput"))
            if pts:
                style = "--" if c in BATCHER_CONFIGS + ("offline",) else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label(c))
        ax.set_title(w)
        ax.set_xlabel("threads (clients; batch size for offline)")
        ax.set_ylabel("requests/s")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"agxguard efficiency: {info['device_name']} ({info['device']}), torch {info['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_args(argv)
    import torch  # noqa: F401  (after option errors, which need no torch)

    if agxguard is not None:
        HEIR_SEAT[0] = opts.heir_seat == "on"
        DEFAULT_SPIN_US[0] = _knobs()._set_heir_spin_us(200.0)
        _knobs()._set_heir_spin_us(DEFAULT_SPIN_US[0])
        if hasattr(agxguard._C, "_set_region_wait"):
            DEFAULT_WAIT[0] = _knobs()._set_region_wait("watch")
            _knobs()._set_region_wait(DEFAULT_WAIT[0])
        _knobs()._set_heir_seat(HEIR_SEAT[0])
    info = machine_info(opts)
    info["global_wait_default"] = DEFAULT_WAIT[0]
    info["command"] = "python3 benchmarks/efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"agxguard efficiency benchmark: device {info['device']} ({info['device_name']}), "
        f"torch {info['torch']}, python {info['python']}, {info['cpu_count']} cpus")
    if AGX_ERROR:
        log(f"warning: {AGX_ERROR}; the agxguard modes are skipped")
    total = sum(len(points_for(c, opts.threads)) for c in opts.configs) * len(opts.workloads) * opts.repeats
    progress = {"done": 0, "total": total}
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    for w in opts.workloads:
        rows += run_workload(w, opts, progress)
    wall = time.perf_counter() - t0
    targets = evaluate_targets(rows, opts)
    print_table(rows, opts, info)
    print_targets(targets, opts)

    report = {
        "benchmark": "efficiency",
        "issue": 6,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall,
        "machine": info,
        "options": {k: v for k, v in vars(opts).items() if k not in ("torch_device", "torch_dtype")},
        "method": ("one model per thread; a request is one forward pass of the per-request input "
                   "and a sync of the thread's stream (cuda) or device (mps); throughput = requests/s; "
                   "speedup vs 1 free thread; efficiency = speedup/threads; batcher: N clients, "
                   "max_batch=N; offline: batch of N requests in 1 thread"),
        "results": rows,
        "targets": targets,
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
    tmp = opts.json + ".tmp"  # written whole, then renamed: a failed dump leaves no half file
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, opts.json)
    log(f"\nwrote {opts.json} ({wall:.0f} s of measuring)")
    if not opts.no_plot:
        png = plot(rows, opts, info, os.path.splitext(opts.json)[0] + ".png")
        log(f"wrote {png}" if png else "no plot: matplotlib is not installed")
    if opts.strict and any(t["result"] == "FAIL" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
