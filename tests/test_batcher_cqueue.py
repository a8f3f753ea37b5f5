"""agxguard._C.RequestQueue, the Batcher's per-request path in C (csrc/python/reqqueue.c).

The queue is driven by hand here: caller threads call it (queue, wait, answer in one C
call) and the test thread plays the dispatcher (_q_take, _q_complete), so each outcome
is pinned down without timing luck. The last tests check, through the Batcher, that a
request costs its caller no Python frame and the dispatcher no Python frame per request.
"""
import asyncio
import concurrent.futures
import re
import sys
import threading
import time

import pytest
import torch

from agxguard._C import RequestQueue
from agxguard.batcher import Batcher

TIMEOUT = 10.0


class Q(RequestQueue):
    """The queue with the name its messages use (the Batcher's attribute)."""
    name = "q"


class Caller(threading.Thread):
    """One blocking call q(x, timeout) in a thread; keeps what it returned or raised."""

    def __init__(self, q, x, timeout=None):
        super().__init__(daemon=True)
        self.q, self.x, self.timeout = q, x, timeout
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.q(self.x, timeout=self.timeout)
        except BaseException as exc:  # kept for the test to check
            self.error = exc


def wait_queued(q, n):
    deadline = time.monotonic() + TIMEOUT
    while q._queued < n:
        assert time.monotonic() < deadline, f"only {q._queued} of {n} requests queued"
        time.sleep(0.001)


def start_callers(q, n):
    """n Callers of q with a (1, 2) request each, started and queued."""
    callers = [Caller(q, torch.zeros(1, 2)) for _ in range(n)]
    for c in callers:
        c.start()
    wait_queued(q, n)
    return callers


def settled(s):
    return s["answered"] + s["failed"] + s["cancelled"] + s["expired"] + s["queued"] + s["in_flight"]


def test_a_call_that_times_out_raises_and_is_counted_expired_and_never_taken():
    q = Q()
    c = Caller(q, torch.zeros(1, 2), timeout=0.05)
    c.start()
    c.join(TIMEOUT)
    assert isinstance(c.error, TimeoutError)
    assert re.search(r"Batcher 'q': no result within 0.05 s", str(c.error))
    later = concurrent.futures.Future()
    q._q_put(torch.ones(1, 2), later, False, None, None)
    batch, xs, rows, lengths, deliver = q._q_take(8, 0.0, None)
    assert len(batch) == 1 and torch.equal(xs[0], torch.ones(1, 2))  # the expired one is dropped
    assert rows == [1] and lengths is None and deliver == []
    s = q._q_stats()
    assert (s["accepted"], s["expired"], s["in_flight"], s["queued"]) == (2, 1, 1, 0)


def test_a_request_given_up_before_its_batch_forms_is_dropped_and_counted_cancelled():
    q = Q()
    loop_future = object()
    gone = q._q_put(torch.zeros(1, 2), loop_future, True, None, None)
    cancelled = concurrent.futures.Future()
    q._q_put(torch.zeros(1, 2), cancelled, False, None, None)
    kept = concurrent.futures.Future()
    q._q_put(torch.full((1, 2), 3.0), kept, False, None, None)
    assert q._q_give_up(gone) is True
    assert q._q_give_up(gone) is False  # given up once
    assert cancelled.cancel()
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert len(batch) == 1 and torch.equal(xs[0], torch.full((1, 2), 3.0))
    assert kept.running()
    deliver = q._q_complete(batch, ["answer"], None)
    assert deliver == [(kept, "answer", None)]
    s = q._q_stats()
    assert (s["accepted"], s["answered"], s["cancelled"]) == (3, 1, 2)
    assert settled(s) == 3


def test_one_exception_answers_every_caller_of_the_batch():
    q = Q()
    callers = start_callers(q, 3)
    batch, _, _, _, _ = q._q_take(8, 0.0, None)
    assert len(batch) == 3
    boom = ValueError("boom")
    assert q._q_complete(batch, None, boom) == []
    for c in callers:
        c.join(TIMEOUT)
        assert c.error is boom
    s = q._q_stats()
    assert (s["failed"], s["answered"], s["batches"], s["batch_sizes"]) == (3, 0, 1, {3: 1})


