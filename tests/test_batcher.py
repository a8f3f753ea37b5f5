"""agxguard.batcher.Batcher on cpu: batching is invisible to callers, except in speed."""
import concurrent.futures
import contextlib
import queue
import re
import threading

import pytest

torch = pytest.importorskip("torch")

from agxguard.lab import workloads  # noqa: E402
from agxguard.batcher import Batcher  # noqa: E402
from conftest import run_threads  # noqa: E402

TIMEOUT = 20  # seconds; any wait in these tests that hits it is a failure, not a pause


class Gate:
    """A fn wrapper that blocks every call until opened, and records batch sizes."""

    def __init__(self, fn):
        self.fn = fn
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.sizes = []

    def __call__(self, x):
        self.sizes.append(x.shape[0])
        self.entered.set()
        assert self.opened.wait(TIMEOUT), "gate never opened"
        return self.fn(x)


@pytest.mark.parametrize("name", ["small_mlp", "story_transformer", "matmul"])
def test_batched_results_equal_direct_calls_for_every_request(name):
    w = workloads.build(name)
    inputs = [w.make_input(seed=i) for i in range(32)]
    expected = [w.model(x) for x in inputs]
    gate = Gate(w.model)
    with Batcher(gate, max_batch=8, max_delay_ms=50) as b:
        futures = [b.submit(inputs[0])]
        assert gate.entered.wait(TIMEOUT)  # first batch is running: the rest must queue
        futures += [b.submit(x) for x in inputs[1:]]
        gate.opened.set()
        results = [f.result(TIMEOUT) for f in futures]
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert gate.sizes[0] == w.input_shape[0]
    assert max(gate.sizes) == 8 * w.input_shape[0], "requests were not batched"
    assert b.stats()["batches"] < len(inputs)


def test_blocking_calls_from_many_threads_get_their_own_rows():
    w = workloads.build("small_mlp")
    inputs = [w.make_input(seed=i) for i in range(8 * 6)]
    results = [None] * len(inputs)
    with Batcher(w.model, max_batch=8, max_delay_ms=5) as b:
        def client(i):
            for j in range(i, len(inputs), 8):
                results[j] = b(inputs[j], timeout=TIMEOUT)
        run_threads(8, client, timeout=TIMEOUT)
        stats = b.stats()
    for x, y in zip(inputs, results):
        torch.testing.assert_close(y, w.model(x), rtol=1e-4, atol=1e-5)
    assert stats["requests"] == len(inputs)
    assert stats["latency_p50_ms"] is not None and stats["latency_p99_ms"] >= stats["latency_p50_ms"]
    assert 0 < stats["batch_run_mean_ms"] <= stats["latency_mean_ms"]


def test_requests_of_different_sizes_along_dim_0_are_batched_and_split_by_size():
    gate = Gate(lambda x: x * 2)
    xs = [torch.full((n, 3), float(n)) for n in (1, 4, 2, 7)]
    with Batcher(gate, max_batch=8, max_delay_ms=50) as b:
        first = b.submit(torch.zeros(1, 3))
        assert gate.entered.wait(TIMEOUT)
        futures = [b.submit(x) for x in xs]
        gate.opened.set()
        assert torch.equal(first.result(TIMEOUT), torch.zeros(1, 3))
        for f, x in zip(futures, xs):
            assert torch.equal(f.result(TIMEOUT), x * 2)
    assert gate.sizes == [1, 14]


def test_mixed_shapes_and_dtypes_are_never_in_one_batch():
    seen = []

    def fn(x):
        seen.append((tuple(x.shape[1:]), x.dtype))
        return x + 1

    gate = Gate(fn)
    kinds = [torch.zeros(2, 3), torch.zeros(2, 5), torch.zeros(2, 3, dtype=torch.float64),
             torch.zeros(1, 3, 1)]
    with Batcher(gate, max_batch=16, max_delay_ms=50) as b:
        first = b.submit(torch.zeros(2, 3))
        assert gate.entered.wait(TIMEOUT)
        futures = [(x, b.submit(x)) for _ in range(4) for x in kinds]
        gate.opened.set()
        first.result(TIMEOUT)
        for x, f in futures:
            y = f.result(TIMEOUT)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert torch.equal(y, x + 1)
    # After the first, one batch per kind: each kind's 4 requests together, none mixed.
    assert sorted(gate.sizes[1:]) == sorted([8, 8, 8, 4])
    assert len(set(seen[1:])) == 4


