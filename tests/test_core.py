"""The core's semantics under 8 threads: what each mode serializes, and what it
must not; re-entrancy; release on every exit path; timeouts; GIL safety; fork;
exact counters."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import agxguard
import agxguard._model
from conftest import run_threads, another_thread_can_take_the_global_lock

THREADS = 8
ITERS = 40


def _regions(detector, stream_of=lambda i: None, key_of=lambda i: None):
    def worker(i):
        for _ in range(ITERS):
            with agxguard.guard(stream_of(i)):
                detector.inside(key_of(i))

    run_threads(THREADS, worker)


def test_off_mode_regions_overlap_so_the_detector_works(detector):
    agxguard.set_mode("off")
    _regions(detector)
    assert detector.max_total > 1


def test_global_mode_regions_never_overlap(detector):
    agxguard.set_mode("global")
    _regions(detector)
    assert detector.entries == THREADS * ITERS
    assert detector.max_total == 1


@pytest.mark.parametrize("wait", ["watch", "grace", "direct"])
def test_global_regions_never_overlap_under_every_way_of_waiting(detector, wait):
    """Each way a Python waiter can wait for the lock (_model._set_region_wait, the
    variants benchmarks/efficiency.py compares) still excludes."""
    from agxguard import _model as _C  # the measuring knobs

    agxguard.set_mode("global")
    previous = _C._set_region_wait(wait)
    try:
        _regions(detector)
    finally:
        _C._set_region_wait(previous)
    assert detector.entries == THREADS * ITERS
    assert detector.max_total == 1


def test_measuring_knobs_refuse_bad_values_naming_the_allowed_ones():
    from agxguard import _model as _C  # the measuring knobs

    with pytest.raises(ValueError, match="allowed: 'watch', 'grace', 'direct'"):
        _C._set_region_wait("fast")
    with pytest.raises(TypeError, match="must be a str"):
        _C._set_region_wait(1)
    with pytest.raises(ValueError, match="0 to 1000000 us"):
        _C._set_grace_us(-1)


def test_op_mode_takes_no_region_lock(detector):
    agxguard.set_mode("op")
    _regions(detector)
    assert detector.max_total > 1
    assert agxguard.stats()["domains"]["op"]["acquisitions"] == 0


def test_stream_mode_serializes_each_stream_and_overlaps_different_streams(detector):
    agxguard.set_mode("stream")
    streams = 4  # two threads per stream
    _regions(detector, stream_of=lambda i: 1000 + i % streams, key_of=lambda i: i % streams)
    assert all(v == 1 for v in detector.max_per_key.values()), dict(detector.max_per_key)
    assert detector.max_distinct_keys > 1
    assert agxguard.stats()["domains"]["stream"]["locks"] >= streams


def test_stream_mode_uses_the_threads_current_stream(detector):
    agxguard.set_mode("stream")

    def worker(i):
        with agxguard.use_stream(("queue", i % 2)):
            for _ in range(ITERS):
                with agxguard.guard():
                    detector.inside(i % 2)

    run_threads(THREADS, worker)
    assert detector.max_per_key[0] == 1 and detector.max_per_key[1] == 1
    assert detector.max_distinct_keys == 2


def test_call_site_in_op_mode_serializes_calls(detector):
    agxguard.set_mode("op")
    call = agxguard._C.Guard(site="call").call

    def worker(i):
        for _ in range(ITERS):
            call(detector.inside)

    run_threads(THREADS, worker)
    assert detector.max_total == 1
    assert agxguard.stats()["domains"]["op"]["acquisitions"] == THREADS * ITERS


def test_throttle_admits_at_most_n_regions_and_does_reach_n(detector):
    agxguard.set_mode("off")
    with agxguard.throttle(2):
        _regions(detector)
    assert detector.max_total == 2
    assert agxguard.stats()["throttle"]["acquisitions"] == THREADS * ITERS


def test_nested_regions_take_one_throttle_slot():
    with agxguard.throttle(1), agxguard.guard(), agxguard.guard():
        assert agxguard.stats()["throttle"]["in_use"] == 1
    assert agxguard.stats()["throttle"]["in_use"] == 0


def test_regions_are_reentrant_in_every_mode():
    for m in agxguard.MODES:
        with agxguard.mode(m):
            with agxguard.guard():
                with agxguard.guard():
                    with agxguard.guard(7), agxguard.guard(7):
                        pass
    g = agxguard.stats()["domains"]["global"]
    assert (g["acquisitions"], g["reentries"]) == (1, 3)
    lock = agxguard.global_lock()
    with lock, lock:
        assert lock.owned()
    assert not lock.locked()


def test_exception_inside_region_releases_the_lock():
    agxguard.set_mode("global")
    with pytest.raises(ZeroDivisionError):
        with agxguard.guard():
            1 / 0
    assert not agxguard.global_lock().locked()
    assert agxguard._model.region_depth() == 0


def test_keyboard_interrupt_inside_region_releases_the_lock():
    agxguard.set_mode("global")
    with pytest.raises(KeyboardInterrupt):
        with agxguard.guard():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
    assert not agxguard.global_lock().locked()
    assert another_thread_can_take_the_global_lock()


def _hold_in_thread(lock_factory, hold_s):
    """Take a lock in another thread and keep it for hold_s; returns once it is held."""
    held = threading.Event()

    def body():
        with lock_factory():
            held.set()
            time.sleep(hold_s)

    t = threading.Thread(target=body)
    t.start()
    held.wait()
    return t


def test_ctrl_c_interrupts_a_blocked_wait():
    agxguard.set_mode("global")
    holder = _hold_in_thread(agxguard.guard, 3.0)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with agxguard.guard():
            pytest.fail("entered a region another thread holds")
    assert time.monotonic() - t0 < 2.0
    holder.join()


def test_wait_past_timeout_raises_lock_timeout():
    agxguard.set_mode("global")
    agxguard.set_lock_timeout(timeout_ms=100)
    holder = _hold_in_thread(agxguard.guard, 1.0)
    t0 = time.monotonic()
    with pytest.raises(agxguard.LockTimeout, match="'global' lock"):
        with agxguard.guard():
            pass
    assert 0.09 < time.monotonic() - t0 < 0.9
    assert agxguard.stats()["domains"]["global"]["timeouts"] == 1
    holder.join()


def test_wait_past_warn_threshold_warns_once_then_proceeds():
    agxguard.set_mode("global")
    agxguard.set_lock_timeout(warn_ms=50)
    holder = _hold_in_thread(agxguard.guard, 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with agxguard.guard():
            pass
    holder.join()
    msgs = [w for w in caught if issubclass(w.category, agxguard.LockWaitWarning)]
    assert len(msgs) == 1 and "'global' lock" in str(msgs[0].message)


def test_timeout_action_abort_ends_the_process():
    code = textwrap.dedent("""
        import threading, time, agxguard
        agxguard.set_mode("global")
        agxguard.set_lock_timeout(timeout_ms=50, action="abort")
        ev = threading.Event()
        def hold():
            with agxguard.guard():
                ev.set(); time.sleep(2)
        threading.Thread(target=hold, daemon=True).start()
        ev.wait()
        with agxguard.guard():
            pass
        print("not reached")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stderr)
    assert "past the timeout; aborting" in r.stderr


