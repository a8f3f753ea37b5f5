"""The Python half of guards: the decorator, the stream key, guard() itself.

Python owns what is Python here; the C core (agxguard._C) owns the locks and the
regions. ``Guard`` is the C region type with ``__call__`` added here (decorating is
Python work: generators, coroutines, functools.wraps), so no C code calls back
into this module to decorate or to turn a stream into a key.

``guard()`` with no stream returns one shared Guard: a Guard keeps no state of its
own between enter and exit (each thread's open regions live in the C core, per
thread), so every caller can use the same object, and ``with agxguard.guard():``
allocates nothing. benchmarks/overhead.py measures it against ``with lock:``.

One callback stays: in ``stream`` mode a region with no stream of its own locks
the caller's current torch CUDA stream, which only torch knows; the C core asks
``current_stream_key`` (registered with ``_C.set_stream_resolver``) at region
entry, and only in ``stream`` mode. Without it guard() would have to find the
stream itself, in Python, for every region in every mode: benchmarks/overhead.py
("guard() resolving the stream in Python") measured that at 1.27x threading.Lock
in global mode against 0.94x for guard() as it is, and 2.57x against 1.62x in
stream mode (2-core Debian 12 VM, python3 benchmarks/overhead.py --n 200000
--repeats 9, commit e29c132: benchmarks/results/overhead_debian2core.txt).
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Any, Callable, Generator, Hashable, Optional, TypeVar

from . import _C

F = TypeVar("F", bound=Callable[..., Any])


class Guard(_C.Guard):
    """A guarded region under the current mode (site='region'), or one guarded
    call (site='call'): a context manager, and a decorator (``@guard()``)."""

    __slots__ = ()

    def __call__(self, fn: F) -> F:
        """Decorate `fn`: its body runs inside this guard (see decorate)."""
        if not callable(fn):
            raise TypeError(f"a guard decorates a callable, not {type(fn).__name__}")
        return decorate(self, fn)


def _stepped(g: Guard, it: Any) -> Generator[Any, Any, Any]:
    """Drive generator-like `it` (a generator, or a coroutine's ``__await__`` iterator)
    one step at a time, each step inside `g` on the thread that takes the step: the
    region is entered before the body resumes and left when it yields (or suspends),
    so nothing is held while it is suspended, whichever thread resumes it next.
    Values sent, exceptions thrown and close() reach `it` as with ``yield from``."""
    send: Any = None
    thrown: Optional[BaseException] = None
    while True:
        try:
            with g:
                value = it.send(send) if thrown is None else it.throw(thrown)
        except StopIteration as stop:
            return stop.value
        finally:
            send = thrown = None
        try:
            send = yield value
        except GeneratorExit:
            with g:
                it.close()
            raise
        except BaseException as e:  # passed on to `it`, as yield from would
            thrown = e


class _SteppedAwaitable:
    """An awaitable whose await runs an awaitable's steps each inside a guard."""

    __slots__ = ("_steps",)

    def __init__(self, g: Guard, awaitable: Any) -> None:
        self._steps = _stepped(g, awaitable.__await__())

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._steps


def _guard_generator(g: Guard, gen: Any) -> Generator[Any, Any, Any]:
    """A generator that runs `gen`'s body inside `g`, step by step."""
    return (yield from _stepped(g, gen))


async def _guard_coroutine(g: Guard, coro: Any) -> Any:
    """A coroutine that runs `coro`'s body inside `g`, step by step."""
    return await _SteppedAwaitable(g, coro)


def _async_generator_wrapper(g: Guard, fn: Callable[..., Any]) -> Callable[..., Any]:
    """An async generator function that runs the body of `fn`'s async generator
    inside `g`: each step of each asend/athrow/aclose, so the lock is given back at
    every await that suspends and at every yield."""
    async def guarded_async_generator(*args: Any, **kwargs: Any) -> Any:
        agen = fn(*args, **kwargs)
        send: Any = None
        thrown: Optional[BaseException] = None
        while True:
            try:
                step = agen.asend(send) if thrown is None else agen.athrow(thrown)
                send = thrown = None
                value = await _SteppedAwaitable(g, step)
            except StopAsyncIteration:
                return
            try:
                send = yield value
            except GeneratorExit:
                await _SteppedAwaitable(g, agen.aclose())
                raise
            except BaseException as e:  # passed on to agen, as athrow would
                thrown = e

    return guarded_async_generator


def _guard_result(g: Guard, result: Any) -> Any:
    """A plain function's result: a generator, coroutine or async generator it
    returned (a partial, a lambda, a factory) gets its body guarded too."""
    if isinstance(result, types.GeneratorType):
        return _guard_generator(g, result)
    if isinstance(result, types.CoroutineType):
        return _guard_coroutine(g, result)
    if isinstance(result, types.AsyncGeneratorType):
        return _async_generator_wrapper(g, lambda: result)()
    return result


def decorate(g: Guard, fn: F) -> F:
    """``@guard()``: `fn` runs inside guard `g`, its whole body under the lock.

    A generator function, an ``async def`` and an async generator keep their kind,
    and their body runs under the lock one step at a time: the lock is taken when
    the body resumes and given back at each ``yield`` and at each ``await`` that
    suspends (so a suspended generator or coroutine holds nothing, and the thread
    that resumes it takes the lock). A function that returns one of these is
    treated the same way for what it returns."""
    if inspect.isasyncgenfunction(fn):
        return functools.wraps(fn)(_async_generator_wrapper(g, fn))  # type: ignore[return-value]
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def guarded_generator(*args: Any, **kwargs: Any) -> Any:
            return (yield from _stepped(g, fn(*args, **kwargs)))

        return guarded_generator  # type: ignore[return-value]
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def guarded_coroutine(*args: Any, **kwargs: Any) -> Any:
            return await _SteppedAwaitable(g, fn(*args, **kwargs))

        return guarded_coroutine  # type: ignore[return-value]

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with g:
            result = fn(*args, **kwargs)
        return _guard_result(g, result)

    return guarded  # type: ignore[return-value]


_KEY_MIN, _KEY_MAX = -(1 << 63), (1 << 64) - 1


def stream_key(stream: Any) -> int:
    """The 64-bit lock key of a stream: an int from -2**63 to 2**64-1 as is (a
    negative one in two's complement), a torch CUDA stream by its handle, an object
    with ``cuda_stream`` likewise, any other hashable by hash(). Distinct keys with
    equal hashes share a lock (more serialization, never less). None, a bool and an
    int outside 64 bits are refused: None is no stream (see use_stream)."""
    if stream is None:
        raise TypeError("a stream key cannot be None (None means no stream: guard(stream=None) and "
                        "use_stream(None) use the caller's current stream)")
    if isinstance(stream, bool):
        raise TypeError("a stream key cannot be a bool")
    if isinstance(stream, int):
        if not _KEY_MIN <= stream <= _KEY_MAX:
            raise ValueError(f"a stream key must be an int from -2**63 to 2**64-1 (64 bits), not {stream!r:.60}")
        return stream & 0xFFFFFFFFFFFFFFFF
    handle = getattr(stream, "cuda_stream", None)
    if isinstance(handle, int):
        return handle & 0xFFFFFFFFFFFFFFFF
    if not isinstance(stream, Hashable):
        raise TypeError(f"a stream must be an int, a torch stream or hashable, not {type(stream).__name__}")
    return hash(stream) & 0xFFFFFFFFFFFFFFFF


_REGION = Guard()  # the shared no-stream region: see the module docstring


def guard(stream: Any = None) -> Guard:
    """A guarded region under the current mode, as a context manager or decorator.

    global: the one process-wide lock; stream: the lock of `stream` (see stream_key),
    or of the caller's current stream (use_stream(), torch's current CUDA stream,
    else 0); op/off: no region lock. Re-entrant. With a throttle set, at most N
    outermost regions run at once.

    As a decorator (@guard()), the function's body runs inside the region. On a
    generator function, async def or async generator the body runs under the lock
    one step at a time: the lock is taken when the body resumes (on the thread that
    resumes it) and given back at each yield and each await that suspends, so a
    suspended generator or coroutine holds nothing.

    A thread can only leave a region it entered itself, innermost first
    (RuntimeError otherwise)."""
    if stream is None:
        return _REGION
    return Guard(stream_key(stream))


def current_stream_key() -> int:
    """The caller's current stream when none was set with use_stream():
    torch's current CUDA stream once CUDA is initialized, else the default stream 0
    (MPS and CPU have one stream per device). The C core calls this at the entry of
    a stream-mode region that has no stream of its own: a Python-side alternative
    (guard() resolving the stream itself) would put a Python call on every region
    in every mode, where this costs one call in stream mode only."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        device = getattr(torch._C, "_cuda_getDevice", None)
        if raw is None or device is None:  # an older torch: the slower public way
            return torch.cuda.current_stream().cuda_stream
        # from now on two C calls, no Stream object (this runs on every stream-mode region)
        _C.set_stream_resolver(lambda: raw(device()))
        return raw(device())
    return 0


_C.set_stream_resolver(current_stream_key)