def test_tuple_and_dict_outputs_are_split_per_request():
    with Batcher(lambda x: (x + 1, x.sum(1)), max_batch=4, max_delay_ms=50) as b:
        fs = [b.submit(torch.full((2, 3), float(i))) for i in range(4)]
        for i, f in enumerate(fs):
            plus, total = f.result(TIMEOUT)
            assert torch.equal(plus, torch.full((2, 3), i + 1.0))
            assert torch.equal(total, torch.full((2,), 3.0 * i))
    with Batcher(lambda x: {"double": x * 2}, max_batch=4) as b:
        assert torch.equal(b(torch.ones(2, 2))["double"], torch.full((2, 2), 2.0))


def test_an_exception_reaches_exactly_the_callers_of_its_batch():
    def fn(x):
        if (x < 0).any():
            raise ArithmeticError("negative request in this batch")
        return x

    gate = Gate(fn)
    good = [torch.full((1, 2), float(i)) for i in range(3)]
    bad_shape = [torch.full((1, 4), float(i)) for i in range(3)]
    bad_shape[1] = -bad_shape[1] - 1  # poisons only the (1, 4) batch
    with Batcher(gate, max_batch=8, max_delay_ms=50) as b:
        first = b.submit(torch.zeros(1, 2))
        assert gate.entered.wait(TIMEOUT)
        good_f = [b.submit(x) for x in good]
        bad_f = [b.submit(x) for x in bad_shape]
        gate.opened.set()
        first.result(TIMEOUT)
        for x, f in zip(good, good_f):
            assert torch.equal(f.result(TIMEOUT), x)
        for f in bad_f:
            with pytest.raises(ArithmeticError, match="negative request"):
                f.result(TIMEOUT)
        # The dispatcher survives the exception.
        assert torch.equal(b(torch.ones(1, 4), timeout=TIMEOUT), torch.ones(1, 4))
        assert b.stats()["failed"] == 3


def test_an_output_that_cannot_be_split_fails_its_batch_with_a_clear_error():
    with Batcher(lambda x: x.sum(), max_batch=4) as b:
        with pytest.raises(ValueError, match="rows along dim 0"):
            b(torch.ones(3, 2), timeout=TIMEOUT)


def test_close_under_load_leaves_no_caller_waiting():
    outcomes = {"ok": 0, "closed": 0}
    lock = threading.Lock()
    started = threading.Barrier(9)
    b = Batcher(lambda x: x * 3, max_batch=4, max_delay_ms=1, max_queue=8)

    def client(i):
        started.wait(TIMEOUT)
        x = torch.full((1, 2), float(i))
        while True:
            try:
                y = b(x, timeout=TIMEOUT)
            except RuntimeError:
                with lock:
                    outcomes["closed"] += 1
                return
            assert torch.equal(y, x * 3)
            with lock:
                outcomes["ok"] += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in clients:
        t.start()
    started.wait(TIMEOUT)
    while b.stats()["requests"] < 200:  # let real traffic build up
        b(torch.zeros(1, 2), timeout=TIMEOUT)
    b.close(wait=True)
    for t in clients:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a caller is still waiting after close()"
    assert outcomes["closed"] == 8  # each client's next submit was refused
    assert b.stats()["queued"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(torch.zeros(1, 2))


def test_close_finishes_accepted_requests_or_fails_them_when_cancelled():
    gate = Gate(lambda x: x)
    b = Batcher(gate, max_batch=2, max_delay_ms=0)
    first = b.submit(torch.zeros(1, 1))
    assert gate.entered.wait(TIMEOUT)
    pending = [b.submit(torch.ones(1, 1)) for _ in range(5)]
    closer = threading.Thread(target=b.close, kwargs={"wait": True})
    closer.start()
    gate.opened.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert all(f.done() for f in pending + [first])
    assert all(torch.equal(f.result(), torch.ones(1, 1)) for f in pending)

    gate2 = Gate(lambda x: x)
    b2 = Batcher(gate2, max_batch=1, max_delay_ms=0)
    running = b2.submit(torch.zeros(1, 1))
    assert gate2.entered.wait(TIMEOUT)
    queued = [b2.submit(torch.ones(1, 1)) for _ in range(3)]
    b2.close(wait=False, cancel_pending=True)
    for f in queued:
        with pytest.raises(RuntimeError, match="closed before this request ran"):
            f.result(TIMEOUT)
    # the running batch's caller is answered at once too (issue 15), not when fn returns
    with pytest.raises(RuntimeError, match="closed .cancel_pending. while this request's batch ran"):
        running.result(TIMEOUT)
    gate2.opened.set()
    b2.close()
    s = b2.stats()
    assert (s["failed"], s["answered"], s["accepted"]) == (4, 0, 4)


def test_a_full_queue_blocks_submit_and_times_out_with_queue_full():
    gate = Gate(lambda x: x)
    with Batcher(gate, max_batch=1, max_delay_ms=0, max_queue=2) as b:
        b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)  # dispatcher holds one; the queue has room for 2
        b.submit(torch.zeros(1, 1))
        b.submit(torch.zeros(1, 1))
        with pytest.raises(queue.Full):
            b.submit(torch.zeros(1, 1), timeout=0.01)
        unblocked = []
        t = threading.Thread(target=lambda: unblocked.append(b.submit(torch.ones(1, 1))))
        t.start()
        t.join(0.05)  # not synchronization: only gives the submit a chance to block
        assert not unblocked, "submit returned while the queue was full"
        gate.opened.set()
        t.join(TIMEOUT)
        assert not t.is_alive() and torch.equal(unblocked[0].result(TIMEOUT), torch.ones(1, 1))


