"""What one handoff between Python threads costs: N threads pass a token round a ring,
each waiting on its own waitable and setting the next one's, GIL taken back at every hop.

Compares, in one run: agxguard._C.Wakeup with spinning (and the GIL gate), the same
with spin_us=0, and a plain ``_thread`` lock used as the same auto-reset event (what
the Batcher used before). Reports microseconds per hop (median of --repeats).

    python3 benchmarks/wakeup_ring.py [--threads 8] [--hops 20000] [--repeats 3]
"""
from __future__ import annotations

import _thread
import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agxguard._C import Wakeup  # noqa: E402


class LockEvent:
    """A _thread lock held while clear: the Batcher's former answer channel."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.lock.acquire()

    def set(self) -> None:
        self.lock.release()

    def wait(self, timeout=None, spin_us=None) -> bool:
        return self.lock.acquire(True, -1 if timeout is None else timeout)


def ring(make, n: int, hops: int) -> float:
    """us per hop for n threads passing a token ``hops`` times in all."""
    events = [make() for _ in range(n)]
    rounds = hops // n
    done = threading.Barrier(n + 1)

    def member(i: int) -> None:
        mine, nxt = events[i], events[(i + 1) % n]
        for _ in range(rounds):
            mine.wait()
            nxt.set()
        done.wait()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    events[0].set()
    done.wait()
    elapsed = time.perf_counter() - t0
    for t in threads:
        t.join()
    return elapsed / (rounds * n) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--hops", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.threads < 2 or a.hops < a.threads or a.repeats < 1:
        p.error("--threads >= 2, --hops >= --threads, --repeats >= 1")
    variants = {
        "Wakeup spin 2000 us": lambda: Wakeup(spin_us=2000),
        "Wakeup spin 0": lambda: Wakeup(spin_us=0),
        "_thread lock": LockEvent,
    }
    times = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, make in variants.items():
            times[name].append(ring(make, a.threads, a.hops))
    print(f"ring of {a.threads} Python threads, {a.hops} hops, {os.cpu_count()} cpus, "
          f"python {sys.version.split()[0]}; median of {a.repeats}:")
    for name, ts in times.items():
        print(f"  {name:<22} {statistics.median(ts):8.2f} us per hop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
