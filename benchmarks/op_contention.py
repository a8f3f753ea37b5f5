"""Where the time of ``op`` mode goes: free threads vs op-mode threads on one workload,
with the op lock's counters (acquisitions per request, contended share, mean wait and
mean hold), and variants: op without the heir seat (every Python waiter watches the
lock), op with other heir spins, and op or free threads pinned to CPU sets (``ops(pin_cpus=...)``).

    python3 benchmarks/op_contention.py [--device cuda] [--workload small_mlp]
        [--threads 8] [--duration 1.0] [--repeats 3] [--pins "0;0,1;0-3"] [--no-heir-variant] [--heir-spins 20,1000]

The variants run round robin (--repeats rounds), so their ratios to free threads come
from one run; each line is the median over rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import agxguard  # noqa: E402
import agxguard._model  # noqa: E402
from agxguard.lab import workloads as W  # noqa: E402


def run(models, inputs, sync_of, n: int, duration: float, op: bool, pin=None) -> float:
    """requests/s of n threads, each with its own model, stream and input; op mode
    through agxguard.ops(pin_cpus=pin), free threads pinned to ``pin`` if given."""
    import torch

    stop = threading.Event()
    counts = [0] * n
    barrier = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()) if torch.cuda.is_available() else _null():
            if op:
                ctx = agxguard.ops(pin_cpus=pin)
            else:
                ctx = _null()
                if pin is not None:
                    os.sched_setaffinity(0, pin)
            with ctx:
                model, x, sync = models[i], inputs[i], sync_of()
                for _ in range(3):
                    model(x)
                    sync()
                barrier.wait()
                k = 0
                while not stop.is_set():
                    model(x)
                    sync()
                    k += 1
                counts[i] = k

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--workload", default="small_mlp", choices=W.WORKLOADS)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pins", default="", help='CPU sets for pinned variants, e.g. "0;0,1;0-3"')
    p.add_argument("--no-heir-variant", action="store_true", help="skip op without the heir seat")
    p.add_argument("--heir-spins", default="", help="op variants with these heir spins in us, e.g. 20,1000")
    a = p.parse_args()
    pins = []
    for part in filter(None, (x.strip() for x in a.pins.split(";"))):
        cpus = set()
        for piece in part.split(","):
            lo, _, hi = piece.partition("-")
            try:
                cpus.update(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                p.error(f"--pins takes CPU sets like 0;0,1;0-3, not {a.pins!r}")
        pins.append(cpus)
    a.pins = pins
    try:
        a.heir_spins = [float(x) for x in a.heir_spins.split(",") if x.strip()]
    except ValueError:
        p.error(f"--heir-spins takes microseconds like 20,1000, not {a.heir_spins!r}")
    if a.threads < 1 or a.duration <= 0 or a.repeats < 1:
        p.error("--threads >= 1, --duration > 0, --repeats >= 1")
    import torch

    device = a.device or W.best_device()
    models = [W.build(a.workload, device).model for _ in range(a.threads)]
    inputs = [W.build(a.workload, device).make_input(seed=i + 1) for i in range(a.threads)]
    kind = torch.device(device).type

    def sync_of():
        if kind == "cuda":
            return torch.cuda.current_stream().synchronize
        return lambda: None

    default_spin = agxguard._model._set_heir_spin_us(0)
    agxguard._model._set_heir_spin_us(default_spin)
    # (name, op mode?, pin set, heir seat?, heir spin us)
    variants = [("free", False, None, True, default_spin), ("op", True, None, True, default_spin)]
    if not a.no_heir_variant:
        variants.append(("op, no heir seat", True, None, False, default_spin))
    for us in a.heir_spins:
        variants.append((f"op, heir spin {us:g} us", True, None, True, us))
    for pin in a.pins:
        name = ",".join(map(str, sorted(pin)))
        variants.append((f"op pinned {{{name}}}", True, pin, True, default_spin))
        variants.append((f"free pinned {{{name}}}", False, pin, True, default_spin))
    results = {v[0]: [] for v in variants}
    stats = {v[0]: [] for v in variants}
    for rep in range(a.repeats):
        for name, op, pin, heir, spin in variants:
            agxguard._model._set_heir_seat(heir)
            agxguard._model._set_heir_spin_us(spin)
            agxguard.set_mode("op" if op else "off")
            agxguard.reset_stats()
            t0 = time.perf_counter()
            r = run(models, inputs, sync_of, a.threads, a.duration, op=op, pin=pin)
            requests = r * (time.perf_counter() - t0)
            st = agxguard.stats()["domains"]["op"]
            results[name].append(r)
            acq = st["acquisitions"]
            stats[name].append((acq / max(requests, 1), st["contentions"] / max(acq, 1),
                                st["wait_ns"] / max(st["contentions"], 1) / 1000,
                                st["hold_ns"] / max(acq, 1) / 1000))
        agxguard._model._set_heir_seat(True)
        agxguard._model._set_heir_spin_us(default_spin)
        print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()), flush=True)
    agxguard.set_mode("off")
    free = results["free"]
    print(f"{a.workload} on {device} ({torch.cuda.get_device_name() if kind == 'cuda' else kind}), "
          f"{a.threads} threads, {os.cpu_count()} cpus, median of {a.repeats} rounds:")
    for name, *_ in variants:
        rs = results[name]
        ratio = statistics.median(x / f for x, f in zip(rs, free))
        line = f"  {name:<22} {statistics.median(rs):>10,.0f} req/s  {ratio:5.2f}x free"
        if name.startswith("op"):
            per, cont, wait, hold = (statistics.median(s[i] for s in stats[name]) for i in range(4))
            line += (f"   op lock: {per:.1f} acq/request, {cont:.0%} contended, "
                     f"mean wait {wait:.1f} us, mean hold {hold:.1f} us")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