def test_a_caller_that_gives_up_while_its_batch_runs_gets_nothing_twice():
    q = Q()
    results = []

    def two_calls():
        try:
            q(torch.zeros(1, 2), timeout=0.2)
        except TimeoutError as exc:
            results.append(exc)
        results.append(q(torch.ones(1, 2), timeout=TIMEOUT))

    t = threading.Thread(target=two_calls, daemon=True)
    t.start()
    wait_queued(q, 1)
    batch, _, _, _, _ = q._q_take(8, 0.0, None)  # its batch runs ...
    deadline = time.monotonic() + TIMEOUT
    while not results:  # ... while its caller gives up
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert q._q_complete(batch, ["stale"], None) == []  # the answer is discarded
    wait_queued(q, 1)
    batch2, _, _, _, _ = q._q_take(8, 0.0, None)
    q._q_complete(batch2, ["fresh"], None)
    t.join(TIMEOUT)
    assert isinstance(results[0], TimeoutError) and results[1] == "fresh"
    s = q._q_stats()
    assert (s["accepted"], s["answered"], s["expired"], s["batches"]) == (2, 1, 1, 2)
    assert settled(s) == 2


def test_stats_count_every_outcome_and_keep_latency_percentiles():
    q = Q()
    callers = start_callers(q, 4)
    s = q._q_stats()
    assert (s["accepted"], s["queued"], s["in_flight"]) == (4, 4, 0)
    batch, _, _, _, _ = q._q_take(3, 0.0, None)
    s = q._q_stats()
    assert (s["queued"], s["in_flight"]) == (1, 3)
    time.sleep(0.01)
    q._q_complete(batch, [1, 2, 3], None)
    batch, _, _, _, _ = q._q_take(3, 0.0, None)
    q._q_complete(batch, None, RuntimeError("x"))
    for c in callers:
        c.join(TIMEOUT)
    s = q._q_stats()
    assert (s["answered"], s["failed"], s["batches"], s["requests"]) == (3, 1, 2, 4)
    assert s["batch_sizes"] == {1: 1, 3: 1} and s["mean_batch_size"] == 2.0
    assert 10.0 <= s["latency_p50_ms"] <= s["latency_p99_ms"] <= s["latency_p999_ms"]
    assert settled(s) == s["accepted"] == 4
    q._q_reset_stats()
    s = q._q_stats()
    assert (s["accepted"], s["answered"], s["latency_p50_ms"], s["batch_sizes"]) == (0, 0, None, {})


def test_a_closed_queue_refuses_with_its_message_and_a_full_one_raises_queue_full():
    import queue

    q = Q(max_queue=1)
    q._q_put(torch.zeros(1, 1), concurrent.futures.Future(), False, None, None)
    with pytest.raises(queue.Full, match=re.escape("Batcher 'q': queue full (1 requests) for 0.05 s")):
        q(torch.zeros(1, 1), timeout=0.05)
    assert [len(r) for r in [q._q_close("closed for the test", False)]] == [0]
    with pytest.raises(RuntimeError, match="closed for the test"):
        q(torch.zeros(1, 1))
    with pytest.raises(TypeError, match="timeout must be None or a number of seconds >= 0, got 'x'"):
        q(torch.zeros(1, 1), timeout="x")


# ---------------------------------------------------------------- no Python per request
def _python_calls(fn):
    """Python frames entered (profile 'call' events) in this thread while fn() runs."""
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code) if event == "call" else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_a_call_runs_no_python_frame_in_its_caller():
    with Batcher(lambda x: x + 1, max_batch=4, max_delay_ms=0) as b:
        x = torch.zeros(1, 3)
        b(x, timeout=TIMEOUT)  # warm: torch imported, the key known
        got = []
        calls = _python_calls(lambda: [got.append(b(x)) for _ in range(20)] and
                              got.append(b(x, timeout=TIMEOUT)))
        assert all(torch.equal(g, torch.ones(1, 3)) for g in got) and len(got) == 21
    names = sorted({f"{c.co_filename.rsplit('/', 1)[-1]}:{c.co_name}" for c in calls})
    assert [n for n in names if "<lambda>" not in n and "<listcomp>" not in n] == [], names