def test_a_submitter_blocked_on_a_full_queue_is_refused_by_close():
    gate = Gate(lambda x: x)
    b = Batcher(gate, max_batch=1, max_delay_ms=0, max_queue=1)
    b.submit(torch.zeros(1, 1))
    assert gate.entered.wait(TIMEOUT)
    b.submit(torch.zeros(1, 1))
    refused = threading.Event()

    def blocked():
        try:
            b.submit(torch.zeros(1, 1))
        except RuntimeError:
            refused.set()

    t = threading.Thread(target=blocked)
    t.start()
    b.close(wait=False)
    assert refused.wait(TIMEOUT), "the blocked submit was not refused"
    gate.opened.set()
    t.join(TIMEOUT)
    b.close(wait=True)
    assert not t.is_alive()


def test_guard_is_entered_around_each_batch_on_the_dispatcher_thread():
    entered = []

    @contextlib.contextmanager
    def guard():
        entered.append(threading.current_thread().name)
        yield

    with Batcher(lambda x: x, guard=guard, name="g") as b:
        b(torch.ones(1, 1), timeout=TIMEOUT)
    assert entered == ["agxguard-batcher-g"]


def test_a_cancelled_future_is_skipped():
    gate = Gate(lambda x: x)
    with Batcher(gate, max_batch=4, max_delay_ms=50) as b:
        first = b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        doomed = b.submit(torch.ones(1, 1))
        kept = b.submit(torch.full((1, 1), 2.0))
        assert doomed.cancel()
        gate.opened.set()
        first.result(TIMEOUT)
        assert torch.equal(kept.result(TIMEOUT), torch.full((1, 1), 2.0))
    assert gate.sizes == [1, 1]
    with pytest.raises(concurrent.futures.CancelledError):
        doomed.result(0)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"max_batch": 0}, ValueError, "max_batch must be an int >= 1, got 0"),
    ({"max_batch": 2.5}, TypeError, "max_batch must be an int >= 1, got 2.5"),
    ({"max_delay_ms": -1}, ValueError, "max_delay_ms must be a finite number >= 0, got -1"),
    ({"max_delay_ms": "2"}, TypeError, "max_delay_ms must be a number >= 0"),
    ({"max_queue": 0}, ValueError, "max_queue must be an int >= 1, got 0"),
    ({"guard": 3}, TypeError, "guard must be True, False or a callable"),
    ({"spin_us": -5}, ValueError, "spin_us must be a number from 0 to 1000000 (1 s), got -5"),
    ({"spin_us": float("nan")}, ValueError, "spin_us must be a number from 0 to 1000000"),
    ({"spin_us": "fast"}, TypeError, "spin_us must be a number from 0 to 1000000, got 'fast'"),
])
def test_a_bad_argument_raises_a_clear_error(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        Batcher(lambda x: x, **kwargs)


@pytest.mark.parametrize("spin_us", [0, 50, 5000])
def test_blocking_calls_are_answered_with_and_without_spinning(spin_us):
    """Callers and the dispatcher wait on Wakeups; with spin_us=0 they sleep at once,
    otherwise they spin first (where a CPU is free for it). Every spin setting must
    hand each caller its own rows."""
    xs = [torch.full((1, 4), float(i)) for i in range(8 * 25)]
    results = [None] * len(xs)
    with Batcher(lambda x: x * 3, max_batch=8, max_delay_ms=1, spin_us=spin_us) as b:
        assert b.spin_us == spin_us

        def client(i):
            for j in range(i, len(xs), 8):
                results[j] = b(xs[j], timeout=TIMEOUT)
        run_threads(8, client, timeout=TIMEOUT)
    for x, y in zip(xs, results):
        assert torch.equal(y, x * 3)


def test_a_non_callable_fn_raises_type_error():
    with pytest.raises(TypeError, match="fn must be callable.*got 42"):
        Batcher(42)


def test_a_request_that_is_not_a_tensor_with_a_batch_dim_is_refused():
    with Batcher(lambda x: x) as b:
        with pytest.raises(TypeError, match="must be tensors"):
            b.submit([1, 2, 3])
        with pytest.raises(ValueError, match="0-d tensor"):
            b.submit(torch.tensor(1.0))


def test_guard_true_runs_each_batch_inside_agxguard_guard():
    agxguard = pytest.importorskip("agxguard")
    if not hasattr(agxguard, "guard"):
        pytest.skip("agxguard.guard() is not built here")
    with agxguard.mode("global"):
        agxguard.reset_stats()
        with Batcher(lambda x: x + 1, guard=True) as b:
            assert torch.equal(b(torch.ones(2, 2), timeout=TIMEOUT), torch.full((2, 2), 2.0))
        assert agxguard.stats()["domains"]["global"]["acquisitions"] == 1


def test_requests_with_zero_rows_get_empty_results():
    gate = Gate(lambda x: x * 2)
    with Batcher(gate, max_batch=8, max_delay_ms=50) as b:
        first = b.submit(torch.zeros(1, 3))
        assert gate.entered.wait(TIMEOUT)
        empties = [b.submit(torch.zeros(0, 3)) for _ in range(3)]
        gate.opened.set()
        first.result(TIMEOUT)
        assert [tuple(f.result(TIMEOUT).shape) for f in empties] == [(0, 3)] * 3


def test_a_timed_out_call_leaves_its_thread_free_for_the_next_call():
    gate = Gate(lambda x: x * 10)
    with Batcher(gate, max_batch=1, max_delay_ms=0) as b:
        with pytest.raises(TimeoutError):
            b(torch.ones(1, 1), timeout=0.05)  # stuck in the gate: abandoned
        gate.opened.set()
        # The same thread's next calls get their own answers, not the abandoned one's.
        for v in (2.0, 3.0):
            assert torch.equal(b(torch.full((1, 1), v), timeout=TIMEOUT), torch.full((1, 1), 10 * v))


def test_a_partial_batch_waits_max_delay_and_a_lone_request_after_idle_still_runs():
    import time

    with Batcher(lambda x: x + 1, max_batch=8, max_delay_ms=30) as b:
        t0 = time.perf_counter()
        assert torch.equal(b(torch.zeros(1, 2), timeout=TIMEOUT), torch.ones(1, 2))
        assert time.perf_counter() - t0 >= 0.029, "a partial batch ran before max_delay"
        time.sleep(0.1)  # longer than max_delay: the dispatcher goes to sleep until an arrival
        assert torch.equal(b(torch.ones(1, 2), timeout=TIMEOUT), torch.full((1, 2), 2.0))
        # A full batch does not wait for the delay.
        results = [None] * 8
        t0 = time.perf_counter()

        def client(i):
            results[i] = b(torch.full((1, 2), float(i)), timeout=TIMEOUT)

        run_threads(8, client, timeout=TIMEOUT)
        assert all(torch.equal(results[i], torch.full((1, 2), i + 1.0)) for i in range(8))
    assert b.stats()["requests"] == 10


def test_stats_already_count_a_batch_when_its_callers_get_their_answers():
    with Batcher(lambda x: x, max_batch=1, max_delay_ms=0) as b:
        for k in range(1, 6):
            b(torch.ones(1, 1), timeout=TIMEOUT)
            st = b.stats()
            assert st["requests"] == k and st["batches"] == k
            assert st["latency_p50_ms"] is not None and st["queue_wait_p50_ms"] is not None


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_pin_cpus_pins_the_dispatcher_and_each_calling_thread():
    import os

    cpu = min(os.sched_getaffinity(0))
    seen = []

    def fn(x):
        seen.append(os.sched_getaffinity(0))
        return x

    def client(i):
        assert torch.equal(b(torch.ones(1, 1), timeout=TIMEOUT), torch.ones(1, 1))
        seen.append(os.sched_getaffinity(0))

    with Batcher(fn, max_batch=4, max_delay_ms=1, pin_cpus={cpu}) as b:
        run_threads(3, client, timeout=TIMEOUT)  # fresh threads: the test's own thread keeps its affinity
    assert seen and all(s == {cpu} for s in seen)
    with pytest.raises(TypeError, match="pin_cpus must be None or a non-empty"):
        Batcher(lambda x: x, pin_cpus=[])
    with pytest.raises(ValueError, match="may not use"):
        Batcher(lambda x: x, pin_cpus={10 ** 6})
