"""Serving throughput: the Batcher against the other ways of serving requests from many clients.

A request arrives as a CPU tensor and its answer must leave as a CPU tensor (what a server
sees). One run measures, on the same models and the same device:

    free            N client threads, each: copy to the device, forward, copy back (sync)
    lock            the same with one threading.Lock around each request
    guard_global    the same inside ``agxguard.guard()`` in mode "global"
    batcher         N client threads calling one Batcher(device=...) (pipelined on cuda/mps)
    batcher_async   N coroutines on one event loop awaiting Batcher.acall
    batcher_nospin  the batcher mode with Batcher(spin_us=0): waiting threads sleep at once
                    instead of spinning (a design variant for many client threads)
    batcher_half    N client threads, Batcher(max_batch=N/2): two half batches in the
                    pipeline, one collated while the other runs (a design variant)
    batcher_base    the batcher mode with the Batcher of another batcher.py (--baseline-file,
                    e.g. the one before a change), for before/after ratios from one run
    offline_sync    1 thread, batches of 8 requests: collate in pinned memory, one copy in,
                    forward, one copy back, wait, split (the same copies as the Batcher)
    offline_pipe    the same with batch k+1 launched before batch k is waited for

for three workloads: story_transformer and small_mlp with fixed-length requests
(agxguard.workloads' per-request inputs), and story_var: the story transformer with
requests of one sequence of 8..32 tokens each, batched with Batcher(pad_dim=1) and run
with a key padding mask (every answer of the Batcher is checked against the same request
run alone). Client counts: 8 and 64 (--clients).

It prints a table and the issue's targets as PASS/FAIL lines, and writes JSON (with the
command, machine and commit) and a PNG (when matplotlib is installed).

--paired R measures each target's two sides in R paired rounds (--slice seconds each, the
order reversed every other round), so that both sides of a ratio run within a second or
two of each other: on a host whose single-thread speed drifts by 1.5x over seconds
(benchmarks/results/host_noise_h200.txt), medians of configurations measured minutes
apart can differ by more than the effect. It reports per target the median of the
per-round ratios with their spread, and the ratio of the totals with a 95% bootstrap
interval over rounds; the targets are judged on the ratio of the totals. --repeats 0
skips the table and runs only the paired rounds.

Usage:
    python3 benchmarks/serving.py [--device cuda] [--seconds 2] [--repeats 2]
        [--clients 8,64] [--workloads story_transformer,small_mlp,story_var]
        [--modes free,...] [--baseline-file PATH] [--paired 16 --slice 0.5]
        [--json benchmarks/results/serving_<device>.json]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import agxguard  # noqa: E402
from agxguard.batcher import Batcher  # noqa: E402
from _paired import bootstrap_ci, total_ratio  # noqa: E402

try:  # the workloads module moves into agxguard.lab (issue 12)
    from agxguard.lab import workloads as W  # type: ignore  # noqa: E402
except ImportError:
    from agxguard import workloads as W  # noqa: E402

WORKLOADS = ("story_transformer", "small_mlp", "story_var")
MODES = ("free", "lock", "guard_global", "batcher", "batcher_async", "batcher_half",
         "batcher_nospin")
OFFLINE = ("offline_sync", "offline_pipe")
OFFLINE_BATCH = 8
# --paired: (workload, side a, its clients, side b, its clients, the target for a / b)
PAIRS = (
    ("story_transformer", "batcher", 8, "offline_sync", 8, 1.0),
    ("small_mlp", "batcher", 8, "offline_sync", 8, 0.8),
    ("story_var", "batcher", 8, "free", 8, 3.0),
    ("story_transformer", "batcher_async", 64, "batcher", 8, 1.0),
    ("small_mlp", "batcher_async", 64, "batcher", 8, 1.0),
    ("story_var", "batcher_async", 64, "batcher", 8, 1.0),
)
# the same targets for the table's medians
OFFLINE_TARGETS = tuple((w, need) for w, a, _, b, _, need in PAIRS
                        if (a, b) == ("batcher", "offline_sync"))
FREE_TARGET = next(need for w, a, _, b, _, need in PAIRS if (w, a, b) == ("story_var", "batcher", "free"))
VAR_LENGTHS = (8, 32)  # story_var: tokens per request, inclusive


class Work:
    """One workload ready to serve: ``single(x)`` runs one request on the device and returns
    it on the CPU; ``fn`` is the batched model for the Batcher (``fn(batch)`` or, for
    variable length, ``fn(batch, lengths)``); ``inputs`` a pool of CPU requests."""

    def __init__(self, name: str, device: str, pool: int = 64, seed: int = 0):
        self.name = name
        self.device = torch.device(device)
        self.variable = name == "story_var"
        base = "story_transformer" if self.variable else name
        self.w = W.build(base, device=device, seed=seed)
        gen = torch.Generator().manual_seed(seed + 7)
        if self.variable:
            module = self.w.module

            def fn(x: Any, lengths: Any) -> Any:
                mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
                with torch.no_grad():
                    return module(x, src_key_padding_mask=mask)

            self.fn = fn
            lo, hi = VAR_LENGTHS
            lens = torch.randint(lo, hi + 1, (pool,), generator=gen).tolist()
            self.inputs = [torch.randn(1, n, 256, generator=gen) for n in lens]
        else:
            self.fn = self.w.model
            self.inputs = [torch.randn(self.w.input_shape, generator=gen) for _ in range(pool)]

    def single(self, x: Any) -> Any:
        """One request alone: copy in, forward (with its mask, all valid), copy back."""
        d = x.to(self.device)
        if self.variable:
            out = self.fn(d, torch.tensor([x.shape[1]] * x.shape[0], device=self.device))
        else:
            out = self.fn(d)
        return out.cpu()

    def batcher(self, clients: int, max_batch: Optional[int] = None, cls: Any = None,
                **kw: Any) -> Batcher:
        """The Batcher this workload is served by for ``clients`` clients (``cls``: another
        Batcher class, e.g. a baseline's)."""
        if self.variable:
            kw["pad_dim"] = 1
        dev = self.device.type if self.device.type in ("cuda", "mps") else None
        if max_batch is None:
            max_batch = max(8, min(clients // 4, 32))
        return (cls or Batcher)(self.fn, max_batch=max_batch, max_delay_ms=2.0,
                       max_queue=4096, device=dev, name=self.name, **kw)


def sync(device: torch.device) -> None:
    """Wait for the device."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def percentiles(lat: list) -> dict:
    """p50/p99 of per-request latencies (seconds) in ms."""
    if not lat:
        return {"p50_ms": None, "p99_ms": None}
    s = sorted(lat)
    return {"p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3}


def run_threads(work: Work, clients: int, seconds: float, call: Callable[[Any], Any]) -> dict:
    """``clients`` closed-loop threads calling ``call(x)`` for ``seconds`` (after a warm-up)."""
    stop = threading.Event()
    measuring = threading.Event()
    counts = [0] * clients
    lats: list = [[] for _ in range(clients)]
    errors: list = []

    def client(i: int) -> None:
        xs = work.inputs
        j = i
        try:
            while not stop.is_set():
                x = xs[j % len(xs)]
                j += clients
                t0 = time.perf_counter()
                call(x)
                if measuring.is_set():
                    lats[i].append(time.perf_counter() - t0)
                    counts[i] += 1
        except BaseException as e:  # reported by the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(0.5, seconds / 2))
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(60)
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    all_lat = [v for lst in lats for v in lst]
    return dict(req_s=sum(counts) / elapsed, requests=sum(counts), **percentiles(all_lat))


def run_async(work: Work, b: Batcher, clients: int, seconds: float) -> dict:
    """``clients`` closed-loop coroutines on one event loop awaiting ``b.acall``."""
    counts = [0] * clients
    lats: list = [[] for _ in range(clients)]

    async def main() -> float:
        measuring = False
        stop = False

        async def client(i: int) -> None:
            xs = work.inputs
            j = i
            while not stop:
                x = xs[j % len(xs)]
                j += clients
                t0 = time.perf_counter()
                await b.acall(x)
                if measuring:
                    lats[i].append(time.perf_counter() - t0)
                    counts[i] += 1

        tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
        await asyncio.sleep(min(0.5, seconds / 2))
        measuring = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - t0
        stop = True
        await asyncio.gather(*tasks)
        return elapsed

    elapsed = asyncio.run(main())
    all_lat = [v for lst in lats for v in lst]
    return dict(req_s=sum(counts) / elapsed, requests=sum(counts), **percentiles(all_lat))


def collate(work: Work, xs: list, pin: bool) -> tuple:
    """Offline: the batch of ``xs`` in (pinned) host memory, padded for variable length,
    and its lengths (or None)."""
    if not work.variable:
        shape = (sum(x.shape[0] for x in xs),) + tuple(xs[0].shape[1:])
        host = torch.empty(shape, pin_memory=pin)
        torch.cat(xs, 0, out=host)
        return host, None
    padded = max(x.shape[1] for x in xs)
    host = torch.zeros((len(xs), padded, xs[0].shape[2]), pin_memory=pin)
    for i, x in enumerate(xs):
        host[i, :x.shape[1]].copy_(x[0])
    lengths = torch.tensor([x.shape[1] for x in xs], dtype=torch.int64)
    return host, (lengths.pin_memory() if pin else lengths)


def run_offline(work: Work, seconds: float, pipelined: bool) -> dict:
    """One thread serving batches of OFFLINE_BATCH requests with the Batcher's copies."""
    dev = work.device
    pin = dev.type == "cuda"
    xs_all = work.inputs
    pending: collections.deque = collections.deque()

    def launch(k: int) -> tuple:
        t = time.perf_counter()
        xs = [xs_all[(k * OFFLINE_BATCH + i) % len(xs_all)] for i in range(OFFLINE_BATCH)]
        host, lengths = collate(work, xs, pin)
        d = host.to(dev, non_blocking=True)
        if lengths is None:
            out = work.fn(d)
        else:
            out = work.fn(d, lengths.to(dev, non_blocking=True))
        back = torch.empty(out.shape, dtype=out.dtype, pin_memory=pin)
        back.copy_(out, non_blocking=True)
        ev = None
        if dev.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        return back, ev, t, xs

    def finish(item: tuple) -> None:
        back, ev, _, xs = item
        if ev is not None:
            ev.synchronize()
        else:
            sync(dev)
        parts = back.split([x.shape[0] for x in xs], 0)
        if work.variable:
            parts = [p[:, :x.shape[1]] for p, x in zip(parts, xs)]

    k = 0
    done = 0
    lat: list = []
    t_end_warm = time.perf_counter() + min(0.5, seconds / 2)
    t0 = None
    while True:
        now = time.perf_counter()
        if t0 is None and now >= t_end_warm:
            t0, done, lat = now, 0, []
        if t0 is not None and now - t0 >= seconds:
            break
        pending.append(launch(k))
        k += 1
        if not pipelined or len(pending) > 1:
            item = pending.popleft()
            finish(item)
            done += OFFLINE_BATCH
            lat.append(time.perf_counter() - item[2])
    elapsed = time.perf_counter() - t0
    while pending:
        finish(pending.popleft())
    return dict(req_s=done / elapsed, requests=done, **percentiles(lat))


def check_answers(work: Work, b: Batcher, n: int = 64) -> float:
    """Send ``n`` requests at once through ``b``; return the largest difference from the
    same requests run alone (raises if any answer has the wrong shape)."""
    futures = [b.submit(x) for x in work.inputs[:n]]
    worst = 0.0
    for x, f in zip(work.inputs[:n], futures):
        got = f.result(60)
        want = work.single(x)
        if got.shape != want.shape:
            raise AssertionError(f"answer shape {tuple(got.shape)} != alone {tuple(want.shape)}")
        worst = max(worst, (got - want).abs().max().item())
    return worst


BASELINE: Any = None  # the batcher module of --baseline-file (mode batcher_base)


def load_baseline(path: str) -> Any:
    """Import another batcher.py as a module of the agxguard package (its relative imports
    resolve against this tree's agxguard, C core included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("agxguard.batcher_baseline", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "agxguard"
    spec.loader.exec_module(module)
    return module


def measure(work: Work, mode: str, clients: int, seconds: float, check: bool = True) -> dict:
    """One configuration; returns req/s, latency and (Batcher) its stats (``check``: for
    story_var's batcher, also compare its answers with each request run alone)."""
    dev = work.device
    if mode == "offline_sync":
        return run_offline(work, seconds, pipelined=False)
    if mode == "offline_pipe":
        return run_offline(work, seconds, pipelined=True)
    if mode in ("free", "lock", "guard_global"):
        lock = threading.Lock()

        def call(x: Any) -> Any:
            if mode == "free":
                return work.single(x)
            if mode == "lock":
                with lock:
                    return work.single(x)
            with agxguard.guard():
                return work.single(x)

        if mode == "guard_global":
            agxguard.set_mode("global")
        try:
            return run_threads(work, clients, seconds, call)
        finally:
            if mode == "guard_global":
                agxguard.set_mode("off")
    b = work.batcher(clients, max(1, clients // 2) if mode == "batcher_half" else None,
                     BASELINE.Batcher if mode == "batcher_base" else None,
                     **({"spin_us": 0} if mode == "batcher_nospin" else {}))
    try:
        if mode in ("batcher", "batcher_half", "batcher_nospin", "batcher_base"):
            out = run_threads(work, clients, seconds, b)
        else:
            out = run_async(work, b, clients, seconds)
        s = b.stats()
        out.update(mean_batch=s["mean_batch_size"], batch_p50_ms=s["latency_p50_ms"],
                   batch_p99_ms=s["latency_p99_ms"], batches=s["batches"],
                   batch_run_mean_ms=s["batch_run_mean_ms"],
                   queue_wait_mean_ms=s["queue_wait_mean_ms"],
                   overlapped_batches=s["overlapped_batches"])
        if work.variable and mode == "batcher" and check:
            out["max_abs_diff_vs_alone"] = check_answers(work, b)
        return out
    finally:
        b.close(timeout=60)
    del dev


def git_commit() -> str:
    """The checkout's commit (and +dirty), or 'unknown'; $AGXGUARD_BENCH_COMMIT wins (a copy
    of the tree run elsewhere, e.g. from an archive, has no git of its own)."""
    if os.environ.get("AGXGUARD_BENCH_COMMIT"):
        return os.environ["AGXGUARD_BENCH_COMMIT"]
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return (c or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    """The device and host in words."""
    dev = ""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0) + ", "
    return (f"{dev}{os.cpu_count()} CPUs, {platform.platform()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def targets(results: dict, clients: list) -> list:
    """The issue's targets as (name, PASS/FAIL, figures) from the medians."""
    def med(w: str, m: str, c: int, key: str = "req_s") -> Optional[float]:
        runs = results.get(w, {}).get(str(c), {}).get(m)
        if not runs:
            return None
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    out = []
    c = 8 if 8 in clients else clients[0]
    for w, need in OFFLINE_TARGETS:
        o = med(w, "offline_sync", c)
        for m in ("batcher", "batcher_half"):
            b = med(w, m, c)
            if b and o:
                out.append((f"{w}: {m} / offline batch of 8 >= {need}, {c} clients",
                            b / o >= need, f"{b / o:.2f}x ({b:.0f} vs {o:.0f} req/s; p50 "
                            f"{med(w, m, c, 'p50_ms'):.2f} ms, p99 "
                            f"{med(w, m, c, 'p99_ms'):.2f} ms)"))
    b, f = med("story_var", "batcher", c), med("story_var", "free", c)
    mb = med("story_var", "batcher", c, "mean_batch")
    diff = med("story_var", "batcher", c, "max_abs_diff_vs_alone")
    if b and f and mb:
        out.append((f"story_var: mean batch >= 6, {c} clients", mb >= 6, f"{mb:.2f}"))
        out.append((f"story_var: Batcher / free threads >= {FREE_TARGET:g}, {c} clients",
                    b / f >= FREE_TARGET,
                    f"{b / f:.2f}x ({b:.0f} vs {f:.0f} req/s)"))
        if diff is not None:
            out.append(("story_var: answers equal to the request alone (max abs diff <= 1e-3)",
                        diff <= 1e-3, f"{diff:.2e}"))
    if 64 in clients:
        for w in ("story_transformer", "small_mlp", "story_var"):
            a, t = med(w, "batcher_async", 64), med(w, "batcher", c)
            if a and t:
                out.append((f"{w}: asyncio 64 coroutines >= {c} client threads", a >= t,
                            f"{a / t:.2f}x ({a:.0f} vs {t:.0f} req/s)"))
    return [(n, "PASS" if ok else "FAIL", fig) for n, ok, fig in out]


def run_paired(works: dict, rounds: int, slice_s: float) -> list:
    """Every target of PAIRS whose workload is in ``works``: ``rounds`` rounds of side a and
    side b, one ``slice_s`` measurement each, the order reversed every other round."""
    out = []
    pairs = PAIRS + (tuple((w, "batcher", 8, "batcher_base", 8, None) for w in WORKLOADS)
                     if BASELINE else ())
    for w, a, ca, b, cb, need in pairs:
        if w not in works:
            continue
        runs: dict = {a: [], b: []}
        first = []
        for rnd in range(rounds):
            sides = ((a, ca), (b, cb)) if rnd % 2 == 0 else ((b, cb), (a, ca))
            first.append(sides[0][0])
            for m, c in sides:
                runs[m].append(measure(works[w], m, c, slice_s, check=False))
            ra, rb = runs[a][-1]["req_s"], runs[b][-1]["req_s"]
            print(f"[paired {rnd + 1}/{rounds}] {w:18} {a}@{ca} {ra:9.0f} / {b}@{cb} {rb:9.0f} "
                  f"req/s = {ra / rb:.2f}", flush=True)
        ratios = [x["req_s"] / y["req_s"] for x, y in zip(runs[a], runs[b])]
        aq = [x["requests"] for x in runs[a]]
        bq = [y["requests"] for y in runs[b]]
        ae = [x["requests"] / x["req_s"] for x in runs[a]]
        be = [y["requests"] / y["req_s"] for y in runs[b]]
        total = total_ratio(aq, ae, bq, be)
        lo, hi = bootstrap_ci(aq, ae, bq, be)
        row = dict(workload=w, a=a, a_clients=ca, b=b, b_clients=cb, target=need,
                   rounds=rounds, slice_s=slice_s, first=first, ratios=ratios,
                   median_ratio=statistics.median(ratios), total_ratio=total,
                   total_ratio_ci95=[lo, hi], a_req_s=[x["req_s"] for x in runs[a]],
                   b_req_s=[y["req_s"] for y in runs[b]],
                   a_p50_ms=statistics.median([x["p50_ms"] for x in runs[a]]),
                   a_p99_ms=statistics.median([x["p99_ms"] for x in runs[a]]),
                   result="info" if need is None else "PASS" if total >= need else "FAIL")
        if "mean_batch" in runs[a][0]:
            row["a_mean_batch"] = statistics.median([x["mean_batch"] for x in runs[a]])
        out.append(row)
    return out


def paired_report(rows: list) -> str:
    """The paired targets as lines: ratio of totals (95% CI), median of per-round ratios
    [min-max], side a's latency."""
    lines = []
    for r in rows:
        lo, hi = r["total_ratio_ci95"]
        batch = f", mean batch {r['a_mean_batch']:.2f}" if r.get("a_mean_batch") else ""
        lines.append(
            f"{r['result']:4}  {r['workload']}: {r['a']}@{r['a_clients']} / {r['b']}@{r['b_clients']}"
            + ("" if r["target"] is None else f" >= {r['target']}") + f": totals {r['total_ratio']:.2f}x (95% CI {lo:.2f}-{hi:.2f}); "
            f"per round median {r['median_ratio']:.2f} [{min(r['ratios']):.2f}-"
            f"{max(r['ratios']):.2f}]; {r['a']} p50 {r['a_p50_ms']:.2f} ms, p99 "
            f"{r['a_p99_ms']:.2f} ms{batch}")
    return "\n".join(lines)


def table(results: dict, clients: list) -> str:
    """The results as a text table: median req/s (spread over repeats), p50/p99, mean batch."""
    lines = [f"{'workload':18} {'clients':>7} {'mode':14} {'req/s (median, spread)':>26} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'x free':>7} {'x offline':>9}"]
    for w, by_c in results.items():
        for c, by_m in by_c.items():
            free = statistics.median([r["req_s"] for r in by_m.get("free", [])] or [0])
            off = statistics.median([r["req_s"] for r in by_m.get("offline_sync", [])] or [0])
            for m, runs in by_m.items():
                vals = [r["req_s"] for r in runs]
                med = statistics.median(vals)
                p50 = statistics.median([r["p50_ms"] or 0 for r in runs])
                p99 = statistics.median([r["p99_ms"] or 0 for r in runs])
                mb = runs[0].get("mean_batch")
                mb_s = f"{statistics.median([r['mean_batch'] for r in runs]):6.2f}" if mb else "      "
                lines.append(
                    f"{w:18} {c:>7} {m:14} {med:>12.0f} ({min(vals):.0f}-{max(vals):.0f})"
                    f"{'':>2} {p50:8.2f} {p99:8.2f} {mb_s} "
                    f"{(med / free if free else 0):7.2f} {(med / off if off else 0):9.2f}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    """Bar chart of median req/s per mode, one panel per workload and client count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(w, c) for w, by_c in results.items() for c in by_c]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (w, c) in zip(axes[0], panels):
        by_m = results[w][c]
        names = list(by_m)
        vals = [statistics.median([r["req_s"] for r in by_m[m]]) for m in names]
        ax.bar(range(len(names)), vals)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{w}, {c} clients", fontsize=9)
        ax.set_ylabel("requests/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=W.best_device())
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per configuration")
    p.add_argument("--repeats", type=int, default=2, help="runs of every configuration")
    p.add_argument("--clients", default="8,64")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--modes", default=",".join(MODES + OFFLINE))
    p.add_argument("--baseline-file", default=None, metavar="PATH",
                   help="another batcher.py, measured as mode batcher_base (threads)")
    p.add_argument("--paired", type=int, default=0, metavar="R",
                   help="also measure each target's two sides in R interleaved rounds")
    p.add_argument("--slice", type=float, default=0.5, metavar="S",
                   help="measured seconds per side and round with --paired")
    p.add_argument("--json", default=None, help="default benchmarks/results/serving_<device>.json")
    a = p.parse_args(argv)
    global BASELINE
    if a.baseline_file:
        BASELINE = load_baseline(a.baseline_file)
    clients = [int(c) for c in a.clients.split(",")]
    workloads = [w for w in a.workloads.split(",") if w]
    modes = [m for m in a.modes.split(",") if m]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; allowed: {', '.join(WORKLOADS)}")
    allowed = MODES + OFFLINE + (("batcher_base",) if BASELINE else ())
    for m in modes:
        if m not in allowed:
            p.error(f"unknown mode {m!r}; allowed: {', '.join(allowed)}"
                    + ("" if BASELINE else " (batcher_base with --baseline-file)"))
    if any(c < 1 for c in clients) or a.repeats < 0 or not a.seconds > 0:
        p.error("--clients and --seconds must be positive, --repeats 0 or more")
    if a.paired < 0 or not a.slice > 0:
        p.error(f"--paired must be 0 or more and --slice positive, got --paired {a.paired} "
                f"--slice {a.slice}")
    if a.repeats == 0 and a.paired == 0:
        p.error("--repeats 0 needs --paired R (nothing would be measured)")
    path = a.json or os.path.join(HERE, "results", f"serving_{torch.device(a.device).type}.json")
    results: dict = {}
    works = {w: Work(w, a.device) for w in workloads}
    for rep in range(a.repeats):
        for w in workloads:
            for c in clients:
                for m in modes:
                    if m in OFFLINE and c != clients[0]:
                        continue  # one thread: the same for every client count
                    r = measure(works[w], m, c, a.seconds)
                    results.setdefault(w, {}).setdefault(str(c), {}).setdefault(m, []).append(r)
                    print(f"[{rep + 1}/{a.repeats}] {w:18} {c:3} {m:14} {r['req_s']:10.0f} req/s"
                          + (f"  mean batch {r['mean_batch']:.2f}" if r.get("mean_batch") else ""),
                          flush=True)
    # offline rows also under the other client counts, for the ratios
    for w in results:
        first = results[w].get(str(clients[0]), {})
        for c in clients[1:]:
            for m in OFFLINE:
                if m in first:
                    results[w].setdefault(str(c), {})[m] = first[m]
    paired = run_paired(works, a.paired, a.slice) if a.paired else []
    text = table(results, clients)
    checks = targets(results, clients)
    head = (f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}\n"
            f"machine: {machine()}\ncommit: {git_commit()}\n"
            f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    report = head
    if a.repeats:
        report += (f"\n{a.seconds} s per configuration, {a.repeats} repeats; medians, spread in "
                   f"brackets\n\n{text}\n\n"
                   + "\n".join(f"{s}  {n}: {f}" for n, s, f in checks))
    if paired:
        report += (f"\n\npaired rounds (the targets): {a.paired} rounds of {a.slice} s per side, "
                   f"order reversed every other round\n{paired_report(paired)}")
    if "batcher_base" in modes:
        lines = []
        for w, by_c in results.items():
            for c, by_m in by_c.items():
                if "batcher" in by_m and "batcher_base" in by_m:
                    new = statistics.median([r["req_s"] for r in by_m["batcher"]])
                    old = statistics.median([r["req_s"] for r in by_m["batcher_base"]])
                    lines.append(f"{w}, {c} clients: batcher / batcher_base {new / old:.2f}x "
                                 f"({new:.0f} vs {old:.0f} req/s)")
        report += f"\n\nbefore/after (batcher_base: {a.baseline_file}):\n" + "\n".join(lines)
    print("\n" + report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"command": sys.argv, "machine": machine(), "commit": git_commit(),
                   "seconds": a.seconds, "repeats": a.repeats, "results": results,
                   "targets": [{"target": n, "result": s, "figures": f} for n, s, f in checks],
                   "paired": paired},
                  fh, indent=1)
    with open(os.path.splitext(path)[0] + ".txt", "w") as fh:
        fh.write(report + "\n")
    if results:
        plot(results, os.path.splitext(path)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
