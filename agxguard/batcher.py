"""Batcher: many threads or coroutines submit single requests, one dispatcher runs them as batches.

Only the dispatcher thread ever calls ``fn``, so no two threads drive the GPU at once
(no driver race to guard against), and requests share one forward pass (the throughput
of batching). The dispatcher can run each batch inside ``agxguard.guard()`` so that it
also cooperates with other code protected by the guard modes.

    with Batcher(model, max_batch=8, max_delay_ms=2.0) as batcher:
        y = batcher(x)                  # blocking, from any thread
        y = batcher(x, timeout=0.5)     # gives up (TimeoutError) after 0.5 s
        fut = batcher.submit(x)         # concurrent.futures.Future
        y = await batcher.acall(x)      # from a coroutine; the event loop is never blocked

A request is a tensor whose dim 0 is its batch dimension. Requests with the same shape
except dim 0, the same dtype and the same device are concatenated along dim 0; others
are never mixed. ``fn``'s output (a tensor, or a tuple/list/dict of tensors) is split
back along dim 0 by each request's size. The slices are views of the batch's output.

Variable-length requests (``pad_dim``): requests that differ only in their size along
``pad_dim`` share a batch; each is padded with ``pad_value`` to the longest in the batch
(or to the next of ``buckets``), ``fn`` is called as ``fn(batch, lengths)`` with
``lengths`` a 1-D int64 tensor of each row's true length (on the batch's device), and each
output whose size along ``pad_dim`` is the padded length is trimmed back per request.

Serving on a GPU (``device="cuda"`` or ``"mps"``): requests are CPU tensors and answers
come back as CPU tensors. The dispatcher collates a batch into pinned host memory, copies
it to the device in one copy, runs ``fn``, copies the outputs back in one copy each and
records an event; while the device works it already collates the next batch when one is
waiting (a pipeline of ``pipeline_depth`` batches), and answers each batch when its event
has fired. On cpu (``device=None``) batches run one after the other, as fn returns.

The dispatcher cannot die: an exception anywhere in forming, running or answering a batch
fails exactly that batch's callers, and the dispatcher goes on. Every accepted request
ends answered, failed or cancelled (``stats()`` counts each). ``close(timeout=...)``
bounds the wait for a hung ``fn``; in a ``fork()`` child a Batcher of the parent refuses
requests with a clear error (its dispatcher thread does not exist there).

torch is imported only when a batch runs, so this module imports without it.
"""
from __future__ import annotations

import _thread
import asyncio
import atexit
import collections
import concurrent.futures
import logging
import math
import os
import queue
import sys
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence, Union

try:
    from ._affinity import check_pin_cpus, set_affinity
except ImportError:  # loaded as a lone file (benchmarks/efficiency.py's fallback)
    def check_pin_cpus(pin_cpus: Any) -> Any:  # type: ignore[misc]
        """Without the package: pinning is refused unless None."""
        if pin_cpus is not None:
            raise ValueError("pin_cpus needs the agxguard package")
        return None

    def set_affinity(cpus: Any) -> None:  # type: ignore[misc]
        """Without the package: nothing to pin."""

try:
    from ._C import Wakeup as _Wakeup
except ImportError:  # loaded without the C core (benchmarks/efficiency.py's fallback)
    class _Wakeup:  # type: ignore[no-redef]
        """The same auto-reset event on a _thread lock (held while clear), without spinning."""

        __slots__ = ("_lock",)

        def __init__(self, spin_us: float = 0.0):
            self._lock = _thread.allocate_lock()
            self._lock.acquire()

        def set(self) -> None:
            try:
                self._lock.release()
            except RuntimeError:  # set already
                pass

        def clear(self) -> bool:
            return self._lock.acquire(False)

        def wait(self, timeout: Optional[float] = None, spin_us: Optional[float] = None) -> bool:
            return self._lock.acquire(True, -1 if timeout is None else timeout)

__all__ = ["Batcher"]

log = logging.getLogger("agxguard.batcher")

#: Default Batcher(spin_us=...): how long a waiting caller or the dispatcher spins
#: (GIL released) before it sleeps.
DEFAULT_SPIN_US = 2000.0

#: How long the interpreter's exit waits for each open Batcher to finish what it
#: accepted (seconds); past it the remaining callers are failed and exit goes on.
EXIT_CLOSE_TIMEOUT_S = 10.0

_LATENCY_SAMPLES = 65536  # per-request samples kept for the percentiles (the newest ones)
_DEVICE_KINDS = ("cuda", "mps")


def _percentile(sorted_values: list, q: float) -> Optional[float]:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Request:
    """One accepted request: its tensor, its batching key, and where its answer goes.

    Whoever takes ``claim`` (a _thread lock, acquired without blocking) finishes the
    request and counts it: the dispatcher when it answers or fails it, close() when it
    fails it, the caller when it gives up (timeout, cancellation). So nothing is answered
    twice and each request is counted once.

    A blocking call answers through ``done``, a Wakeup (agxguard._C.Wakeup: an event the
    caller waits on with the GIL released, spinning first); the dispatcher sets ``value``
    or ``error`` and sets ``done``. Each thread keeps one such request in thread-local
    storage and reuses it call after call. A ``submit()`` request answers through
    ``future``; an ``acall()`` request through ``afut`` on its event loop ``loop``.
    """

    __slots__ = ("x", "rows", "length", "key", "t", "deadline", "future", "done", "value",
                 "error", "busy", "claim", "loop", "afut", "timed_out", "stale")

    def __init__(self, future: Optional[concurrent.futures.Future] = None, blocking: bool = True):
        self.x = None
        self.rows = 0
        self.length = 0  # size along pad_dim (0 without pad_dim)
        self.key = None
        self.t = 0.0  # time.perf_counter() at submit
        self.deadline: Optional[float] = None  # perf_counter() past which it is not computed
        self.future = future
        self.done = _Wakeup() if blocking and future is None else None
        self.value = None
        self.error = None
        self.busy = False  # a blocking call is using (or abandoned) this request
        self.claim = _thread.allocate_lock()
        self.loop = None
        self.afut = None
        self.timed_out = False
        self.stale = False  # failed while the dispatcher still held it: never reused


_tls = threading.local()  # .req: the calling thread's reusable blocking request


_perf_counter = time.perf_counter
_torch = None
_Size: Any = None  # torch.Size and torch.dtype once torch is imported (fast path in _describe)
_dtype: Any = None


