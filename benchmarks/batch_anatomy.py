"""Where a Batcher's batch time goes, against offline batching, in one run.

For one workload and N requests per batch it times, per batch, round robin:

    offline     fn(xb) on a ready-made batch of N (fn = model + device sync)
    cat+fn      torch.cat of the N separate request tensors, fn, then chunk into N views:
                what the Batcher's dispatcher does per batch, from one thread
    batcher     N client threads calling a Batcher (max_batch=N): its stats' mean batch
                run (cat, fn, split) and the whole cycle (wall time per batch)

    python3 benchmarks/batch_anatomy.py [--device cuda] [--workload story_transformer]
        [--batch 8] [--duration 0.6] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agxguard.lab import workloads as W  # noqa: E402
from agxguard.batcher import Batcher  # noqa: E402


def per_call_us(step, duration: float) -> float:
    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        step()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--workload", default="story_transformer", choices=W.WORKLOADS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--duration", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.batch < 1 or a.duration <= 0 or a.repeats < 1:
        p.error("--batch >= 1, --duration > 0, --repeats >= 1")
    import torch

    device = a.device or W.best_device()
    w = W.build(a.workload, device)
    xs = [w.make_input(seed=i + 1) for i in range(a.batch)]
    xb = torch.cat(xs, 0)

    def fn(x):
        y = w.model(x)
        W.sync(device)
        return y

    def cat_fn():
        fn(torch.cat(xs, 0)).chunk(a.batch, 0)

    rows = {"offline fn(batch)": [], "cat + fn + chunk": [], "Batcher batch run": [], "Batcher cycle": []}
    for _ in range(a.repeats):
        rows["offline fn(batch)"].append(per_call_us(lambda: fn(xb), a.duration))
        rows["cat + fn + chunk"].append(per_call_us(cat_fn, a.duration))
        with Batcher(fn, max_batch=a.batch, max_delay_ms=2.0) as b:
            stop = threading.Event()

            def client(x):
                while not stop.is_set():
                    b(x)

            threads = [threading.Thread(target=client, args=(x,)) for x in xs]
            for t in threads:
                t.start()
            time.sleep(0.1)
            b.reset_stats()
            t0 = time.perf_counter()
            time.sleep(a.duration)
            st = b.stats()
            wall = time.perf_counter() - t0
            stop.set()
            for t in threads:
                t.join()
        rows["Batcher batch run"].append(st["batch_run_mean_ms"] * 1000)
        rows["Batcher cycle"].append(wall / max(st["batches"], 1) * 1e6)
    base = statistics.median(rows["offline fn(batch)"])
    print(f"{a.workload} on {device}, batch of {a.batch}, median of {a.repeats} rounds (us per batch):")
    for name, v in rows.items():
        m = statistics.median(v)
        print(f"  {name:<20} {m:9.1f}  {m / base:5.2f}x offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
