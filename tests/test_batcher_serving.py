"""The Batcher as a serving engine (issue 15), on cpu: a dispatcher that cannot die or hang
the process, variable-length requests, deadlines and cancellation, asyncio, settings
changed while running, and stats that account for every accepted request.

Every wait here is bounded (TIMEOUT); cases that could hang the interpreter itself (a hung
fn at exit, fork) run in a child process with a timeout.
"""
import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from agxguard.batcher import Batcher  # noqa: E402

TIMEOUT = 20  # seconds; any wait in these tests that hits it is a failure, not a pause
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Gate:
    """A fn wrapper that blocks every call until opened, and records what it was called with."""

    def __init__(self, fn=lambda x: x):
        self.fn = fn
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.calls = []

    def __call__(self, x, *rest):
        self.calls.append(x.clone() if isinstance(x, torch.Tensor) else x)
        self.entered.set()
        assert self.opened.wait(TIMEOUT), "gate never opened"
        return self.fn(x, *rest)


def settled(stats):
    """accepted == answered + failed + cancelled + expired once nothing is queued or running."""
    return (stats["answered"] + stats["failed"] + stats["cancelled"] + stats["expired"]
            + stats["queued"] + stats["in_flight"])


def run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout on the path; fail on a hang."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child process hung (no exit within {e.timeout:.0f} s)")


# ---------------------------------------------------------------- a dispatcher that cannot die
def test_a_caller_that_sets_its_own_future_does_not_stop_the_dispatcher():
    gate = Gate()
    with Batcher(gate, max_batch=4, max_delay_ms=0) as b:
        b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        mine = b.submit(torch.ones(1, 1))
        mine.set_result("set by its caller")  # before its batch is formed
        later = b.submit(torch.full((1, 1), 2.0))
        gate.opened.set()
        assert torch.equal(later.result(TIMEOUT), torch.full((1, 1), 2.0))
        assert mine.result(0) == "set by its caller"
        assert torch.equal(b(torch.full((1, 1), 3.0), timeout=TIMEOUT), torch.full((1, 1), 3.0))
    s = b.stats()
    assert s["cancelled"] == 1 and s["answered"] == 3 and settled(s) == s["accepted"] == 4


def test_a_future_set_by_its_caller_while_its_batch_runs_is_discarded_not_fatal():
    gate = Gate()
    with Batcher(gate, max_batch=4, max_delay_ms=0) as b:
        mine = b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        mine.set_result("mine")
        gate.opened.set()
        assert torch.equal(b(torch.ones(1, 1), timeout=TIMEOUT), torch.ones(1, 1))
    assert mine.result(0) == "mine"
    s = b.stats()
    assert (s["cancelled"], s["answered"]) == (1, 1) and settled(s) == s["accepted"]


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, RuntimeError])
def test_a_done_callback_that_raises_does_not_stop_the_dispatcher(exc):
    with Batcher(lambda x: x + 1, max_batch=4, max_delay_ms=0) as b:
        f = b.submit(torch.zeros(1, 1))

        def bad(_):
            raise exc("from a done-callback")

        f.add_done_callback(bad)
        f.result(TIMEOUT)
        # add one before the answer, too: it runs on the dispatcher thread
        gate_f = b.submit(torch.zeros(1, 1))
        gate_f.add_done_callback(bad)
        gate_f.result(TIMEOUT)
        for i in range(3):
            assert torch.equal(b(torch.full((1, 1), float(i)), timeout=TIMEOUT),
                               torch.full((1, 1), float(i) + 1))
        assert b._thread.is_alive()


class OddShape(tuple):
    """A shape whose dims cannot be turned into ints (compares with an error)."""

    class Dim:
        def __eq__(self, other):
            raise RuntimeError("this dim cannot be compared")

        def __index__(self):
            raise RuntimeError("this dim is not an int")

        __int__ = __index__
        __hash__ = object.__hash__


class OddTensor:
    """Looks like a tensor, but its shape compares (and converts) with an error."""

    dtype = torch.float32
    device = torch.device("cpu")

    @property
    def shape(self):
        return (1, OddShape.Dim())


