"""@agxguard.guard() protects what it decorates: a plain function, a generator function,
an ``async def`` and an async generator each run their body with the lock held, and
release it at every ``yield`` / suspending ``await`` (issue 11, point 3)."""
from __future__ import annotations

import asyncio
import functools
import inspect
import threading

import pytest

import agxguard
import agxguard._model
from conftest import run_threads, another_thread_can_take_the_global_lock

TIMEOUT = 30


def held() -> bool:
    """Whether the calling thread holds the global lock (what global mode's regions take)."""
    return agxguard.global_lock().owned()


@pytest.fixture
def global_mode():
    agxguard.set_mode("global")


def test_a_plain_function_runs_with_the_lock_held(global_mode):
    @agxguard.guard()
    def f(x):
        return held(), x

    assert f(3) == (True, 3)
    assert not held()


def test_a_generator_body_runs_with_the_lock_held_and_releases_it_at_each_yield(global_mode):
    seen_outside = []

    @agxguard.guard()
    def gen(n):
        for i in range(n):
            yield held(), i
        return "end"

    assert inspect.isgeneratorfunction(gen)
    it = gen(3)
    out = []
    for item in it:
        out.append(item)
        seen_outside.append(held())
    assert out == [(True, 0), (True, 1), (True, 2)]
    assert seen_outside == [False, False, False]
    assert agxguard.stats()["domains"]["global"]["acquisitions"] >= 4  # one per resume


def test_a_generator_gets_sent_values_thrown_exceptions_and_its_return_value(global_mode):
    log = []

    @agxguard.guard()
    def echo():
        try:
            while True:
                got = yield
                log.append((got, held()))
        except KeyError as e:
            log.append(("thrown", str(e), held()))
            yield "recovered"
        finally:
            log.append(("finally", held()))
        return 42

    it = echo()
    next(it)
    it.send("a")
    assert it.throw(KeyError("k")) == "recovered"
    with pytest.raises(StopIteration) as stop:
        next(it)
    assert stop.value.value == 42
    assert log == [("a", True), ("thrown", "'k'", True), ("finally", True)]
    assert not held()


def test_closing_a_guarded_generator_runs_its_cleanup_with_the_lock(global_mode):
    log = []

    @agxguard.guard()
    def gen():
        try:
            yield 1
            yield 2
        finally:
            log.append(held())

    it = gen()
    assert next(it) == 1
    it.close()
    assert log == [True] and not held()


def test_an_exception_in_a_guarded_generator_releases_the_lock(global_mode):
    @agxguard.guard()
    def gen():
        yield 1
        raise ValueError("boom")

    it = gen()
    next(it)
    with pytest.raises(ValueError, match="boom"):
        next(it)
    assert not agxguard.global_lock().locked()
    assert agxguard._model.region_depth() == 0


def test_a_generator_resumed_on_another_thread_leaves_no_lock_held(global_mode):
    """Each resume takes the lock on the thread that resumes it and gives it back at the
    yield, so no thread is left holding it once the generator is suspended."""
    @agxguard.guard()
    def gen():
        yield threading.get_ident(), held()
        yield threading.get_ident(), held()

    it = gen()
    first = next(it)
    second = []
    t = threading.Thread(target=lambda: second.append((next(it), agxguard.global_lock().locked())))
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert first == (threading.get_ident(), True)
    (ident, was_held), locked_after = second[0]
    assert ident != threading.get_ident() and was_held and not locked_after
    assert not agxguard.global_lock().locked()
    # the lock is free for anyone: another thread can take it right away
    assert another_thread_can_take_the_global_lock(TIMEOUT)
    it.close()


def test_guarded_generators_on_many_threads_never_overlap(global_mode, detector):
    @agxguard.guard()
    def gen(n):
        for _ in range(n):
            detector.inside()
            yield

    def body(i):
        for _ in gen(30):
            pass

    run_threads(4, body)
    assert detector.entries == 120
    assert detector.max_total == 1


def test_a_coroutine_body_runs_with_the_lock_held_and_releases_it_at_each_await(global_mode):
    @agxguard.guard()
    async def work(tag, log):
        log.append((tag, "start", held()))
        await asyncio.sleep(0.001)
        log.append((tag, "resumed", held()))
        return tag

    async def watcher(log):
        # runs while `work` is suspended at its await, on the same thread
        await asyncio.sleep(0)
        log.append(("watcher", held()))

    async def main():
        log = []
        results = await asyncio.gather(work("a", log), watcher(log))
        return results, log

    assert inspect.iscoroutinefunction(work)
    results, log = asyncio.run(main())
    assert results[0] == "a"
    assert ("a", "start", True) in log and ("a", "resumed", True) in log
    assert ("watcher", False) in log
    assert not held()


