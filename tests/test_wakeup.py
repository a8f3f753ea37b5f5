"""agxguard._C.Wakeup, the auto-reset event the Batcher's callers and dispatcher wait on:
set/wait/clear semantics, timeouts, wake-ups across threads with and without spinning,
Ctrl-C while waiting, bad arguments."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from agxguard._C import Wakeup


def test_set_then_wait_returns_true_once_and_clears():
    w = Wakeup()
    assert not w.is_set()
    w.set()
    w.set()  # setting twice is still one set (auto-reset, not a counter)
    assert w.is_set()
    assert w.wait() is True
    assert not w.is_set()
    assert w.wait(0) is False


def test_clear_reports_whether_it_was_set():
    w = Wakeup()
    assert w.clear() is False
    w.set()
    assert w.clear() is True
    assert w.wait(0.01) is False


@pytest.mark.parametrize("spin_us", [0, 50, 5000])
def test_wait_times_out_near_its_timeout(spin_us):
    w = Wakeup(spin_us=spin_us)
    t0 = time.monotonic()
    assert w.wait(0.05) is False
    took = time.monotonic() - t0
    assert 0.045 <= took < 2.0, took


@pytest.mark.parametrize("spin_us", [0, 2000])
def test_a_set_from_another_thread_wakes_the_waiter(spin_us):
    w = Wakeup(spin_us=spin_us)
    threading.Timer(0.05, w.set).start()
    t0 = time.monotonic()
    assert w.wait(10) is True
    assert time.monotonic() - t0 >= 0.04


@pytest.mark.parametrize("spin_us", [0, 100, 2000])
def test_a_ring_of_threads_hands_a_token_round_exactly(spin_us):
    """8 threads pass one token round a ring 300 times through Wakeups: every set
    must reach its waiter (a lost wake-up hangs the ring and fails the timeout)."""
    n, rounds = 8, 300
    ws = [Wakeup(spin_us=spin_us) for _ in range(n)]
    seen = [0] * n
    errors = []

    def member(i):
        try:
            for _ in range(rounds):
                if not ws[i].wait(20):
                    raise AssertionError(f"member {i} was never woken")
                seen[i] += 1
                ws[(i + 1) % n].set()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ws[0].set()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert seen == [rounds] * n


def test_ctrl_c_interrupts_a_wait():
    w = Wakeup(spin_us=100)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        w.wait(30)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 2e6])
def test_bad_spin_is_a_value_error_naming_the_range(bad):
    with pytest.raises(ValueError, match="spin_us must be"):
        Wakeup(spin_us=bad)
    with pytest.raises(ValueError, match="spin_us must be"):
        Wakeup().wait(0, bad)


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_bad_timeout_is_a_value_error(bad):
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
        Wakeup().wait(bad)


def test_wait_takes_at_most_two_arguments():
    with pytest.raises(TypeError):
        Wakeup().wait(1, 2, 3)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                    reason="CPU affinity is Linux-only (os.sched_getaffinity)")
def test_usable_cpus_is_the_affinity_mask_at_most():
    """Spinning is allowed while fewer threads spin than the usable CPUs less two;
    that count is the thread's affinity mask capped by a cgroup CPU quota."""
    from agxguard import _model

    n = _model._usable_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    from agxguard._affinity import set_affinity

    saved = os.sched_getaffinity(0)
    set_affinity({min(saved)})
    try:
        assert _model._usable_cpus() == 1  # pinned to one CPU: no spinning at all
    finally:
        set_affinity(saved)
    assert _model._usable_cpus() == n