class OddDtype:
    """A dtype that hashes but whose comparison raises."""

    def __eq__(self, other):
        raise RuntimeError("this dtype cannot be compared")

    __hash__ = object.__hash__


def test_an_input_whose_shape_compares_with_an_error_is_refused_in_its_caller():
    with Batcher(lambda x: x * 2, max_batch=4, max_delay_ms=1) as b:
        with pytest.raises(TypeError, match="shape of ints"):
            b(OddTensor(), timeout=TIMEOUT)
        with pytest.raises(TypeError, match="shape of ints"):
            b.submit(OddTensor())
        assert torch.equal(b(torch.ones(1, 2), timeout=TIMEOUT), torch.full((1, 2), 2.0))
    assert b.stats()["accepted"] == 1


def test_a_key_that_compares_with_an_error_runs_alone_and_fails_only_its_request():
    gate = Gate(lambda x: x * 2)

    class OddT:
        shape = (1, 2)
        dtype = OddDtype()
        device = torch.device("cpu")

    with Batcher(gate, max_batch=4, max_delay_ms=0) as b:
        first = b.submit(torch.zeros(1, 2))
        assert gate.entered.wait(TIMEOUT)
        odd = b.submit(OddT())
        later = [b.submit(torch.ones(1, 2)) for _ in range(3)]
        gate.opened.set()
        assert first.result(TIMEOUT) is not None
        with pytest.raises(TypeError):  # fn got the odd object, alone in its batch
            odd.result(TIMEOUT)
        for f in later:
            assert torch.equal(f.result(TIMEOUT), torch.full((1, 2), 2.0))
        assert b._thread.is_alive()
    s = b.stats()
    assert settled(s) == s["accepted"] == 5


def test_close_timeout_fails_the_callers_of_a_hung_fn_and_returns():
    release = threading.Event()
    entered = threading.Event()

    def hung(x):
        entered.set()
        release.wait(60)
        return x

    b = Batcher(hung, max_batch=2, max_delay_ms=0)
    running = b.submit(torch.zeros(1, 1))
    assert entered.wait(TIMEOUT)
    queued = [b.submit(torch.ones(1, 1)) for _ in range(3)]
    t0 = time.monotonic()
    b.close(timeout=0.3)
    assert time.monotonic() - t0 < 5
    for f in [running] + queued:
        with pytest.raises(TimeoutError, match=re.escape("close(timeout=0.3)")):
            f.result(0)
    release.set()
    s = b.stats()
    assert s["failed"] == 4 and s["accepted"] == 4
    b._thread.join(TIMEOUT)
    assert not b._thread.is_alive()
    assert b.stats()["failed"] == 4  # the late answers were discarded, not counted twice