def test_the_dispatcher_runs_python_per_batch_not_per_request():
    """Batches of 8 cost the dispatcher no more Python frames than batches of 1."""
    def per_batch(clients):
        counts = {}
        lock = threading.Lock()

        def prof(frame, event, arg):
            if event == "call" and threading.current_thread().name.startswith("agxguard-batcher"):
                with lock:
                    counts["n"] = counts.get("n", 0) + 1

        threading.setprofile(prof)
        try:
            b = Batcher(lambda x: x * 2, max_batch=clients, max_delay_ms=500, name="prof")
        finally:
            threading.setprofile(None)
        xs = [torch.full((1, 4), float(i)) for i in range(clients)]
        try:
            for _ in range(3):  # warm up
                threads = [Caller(b, x, TIMEOUT) for x in xs]
                [t.start() for t in threads]
                [t.join(TIMEOUT) for t in threads]
            b.reset_stats()
            counts["n"] = 0
            for _ in range(10):
                threads = [Caller(b, x, TIMEOUT) for x in xs]
                [t.start() for t in threads]
                [t.join(TIMEOUT) for t in threads]
                assert all(torch.equal(t.result, x * 2) for t, x in zip(threads, xs))
            s = b.stats()
            n = counts["n"]
        finally:
            b.close()
        assert s["batch_sizes"] == {clients: 10}, s["batch_sizes"]
        return n / s["batches"]

    one, eight = per_batch(1), per_batch(8)
    print(f"frames per batch: {one:.1f} (1) {eight:.1f} (8)")
    assert eight <= one + 2, f"{one:.1f} Python frames per batch of 1, {eight:.1f} per batch of 8"


def test_acall_and_threads_share_the_c_queue_and_every_request_is_settled():
    with Batcher(lambda x: x + 1, max_batch=8, max_delay_ms=1) as b:
        async def many():
            return await asyncio.gather(*[b.acall(torch.full((1, 2), float(i)), timeout=TIMEOUT)
                                          for i in range(32)])

        threads = [Caller(b, torch.full((1, 2), -1.0), TIMEOUT) for _ in range(8)]
        [t.start() for t in threads]
        got = asyncio.run(many())
        [t.join(TIMEOUT) for t in threads]
        assert all(torch.equal(g, torch.full((1, 2), i + 1.0)) for i, g in enumerate(got))
        assert all(torch.equal(t.result, torch.zeros(1, 2)) for t in threads)
    s = b.stats()
    assert s["answered"] == s["accepted"] == 40 and settled(s) == 40


def test_requests_leave_no_reference_to_their_input_behind():
    """Every way in (call, call with timeout, submit, acall, a failing batch, a timed-out
    call) drops the queue's references to the input once finished."""
    import gc

    x = torch.zeros(1, 4)
    gate = threading.Event()

    def fn(t):
        gate.wait(TIMEOUT)
        if t.shape[0] == 3:
            raise ValueError("a batch of three fails")
        return t + 1

    with Batcher(fn, max_batch=4, max_delay_ms=0) as b:
        gate.set()
        b(x)
        gc.collect()
        before = sys.getrefcount(x)
        for _ in range(300):
            b(x)
            b(x, timeout=TIMEOUT)
            b.submit(x).result(TIMEOUT)

        async def calls():
            for _ in range(100):
                await b.acall(x, timeout=TIMEOUT)

        asyncio.run(calls())
        gate.clear()
        first = b.submit(x)  # holds the dispatcher in fn
        time.sleep(0.05)
        with pytest.raises(TimeoutError):
            b(x, timeout=0.01)
        futs = [b.submit(x) for _ in range(3)]
        gate.set()
        first.result(TIMEOUT)
        for f in futs:
            with pytest.raises(ValueError, match="a batch of three fails"):
                f.result(TIMEOUT)
        del f, futs, first
        gc.collect()
        assert sys.getrefcount(x) == before


