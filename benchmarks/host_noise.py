"""How steady is one thread's speed on this host? The yardstick for every ratio
measured here.

One thread runs the server pattern of a workload (request copied to the device, model,
result copied back) for --sample seconds, pinned to each CPU in turn (Linux), --rounds
times, the CPU order reversed every other round. If samples of the same CPU differ as
much as samples of different CPUs, the host's speed drifts in time (other tenants,
clocks), and a comparison of two configurations needs interleaved rounds
(efficiency.py --slice), not one sample each.

    python3 benchmarks/host_noise.py [--device cuda] [--workload small_mlp] [--sample 0.3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best present)")
    p.add_argument("--workload", default="small_mlp")
    p.add_argument("--sample", type=float, default=0.3, help="seconds per sample")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    import torch
    from agxguard.lab import workloads as W

    if a.workload not in W.WORKLOADS:
        p.error(f"unknown workload {a.workload!r}; allowed: {', '.join(W.WORKLOADS)}")
    if a.sample <= 0 or a.rounds < 1:
        p.error("--sample must be > 0 and --rounds >= 1")
    dev = W._check_device(a.device or W.best_device())
    m = W.build(a.workload, dev, torch.float32, seed=0)
    xh = m.make_input(seed=1).cpu()

    def serve():
        y = m.model(xh.to(dev))
        return y.cpu()

    for _ in range(20):
        serve()
    can_pin = hasattr(os, "sched_setaffinity")
    cpus = sorted(os.sched_getaffinity(0)) if can_pin else [None]
    res = {c: [] for c in cpus}

    def run(cpu):
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # this thread only
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.sample:
            serve()
            n += 1
        res[cpu].append(n / (time.perf_counter() - t0))

    for r in range(a.rounds):
        for c in (cpus if r % 2 == 0 else cpus[::-1]):
            t = threading.Thread(target=run, args=(c,))
            t.start()
            t.join()
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    print(f"{a.workload} server pattern on {dev}, one thread, {a.sample} s samples, req/s")
    print("cpu   " + "".join(f"{'round ' + str(i + 1):>10}" for i in range(a.rounds)) + "    max/min")
    for c in cpus:
        v = res[c]
        print(f"{str(c):<5} " + "".join(f"{x:10.0f}" for x in v) + f"    {max(v) / min(v):7.2f}")
    allv = [x for v in res.values() for x in v]
    within = statistics.median(max(v) / min(v) for v in res.values()) if a.rounds > 1 else float("nan")
    print(f"all samples: median {statistics.median(allv):.0f}, min {min(allv):.0f}, max {max(allv):.0f} "
          f"(max/min {max(allv) / min(allv):.2f}); median max/min of one CPU's samples {within:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