def test_interpreter_exit_is_not_blocked_by_a_hung_fn():
    r = run_child("""
        import threading, torch
        import agxguard.batcher as B
        B.EXIT_CLOSE_TIMEOUT_S = 0.5
        entered = threading.Event()
        def hung(x):
            entered.set()
            threading.Event().wait(3600)
        b = B.Batcher(hung, max_batch=1, max_delay_ms=0)
        f = b.submit(torch.zeros(1, 1))
        entered.wait(10)
        q = b.submit(torch.zeros(1, 1))
        print("exiting", flush=True)
    """, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exiting" in r.stdout


def test_close_without_wait_and_cancel_pending_answers_blocked_callers_of_the_running_batch():
    gate = Gate()
    b = Batcher(gate, max_batch=4, max_delay_ms=50)
    outcomes = []
    barrier = threading.Barrier(4)

    def caller():
        barrier.wait(TIMEOUT)
        try:
            outcomes.append(b(torch.ones(1, 1), timeout=TIMEOUT))
        except BaseException as e:  # noqa: B902 (recorded and checked below)
            outcomes.append(e)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    assert gate.entered.wait(TIMEOUT)
    t0 = time.monotonic()
    b.close(wait=False, cancel_pending=True)
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - t0 < 5, "callers waited for the gated fn"
    assert len(outcomes) == 4
    assert all(isinstance(o, RuntimeError) and "closed" in str(o) for o in outcomes), outcomes
    gate.opened.set()
    b.close(timeout=TIMEOUT)
    s = b.stats()
    assert s["failed"] == 4 and s["answered"] == 0 and settled(s) == s["accepted"] == 4


def test_a_fork_child_gets_a_clear_error_instead_of_a_hang():
    if not hasattr(os, "fork"):
        pytest.skip("os.fork is not available on this platform")
    r = run_child("""
        import os, sys, torch
        from agxguard.batcher import Batcher
        b = Batcher(lambda x: x + 1, max_batch=2, max_delay_ms=0)
        assert b(torch.zeros(1, 1), timeout=10).item() == 1.0
        pid = os.fork()
        if pid == 0:
            try:
                b(torch.zeros(1, 1), timeout=5)
                os._exit(3)
            except RuntimeError as e:
                os._exit(0 if "fork" in str(e) and "create a new Batcher" in str(e) else 4)
            except BaseException:
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        assert b(torch.zeros(1, 1), timeout=10).item() == 1.0  # the parent's still serves
        b.close()
    """, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "child 0" in r.stdout, r.stdout


# ---------------------------------------------------------------- variable-length requests
def masked_mean_model():
    """fn(batch, lengths): per-token linear map, then each row's mean over its true tokens;
    returns (per-token output, per-row mean)."""
    torch.manual_seed(0)
    w = torch.randn(8, 8)

    def fn(x, lengths):
        y = x @ w
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        mean = (y * mask[..., None]).sum(1) / lengths[:, None].clamp(min=1)
        return y, mean

    return fn


def test_padded_batches_equal_unpadded_single_calls():
    fn = masked_mean_model()
    seen = []

    def spy(x, lengths):
        seen.append((tuple(x.shape), lengths.tolist()))
        return fn(x, lengths)

    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, int(n), 8, generator=gen)
              for n in torch.randint(1, 20, (40,), generator=gen)]
    gate = Gate(spy)
    with Batcher(gate, max_batch=8, max_delay_ms=50, pad_dim=1) as b:
        futures = [b.submit(inputs[0])]
        assert gate.entered.wait(TIMEOUT)
        futures += [b.submit(x) for x in inputs[1:]]
        gate.opened.set()
        results = [f.result(TIMEOUT) for f in futures]
    for x, (y, mean) in zip(inputs, results):
        want_y, want_mean = fn(x, torch.tensor([x.shape[1]]))
        assert y.shape == want_y.shape  # trimmed back to its own length
        torch.testing.assert_close(y, want_y)
        torch.testing.assert_close(mean, want_mean)
    assert max(len(lens) for _, lens in seen) == 8, "requests of different lengths were not batched"
    for shape, lens in seen:
        assert shape[1] == max(lens)  # padded to the longest in the batch
    assert b.stats()["mean_batch_size"] > 3


def test_padding_uses_pad_value_and_lengths_count_rows():
    got = {}

    def fn(x, lengths):
        got["x"], got["lengths"] = x.clone(), lengths.clone()
        return x

    gate = Gate(fn)
    with Batcher(gate, max_batch=2, max_delay_ms=50, pad_dim=1, pad_value=-1.0) as b:
        first = b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        a = b.submit(torch.ones(2, 3))
        c = b.submit(torch.full((1, 5), 2.0))
        gate.opened.set()
        first.result(TIMEOUT)
        assert torch.equal(a.result(TIMEOUT), torch.ones(2, 3))
        assert torch.equal(c.result(TIMEOUT), torch.full((1, 5), 2.0))
    assert got["lengths"].tolist() == [3, 3, 5] and got["lengths"].dtype == torch.int64
    assert torch.equal(got["x"][0], torch.tensor([1, 1, 1, -1, -1.0]))
    assert torch.equal(got["x"][2], torch.full((5,), 2.0))


