"""Nested regions and hooked driver calls while the mode changes under them
(issue 11, point 1): no deadlock whatever set_mode does meanwhile.

Each scenario runs in a child process with a timeout, so a deadlock is a test
failure, not a hung test run. The mode-switch hammer (a thread switching modes
as fast as it can while 32 threads nest regions and, on the driver model, make
hooked calls inside them) runs for AGXGUARD_HAMMER_S seconds per scenario (CI:
the default of a few seconds; set it higher for a soak)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import agxguard
import agxguard._model
from agxguard.lab import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAMMER_S = float(os.environ.get("AGXGUARD_HAMMER_S", "1.0"))

# The child: `threads` workers nest regions (outer on its stream, inner on the
# same or another stream, sometimes an op-site guard, sometimes a hooked model
# op inside) while one thread switches modes at random; prints one JSON line.
_CHILD = textwrap.dedent(r"""
    import json, random, sys, threading, time
    import agxguard
    from agxguard import _C, _model
    cfg = json.loads(sys.argv[1])
    agxguard.set_throttle(cfg["throttle"])
    agxguard.set_mode(cfg["start"])
    use_model = cfg["model"]
    if use_model:
        from agxguard.lab import model
        model.configure(**{b: False for b in model.BUGS})
        model.hook()
    stop = threading.Event()
    done = [0] * cfg["threads"]
    errors = []
    inner = [agxguard.guard(stream=k) for k in range(4)]
    call_site = _C.Guard(site="call")

    def worker(i):
        rnd = random.Random(i)
        try:
            with agxguard.use_stream(i % 4):
                while not stop.is_set():
                    with agxguard.guard():
                        with agxguard.guard():
                            time.sleep(0)          # let the switcher run between entries
                            with inner[rnd.randrange(4)]:
                                with call_site:
                                    if use_model:
                                        model.run_op(queue=i % 4, length=16)
                    done[i] += 1
        except BaseException as e:
            errors.append(repr(e))

    def switcher():
        rnd = random.Random(99)
        while not stop.is_set():
            agxguard.set_mode(rnd.choice(agxguard.MODES))
            time.sleep(rnd.choice((0, 0, 0.0001, 0.001)))

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(cfg["threads"])]
    sw = threading.Thread(target=switcher)
    for t in ts: t.start()
    sw.start()
    native = None
    if use_model:
        # native regions (model_runner) with hooked calls inside, beside the Python ones
        native = model.run_threads(8, cfg["native_iterations"], shared_queue=True, region=True,
                                   internal_every=0, length=16, hooks=False)
    time.sleep(cfg["seconds"])
    stop.set()
    for t in ts: t.join()
    sw.join()
    print("NESTED-RESULT " + json.dumps({"done": done, "errors": errors,
                                          "native_ok": None if native is None else native["result_ok"],
                                          "depth": _model.region_depth()}), flush=True)
""")


def _run_child(timeout: float, **cfg):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("AGXGUARD_DRIVER", None)
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: the child did not finish in {timeout} s ({cfg})")
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    line = [x for x in p.stdout.splitlines() if x.startswith("NESTED-RESULT ")]
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(line[0].split(" ", 1)[1])


@pytest.mark.parametrize("throttle", [0, 1, 3])
@pytest.mark.parametrize("start", agxguard.MODES)
def test_nested_regions_survive_mode_switches(start, throttle):
    """32 threads nest regions on shared streams while the mode flips at random:
    every thread keeps finishing regions (today a thread in `stream` holding its
    stream lock waits for the global lock that a thread entered under `global`
    holds while it waits for that stream lock)."""
    r = _run_child(timeout=30 + 4 * HAMMER_S, threads=32, throttle=throttle, start=start, model=False,
                   seconds=HAMMER_S / 2, native_iterations=0)
    assert r["errors"] == []
    assert min(r["done"]) > 0, r["done"]
    assert r["depth"] == 0


@pytest.mark.skipif(not model.available(), reason="the driver model needs an Objective-C runtime build")
@pytest.mark.parametrize("throttle", [0, 2])
def test_hooked_calls_inside_regions_survive_mode_switches(throttle):
    """The mode-switch hammer on the driver model: 32 Python threads make hooked
    model ops inside nested regions, 8 native threads run the op pattern inside
    native regions, and the mode flips at random: everything finishes (today a
    region holding the global lock makes a hooked call that waits for a stream
    lock, while a region holding that stream lock makes one that waits for the
    global lock)."""
    r = _run_child(timeout=45 + 4 * HAMMER_S, threads=32, throttle=throttle, start="stream", model=True,
                   seconds=HAMMER_S, native_iterations=400)
    assert r["errors"] == []
    assert min(r["done"]) > 0, r["done"]
    assert r["native_ok"] is True
    assert r["depth"] == 0


# A hooked call that waits for a stream lock another thread holds (and never
# gives back): the wait must end the process with a message, not wait forever.
_WAIT_CHILD = textwrap.dedent(r"""
    import os, signal, sys, threading, time
    import agxguard
    from agxguard import _C
    from agxguard.lab import model
    how = sys.argv[1]
    model.configure(**{b: False for b in model.BUGS})
    model.hook()
    agxguard.set_mode("stream")
    model.run_op(queue=0, length=16)          # the queue exists and has its stream key
    held = threading.Event()
    def holder():
        _C.stream_lock(0x4147584D00000000 | 1000).acquire()   # model queue 0's stream, kept
        held.set()
        time.sleep(3600)
    threading.Thread(target=holder, daemon=True).start()
    held.wait()
    if how == "timeout":
        agxguard.set_lock_timeout(100, action="raise")
    else:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    print("CALLING", flush=True)
    model.run_op(queue=0, length=16)            # its hooked calls wait for the held stream lock
    print("RETURNED", flush=True)