def test_holder_needing_the_gil_never_deadlocks_with_a_waiter_holding_it():
    agxguard.set_mode("global")
    entered = threading.Event()
    done = []

    def holder():
        with agxguard.guard():
            entered.set()
            # pure-Python work: needs the GIL for every bytecode
            x = 0
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                x += 1
            done.append(x)

    def waiter():
        entered.wait()
        with agxguard.guard():  # holds the GIL when it starts to wait
            done.append("waiter")

    run_threads(2, lambda i: holder() if i == 0 else waiter(), timeout=20)
    assert done[-1] == "waiter" and done[0] > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
def test_forked_child_can_take_locks_another_thread_held():
    agxguard.set_mode("global")
    agxguard.set_throttle(1)
    holder = _hold_in_thread(agxguard.guard, 1.0)  # holds the global lock and the only throttle slot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, on 3.12+
        pid = os.fork()
    if pid == 0:  # child: only this thread exists; the holder's locks must be free
        status = 1
        try:
            agxguard.set_lock_timeout(timeout_ms=2000)
            with agxguard.guard():
                with agxguard.mode("stream"), agxguard.guard(3):
                    status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    holder.join()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_lock_held_by_the_forking_thread_stays_held_in_the_child():
    agxguard.set_mode("global")
    with agxguard.guard():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            ok = agxguard.global_lock().owned()
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_stats_count_exactly_what_happened():
    agxguard.set_mode("global")
    agxguard.reset_stats()

    def worker(i):
        for _ in range(500):
            with agxguard.guard():
                with agxguard.guard():
                    pass

    run_threads(THREADS, worker)
    g = agxguard.stats()["domains"]["global"]
    assert g["acquisitions"] == THREADS * 500
    assert g["reentries"] == THREADS * 500
    assert g["contentions"] <= g["acquisitions"]
    assert g["wait_ns"] >= 0 and g["hold_ns"] > 0
    assert (g["contentions"] == 0) == (g["wait_ns"] == 0)
    assert agxguard.stats()["domains"]["op"]["acquisitions"] == 0
    agxguard.reset_stats()
    assert agxguard.stats()["domains"]["global"]["acquisitions"] == 0