def _get_torch() -> Any:
    """Import torch on first use (the module imports without it)."""
    global _torch, _Size, _dtype
    if _torch is None:
        import torch

        _torch = torch
        _Size, _dtype = torch.Size, torch.dtype
    return _torch


def _describe(r: _Request, x: Any, pad_dim: Optional[int], buckets: Optional[tuple]) -> None:
    """Set ``r.key``, ``r.rows`` and ``r.length`` from request tensor ``x``, or raise a
    clear error in the caller (so nothing the dispatcher compares can raise there)."""
    try:
        shape = x.shape
        dtype = x.dtype
        device = x.device
    except AttributeError:
        raise TypeError(f"Batcher requests must be tensors with a batch dimension, "
                        f"got {type(x).__name__}") from None
    if type(shape) is not _Size or type(dtype) is not _dtype:
        # not a torch.Size of ints and a torch.dtype: check it all here, in the caller,
        # so that nothing the dispatcher compares can raise there
        try:
            dims = tuple([int(s) for s in shape])
            hash((dtype, device))
        except Exception as exc:
            raise TypeError(f"Batcher requests must have a shape of ints and a hashable dtype "
                            f"and device; this {type(x).__name__}'s could not be read: "
                            f"{exc!r}") from None
    else:
        dims = shape
    if not dims:
        raise ValueError("Batcher requests need a batch dimension (dim 0); got a 0-d tensor")
    r.rows = dims[0]
    if pad_dim is None:
        r.key = (tuple(dims[1:]), dtype, device)
        return
    if pad_dim >= len(dims):
        raise ValueError(f"pad_dim={pad_dim} is out of range for a request of shape {tuple(dims)} "
                         f"({len(dims)} dims); allowed: 1 to {len(dims) - 1} (dim 0 is the "
                         f"batch dimension)")
    length = dims[pad_dim]
    if buckets is not None and length > buckets[-1]:
        raise ValueError(f"request length {length} along pad_dim={pad_dim} is longer than the "
                         f"largest bucket {buckets[-1]}; allowed: 0 to {buckets[-1]}")
    r.length = length
    r.key = (dims[1:pad_dim] + dims[pad_dim + 1:], dtype, device)


def _answer(r: _Request) -> Any:
    """In the caller, once ``r.done`` was set: free ``r`` for reuse, return or raise.
    One failed by close() while its batch ran stays taken (the dispatcher may still
    try to answer it); the thread's next call takes a fresh request."""
    r.x = None
    if not r.stale:
        r.busy = False
        r.claim.release()  # taken by whoever answered
    error = r.error
    if error is not None:
        r.error = None
        raise error
    value = r.value
    r.value = None
    return value


def _deliver_async(items: list) -> None:
    """On an event loop: set each (asyncio future, value, error) that is not done yet."""
    for afut, value, error in items:
        if afut.done():  # cancelled after the dispatcher took it: the answer is dropped
            continue
        if error is None:
            afut.set_result(value)
        else:
            afut.set_exception(error)


def _give_up(r: _Request) -> bool:
    """In the caller: give ``r`` up (timeout, cancellation) unless it is being answered.
    True if it was given up (the dispatcher then drops it or discards its answer)."""
    return r.claim.acquire(False)


def _split_tensor(t: Any, sizes: list, total: int) -> list:
    """Split one output tensor along dim 0 into ``sizes``; checks that dim 0 is ``total``."""
    shape = getattr(t, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] != total:
        got = "a non-tensor" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            f"Batcher: fn returned {got} (type {type(t).__name__}) for a batch of {total} rows; "
            f"each output tensor must have {total} rows along dim 0 so it can be split")
    n = len(sizes)
    if n == 1:
        return [t]
    if sizes[0] > 0 and sizes[0] * n == total and min(sizes) == sizes[0]:
        return t.chunk(n, 0)  # equal sizes: the cheapest way to cut views
    return t.split(sizes, 0)


def _trim(parts: list, lengths: list, pad_dim: int, padded: int) -> list:
    """Trim each part whose size along ``pad_dim`` is the padded length to its request's length."""
    if not parts or parts[0].dim() <= pad_dim or parts[0].shape[pad_dim] != padded:
        return parts
    return [p if n == padded else p.narrow(pad_dim, 0, n) for p, n in zip(parts, lengths)]


def _split_output(out: Any, sizes: list, total: int, trim: Optional[tuple] = None) -> list:
    """Split ``fn``'s output into one result per request.

    A tensor is split along dim 0; a tuple, list (namedtuples too) or dict of tensors is
    split element by element and rebuilt with the same type for each request. ``trim``
    (lengths, pad_dim, padded length) trims padded outputs back to each request's length.
    """
    def one(t: Any) -> list:
        parts = _split_tensor(t, sizes, total)
        return parts if trim is None else _trim(list(parts), *trim)

    if isinstance(out, (tuple, list)):
        parts = [one(t) for t in out]
        n = len(sizes)
        if hasattr(out, "_fields"):  # namedtuple
            return [type(out)(*(p[i] for p in parts)) for i in range(n)]
        return [type(out)(p[i] for p in parts) for i in range(n)]
    if isinstance(out, dict):
        parts = {k: one(v) for k, v in out.items()}
        return [type(out)((k, p[i]) for k, p in parts.items()) for i in range(len(sizes))]
    return one(out)


def _map_tensors(out: Any, f: Callable[[Any], Any]) -> Any:
    """Apply ``f`` to ``out`` (a tensor) or to each tensor of a tuple/list/dict of them."""
    if isinstance(out, (tuple, list)):
        if hasattr(out, "_fields"):
            return type(out)(*(f(t) for t in out))
        return type(out)(f(t) for t in out)
    if isinstance(out, dict):
        return type(out)((k, f(v)) for k, v in out.items())
    return f(out)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int >= minimum, else raise TypeError/ValueError saying so."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} "
                        f"(type {type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_ms(name: str, value: Any, allow_none: bool = False) -> Optional[float]:
    """Return ``value`` as a float if it is a finite number >= 0 (or None if allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} "
                        f"(type {type(value).__name__})")
    if not (value >= 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_timeout(timeout: Any) -> Optional[float]:
    """Return a call's ``timeout`` (None or seconds >= 0) or raise a clear error."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    if not (timeout >= 0):
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