def test_buckets_limit_the_shapes_fn_sees():
    fn = masked_mean_model()
    shapes = set()

    def spy(x, lengths):
        shapes.add(tuple(x.shape[1:]))
        return fn(x, lengths)

    gen = torch.Generator().manual_seed(2)
    lengths = [int(n) for n in torch.randint(1, 33, (60,), generator=gen)]
    with Batcher(spy, max_batch=4, max_delay_ms=2, pad_dim=1, buckets=[8, 16, 32]) as b:
        futures = [b.submit(torch.randn(1, n, 8, generator=gen)) for n in lengths]
        for f, n in zip(futures, lengths):
            y, _ = f.result(TIMEOUT)
            assert y.shape == (1, n, 8)
        with pytest.raises(ValueError, match="longer than the largest bucket 32"):
            b.submit(torch.zeros(1, 33, 8))
    assert shapes <= {(8, 8), (16, 8), (32, 8)}, shapes
    assert len(shapes) > 1


def test_trim_false_keeps_an_output_whose_width_equals_the_padded_length():
    """A pooled output of width 16 in a batch padded to 16 (bucket 16): the default trims
    it to each request's length (the rule the issue gives), trim=False keeps it whole.
    The HTTP example's embeddings (width 16, a bucket of 16) were cut this way."""
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))

    def pooled(x, lengths):  # (rows, length, 16) -> (rows, 16)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        return (x @ w * mask[..., None]).sum(1) / lengths[:, None]

    xs = [torch.randn(1, n, 16, generator=torch.Generator().manual_seed(n)) for n in (5, 11, 16)]
    for trim, widths in ((True, [5, 11, 16]), (False, [16, 16, 16])):
        with Batcher(pooled, max_batch=3, max_delay_ms=200, pad_dim=1, buckets=[16], trim=trim) as b:
            futures = [b.submit(x) for x in xs]
            got = [f.result(TIMEOUT) for f in futures]
        assert [g.shape[1] for g in got] == widths, (trim, [g.shape for g in got])
        if not trim:
            for x, g in zip(xs, got):
                torch.testing.assert_close(g, pooled(x, torch.tensor([x.shape[1]])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"pad_dim": 0}, ValueError, "pad_dim must be None or an int >= 1 (dim 0 is the batch"),
    ({"pad_dim": -1}, ValueError, "pad_dim must be None or an int >= 1"),
    ({"pad_dim": 1.5}, TypeError, "pad_dim must be None or an int >= 1, got 1.5"),
    ({"pad_dim": 1, "buckets": [16, 8]}, ValueError, "buckets must be sorted in strictly increasing"),
    ({"pad_dim": 1, "buckets": [8, 8]}, ValueError, "buckets must be sorted in strictly increasing"),
    ({"pad_dim": 1, "buckets": [0, 8]}, ValueError, "buckets must hold ints >= 1 (positive lengths), got 0"),
    ({"pad_dim": 1, "buckets": [-4]}, ValueError, "buckets must hold ints >= 1"),
    ({"pad_dim": 1, "buckets": []}, ValueError, "got an empty one"),
    ({"buckets": [8]}, ValueError, "buckets needs pad_dim"),
    ({"device": "cpu"}, ValueError, "device must be None (run on the requests' device) or one of"),
    ({"pipeline_depth": 0}, ValueError, "pipeline_depth must be an int >= 1, got 0"),
    ({"latency_target_ms": 0}, ValueError, "latency_target_ms must be None or a number > 0"),
    ({"latency_target_ms": -3}, ValueError, "latency_target_ms must be a finite number >= 0"),
    ({"pad_dim": 1, "trim": "yes"}, ValueError, "trim must be True or False, got 'yes'"),
])
def test_a_bad_serving_argument_raises_a_clear_error(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        Batcher(lambda x, *lengths: x, **kwargs)


def test_pad_dim_out_of_range_for_a_request_and_negative_timeouts_are_refused():
    with Batcher(lambda x, lengths: x, pad_dim=2) as b:
        with pytest.raises(ValueError, match=re.escape("pad_dim=2 is out of range for a request "
                                                       "of shape (1, 4) (2 dims); allowed: 1 to 1")):
            b(torch.zeros(1, 4))
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0, got -1"):
            b(torch.zeros(1, 4, 2), timeout=-1)
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            b.submit(torch.zeros(1, 4, 2), timeout=-0.5)
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            asyncio.run(b.acall(torch.zeros(1, 4, 2), timeout=-2))
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            b.close(timeout=-1)


# ---------------------------------------------------------------- deadlines and cancellation
def test_a_blocking_request_that_times_out_while_queued_is_never_computed():
    gate = Gate()
    with Batcher(gate, max_batch=4, max_delay_ms=0) as b:
        first = b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        with pytest.raises(TimeoutError, match="no result within 0.05 s"):
            b(torch.full((1, 1), 7.0), timeout=0.05)
        kept = b.submit(torch.full((1, 1), 2.0))
        gate.opened.set()
        first.result(TIMEOUT)
        assert torch.equal(kept.result(TIMEOUT), torch.full((1, 1), 2.0))
        assert torch.equal(b(torch.ones(1, 1), timeout=TIMEOUT), torch.ones(1, 1))  # thread reusable
    assert not any((c == 7.0).any() for c in gate.calls), "the expired request was computed"
    s = b.stats()
    assert s["expired"] == 1 and s["answered"] == 3 and settled(s) == s["accepted"] == 4


def test_a_request_in_a_running_batch_that_times_out_is_computed_and_its_answer_discarded():
    gate = Gate()
    with Batcher(gate, max_batch=4, max_delay_ms=0) as b:
        with pytest.raises(TimeoutError):
            b(torch.ones(1, 1), timeout=0.1)  # its batch is running (gated) when it expires
        assert gate.entered.is_set()
        gate.opened.set()
    s = b.stats()
    assert s["batches"] == 1 and s["answered"] == 0 and s["expired"] == 1
    assert settled(s) == s["accepted"] == 1


def test_cancelled_and_expired_async_requests_are_never_computed():
    gate = Gate()

    async def main(b):
        loop = asyncio.get_running_loop()
        first = loop.run_in_executor(None, b, torch.zeros(1, 1), TIMEOUT)
        await loop.run_in_executor(None, gate.entered.wait, TIMEOUT)
        with pytest.raises(TimeoutError):
            await b.acall(torch.full((1, 1), 7.0), timeout=0.05)
        task = asyncio.ensure_future(b.acall(torch.full((1, 1), 8.0)))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        kept = asyncio.ensure_future(b.acall(torch.full((1, 1), 2.0), timeout=TIMEOUT))
        await asyncio.sleep(0.02)
        gate.opened.set()
        await first
        return await kept

    with Batcher(gate, max_batch=4, max_delay_ms=0) as b:
        assert torch.equal(asyncio.run(main(b)), torch.full((1, 1), 2.0))
    computed = torch.cat([c.flatten() for c in gate.calls])
    assert not ((computed == 7.0) | (computed == 8.0)).any(), "a given-up request was computed"
    s = b.stats()
    assert (s["expired"], s["cancelled"], s["answered"]) == (1, 1, 2)
    assert settled(s) == s["accepted"] == 4


# ---------------------------------------------------------------- asyncio
def test_many_coroutines_on_one_loop_without_threads_and_without_blocking_the_loop():
    def slow(x):
        time.sleep(0.05)  # the dispatcher holds each batch 50 ms: the loop must keep ticking
        return x * 2

    async def main(b):
        gaps = []
        stop = False

        async def ticker():
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        threads_before = threading.active_count()
        xs = [torch.full((1, 3), float(i)) for i in range(256)]
        ys = await asyncio.gather(*(b.acall(x, timeout=TIMEOUT) for x in xs))
        threads_during = threading.active_count()
        stop = True
        await tick
        return xs, ys, gaps, threads_before, threads_during

    with Batcher(slow, max_batch=64, max_delay_ms=2) as b:
        xs, ys, gaps, before, during = asyncio.run(main(b))
    for x, y in zip(xs, ys):
        assert torch.equal(y, x * 2)
    assert during == before, "acall started threads"
    assert max(gaps) < 0.025, f"the event loop was blocked for {max(gaps) * 1000:.1f} ms"
    s = b.stats()
    assert s["mean_batch_size"] > 8 and s["answered"] == 256


def test_close_under_load_with_async_and_thread_callers_leaves_no_caller_waiting():
    b = Batcher(lambda x: x * 3, max_batch=8, max_delay_ms=1, max_queue=16)
    outcomes = {"ok": 0, "closed": 0, "bad": []}
    lock = threading.Lock()

    def record(y, x):
        with lock:
            if isinstance(y, RuntimeError) and "closed" in str(y):
                outcomes["closed"] += 1
                return True
            if isinstance(y, BaseException) or not torch.equal(y, x * 3):
                outcomes["bad"].append(y)
                return True
            outcomes["ok"] += 1
            return False

    def thread_client(i):
        x = torch.full((1, 2), float(i))
        while True:
            try:
                y = b(x, timeout=TIMEOUT)
            except BaseException as e:  # noqa: B902 (recorded)
                y = e
            if record(y, x):
                return

    async def coro_client(i):
        x = torch.full((1, 2), float(100 + i))
        while True:
            try:
                y = await b.acall(x, timeout=TIMEOUT)
            except BaseException as e:  # noqa: B902 (recorded)
                y = e
            if record(y, x):
                return

    async def async_side():
        await asyncio.gather(*(coro_client(i) for i in range(32)))

    loop_thread = threading.Thread(target=asyncio.run, args=(async_side(),), daemon=True)
    threads = [threading.Thread(target=thread_client, args=(i,), daemon=True) for i in range(8)]
    loop_thread.start()
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT
    while b.stats()["answered"] < 500 and time.monotonic() < deadline:
        time.sleep(0.01)
    b.close(wait=True, timeout=TIMEOUT)
    for t in threads + [loop_thread]:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a caller is still waiting after close()"
    assert not outcomes["bad"], outcomes["bad"][:3]
    assert outcomes["closed"] == 8 + 32
    assert outcomes["ok"] >= 500
    s = b.stats()
    assert s["answered"] == outcomes["ok"] and settled(s) == s["accepted"]
    assert s["queued"] == 0 and s["in_flight"] == 0


# ---------------------------------------------------------------- settings and stats
def test_max_batch_and_max_delay_can_be_changed_while_running():
    gate = Gate()
    with Batcher(gate, max_batch=2, max_delay_ms=50) as b:
        first = b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        b.max_batch = 6
        b.max_delay_ms = 0
        futures = [b.submit(torch.ones(1, 1)) for _ in range(6)]
        gate.opened.set()
        first.result(TIMEOUT)
        [f.result(TIMEOUT) for f in futures]
        with pytest.raises(ValueError, match="max_batch must be an int >= 1, got 0"):
            b.max_batch = 0
        with pytest.raises(ValueError, match="max_delay_ms must be a finite number >= 0"):
            b.max_delay_ms = -1
    assert [c.shape[0] for c in gate.calls] == [1, 6]
    assert b.stats()["batch_sizes"] == {1: 1, 6: 1}


def test_a_latency_target_shortens_the_wait_when_arrivals_are_sparse():
    """With max_delay 200 ms and a lone sequential caller, each call would wait 200 ms for
    a batch that never fills; a 20 ms latency target answers far sooner."""
    def run(**kw):
        with Batcher(lambda x: x, max_batch=8, max_delay_ms=200, **kw) as b:
            t0 = time.perf_counter()
            for _ in range(5):
                b(torch.ones(1, 1), timeout=TIMEOUT)
            return (time.perf_counter() - t0) / 5

    plain = run()
    targeted = run(latency_target_ms=20)
    assert plain > 0.15
    assert targeted < 0.05, f"{targeted * 1000:.1f} ms per call with a 20 ms target"


def test_stats_have_a_batch_size_histogram_queue_depth_and_tail_latency():
    gate = Gate()
    with Batcher(gate, max_batch=3, max_delay_ms=0) as b:
        first = b.submit(torch.zeros(1, 1))
        assert gate.entered.wait(TIMEOUT)
        rest = [b.submit(torch.ones(1, 1)) for _ in range(5)]
        s = b.stats()
        assert (s["queued"], s["in_flight"], s["accepted"]) == (5, 1, 6)
        gate.opened.set()
        for f in [first] + rest:
            f.result(TIMEOUT)
    s = b.stats()
    assert s["batch_sizes"] == {1: 1, 2: 1, 3: 1}
    assert s["latency_p50_ms"] <= s["latency_p99_ms"] <= s["latency_p999_ms"]
    assert s["answered"] == 6 and settled(s) == 6


# ---------------------------------------------------------------- the device pipeline
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pipelined dispatcher needs cuda "
                    "(mps untested here); on cpu the Batcher runs batches one after the other")
