"""Shared fixtures: every test starts from mode 'off', no throttle, no wait limits,
zeroed counters, and whatever it changes is put back."""
from __future__ import annotations

import collections
import threading
import time
from typing import Dict, Hashable, Optional

import pytest

import agxguard
import agxguard._model


@pytest.fixture(autouse=True)
def clean_agxguard():
    mode = agxguard.set_mode("off")
    throttle = agxguard.set_throttle(0)
    wait = agxguard.set_lock_timeout(None, None)
    agxguard.reset_stats()
    yield
    assert agxguard._model.region_depth() == 0, "a test left a guarded region open"
    agxguard.set_mode(mode)
    agxguard.set_throttle(throttle)
    agxguard.set_lock_timeout(**wait)


class OverlapDetector:
    """Records how many threads are inside regions at once, in total and per key.

    `inside(key)` is used as the body of a region under test: it enters, sleeps
    (releasing the GIL, which widens the window in which a second thread could
    enter), and leaves. The detector's own bookkeeping lock is held only for the
    counter updates, never across the sleep, so it serializes nothing it measures."""

    def __init__(self, hold_s: float = 0.0002):
        self.hold_s = hold_s
        self._mu = threading.Lock()
        self._active: Dict[Optional[Hashable], int] = collections.Counter()
        self._total = 0
        self.max_total = 0
        self.max_per_key: Dict[Optional[Hashable], int] = collections.Counter()
        self.max_distinct_keys = 0
        self.entries = 0

    def inside(self, key: Optional[Hashable] = None) -> None:
        with self._mu:
            self._active[key] += 1
            self._total += 1
            self.entries += 1
            self.max_total = max(self.max_total, self._total)
            self.max_per_key[key] = max(self.max_per_key[key], self._active[key])
            distinct = sum(1 for v in self._active.values() if v > 0)
            self.max_distinct_keys = max(self.max_distinct_keys, distinct)
        time.sleep(self.hold_s)
        with self._mu:
            self._active[key] -= 1
            self._total -= 1


def another_thread_can_take_the_global_lock(timeout: float = 10.0) -> bool:
    """Whether a fresh thread gets the global lock at once (and gives it back)."""
    got = []

    def probe():
        lock = agxguard.global_lock()
        got.append(lock.acquire(blocking=False))
        if got[-1]:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join(timeout)
    return got == [True]


def run_threads(n: int, target, *args, timeout: float = 60.0):
    """Start n threads on target(index, *args) behind a barrier, join them, and
    re-raise the first exception any of them hit."""
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait()
            target(i, *args)
        except BaseException as e:  # reported below, never swallowed
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    alive = [t for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} threads still running after {timeout}s (deadlock?)"
    if errors:
        raise errors[0]


@pytest.fixture
def detector():
    return OverlapDetector()