def _check_buckets(buckets: Any) -> Optional[tuple]:
    """Return ``buckets`` as a tuple of strictly increasing ints >= 1, or raise saying so."""
    if buckets is None:
        return None
    try:
        values = tuple(buckets)
    except TypeError:
        raise TypeError(f"buckets must be None or a sequence of increasing ints >= 1, "
                        f"got {buckets!r}") from None
    if not values:
        raise ValueError("buckets must be None or a non-empty sequence of increasing ints >= 1, "
                         "got an empty one")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"buckets must hold ints >= 1, got {v!r} in {values!r}")
        if v < 1:
            raise ValueError(f"buckets must hold ints >= 1 (positive lengths), got {v!r} "
                             f"in {values!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"buckets must be sorted in strictly increasing order, got {values!r}")
    return values


_live_batchers: "weakref.WeakSet[Batcher]" = weakref.WeakSet()


@atexit.register
def _close_live_batchers() -> None:
    """At interpreter exit, let every open Batcher finish what it accepted (within
    EXIT_CLOSE_TIMEOUT_S each: a hung fn fails its callers instead of blocking exit)."""
    for b in list(_live_batchers):
        b.close(wait=True, timeout=EXIT_CLOSE_TIMEOUT_S)


def _after_fork_in_child() -> None:
    """In a fork() child: the parent's Batchers have no dispatcher here; refuse requests."""
    for b in list(_live_batchers):
        b._forked()
    _live_batchers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Flight:
    """One batch on its way: its requests, the split answers, and (device path) the event
    that fires when its outputs are back on the host."""

    __slots__ = ("batch", "results", "error", "event", "t_start", "n")

    def __init__(self, batch: list, t_start: float):
        self.batch = batch
        self.results = None
        self.error: Optional[BaseException] = None
        self.event = None
        self.t_start = t_start
        self.n = len(batch)


class Batcher:
    """Run single requests from many threads or coroutines as batches on one dispatcher thread.

    Args:
        fn: callable taking one batched tensor (``fn(batch)``, or ``fn(batch, lengths)``
            with ``pad_dim``) and returning a tensor (or a tuple, list or dict of tensors)
            with the same number of rows along dim 0.
        max_batch: most requests concatenated into one call of ``fn`` (>= 1); settable
            while running.
        max_delay_ms: longest time the oldest waiting request is held back while the
            dispatcher waits for more to fill the batch (>= 0; 0 means never wait);
            settable while running.
        max_queue: most accepted requests waiting at once (>= 1); past it ``submit``
            blocks (backpressure), or raises ``queue.Full`` after its timeout.
        guard: False; True to run each batch inside ``agxguard.guard()``; or a callable
            returning a context manager to enter around each batch.
        name: used in the dispatcher thread's name and in ``repr``.
        pin_cpus: None (default), or CPU numbers (e.g. ``{0}``): pin the dispatcher thread
            and, on its first request, every thread that calls ``submit`` or the Batcher to
            these CPUs (Linux, ``os.sched_setaffinity``; it changes the calling threads'
            affinity for good). Meant for ``fn`` on a GPU.
        spin_us: how long (microseconds, 0 to 1,000,000) a waiting caller, and the
            dispatcher waiting for requests, spin with the GIL released before they
            sleep (default 2000); 0 never spins (least CPU, most latency).
        pad_dim: None (requests batch only with equal shapes), or the dim (>= 1) along
            which requests may differ in length: they are padded to a common length and
            ``fn`` is called as ``fn(batch, lengths)``.
        pad_value: the value padding is filled with (default 0.0).
        buckets: None, or increasing lengths (ints >= 1): a batch is padded to the
            smallest bucket that holds its longest request, so ``fn`` sees few distinct
            shapes; a request longer than the largest bucket is refused (ValueError).
        device: None (``fn`` runs on the requests as they are), or "cuda"/"mps" (or a
            torch.device): requests are CPU tensors, batches are collated in pinned host
            memory, copied to the device once, and the outputs copied back once; answers
            are CPU tensors, and batches are pipelined (see the module doc).
        pipeline_depth: batches in flight on the device at once (>= 1; default 2).
        latency_target_ms: None, or a target latency (> 0): the wait for more requests is
            tuned to the arrival rate and the batch run time so that a request's latency
            stays near it (never longer than max_delay_ms).
    """

    def __init__(self, fn: Callable[..., Any], max_batch: int = 8, max_delay_ms: float = 2.0,
                 max_queue: int = 1024, guard: Union[bool, Callable[[], Any]] = False,
                 name: Optional[str] = None, pin_cpus: Optional[Any] = None,
                 spin_us: float = DEFAULT_SPIN_US, pad_dim: Optional[int] = None,
                 pad_value: float = 0.0, buckets: Optional[Sequence[int]] = None,
                 device: Any = None, pipeline_depth: int = 2,
                 latency_target_ms: Optional[float] = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable (a model or function of one batched tensor), "
                            f"got {fn!r} (type {type(fn).__name__})")
        self._max_batch = _check_int("max_batch", max_batch, 1)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        self._max_delay_ms = _check_ms("max_delay_ms", max_delay_ms)
        if isinstance(spin_us, bool) or not isinstance(spin_us, (int, float)):
            raise TypeError(f"spin_us must be a number from 0 to 1000000, got {spin_us!r} "
                            f"(type {type(spin_us).__name__})")
        if not (0 <= spin_us <= 1e6):
            raise ValueError(f"spin_us must be a number from 0 to 1000000 (1 s), got {spin_us!r}")
        self.spin_us = float(spin_us)
        if pad_dim is not None:
            if isinstance(pad_dim, bool) or not isinstance(pad_dim, int):
                raise TypeError(f"pad_dim must be None or an int >= 1, got {pad_dim!r}")
            if pad_dim < 1:
                raise ValueError(f"pad_dim must be None or an int >= 1 (dim 0 is the batch "
                                 f"dimension), got {pad_dim!r}")
        self.pad_dim = pad_dim
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
            raise TypeError(f"pad_value must be a number, got {pad_value!r}")
        self.pad_value = pad_value
        self.buckets = _check_buckets(buckets)
        if self.buckets is not None and pad_dim is None:
            raise ValueError("buckets needs pad_dim (the dim whose length they bucket)")
        self.pipeline_depth = _check_int("pipeline_depth", pipeline_depth, 1)
        if latency_target_ms is not None:
            _check_ms("latency_target_ms", latency_target_ms)
            if latency_target_ms <= 0:
                raise ValueError(f"latency_target_ms must be None or a number > 0, "
                                 f"got {latency_target_ms!r}")
            latency_target_ms = float(latency_target_ms)
        self.latency_target_ms = latency_target_ms
        self.device = self._check_device(device)
        if "torch" in sys.modules:  # the fast path of _describe needs torch.Size
            _get_torch()
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self._guard = self._guard_factory(guard)
        self._pin = check_pin_cpus(pin_cpus)

        self._mutex = _thread.allocate_lock()  # guards the queue and the wake-up state
        self._queue: collections.deque = collections.deque()
        # The dispatcher sleeps on _wake (a Wakeup); a submitter sets it
        # when _sleeping is set and the queue reached _wake_at requests, so the dispatcher
        # wakes once for a full batch instead of once per arrival.
        self._wake = _Wakeup()
        self._sleeping = False
        self._wake_at = 1
        self._not_full = threading.Condition(self._mutex)  # blocked submitters wait here
        self._full_waiters = 0
        self._closed = False
        self._fork_child = False
        self._inflight: list = []  # _Flight objects between forming and answering
        self._stats_lock = _thread.allocate_lock()
        self._accepted = 0
        self._reset_counters()
        # adaptive batching estimates (dispatcher thread only)
        self._ia_est = 0.0  # seconds between arrivals
        self._run_est = 0.0  # seconds per batch run
        self._last_form = 0.0

        self._thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                        name=f"agxguard-batcher-{self.name}")
        self._thread.start()
        _live_batchers.add(self)

    @staticmethod
    def _check_device(device: Any) -> Any:
        """None, or a torch.device of kind cuda or mps (ValueError naming the allowed ones)."""
        if device is None:
            return None
        torch = _get_torch()
        try:
            dev = device if isinstance(device, torch.device) else torch.device(str(device))
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in _DEVICE_KINDS:
            raise ValueError(f"device must be None (run on the requests' device) or one of "
                             f"{', '.join(_DEVICE_KINDS)}, got {device!r}")
        return dev

    # ------------------------------------------------------------------ settings
    @property
    def max_batch(self) -> int:
        """Most requests in one batch (settable while running)."""
        return self._max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self._max_batch = _check_int("max_batch", value, 1)

    @property
    def max_delay_ms(self) -> float:
        """Longest wait for a batch to fill, in ms (settable while running)."""
        return self._max_delay_ms

    @max_delay_ms.setter
    def max_delay_ms(self, value: float) -> None:
        self._max_delay_ms = _check_ms("max_delay_ms", value)

    def _pin_caller(self) -> None:
        """Pin the calling thread to pin_cpus (once per thread, while it calls this Batcher)."""
        _tls.pin = self._pin
        try:
            set_affinity(self._pin)
        except OSError:  # a CPU went away since __init__: pinning is only a speed-up
            pass

    @staticmethod
    def _guard_factory(guard: Union[bool, Callable[[], Any]]) -> Optional[Callable[[], Any]]:
        """Resolve ``guard`` to a context-manager factory, or None for no guard."""
        if guard is False or guard is None:
            return None
        if guard is True:
            # agxguard.guard lives in agxguard._decorate; taken from there, not from the
            # package, so that this module does not import the package that imports it
            from ._decorate import guard as region_guard

            return region_guard
        if callable(guard):
            return guard
        raise TypeError(f"guard must be True, False or a callable returning a context manager, "
                        f"got {guard!r}")

    # ------------------------------------------------------------------ submitting
    def submit(self, x: Any, timeout: Optional[float] = None) -> concurrent.futures.Future:
        """Queue one request and return a Future for its result.

        Blocks while the queue is full; with ``timeout`` (seconds) raises ``queue.Full``
        if no room opened in time. Raises RuntimeError once the Batcher is closed.
        Cancelling the Future before its batch is formed drops the request (never
        computed). The Future's done-callbacks run on the dispatcher thread: keep them
        short, and never wait on this Batcher from one.
        """
        timeout = _check_timeout(timeout)
        if self._pin is not None and getattr(_tls, "pin", None) is not self._pin:
            self._pin_caller()
        future: concurrent.futures.Future = concurrent.futures.Future()
        r = _Request(future)
        _describe(r, x, self.pad_dim, self.buckets)
        self._push(r, x, timeout)
        return future

    def __call__(self, x: Any, timeout: Optional[float] = None) -> Any:
        """Run one request and return its result (or raise its batch's exception).

        ``timeout`` (seconds) bounds the whole call: ``queue.Full`` while queueing,
        TimeoutError while waiting for the result. A request that times out before its
        batch is formed is never computed.
        """
        # The calling thread's reusable request. One still busy belongs to an abandoned
        # call (timeout, KeyboardInterrupt) or to a call this one interrupts (a signal
        # handler): it is left to the dispatcher.
        try:
            r = _tls.req
            if r.busy:
                raise AttributeError
        except AttributeError:
            r = _tls.req = _Request()
        if self._pin is not None and getattr(_tls, "pin", None) is not self._pin:
            self._pin_caller()
        _describe(r, x, self.pad_dim, self.buckets)
        if timeout is not None:
            return self._call_with_timeout(r, x, timeout)
        self._enqueue_call(r, x, None)
        try:
            r.done.wait(None, self.spin_us)
        except BaseException:  # a signal handler raised (KeyboardInterrupt): give up
            if _give_up(r):
                self._count_given_up(r)
            raise
        return _answer(r)

    def _call_with_timeout(self, r: _Request, x: Any, timeout: Any) -> Any:
        """``__call__`` with a timeout (the blocking path without one stays lean)."""
        timeout = _check_timeout(timeout)
        r.deadline = _perf_counter() + timeout
        try:
            self._enqueue_call(r, x, timeout)
        except BaseException:
            r.deadline = None
            raise
        try:
            got = r.done.wait(max(0.0, r.deadline - _perf_counter()), self.spin_us)
        except BaseException:  # a signal handler raised (KeyboardInterrupt): give up
            if _give_up(r):
                self._count_given_up(r)
            raise
        if not got:
            r.timed_out = True
            if _give_up(r):
                # r stays busy: the dispatcher drops it (queued) or discards its answer
                # (running), and this thread's next call takes a fresh request.
                self._count_given_up(r)
                raise TimeoutError(f"Batcher {self.name!r}: no result within {timeout} s")
            r.timed_out = False
            r.done.wait(None, 0)  # answered this very moment: it is being set
        r.deadline = None
        return _answer(r)

    def _enqueue_call(self, r: _Request, x: Any, timeout: Optional[float]) -> None:
        """Queue the blocking call's request ``r`` for ``x`` (marked busy) and wake the
        dispatcher if it waits for this many; on any exception ``r`` is left unqueued
        and free again."""
        r.busy = True
        try:
            self._push(r, x, timeout)
        except BaseException:
            r.busy = False
            r.x = None
            raise

    async def acall(self, x: Any, timeout: Optional[float] = None) -> Any:
        """Run one request from a coroutine and return its result (or raise its error).

        Many coroutines of one event loop may await it at once: no thread per request,
        and the loop is never blocked (a full queue is waited out asynchronously).
        ``timeout`` (seconds) bounds the whole call (TimeoutError); cancelling the
        awaiting task gives the request up, and one given up before its batch is formed
        is never computed.
        """
        timeout = _check_timeout(timeout)
        loop = asyncio.get_running_loop()
        if self._pin is not None and getattr(_tls, "pin", None) is not self._pin:
            self._pin_caller()
        r = _Request(blocking=False)
        _describe(r, x, self.pad_dim, self.buckets)
        r.loop = loop
        afut = r.afut = loop.create_future()
        t0 = _perf_counter()
        if timeout is not None:
            r.deadline = t0 + timeout
        while True:  # queue full: wait for room without blocking the loop
            try:
                self._push(r, x, 0.0)
                break
            except queue.Full:
                if timeout is not None and _perf_counter() >= r.deadline:
                    raise TimeoutError(f"Batcher {self.name!r}: queue full for {timeout} s")
                await asyncio.sleep(0.0005)
        afut.add_done_callback(lambda f, r=r: self._async_done(r, f))
        handle = None
        if timeout is not None:
            handle = loop.call_at(loop.time() + max(0.0, r.deadline - _perf_counter()),
                                  self._async_expire, r)
        try:
            return await afut
        except asyncio.CancelledError:
            if r.timed_out:
                raise TimeoutError(f"Batcher {self.name!r}: no result within {timeout} s") from None
            raise
        finally:
            if handle is not None:
                handle.cancel()

    @staticmethod
    def _async_expire(r: _Request) -> None:
        """On the loop, at an acall's timeout: cancel its future (unless answered)."""
        if not r.afut.done():
            r.timed_out = True
            r.afut.cancel()

    def _async_done(self, r: _Request, f: Any) -> None:
        """On the loop, when an acall's future is done: if it was cancelled (timeout, task
        cancelled), give the request up."""
        if f.cancelled() and _give_up(r):
            self._count_given_up(r)

    def _count_given_up(self, r: _Request) -> None:
        """Count a request its caller gave up (the caller holds its claim)."""
        r.x = None
        with self._stats_lock:
            if r.timed_out or (r.deadline is not None and _perf_counter() >= r.deadline):
                self._expired += 1
            else:
                self._cancelled += 1

    def _push(self, r: _Request, x: Any, timeout: Optional[float]) -> None:
        """Queue ``r`` for ``x`` (waiting for room up to ``timeout``) and wake the
        dispatcher if it waits for this many requests."""
        r.x = x
        r.t = _perf_counter()
        with self._mutex:
            q = self._queue
            if self._closed or len(q) >= self.max_queue:
                self._wait_for_room(timeout)
            q.append(r)
            self._accepted += 1
            if self._sleeping and len(q) >= self._wake_at:
                self._sleeping = False
                self._wake.set()

    def _wait_for_room(self, timeout: Optional[float]) -> None:
        """With the mutex held: wait until the queue has room; raise if closed or timed out."""
        if self._closed:
            raise RuntimeError(self._closed_message())
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self._queue
        self._full_waiters += 1
        try:
            while len(q) >= self.max_queue and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Full(f"Batcher {self.name!r}: queue full "
                                     f"({self.max_queue} requests) for {timeout} s")
                self._not_full.wait(left)
        finally:
            self._full_waiters -= 1
        if self._closed:
            raise RuntimeError(f"Batcher {self.name!r} closed while this request "
                               f"waited for room; it was not accepted")

    def _closed_message(self) -> str:
        """Why a closed Batcher refuses a request."""
        if self._fork_child:
            return (f"Batcher {self.name!r} was created before this process was forked; "
                    f"its dispatcher thread does not exist in the fork() child, so it accepts "
                    f"no requests here: create a new Batcher in the child")
        return f"Batcher {self.name!r} is closed; it accepts no requests"

    def _forked(self) -> None:
        """In a fork() child: fresh locks (the parent's may have been held by a thread
        that is gone), an empty queue, and closed with the fork's reason."""
        self._mutex = _thread.allocate_lock()
        self._not_full = threading.Condition(self._mutex)
        self._stats_lock = _thread.allocate_lock()
        self._wake = _Wakeup()
        self._queue = collections.deque()
        self._inflight = []
        self._full_waiters = 0
        self._sleeping = False
        self._fork_child = True
        self._closed = True

    # ------------------------------------------------------------------ dispatching
    def _sleep(self, wake_at: int, timeout: Optional[float]) -> None:
        """With the mutex held: release it and sleep until a submitter sees ``wake_at``
        queued requests (or close() is called, or ``timeout`` s pass); then re-take it."""
        self._wake_at = wake_at
        self._sleeping = True
        self._mutex.release()
        try:
            got = self._wake.wait(timeout, self.spin_us)
        finally:
            self._mutex.acquire()
        if self._sleeping:  # nobody woke us: timed out, _wake is still clear
            self._sleeping = False
        elif not got:  # woken right after timing out: clear _wake again
            self._wake.clear()

    def _take(self, key: tuple, batch: list, dropped: list, max_batch: int) -> None:
        """With the mutex held: move queued requests with ``key`` into ``batch`` (oldest
        first, up to max_batch); the others keep their places in the queue. Requests given
        up, cancelled or past their deadline go to ``dropped`` instead (never computed)."""
        q = self._queue
        room = max_batch - len(batch)
        skipped = None
        now = None
        while q and room:
            r = q.popleft()
            if r.claim.locked():  # its caller gave up (and counted it)
                r.x = None
                continue
            if r.deadline is not None:
                if now is None:
                    now = _perf_counter()
                if now >= r.deadline:
                    dropped.append(r)
                    continue
            k = r.key
            try:
                same = k is key or k == key
            except Exception:  # an odd dtype/device: it batches only with itself (as head)
                same = False
            if not same:
                if skipped is None:
                    skipped = []
                skipped.append(r)
                continue
            f = r.future
            if f is not None:
                try:
                    running = f.set_running_or_notify_cancel()
                except RuntimeError:  # its caller set its result or exception itself
                    running = False
                if not running:
                    dropped.append(r)
                    continue
            batch.append(r)
            room -= 1
        if skipped:
            q.extendleft(reversed(skipped))

    def _delay(self, n: int, max_batch: int) -> float:
        """How long (seconds) a batch of ``n`` may wait for more: max_delay, or with a
        latency target, what the target leaves after the batch run time, and no longer
        than the arrival rate needs to fill the batch."""
        delay = self._max_delay_ms / 1000.0
        target = self.latency_target_ms
        if target is None or delay <= 0:
            return delay
        budget = target / 1000.0 - self._run_est
        fill = (max_batch - n) * self._ia_est * 1.5
        return max(0.0, min(delay, budget, fill))

    def _next_batch(self, dropped: list) -> Optional[list]:
        """Wait for requests and return the next batch, or None when closed and drained.

        Under load the dispatcher wakes once per batch: with an empty queue it sleeps
        until a full batch could be there or max_delay passed (one timed wake when idle),
        then, still empty, until the first arrival. A partial batch waits until its oldest
        request has waited its delay, waking only when enough could have arrived to fill it.
        """
        max_batch = self._max_batch
        self._mutex.acquire()
        try:
            q = self._queue
            delay = self._delay(0, max_batch)
            if not q and not self._closed and delay > 0 and max_batch > 1:
                self._sleep(max_batch, delay)
            batch: list = []
            while not batch:
                while not q:
                    if self._closed:
                        return None
                    self._sleep(1, None)
                head = q[0]
                self._take(head.key, batch, dropped, max_batch)
                if not batch and dropped:
                    return batch  # only dropped requests: let the caller fail them first
            delay = self._delay(len(batch), max_batch)
            if len(batch) < max_batch and delay > 0 and not self._closed:
                deadline = head.t + delay
                while True:
                    left = deadline - _perf_counter()
                    if left <= 0:
                        break
                    self._sleep(len(q) + max_batch - len(batch), left)
                    self._take(head.key, batch, dropped, max_batch)
                    if len(batch) >= max_batch or self._closed:
                        break
            if self._full_waiters:
                self._not_full.notify(len(batch) + len(dropped))
            return batch
        finally:
            self._mutex.release()

    def _ready_batch(self, dropped: list) -> Optional[list]:
        """Without waiting: a batch of the head's key if at least max_batch requests are
        queued, else None (the pipelined dispatcher then answers a batch first)."""
        max_batch = self._max_batch
        with self._mutex:
            q = self._queue
            if len(q) < max_batch or self._closed:
                return None
            batch: list = []
            self._take(q[0].key, batch, dropped, max_batch)
            if self._full_waiters:
                self._not_full.notify(len(batch) + len(dropped))
            return batch

    def _collate(self, batch: list) -> tuple:
        """Build the batch tensor (padded with pad_value along pad_dim if set) and the
        lengths tensor (or None); on the device path, in pinned host memory, then copied
        to the device. Returns (x, lengths, sizes, trim)."""
        sizes = [r.rows for r in batch]
        xs = [r.x for r in batch]
        dev = self.device
        pad_dim = self.pad_dim
        torch = None
        if pad_dim is None:
            if dev is None:
                x = xs[0] if len(xs) == 1 else _get_torch().cat(xs, 0)
                return x, None, sizes, None
            torch = _get_torch()
            x0 = xs[0]
            shape = (sum(sizes),) + tuple(x0.shape[1:])
            host = torch.empty(shape, dtype=x0.dtype, pin_memory=dev.type == "cuda")
            torch.cat(xs, 0, out=host)
            return host.to(dev, non_blocking=True), None, sizes, None
        torch = _get_torch()
        lens = [r.length for r in batch]
        padded = max(lens)
        if self.buckets is not None:
            for b in self.buckets:
                if b >= padded:
                    padded = b
                    break
        x0 = xs[0]
        shape = list(x0.shape)
        shape[0] = sum(sizes)
        shape[pad_dim] = padded
        pin = dev is not None and dev.type == "cuda"
        where = x0.device if dev is None else "cpu"
        host = torch.empty(shape, dtype=x0.dtype, device=where, pin_memory=pin)
        row = 0
        row_lens = []
        for x, n, length in zip(xs, sizes, lens):
            dst = host.narrow(0, row, n)
            if length == padded:
                dst.copy_(x)
            else:
                dst.narrow(pad_dim, 0, length).copy_(x)
                dst.narrow(pad_dim, length, padded - length).fill_(self.pad_value)
            row += n
            row_lens.extend([length] * n)
        lengths = torch.tensor(row_lens, dtype=torch.int64)
        trim = (lens, pad_dim, padded)
        if dev is None:
            return host, lengths.to(x0.device), sizes, trim
        if pin:
            lengths = lengths.pin_memory()
        return host.to(dev, non_blocking=True), lengths.to(dev, non_blocking=True), sizes, trim

    def _launch(self, batch: list) -> _Flight:
        """Collate ``batch``, call ``fn`` once, and split its output; on the device path
        also start the copies back to the host and record the completion event. An error
        is kept in the flight (its callers get it)."""
        flight = _Flight(batch, _perf_counter())
        self._inflight.append(flight)
        try:
            x, lengths, sizes, trim = self._collate(batch)
            if self._guard is None:
                out = self.fn(x) if lengths is None else self.fn(x, lengths)
            else:
                with self._guard():
                    out = self.fn(x) if lengths is None else self.fn(x, lengths)
            x = lengths = None
            if self.device is not None:
                out = _map_tensors(out, self._to_host)
                flight.event = self._record_event()
            flight.results = _split_output(out, sizes, sum(sizes), trim)
        except BaseException as exc:  # every caller of this batch gets it, and only them
            flight.error = exc
        return flight

    def _to_host(self, t: Any) -> Any:
        """Start copying device tensor ``t`` into (pinned) host memory; CPU tensors stay."""
        dev = getattr(t, "device", None)
        if dev is None or dev.type == "cpu":
            return t
        torch = _get_torch()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=dev.type == "cuda")
        host.copy_(t, non_blocking=True)
        return host

    def _record_event(self) -> Any:
        """Record an event on the device's current stream (fires when the copies are done)."""
        torch = _get_torch()
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            return ev
        ev = torch.mps.event.Event()
        ev.record()
        return ev

    def _complete(self, flight: _Flight, dropped: Optional[list] = None) -> None:
        """Wait for ``flight``'s event (if any), then answer each of its requests."""
        if flight.event is not None and flight.error is None:
            try:
                flight.event.synchronize()
            except BaseException as exc:
                flight.error = exc
        t_done = _perf_counter()
        batch = flight.batch
        error = flight.error
        results = flight.results if error is None else None
        # read now: an answered blocking request is reused by its caller at once
        times = [r.t for r in batch]
        rows = sum([r.rows for r in batch])
        answered = failed = discarded = 0
        groups: dict = {}
        if error is None:
            for r, value in zip(batch, results):
                outcome = self._finish(r, value, None, groups)
                answered += outcome == 1
                discarded += outcome == 0
        else:
            for r in batch:
                outcome = self._finish(r, None, error, groups)
                failed += outcome == 1
                discarded += outcome == 0
        self._flush_async(groups)
        try:
            self._inflight.remove(flight)
        except ValueError:
            pass
        n = flight.n
        run = t_done - flight.t_start
        self._run_est = run if self._run_est == 0 else self._run_est * 0.8 + run * 0.2
        with self._stats_lock:
            self._batches += 1
            self._requests += n
            self._rows += rows
            self._answered += answered
            self._failed += failed
            self._cancelled += discarded
            self._hist[n] = self._hist.get(n, 0) + 1
            if n > self._largest:
                self._largest = n
            self._samples.append((flight.t_start, t_done, times))
            self._sampled += n
            while self._sampled - len(self._samples[0][2]) >= _LATENCY_SAMPLES:
                self._sampled -= len(self._samples.popleft()[2])

    def _finish(self, r: _Request, value: Any, error: Optional[BaseException],
                groups: dict, stale: bool = False) -> int:
        """Answer (or fail) ``r`` if nobody else did: 1 if this call delivered it, 0 if its
        caller had given it up (or set its own Future), -1 if someone else delivered it.
        asyncio answers are collected in ``groups`` (loop -> items) for _flush_async.
        ``stale``: the dispatcher may still hold ``r`` (close() fails a running batch)."""
        if not r.claim.acquire(False):
            return -1  # its caller gave it up, or close() failed it: counted there
        r.x = None
        f = r.future
        if f is not None:
            try:
                if error is None:
                    f.set_result(value)
                else:
                    f.set_exception(error)
            except concurrent.futures.InvalidStateError:  # its caller set it itself
                return 0
            except BaseException:  # a done-callback raised (even SystemExit): log, go on
                log.exception("Batcher %r: a Future's done-callback raised", self.name)
            return 1
        if r.afut is not None:
            groups.setdefault(r.loop, []).append((r.afut, value, error))
            return 1
        if error is None:
            r.value = value
        else:
            r.error = error
        r.stale = stale
        r.done.set()  # r belongs to its caller again from here on
        return 1

    def _flush_async(self, groups: dict) -> None:
        """Hand collected asyncio answers to their loops, one wake-up per loop."""
        for loop, items in groups.items():
            try:
                loop.call_soon_threadsafe(_deliver_async, items)
            except RuntimeError:  # the loop is closed: nobody is waiting there any more
                pass

    def _fail_requests(self, reqs: list, error_for: Callable[[_Request], BaseException],
                       expired: bool = False, stale: bool = False) -> None:
        """Fail each request of ``reqs`` nobody answered yet, and count them (``stale``:
        they are in a batch the dispatcher still runs)."""
        groups: dict = {}
        failed = cancelled = 0
        for r in reqs:
            outcome = self._finish(r, None, error_for(r), groups, stale)
            failed += outcome == 1
            cancelled += outcome == 0
        self._flush_async(groups)
        with self._stats_lock:
            if expired:
                self._expired += failed
            else:
                self._failed += failed
            self._cancelled += cancelled

    def _drop(self, dropped: list) -> None:
        """Finish requests dropped while forming a batch: expired ones get TimeoutError,
        cancelled futures (or set by their caller) are counted."""
        if not dropped:
            return
        now = _perf_counter()
        expired = [r for r in dropped if r.deadline is not None and now >= r.deadline
                   and r.future is None]
        others = [r for r in dropped if not (r.deadline is not None and now >= r.deadline
                                             and r.future is None)]
        dropped.clear()
        if expired:
            self._fail_requests(expired, lambda r: TimeoutError(
                f"Batcher {self.name!r}: the request's timeout passed before its batch formed"),
                expired=True)
        for r in others:
            f = r.future
            if f is not None and f.done():  # cancelled, or set by its caller
                if r.claim.acquire(False):
                    r.x = None
                    with self._stats_lock:
                        self._cancelled += 1


    def _dispatch_loop(self) -> None:
        """The dispatcher thread: form and run batches until closed and drained.

        Nothing that happens in one batch can stop it: any exception fails that batch's
        callers (and is logged), and the loop goes on.
        """
        if self._pin is not None:
            try:
                set_affinity(self._pin)
            except OSError:  # pinning is only a speed-up
                pass
        pending: collections.deque = collections.deque()
        dropped: list = []
        depth = self.pipeline_depth if self.device is not None else 1
        while True:
            try:
                if pending:
                    # A batch is on the device: launch the next one now only if a full
                    # batch is already waiting; otherwise answer the oldest first.
                    batch = self._ready_batch(dropped) if len(pending) < depth else None
                    self._drop(dropped)
                    if batch:
                        self._overlapped += 1
                        pending.append(self._launch(batch))
                    else:
                        self._complete(pending.popleft())
                    continue
                batch = self._next_batch(dropped)
                self._drop(dropped)
                if batch is None:
                    return
                if not batch:
                    continue
                flight = self._launch(batch)
                if flight.event is None:
                    self._complete(flight)
                else:
                    pending.append(flight)
            except BaseException as exc:  # the loop's own machinery failed: fail what it held
                log.exception("Batcher %r: dispatcher error (it goes on)", self.name)
                held = [r for fl in list(self._inflight) for r in fl.batch] + dropped
                dropped.clear()
                pending.clear()
                self._inflight.clear()
                try:
                    self._fail_requests(held, lambda r: RuntimeError(
                        f"Batcher {self.name!r}: dispatcher error: {exc!r}"))
                except BaseException:
                    log.exception("Batcher %r: could not fail a batch's callers", self.name)

    # ------------------------------------------------------------------ lifecycle
    def close(self, wait: bool = True, cancel_pending: bool = False,
              timeout: Optional[float] = None) -> None:
        """Stop accepting requests; finish (or, with cancel_pending, fail) those accepted.

        With ``wait`` the call returns once every accepted request has its answer, or
        after ``timeout`` seconds: then (``fn`` hung) every caller still waiting is failed
        with TimeoutError and close returns. With ``cancel_pending`` queued requests and
        those of the batch running now are failed at once (RuntimeError; a running
        batch's answers are discarded). Submitters blocked on a full queue get
        RuntimeError. Closing twice is harmless.
        """
        timeout = _check_timeout(timeout)
        with self._mutex:
            self._closed = True
            if cancel_pending:
                dropped = list(self._queue)
                self._queue.clear()
            else:
                dropped = []
            if self._sleeping:
                self._sleeping = False
                self._wake.set()
            if self._full_waiters:
                self._not_full.notify_all()
        if cancel_pending:
            running = [r for fl in list(self._inflight) for r in fl.batch]
            self._fail_requests(dropped, lambda r: RuntimeError(
                f"Batcher {self.name!r} closed before this request ran"))
            self._fail_requests(running, lambda r: RuntimeError(
                f"Batcher {self.name!r} closed (cancel_pending) while this request's batch "
                f"ran; its answer is discarded"), stale=True)
        if wait and threading.current_thread() is not self._thread and not self._fork_child:
            self._thread.join(timeout)
            if self._thread.is_alive():  # fn hung: answer everyone still waiting
                with self._mutex:
                    left = list(self._queue)
                    self._queue.clear()
                running = [r for fl in list(self._inflight) for r in fl.batch]

                def error(r: _Request) -> BaseException:
                    return TimeoutError(f"Batcher {self.name!r}: close(timeout={timeout}) passed "
                                        f"while fn was still running; this request was not "
                                        f"answered")

                self._fail_requests(left, error)
                self._fail_requests(running, error, stale=True)
        _live_batchers.discard(self)

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def __enter__(self) -> "Batcher":
        """``with Batcher(...) as b:`` closes (and drains) it on leaving the block."""
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Close and wait for every accepted request."""
        self.close(wait=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"Batcher({self.name!r}, max_batch={self.max_batch}, "
                f"max_delay_ms={self.max_delay_ms}, max_queue={self.max_queue}, {state})")

    # ------------------------------------------------------------------ stats
    def _reset_counters(self) -> None:
        """Zero the counters (stats lock held, or before the dispatcher starts)."""
        self._batches = 0
        self._requests = 0
        self._rows = 0
        self._answered = 0
        self._failed = 0
        self._cancelled = 0
        self._expired = 0
        self._largest = 0
        self._hist: dict = {}
        self._overlapped = 0  # batches launched while another was on the device
        # Per batch (t_start, t_done, submit times): expanded into per-request samples
        # only when stats() asks, covering at least the newest _LATENCY_SAMPLES requests.
        self._samples: collections.deque = collections.deque()
        self._sampled = 0

    def reset_stats(self) -> None:
        """Zero the counters and drop latency samples (e.g. after a warm-up)."""
        with self._mutex:
            queued = len(self._queue)
            inflight = sum(fl.n for fl in list(self._inflight))
            with self._stats_lock:
                self._reset_counters()
                self._accepted = queued + inflight

    def stats(self) -> dict:
        """Counters and timings so far; times in milliseconds, None where nothing ran.

        Keys: accepted (requests queued since the last reset), answered, failed (got an
        exception: fn's, close's, a timeout at close), cancelled (given up by their caller
        or cancelled, including answers discarded because of that), expired (their
        timeout passed before their batch formed; never computed), queued, in_flight
        (in a batch being run); accepted == answered + failed + cancelled + expired +
        queued + in_flight once the dispatcher is between batches. batches, requests
        (computed), rows, mean_batch_size, largest_batch, batch_sizes ({size: batches}),
        overlapped_batches (device path: launched while another batch was on the device),
        queue_wait_mean_ms, queue_wait_p50_ms, queue_wait_p99_ms, batch_run_mean_ms
        (collate, fn, copies and split, per batch), latency_mean_ms, latency_p50_ms,
        latency_p99_ms, latency_p999_ms (submit to answer, per request; the percentiles
        cover the newest 65,536 computed requests).
        """
        with self._mutex:
            queued = len(self._queue)
            accepted = self._accepted
            inflight = sum(fl.n for fl in list(self._inflight))
        with self._stats_lock:
            samples = list(self._samples)
            out = {
                "accepted": accepted,
                "answered": self._answered,
                "failed": self._failed,
                "cancelled": self._cancelled,
                "expired": self._expired,
                "queued": queued,
                "in_flight": inflight,
                "batches": self._batches,
                "requests": self._requests,
                "rows": self._rows,
                "mean_batch_size": (self._requests / self._batches) if self._batches else None,
                "largest_batch": self._largest,
                "batch_sizes": dict(sorted(self._hist.items())),
                "overlapped_batches": self._overlapped,
            }
        runs = [t_done - t_start for t_start, t_done, _ in samples]
        waits: list = []
        lats: list = []
        for t_start, t_done, times in reversed(samples):
            waits.extend([t_start - t for t in times])
            lats.extend([t_done - t for t in times])
            if len(lats) >= _LATENCY_SAMPLES:
                break
        waits = sorted(waits[:_LATENCY_SAMPLES])
        lats = sorted(lats[:_LATENCY_SAMPLES])

        def ms(v: Optional[float]) -> Optional[float]:
            return None if v is None else v * 1000.0

        out["queue_wait_mean_ms"] = ms(sum(waits) / len(waits)) if waits else None
        out["queue_wait_p50_ms"] = ms(_percentile(waits, 50))
        out["queue_wait_p99_ms"] = ms(_percentile(waits, 99))
        out["batch_run_mean_ms"] = ms(sum(runs) / len(runs)) if runs else None
        out["latency_mean_ms"] = ms(sum(lats) / len(lats)) if lats else None
        out["latency_p50_ms"] = ms(_percentile(lats, 50))
        out["latency_p99_ms"] = ms(_percentile(lats, 99))
        out["latency_p999_ms"] = ms(_percentile(lats, 99.9))
        return out