def test_handoffs_count_acquisitions_by_another_thread_than_the_last_holder():
    agxguard.set_mode("global")
    agxguard.reset_stats()
    for _ in range(3):  # one thread again and again: the lock never changes hands
        with agxguard.guard():
            pass
    first = agxguard.stats()["domains"]["global"]["handoffs"]
    assert first <= 1  # the first acquisition may follow another test's holder
    t = threading.Thread(target=lambda: agxguard.guard().__enter__() and agxguard.guard().__exit__(None, None, None))
    t.start()
    t.join()
    with agxguard.guard():  # back to this thread: a second change of hands
        pass
    assert agxguard.stats()["domains"]["global"]["handoffs"] == first + 2


def test_contention_is_counted_with_its_wait():
    agxguard.set_mode("global")
    holder = _hold_in_thread(agxguard.guard, 0.2)
    with agxguard.guard():
        pass
    holder.join()
    g = agxguard.stats()["domains"]["global"]
    assert g["acquisitions"] == 2 and g["contentions"] == 1
    assert g["wait_ns"] >= 50_000_000 and g["max_wait_ns"] == g["wait_ns"]


def test_mode_switched_inside_a_region_still_releases_what_was_taken():
    agxguard.set_mode("global")
    with agxguard.guard():
        agxguard.set_mode("off")
    assert not agxguard.global_lock().locked()


def test_decorator_guards_each_call(detector):
    agxguard.set_mode("global")

    @agxguard.guard()
    def work():
        detector.inside()
        return 42

    assert work.__name__ == "work"
    run_threads(THREADS, lambda i: [work() for _ in range(ITERS)])
    assert detector.max_total == 1
    assert work() == 42


def test_exit_without_enter_is_an_error():
    with pytest.raises(RuntimeError, match="never entered"):
        agxguard.guard().__exit__(None, None, None)


def test_mode_context_restores_the_previous_mode():
    agxguard.set_mode("op")
    with agxguard.mode("global"):
        assert agxguard.get_mode() == "global"
    assert agxguard.get_mode() == "op"


@pytest.mark.parametrize("bad", ["Global", "", "none", "per-op"])
def test_unknown_mode_is_a_value_error_naming_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="allowed: 'off', 'op', 'stream', 'global'"):
        agxguard.set_mode(bad)
    assert agxguard.get_mode() == "off"


def test_bad_arguments_name_the_value():
    with pytest.raises(TypeError, match="must be a str"):
        agxguard.set_mode(2)
    with pytest.raises(ValueError, match="-1"):
        agxguard.set_throttle(-1)
    with pytest.raises(TypeError):
        agxguard.set_throttle(1.5)
    with pytest.raises(ValueError, match="'explode'.*raise, abort"):
        agxguard.set_lock_timeout(100, action="explode")
    with pytest.raises(ValueError, match="timeout_ms"):
        agxguard.set_lock_timeout(timeout_ms=-5)
    with pytest.raises(TypeError, match="hashable"):
        agxguard.guard([1, 2])
    with pytest.raises(TypeError):
        agxguard.guard(1, stream=2)
    with pytest.raises(TypeError, match="callable"):
        agxguard.guard()(3)


def test_the_type_stub_names_everything_the_c_module_has():
    """agxguard/_C.pyi must keep up with csrc/: every public and private name of the
    built module has a stub (objc names only where the build has them)."""
    import ast

    import agxguard._C as C

    tree = ast.parse(open(os.path.join(os.path.dirname(agxguard.__file__), "_C.pyi")).read())
    stubbed = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stubbed |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    missing = sorted(m for m in dir(C) if not m.startswith("__") and m not in stubbed)
    assert not missing, f"no stub in agxguard/_C.pyi for: {missing}"