@pytest.mark.parametrize("variable", [False, True])
def test_the_cuda_pipeline_answers_cpu_requests_with_cpu_tensors_equal_to_single_calls(variable):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16).cuda()

    def fn(x, *lengths):
        with torch.no_grad():
            return lin(x).relu()

    gen = torch.Generator().manual_seed(3)
    if variable:
        inputs = [torch.randn(1, int(n), 16, generator=gen)
                  for n in torch.randint(1, 12, (400,), generator=gen)]
    else:
        inputs = [torch.randn(2, 16, generator=gen) for _ in range(400)]
    kw = {"pad_dim": 1} if variable else {}
    with Batcher(fn, max_batch=8, max_delay_ms=1, device="cuda", **kw) as b:
        futures = [b.submit(x) for x in inputs]
        results = [f.result(TIMEOUT) for f in futures]
    for x, y in zip(inputs, results):
        assert y.device.type == "cpu"
        torch.testing.assert_close(y, fn(x.cuda()).cpu())
    s = b.stats()
    assert s["answered"] == 400 and s["mean_batch_size"] > 4
    assert s["overlapped_batches"] > 0, "no batch was collated while another ran"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging buffers and device "
                    "events need cuda (the device path); the pool's caps are tested on cpu below")
def test_the_cuda_pipeline_reuses_its_staging_buffers_and_events_without_mixing_batches():
    """Fixed-length batches are collated into pinned buffers that earlier batches used (once
    their copies are done) and answered into pinned memory; with two batches in flight and
    16 threads no answer may come from another batch's data."""
    lin = torch.nn.Linear(64, 64).cuda()

    def fn(x):
        with torch.no_grad():
            return lin(x) + x  # an answer that carries its own input

    inputs = [torch.full((2, 64), float(i)) for i in range(3000)]
    results = [None] * len(inputs)
    with Batcher(fn, max_batch=8, max_delay_ms=1, device="cuda") as b:
        def client(k):
            for i in range(k, len(inputs), 16):
                results[i] = b(inputs[i])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    for x, y in zip(inputs, results):
        torch.testing.assert_close(y, fn(x.cuda()).cpu())
    assert all(y.is_pinned() for y in results[:50]), "answers should land in pinned memory"
    s = b.stats()
    assert s["answered"] == len(inputs)
    assert s["staging_reused"] > s["batches"] // 2, s
    # most batches were copied into their buffer as they arrived, mostly by their callers
    assert s["staged_batches"] > s["batches"] // 2 and s["staged_by_callers"] > s["requests"] // 2, s
    assert len(b._events) <= b.pipeline_depth + 1