def test_batcher_profile_benchmark_runs_on_cpu_and_its_steps_fit_in_the_cycle():
    """benchmarks/batcher_profile.py (written for the GPU machine) runs here, in a child."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "batcher_profile.py"),
                          "--device", "cpu", "--seconds", "0.3", "--clients", "4",
                          "--workloads", "small_mlp"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line for line in out.stdout.splitlines() if line.startswith("small_mlp")][0].split()
    cycle, steps = float(row[3]), [float(v) for v in row[4:11]]
    assert all(v >= 0 for v in steps) and 0 < sum(steps) <= cycle * 1.05, row


# ---------------------------------------------------------------- a take that fails
TAKE_STEPS = 11  # the steps needing memory in the take below: 2 for the expired request,
# 3 appends to the batch, the 3 lists/tuple of its answer and one int per request


@pytest.mark.parametrize("step", range(1, TAKE_STEPS + 2))
def test_a_take_that_runs_out_of_memory_at_any_step_loses_no_request(step):
    """Every step of a take that needs memory fails once in turn (_q_fault): the take
    raises MemoryError, leaves its requests queued in order (futures not yet running)
    and keeps the expired request's delivery, which the next take returns at once, and
    the take after it every request: each exactly once. The last step number is the
    control: no failure."""
    q = Q()
    late = concurrent.futures.Future()
    q._q_put(torch.zeros(1, 2), late, False, None, 0.0)  # expires before any batch forms
    futs = [concurrent.futures.Future() for _ in range(3)]
    reqs = [q._q_put(torch.full((1, 2), float(i)), f, False, None, None) for i, f in enumerate(futs)]
    q._q_fault(step)
    failed = False
    try:
        got = q._q_take(8, 0.0, None)
    except MemoryError:
        failed = True
        # steps 1-2 are the expired request's: it stays queued too, undelivered
        assert not any(f.running() for f in futs) and q._queued == (4 if step <= 2 else 3)
        got = q._q_take(8, 0.0, None)
        if step > 2:  # the expired one's delivery was made: the next take returns it at once
            assert got[0] == [] and len(got[4]) == 1
            stashed = got[4]
            got = q._q_take(8, 0.0, None)
            got = got[:4] + (stashed + got[4],)
    assert failed == (step <= TAKE_STEPS)
    batch, xs, rows, _, deliver = got
    assert batch == reqs and [x[0, 0].item() for x in xs] == [0.0, 1.0, 2.0] and rows == [1, 1, 1]
    assert all(f.running() for f in futs)
    assert len(deliver) == 1 and deliver[0][0] is late and isinstance(deliver[0][2], TimeoutError)
    s = q._q_stats()
    assert (s["accepted"], s["expired"], s["in_flight"], s["queued"]) == (4, 1, 3, 0)


def test_a_caller_whose_take_failed_is_answered_by_the_next_one():
    q = Q()
    c = Caller(q, torch.ones(1, 2))
    c.start()
    wait_queued(q, 1)
    q._q_fault(1)
    with pytest.raises(MemoryError):
        q._q_take(8, 0.0, None)
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    q._q_complete(batch, [xs[0] * 3], None)
    c.join(TIMEOUT)
    assert c.error is None and torch.equal(c.result, torch.full((1, 2), 3.0))


def test_the_batcher_answers_every_request_when_its_dispatcher_runs_out_of_memory():
    """The dispatcher's take fails with MemoryError (logged, the dispatcher goes on): the
    requests it was taking are served by the next take."""
    with Batcher(lambda x: x + 1, max_batch=4, max_delay_ms=1) as b:
        b._q_fault(2)
        futures = [b.submit(torch.full((1, 2), float(i))) for i in range(6)]
        got = [f.result(TIMEOUT) for f in futures]
    assert [g[0, 0].item() for g in got] == [float(i + 1) for i in range(6)]
    assert b.stats()["answered"] == 6


@pytest.mark.parametrize("step", range(1, 6))
def test_an_answer_that_runs_out_of_memory_loses_no_delivery(step):
    """_q_complete fails at its step-th delivery (of 4: a call and three futures; step 5
    is the control): it raises MemoryError, the call answered before is woken, the
    deliveries made go out with the next take, and the requests not answered stay
    unclaimed and in flight, so the dispatcher's _q_fail(settle=True) fails them. Every
    request ends with exactly one outcome."""
    q = Q()
    c = Caller(q, torch.full((1, 2), 7.0))
    c.start()
    wait_queued(q, 1)
    futs = [concurrent.futures.Future() for _ in range(3)]
    for i, f in enumerate(futs):
        q._q_put(torch.full((1, 2), float(i)), f, False, None, None)
    batch, xs, _, _, _ = q._q_take(8, 0.0, None)
    assert len(batch) == 4
    q._q_fault(step)
    outcomes = []
    try:
        outcomes += q._q_complete(batch, [x + 1 for x in xs], None)
        failed = False
    except MemoryError:
        failed = True
        outcomes += q._q_fail(batch, RuntimeError, "dispatcher error", settle=True)
        if step > 2:  # futures were delivered before the failure: the next take returns them
            got = q._q_take(8, 0.0, None)
            assert got[0] == [] and len(got[4]) == step - 2
            outcomes += got[4]
    assert failed == (step <= 4)
    c.join(TIMEOUT)
    if step == 1:  # the call's delivery failed: it was failed by _q_fail instead
        assert isinstance(c.error, RuntimeError) and c.result is None
    else:
        assert c.error is None and torch.equal(c.result, torch.full((1, 2), 8.0))
    assert sorted(id(o[0]) for o in outcomes) == sorted(id(f) for f in futs)  # once each
    for payload, value, error in outcomes:
        i = futs.index(payload)
        if i + 2 < step or not failed:  # delivered before the failure: its answer
            assert error is None and torch.equal(value, torch.full((1, 2), i + 1.0))
        else:
            assert isinstance(error, RuntimeError)
    s = q._q_stats()
    assert (s["answered"] + s["failed"], s["in_flight"], s["queued"]) == (4, 0, 0)
