"""Where the CPU goes while a Batcher serves on cuda (Linux): per thread CPU share and
context switches, from /proc/self/task, over 1.5 s of 8 closed-loop client threads; and
the offline cycle of one batch of 8 timed in the main thread and in a fresh thread (3
loops of 2000 each). It answers: do the spinning clients, torch's OpenMP workers or
preemption take the dispatcher's CPU? Run it under OMP_NUM_THREADS=1 too to compare.

    python3 benchmarks/batcher_threads.py story_transformer,small_mlp
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import serving  # noqa: E402  (the workloads of the serving benchmark)


def tasks() -> dict:
    """{thread id: (name, CPU seconds, voluntary, involuntary context switches)} of this
    process, from /proc/self/task."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        base = f"/proc/self/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat = f.read()
            with open(f"{base}/comm") as f:
                name = f.read().strip()
            with open(f"{base}/status") as f:
                switches = dict(line.split(":") for line in f if "ctxt_switches" in line)
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        out[int(tid)] = (name, cpu, int(switches.get("voluntary_ctxt_switches", 0)),
                         int(switches.get("nonvoluntary_ctxt_switches", 0)))
    return out


def delta(a: dict, b: dict, secs: float) -> list:
    """(name, tid, CPU share, voluntary, involuntary switches) per thread from a to b."""
    rows = []
    for tid, (name, cpu, v, nv) in b.items():
        _, c0, v0, nv0 = a.get(tid, (name, 0, 0, 0))
        rows.append((name, tid, (cpu - c0) / secs, v - v0, nv - nv0))
    return rows


def offline_cycle(work: Any) -> Callable[[], None]:
    """One offline batch of 8: pinned collate, copy in, forward, copy back, wait, split."""
    dev = work.device
    xs = work.inputs[:8]
    sizes = [x.shape[0] for x in xs]
    shape = (sum(sizes),) + tuple(xs[0].shape[1:])

    def cycle() -> None:
        host = torch.empty(shape, pin_memory=True)
        torch.cat(xs, 0, out=host)
        back = work.fn(host.to(dev, non_blocking=True)).to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        back.split(sizes, 0)

    return cycle


def loop_us(f: Callable[[], None], n: int = 2000) -> float:
    """Microseconds per call of f over n calls (after 50 warm-up calls)."""
    for _ in range(50):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def in_thread(f: Callable[[], None], n: int = 2000) -> float:
    """loop_us(f, n) run in a fresh thread."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(loop_us(f, n)))
    thread.start()
    thread.join()
    return result[0]


def serve(work: Any, name: str, spin_us: float = 2000.0, clients: int = 8) -> None:
    """``clients`` closed-loop threads on a cuda Batcher; print each busy thread's share."""
    b = work.batcher(clients, spin_us=spin_us)
    stop = threading.Event()
    counts = [0] * clients

    def client(i: int) -> None:
        xs = work.inputs
        j = i
        while not stop.is_set():
            b(xs[j % len(xs)])
            counts[i] += 1
            j += clients

    threads = [threading.Thread(target=client, args=(i,), name=f"client{i}") for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    before, c0, t0 = tasks(), sum(counts), time.perf_counter()
    time.sleep(1.5)
    secs, c1, after = time.perf_counter() - t0, sum(counts), tasks()
    names = {t.native_id: t.name for t in threading.enumerate()}
    names[b._thread.native_id] = "DISPATCHER"
    stop.set()
    for t in threads:
        t.join()
    print(f"{name} batcher spin {spin_us}: {(c1 - c0) / secs:.0f} req/s; threads {len(after)}")
    for tname, tid, cpu, v, nv in sorted(delta(before, after, secs), key=lambda r: -r[2]):
        if cpu > 0.005 or nv > 10:
            print(f"   {names.get(tid, tname):28s} {tid:8d} cpu {cpu:5.2f}  vol {v:7d}  invol {nv:6d}")
    b.close()


def main() -> None:
    print("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"), "torch threads", torch.get_num_threads(),
          "cpus", os.cpu_count(), len(os.sched_getaffinity(0)))
    print(torch.__config__.parallel_info())
    for name in (sys.argv[1] if len(sys.argv) > 1 else "story_transformer,small_mlp").split(","):
        work = serving.Work(name, "cuda")
        cycle = offline_cycle(work)
        main_us, thread_us = [], []
        for _ in range(3):
            main_us.append(round(loop_us(cycle), 1))
            thread_us.append(round(in_thread(cycle), 1))
        print(name, "offline cycle us main", main_us, "new thread", thread_us)
        serve(work, name)


if __name__ == "__main__":
    main()