def test_the_staging_pool_keeps_few_buffers_per_shape_few_shapes_and_no_large_ones(monkeypatch):
    """The device path's pool of pinned input buffers is bounded (run here on cpu tensors:
    only the pool's bookkeeping, no device)."""
    import agxguard.batcher as B

    monkeypatch.setattr(B, "STAGING_MAX_BYTES", 4096)
    b = Batcher(lambda x: x, max_batch=2)
    try:
        b.device = torch.device("cuda")  # the pool is only used on the device path
        for _ in range(B.STAGING_PER_SHAPE + 3):
            b._staging_put(torch.zeros(2, 8))
        assert len(b._staging[((2, 8), torch.float32)]) == B.STAGING_PER_SHAPE
        for n in range(1, B.STAGING_SHAPES + 3):
            b._staging_put(torch.zeros(n, 3))
        assert len(b._staging) == B.STAGING_SHAPES
        assert ((2, 8), torch.float32) not in b._staging  # the oldest shape went first
        b._staging_put(torch.zeros(2, 4096))  # 32 KiB > the cap: not kept
        assert ((2, 4096), torch.float32) not in b._staging
        got = b._staging_get((B.STAGING_SHAPES + 2, 3), torch.float32)
        assert tuple(got.shape) == (B.STAGING_SHAPES + 2, 3) and b.stats()["staging_reused"] == 1
    finally:
        b.device = None
        b.close()