def test_guarded_coroutines_on_one_loop_never_overlap_in_their_bodies(global_mode, detector):
    """Between two awaits the body holds the lock: the overlap detector (which sleeps
    with the GIL released) sees one body at a time even across event-loop threads."""
    @agxguard.guard()
    async def work():
        for _ in range(10):
            detector.inside()
            await asyncio.sleep(0)

    def body(i):
        async def main():
            await asyncio.gather(*(work() for _ in range(3)))
        asyncio.run(main())

    run_threads(3, body)
    assert detector.entries == 90
    assert detector.max_total == 1


def test_a_coroutine_exception_and_cancellation_release_the_lock(global_mode):
    @agxguard.guard()
    async def fails():
        await asyncio.sleep(0)
        raise KeyError("x")

    @agxguard.guard()
    async def sleeps_long():
        await asyncio.sleep(60)

    async def main():
        with pytest.raises(KeyError):
            await fails()
        task = asyncio.ensure_future(sleeps_long())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not agxguard.global_lock().locked()


def test_an_async_generator_body_runs_with_the_lock_held(global_mode):
    @agxguard.guard()
    async def agen(n):
        for i in range(n):
            before = held()
            await asyncio.sleep(0)
            yield i, before, held()

    async def watcher(log):
        for _ in range(5):
            log.append(held())
            await asyncio.sleep(0)

    async def main():
        log, out = [], []

        async def consume():
            async for item in agen(3):
                out.append((item, held()))

        await asyncio.gather(consume(), watcher(log))
        return out, log

    assert inspect.isasyncgenfunction(agen)
    out, log = asyncio.run(main())
    assert out == [((i, True, True), False) for i in range(3)]
    assert log and not any(log)
    assert not held()


def test_an_async_generator_gets_sent_values_and_is_closed_with_the_lock(global_mode):
    log = []

    @agxguard.guard()
    async def agen():
        try:
            while True:
                got = yield
                log.append((got, held()))
        finally:
            log.append(("finally", held()))

    async def main():
        it = agen()
        await it.asend(None)
        await it.asend("x")
        await it.aclose()

    asyncio.run(main())
    assert log == [("x", True), ("finally", True)]
    assert not held()


def test_a_callable_that_returns_a_generator_is_protected_too(global_mode):
    """Detection does not rest on the function's flags alone: a partial, or a plain
    function returning a generator, gets its generator guarded when it is called."""
    def gen(n):
        for i in range(n):
            yield held()

    guarded_partial = agxguard.guard()(functools.partial(gen, 2))
    assert list(guarded_partial()) == [True, True]
    guarded_factory = agxguard.guard()(lambda: gen(2))
    assert list(guarded_factory()) == [True, True]

    async def coro():
        return held()

    assert asyncio.run(agxguard.guard()(lambda: coro())()) is True


def test_a_stream_guard_decorates_a_generator_with_its_stream_lock():
    agxguard.set_mode("stream")
    lock = agxguard.stream_lock(11)

    @agxguard.guard(stream=11)
    def gen():
        yield lock.owned()

    assert list(gen()) == [True]
    assert not lock.locked()


def test_the_decorator_keeps_the_functions_name_and_docstring():
    @agxguard.guard()
    def gen():
        """doc"""
        yield

    @agxguard.guard()
    async def coro():
        """cdoc"""

    assert (gen.__name__, gen.__doc__) == ("gen", "doc")
    assert (coro.__name__, coro.__doc__) == ("coro", "cdoc")
    assert gen.__wrapped__ is not None


def test_the_decorator_and_the_stream_key_are_python_and_c_calls_no_python_helper():
    """Python owns Python (issue 12): decorating and turning a stream into a key
    happen in agxguard._decorate; the C core has no hook to call them back."""
    from agxguard import _C, _decorate

    assert not hasattr(_C, "_set_helpers") and not hasattr(_C, "guard")
    assert "__call__" not in vars(_C.Guard)
    assert agxguard.guard is _decorate.guard and agxguard._stream_key is _decorate.stream_key
    assert isinstance(agxguard.guard(), _decorate.Guard) and issubclass(_decorate.Guard, _C.Guard)
    # the no-stream guard is one shared object; one with a stream is its own
    assert agxguard.guard() is agxguard.guard() is agxguard.guard(None)
    g = agxguard.guard(stream=7)
    assert isinstance(g, agxguard._decorate.Guard) and g is not agxguard.guard(7) and "stream=7" in repr(g)
    with pytest.raises(TypeError, match="decorates a callable"):
        agxguard.guard()(42)