""")


def _wait_child(how: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("AGXGUARD_DRIVER", None)
    try:
        return subprocess.run([sys.executable, "-c", _WAIT_CHILD, how], capture_output=True, text=True,
                              timeout=30, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the hooked call kept waiting ({how}): no way out of a driver wait")


@pytest.mark.skipif(not model.available(), reason="the driver model needs an Objective-C runtime build")
def test_hooked_wait_past_the_timeout_ends_the_process_under_action_raise():
    """A driver call cannot raise: past the timeout with action 'raise' it ends
    the process with the message (today it prints 'still waiting' and waits on)."""
    p = _wait_child("timeout")
    assert "CALLING" in p.stdout and "RETURNED" not in p.stdout, p.stdout
    assert p.returncode == -6, (p.returncode, p.stderr[-2000:])
    assert "passed the timeout" in p.stderr and "'raise' cannot raise from a driver call" in p.stderr


@pytest.mark.skipif(not model.available(), reason="the driver model needs an Objective-C runtime build")
def test_ctrl_c_ends_a_hooked_wait_on_the_main_thread():
    """Ctrl-C while the main thread waits inside a hooked driver call ends the
    process as SIGINT does, with a message (today the wait never notices)."""
    p = _wait_child("interrupt")
    assert "CALLING" in p.stdout and "RETURNED" not in p.stdout, p.stdout
    assert p.returncode == -2, (p.returncode, p.stderr[-2000:])
    assert "was interrupted (KeyboardInterrupt)" in p.stderr


# ---- the rule, entry by entry (in process: nothing here can hang if the rule holds;
# each wait that the rule forbids is bounded by the holder's own timer)

def _lock_address(lock) -> int:
    return int(repr(lock).rsplit(" at ", 1)[1].rstrip(">"), 16)


def test_a_nested_region_keeps_the_mode_its_thread_is_bound_to():
    """Entered under `global`, a region's nested regions take the global lock
    again after set_mode('stream'), not a stream lock (today they take the
    stream lock: the other half of the deadlock)."""
    agxguard.set_mode("global")
    with agxguard.guard():
        agxguard.set_mode("stream")
        with agxguard.guard(stream=5):
            assert agxguard.global_lock().owned()
            assert not agxguard._C.stream_lock(5).locked()
            assert agxguard._model.region_depth() == 2
    assert not agxguard.global_lock().locked()


def test_a_thread_that_holds_no_lock_reads_the_mode_again():
    """An `off` region holds nothing, so a nested region reads the current mode
    (nothing held: its wait cannot close a cycle)."""
    with agxguard.guard():
        agxguard.set_mode("global")
        with agxguard.guard():
            assert agxguard.global_lock().owned()
        assert not agxguard.global_lock().locked()


def _keys_in_lock_order():
    """Two stream keys whose locks lie low and high in the lock order."""
    by_addr = sorted((_lock_address(agxguard._C.stream_lock(k)), k) for k in range(900, 940))
    return by_addr[0][1], by_addr[-1][1]


def _hold(lock, seconds, taken):
    def run():
        lock.acquire()
        taken.set()
        time.sleep(seconds)
        lock.release()
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_nested_region_waits_only_up_the_lock_order():
    """In `stream` mode a nested region on another stream waits for that stream's
    lock when it comes later in the lock order, and when it comes earlier and is
    busy runs under the outer region's lock instead, counted in nested_skips."""
    low, high = _keys_in_lock_order()
    agxguard.set_mode("stream")
    taken = threading.Event()
    holder = _hold(agxguard._C.stream_lock(high), 0.3, taken)
    taken.wait()
    t0 = time.monotonic()
    with agxguard.guard(stream=low):
        with agxguard.guard(stream=high):  # up the order: waits for the holder
            assert agxguard._C.stream_lock(high).owned()
    assert time.monotonic() - t0 >= 0.25
    holder.join()

    taken.clear()
    holder = _hold(agxguard._C.stream_lock(low), 0.5, taken)
    taken.wait()
    before = agxguard.stats()["nested_skips"]
    t0 = time.monotonic()
    with agxguard.guard(stream=high):
        with agxguard.guard(stream=low):  # down the order and busy: no wait
            assert not agxguard._C.stream_lock(low).owned()
            assert agxguard._C.stream_lock(high).owned()
    assert time.monotonic() - t0 < 0.25
    assert agxguard.stats()["nested_skips"] == before + 1
    holder.join()

    with agxguard.guard(stream=high):
        with agxguard.guard(stream=low):  # down the order but free: taken
            assert agxguard._C.stream_lock(low).owned()