# ---------------------------------------------------------------- benchmarks/serving.py
def run_serving(out, *argv):
    """benchmarks/serving.py --device cpu ARGV --json OUT in a child; its JSON."""
    import json

    args = ["serving.py", "--device", "cpu", *argv, "--json", str(out)]
    r = run_child(f"""
        import sys
        sys.argv = {args!r}
        sys.path.insert(0, "benchmarks")
        import serving
        sys.exit(serving.main())
    """, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_serving_benchmark_runs_every_mode_and_writes_json_and_table(tmp_path):
    out = tmp_path / "serving.json"
    data = run_serving(out, "--seconds", "0.15", "--repeats", "1", "--clients", "2",
                       "--workloads", "small_mlp,story_var")
    assert set(data["results"]) == {"small_mlp", "story_var"}
    for w in data["results"].values():
        assert set(w["2"]) == {"free", "lock", "guard_global", "batcher", "batcher_async",
                               "batcher_half", "batcher_nospin",
                               "offline_sync", "offline_pipe"}
        assert all(runs[0]["req_s"] > 0 for runs in w["2"].values())
    assert data["results"]["story_var"]["2"]["batcher"][0]["max_abs_diff_vs_alone"] < 1e-3
    assert (tmp_path / "serving.txt").read_text().count("req/s") >= 1
    assert any(t["target"].startswith("story_var: mean batch") for t in data["targets"])


def test_the_serving_benchmark_pairs_rounds_for_its_targets(tmp_path):
    """--paired: each target's two sides alternate round by round (ABBA), each round gives
    a ratio, and the totals' ratio lies inside its bootstrap interval; bad values refused."""
    out = tmp_path / "paired.json"
    data = run_serving(out, "--repeats", "0", "--paired", "3", "--slice", "0.1",
                       "--workloads", "small_mlp")
    assert data["results"] == {}
    pairs = {(p["a"], p["a_clients"], p["b"]): p for p in data["paired"]}
    assert set(pairs) == {("batcher", 8, "offline_sync"), ("batcher_async", 64, "batcher")}
    for p in pairs.values():
        assert p["workload"] == "small_mlp" and p["rounds"] == 3 and len(p["ratios"]) == 3
        lo, hi = p["total_ratio_ci95"]
        assert lo <= p["total_ratio"] <= hi
        assert p["result"] == ("PASS" if p["total_ratio"] >= p["target"] else "FAIL")
        assert p["first"] == [p["a"], p["b"], p["a"]]  # the order reversed every other round
    text = (tmp_path / "paired.txt").read_text()
    assert "paired rounds" in text and "95% CI" in text
    for argv, words in ((["--paired", "-1"], "--paired"), (["--slice", "0"], "--slice"),
                        (["--repeats", "0"], "needs --paired")):
        bad = subprocess.run([sys.executable, "benchmarks/serving.py", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr[-500:]
