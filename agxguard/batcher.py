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
come back as CPU tensors. A batch is collated in pinned host memory: for fixed shapes the
dispatcher registers a pinned buffer for the next batch with the queue and each caller
copies its own request into its rows right after releasing the GIL (the queue's take
copies what no caller did), so the dispatcher concatenates nothing; padded batches are
collated by the dispatcher. The batch goes to the device in one copy, ``fn`` runs, the
outputs come back in one copy each and an event is recorded; while the device works the
dispatcher already forms the next batch when one is waiting (a pipeline of
``pipeline_depth`` batches), and answers each batch when its event has fired. On cpu
(``device=None``) batches run one after the other, as fn returns.

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
    from ._C import RequestQueue as _RequestQueue
except ImportError as _exc:  # loaded as a lone file, or not built (benchmarks/efficiency.py's fallback)
    _C_ERROR = _exc

    class _RequestQueue:  # type: ignore[no-redef]
        """Stand-in without the C core: this module imports, a Batcher cannot be made."""

        def __init__(self, *args: Any, **kwargs: Any):
            raise ImportError(f"agxguard.Batcher needs agxguard's C core (agxguard._C, its request "
                              f"queue), which could not be imported ({_C_ERROR}); build it with "
                              f"`python3 setup.py build_ext --inplace`")

__all__ = ["Batcher"]

log = logging.getLogger("agxguard.batcher")

#: Default Batcher(spin_us=...): how long a waiting caller or the dispatcher spins
#: (GIL released) before it sleeps.
DEFAULT_SPIN_US = 2000.0

#: The device path reuses pinned input buffers: per shape at most this many are kept,
#: for at most STAGING_SHAPES shapes, each of at most STAGING_MAX_BYTES.
STAGING_PER_SHAPE = 4
STAGING_SHAPES = 8
STAGING_MAX_BYTES = 64 << 20

#: How long the interpreter's exit waits for each open Batcher to finish what it
#: accepted (seconds); past it the remaining callers are failed and exit goes on.
EXIT_CLOSE_TIMEOUT_S = 10.0

_DEVICE_KINDS = ("cuda", "mps")

_perf_counter = time.perf_counter
_torch = None
_Size: Any = None  # torch.Size and torch.dtype once torch is imported (fast path in _describe)
_dtype: Any = None
_Tensor: Any = None  # torch.Tensor once imported (_split_output's fast path for one tensor)


def _get_torch() -> Any:
    """Import torch on first use (the module imports without it)."""
    global _torch, _Size, _dtype, _Tensor
    if _torch is None:
        import torch

        _torch = torch
        _Size, _dtype, _Tensor = torch.Size, torch.dtype, torch.Tensor
    return _torch



def _describe(x: Any, pad_dim: Optional[int], buckets: Optional[tuple]) -> tuple:
    """The slow path of describing a request (the C queue describes torch tensors itself,
    and calls this for anything else or anything it refuses): return (key, rows, length)
    for request tensor ``x``, or raise a clear error in the caller (so nothing the
    dispatcher compares can raise there)."""
    if _Size is None and "torch" in sys.modules:
        _get_torch()
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
        dims = tuple(shape)
    if not dims:
        raise ValueError("Batcher requests need a batch dimension (dim 0); got a 0-d tensor")
    if pad_dim is None:
        return (dims[1:], dtype, device), dims[0], 0
    if pad_dim >= len(dims):
        raise ValueError(f"pad_dim={pad_dim} is out of range for a request of shape {tuple(dims)} "
                         f"({len(dims)} dims); allowed: 1 to {len(dims) - 1} (dim 0 is the "
                         f"batch dimension)")
    length = dims[pad_dim]
    if buckets is not None and length > buckets[-1]:
        raise ValueError(f"request length {length} along pad_dim={pad_dim} is longer than the "
                         f"largest bucket {buckets[-1]}; allowed: 0 to {buckets[-1]}")
    return (dims[1:pad_dim] + dims[pad_dim + 1:], dtype, device), dims[0], length


def _deliver_async(items: list) -> None:
    """On an event loop: set each (asyncio future, value, error) that is not done yet."""
    for afut, value, error in items:
        if afut.done():  # cancelled after the dispatcher took it: the answer is dropped
            continue
        if error is None:
            afut.set_result(value)
        else:
            afut.set_exception(error)



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
    if trim is None and type(out) is _Tensor:  # the common case, without the generic walk
        return _split_tensor(out, sizes, total)

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
    """One batch on its way: its requests (the queue's), the split answers, and (device
    path) the event that fires when its outputs are back on the host."""

    __slots__ = ("batch", "results", "error", "event", "staging")

    def __init__(self, batch: list):
        self.batch = batch
        self.results = None
        self.error: Optional[BaseException] = None
        self.event = None
        self.staging = None  # the pinned input buffer, reusable once the event fired


class Batcher(_RequestQueue):
    """Run single requests from many threads or coroutines as batches on one dispatcher thread.

    ``batcher(x, timeout=None)`` is the C queue's own call (agxguard._C.RequestQueue, which
    this class extends): describing the request, queueing it, waking the dispatcher,
    waiting with the GIL released and returning the answer run in one C call, with no
    Python frame. The dispatcher takes and answers whole batches in C as well.

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
        trim: with ``pad_dim``, True (default) trims each output whose size along
            ``pad_dim`` equals the batch's padded length back to its request's length;
            False returns every output row as ``fn`` made it. Use False when outputs are
            not sequences (a pooled embedding of width 16 would otherwise be cut to a
            request's length whenever a batch happens to be padded to 16).
    """


    def __init__(self, fn: Callable[..., Any], max_batch: int = 8, max_delay_ms: float = 2.0,
                 max_queue: int = 1024, guard: Union[bool, Callable[[], Any]] = False,
                 name: Optional[str] = None, pin_cpus: Optional[Any] = None,
                 spin_us: float = DEFAULT_SPIN_US, pad_dim: Optional[int] = None,
                 pad_value: float = 0.0, buckets: Optional[Sequence[int]] = None,
                 device: Any = None, pipeline_depth: int = 2,
                 latency_target_ms: Optional[float] = None, trim: bool = True):
        if not callable(fn):
            raise TypeError(f"fn must be callable (a model or function of one batched tensor), "
                            f"got {fn!r} (type {type(fn).__name__})")
        self._max_batch = _check_int("max_batch", max_batch, 1)
        max_queue = _check_int("max_queue", max_queue, 1)
        self._max_delay_ms = _check_ms("max_delay_ms", max_delay_ms)
        if isinstance(spin_us, bool) or not isinstance(spin_us, (int, float)):
            raise TypeError(f"spin_us must be a number from 0 to 1000000, got {spin_us!r} "
                            f"(type {type(spin_us).__name__})")
        if not (0 <= spin_us <= 1e6):
            raise ValueError(f"spin_us must be a number from 0 to 1000000 (1 s), got {spin_us!r}")
        if pad_dim is not None:
            if isinstance(pad_dim, bool) or not isinstance(pad_dim, int):
                raise TypeError(f"pad_dim must be None or an int >= 1, got {pad_dim!r}")
            if pad_dim < 1:
                raise ValueError(f"pad_dim must be None or an int >= 1 (dim 0 is the batch "
                                 f"dimension), got {pad_dim!r}")
            if pad_dim > 64:
                raise ValueError(f"pad_dim must be None or an int from 1 to 64, got {pad_dim!r}")
        self.pad_dim = pad_dim
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
            raise TypeError(f"pad_value must be a number, got {pad_value!r}")
        self.pad_value = pad_value
        if trim is not True and trim is not False:
            raise ValueError(f"trim must be True or False, got {trim!r}")
        self.trim = trim
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
        if "torch" in sys.modules:  # the slow path of _describe compares with torch.Size
            _get_torch()
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self._guard = self._guard_factory(guard)
        self._pin = check_pin_cpus(pin_cpus)
        pad, buckets = self.pad_dim, self.buckets
        _RequestQueue.__init__(
            self, max_queue=max_queue, spin_us=float(spin_us), pad_dim=pad_dim,
            max_length=None if buckets is None else buckets[-1],
            describe=lambda x: _describe(x, pad, buckets),
            pin_hook=None if self._pin is None else self._pin_caller, pin_obj=self._pin)
        self._closed = False
        self._fork_child = False
        self._inflight: list = []  # _Flight objects between forming and answering
        self._overlapped = 0  # batches launched while another was on the device
        self._events: list = []  # device path: recorded events whose flights completed
        self._staging: dict = {}  # (shape, dtype) -> pinned input buffers free for reuse
        self._staging_reused = 0

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
        """Pin the calling thread to pin_cpus (the C queue calls this once per thread)."""
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
    # batcher(x, timeout=None) is RequestQueue.__call__ (C): it runs one request and returns
    # its result (or raises its batch's exception); ``timeout`` (seconds) bounds the whole
    # call: queue.Full while queueing, TimeoutError while waiting for the result. A request
    # that times out before its batch is formed is never computed.

    def submit(self, x: Any, timeout: Optional[float] = None) -> concurrent.futures.Future:
        """Queue one request and return a Future for its result.

        Blocks while the queue is full; with ``timeout`` (seconds) raises ``queue.Full``
        if no room opened in time. Raises RuntimeError once the Batcher is closed.
        Cancelling the Future before its batch is formed drops the request (never
        computed). The Future's done-callbacks run on the dispatcher thread: keep them
        short, and never wait on this Batcher from one.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._q_put(x, future, False, timeout, None)
        return future

    async def acall(self, x: Any, timeout: Optional[float] = None) -> Any:
        """Run one request from a coroutine and return its result (or raise its error).

        Many coroutines of one event loop may await it at once: no thread per request,
        and the loop is never blocked (a full queue is waited out asynchronously).
        ``timeout`` (seconds) bounds the whole call (TimeoutError); cancelling the
        awaiting task gives the request up, and one given up before its batch is formed
        is never computed.
        """
        loop = asyncio.get_running_loop()
        afut = loop.create_future()
        payload = (loop, afut)
        handle = None
        if timeout is None:
            try:
                r = self._q_put(x, payload, True, 0.0, None)
            except queue.Full:
                r = await self._aput_waiting(x, payload, None)
        else:
            timeout = _check_timeout(timeout)
            t0 = _perf_counter()
            r = await self._aput_waiting(x, payload, timeout)
            left = max(0.0, timeout - (_perf_counter() - t0))
            handle = loop.call_later(left, self._async_expire, r, afut)
        try:
            return await afut
        except BaseException as exc:  # cancelled (its task, or its timeout): give it up
            self._q_give_up(r)
            if r.timed_out and isinstance(exc, asyncio.CancelledError):
                raise TimeoutError(f"Batcher {self.name!r}: no result within {timeout} s") from None
            raise
        finally:
            if handle is not None:
                handle.cancel()

    async def _aput_waiting(self, x: Any, payload: tuple, timeout: Optional[float]) -> Any:
        """Queue an acall's request, waiting out a full queue without blocking the loop
        (TimeoutError past ``timeout`` seconds, None: no limit)."""
        t0 = _perf_counter()
        while True:
            left = None if timeout is None else max(0.0, timeout - (_perf_counter() - t0))
            try:
                return self._q_put(x, payload, True, 0.0, left)
            except queue.Full:
                if timeout is not None and _perf_counter() - t0 >= timeout:
                    raise TimeoutError(f"Batcher {self.name!r}: queue full for {timeout} s") from None
                await asyncio.sleep(0.0005)

    @staticmethod
    def _async_expire(r: Any, afut: Any) -> None:
        """On the loop, at an acall's timeout: cancel its future (unless answered)."""
        if not afut.done():
            r.timed_out = True
            afut.cancel()

    def _closed_message(self) -> str:
        """Why a closed Batcher refuses a request."""
        if self._fork_child:
            return (f"Batcher {self.name!r} was created before this process was forked; "
                    f"its dispatcher thread does not exist in the fork() child, so it accepts "
                    f"no requests here: create a new Batcher in the child")
        return f"Batcher {self.name!r} is closed; it accepts no requests"

    def _forked(self) -> None:
        """In a fork() child: fresh waiting state (the parent's may have been held by a
        thread that is gone), an empty queue, and closed with the fork's reason."""
        self._fork_child = True
        self._closed = True
        self._inflight = []
        self._events, self._staging = [], {}  # the parent's device state is not the child's
        self._q_after_fork(self._closed_message())

    # ------------------------------------------------------------------ dispatching
    def _deliver(self, items: list) -> None:
        """Hand the queue's answers for futures to them: (payload, value, error) triples;
        a submit() Future is set here, an acall()'s on its loop (one wake-up per loop)."""
        groups: dict = {}
        refused_answers = refused_errors = 0
        for payload, value, error in items:
            if type(payload) is tuple:
                loop, afut = payload
                groups.setdefault(loop, []).append((afut, value, error))
                continue
            try:
                if error is None:
                    payload.set_result(value)
                else:
                    payload.set_exception(error)
            except concurrent.futures.InvalidStateError:  # its caller set it itself
                if error is None:
                    refused_answers += 1
                else:
                    refused_errors += 1
            except BaseException:  # a done-callback raised (even SystemExit): log, go on
                log.exception("Batcher %r: a Future's done-callback raised", self.name)
        if refused_answers or refused_errors:
            self._q_recount(refused_answers, refused_errors)
        for loop, its in groups.items():
            try:
                loop.call_soon_threadsafe(_deliver_async, its)
            except RuntimeError:  # the loop is closed: nobody is waiting there any more
                pass

    def _collate(self, xs: list, sizes: list, lens: Optional[list], flight: _Flight) -> tuple:
        """Build the batch tensor (padded with pad_value along pad_dim if set) and the
        lengths tensor (or None); on the device path, in pinned host memory (for fixed
        length, a staging buffer that ``flight`` keeps until its event fired), then copied
        to the device. Returns (x, lengths, trim)."""
        dev = self.device
        pad_dim = self.pad_dim
        torch = None
        if pad_dim is None:
            if dev is None:
                x = xs[0] if len(xs) == 1 else _get_torch().cat(xs, 0)
                return x, None, None
            torch = _get_torch()
            x0 = xs[0]
            total = sum(sizes)
            host = None
            staged = self._q_staged()
            if staged is not None:  # the callers copied their requests into it already
                buf, rows = staged
                if rows == total:
                    host = buf if rows == buf.shape[0] else buf.narrow(0, 0, rows)
                    flight.staging = buf
                else:  # this batch is not its first rows: free again, concatenate
                    self._staging_put(buf)
            if host is None:
                host = self._staging_get((total,) + tuple(x0.shape[1:]), x0.dtype)
                torch.cat(xs, 0, out=host)
                flight.staging = host
            self._stage_next(flight.batch[0].key, x0)
            return host.to(dev, non_blocking=True), None, None
        torch = _get_torch()
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
        trim = (lens, pad_dim, padded) if self.trim else None
        if dev is None:
            return host, lengths.to(x0.device), trim
        if pin:
            lengths = lengths.pin_memory()
        return host.to(dev, non_blocking=True), lengths.to(dev, non_blocking=True), trim

    def _launch(self, batch: list, xs: list, sizes: list, lens: Optional[list]) -> _Flight:
        """Collate a batch the queue gave (requests, their inputs, rows and lengths), call
        ``fn`` once, and split its output; on the device path also start the copies back
        to the host and record the completion event. An error is kept in the flight (its
        callers get it)."""
        flight = _Flight(batch)
        self._inflight.append(flight)
        try:
            x, lengths, trim = self._collate(xs, sizes, lens, flight)
            xs = None
            if self._guard is None:
                out = self.fn(x) if lengths is None else self.fn(x, lengths)
            else:
                with self._guard():
                    out = self.fn(x) if lengths is None else self.fn(x, lengths)
            x = lengths = None
            if self.device is not None:
                out = _map_tensors(out, self._to_host)
                flight.event = self._record_event()
            results = _split_output(out, sizes, sum(sizes), trim)
            flight.results = results if type(results) is list else list(results)
        except BaseException as exc:  # every caller of this batch gets it, and only them
            flight.error = exc
        return flight

    def _to_host(self, t: Any) -> Any:
        """Start copying device tensor ``t`` into (pinned) host memory; CPU tensors stay."""
        dev = getattr(t, "device", None)
        if dev is None or dev.type == "cpu":
            return t
        if dev.type == "cuda":  # a non-blocking copy to the CPU lands in pinned memory
            return t.to("cpu", non_blocking=True)
        host = _get_torch().empty(t.shape, dtype=t.dtype)
        host.copy_(t, non_blocking=True)
        return host

    def _record_event(self) -> Any:
        """Record an event on the device's current stream (fires when the copies are done);
        events come from a small pool (a completed flight gives its event back)."""
        ev = self._events.pop() if self._events else None
        if ev is None:
            torch = _get_torch()
            ev = torch.cuda.Event() if self.device.type == "cuda" else torch.mps.event.Event()
        ev.record()
        return ev

    def _stage_next(self, key: int, x0: Any) -> None:
        """Register a pinned buffer of max_batch requests shaped like ``x0`` (a contiguous
        CPU tensor of batching key ``key``) with the queue: callers of the next batch copy
        their requests into it themselves (see RequestQueue._q_stage)."""
        if type(x0) is not _Tensor or x0.device.type != "cpu" or x0.dtype.is_complex:
            return
        rows = self._max_batch * x0.shape[0]
        if rows < 1 or x0.numel() == 0:
            return
        shape = (rows,) + tuple(x0.shape[1:])
        row_bytes = x0.numel() // x0.shape[0] * x0.element_size()
        if rows * row_bytes > STAGING_MAX_BYTES:
            return
        try:
            buf = self._staging_get(shape, x0.dtype)
            single = row_bytes == x0.element_size()
            if not self._q_stage(buf, key, buf.data_ptr(), row_bytes, rows, _Tensor, single):
                self._staging_put(buf)
        except Exception:  # only a speed-up: the next batch is concatenated instead
            log.debug("Batcher %r: no staging buffer for the next batch", self.name, exc_info=True)

    def _staging_get(self, shape: tuple, dtype: Any) -> Any:
        """A pinned (cuda) host buffer of ``shape`` and ``dtype`` for a batch's input: a
        reused one whose last batch is done, or a new one."""
        free = self._staging.get((shape, dtype))
        if free:
            self._staging_reused += 1
            return free.pop()
        return _get_torch().empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")

    def _staging_put(self, host: Any) -> None:
        """Keep ``host`` for a later batch of its shape (its copy to the device is done);
        at most STAGING_PER_SHAPE per shape and STAGING_SHAPES shapes (the oldest shape
        is dropped), buffers of up to STAGING_MAX_BYTES."""
        if host.numel() * host.element_size() > STAGING_MAX_BYTES:
            return
        key = (tuple(host.shape), host.dtype)
        free = self._staging.get(key)
        if free is None:
            if len(self._staging) >= STAGING_SHAPES:
                self._staging.pop(next(iter(self._staging)))
            free = self._staging[key] = []
        if len(free) < STAGING_PER_SHAPE:
            free.append(host)

    def _complete(self, flight: _Flight) -> None:
        """Wait for ``flight``'s event (if any), then answer each of its requests (in C:
        the queue skips those whose callers gave up, and counts the batch)."""
        if flight.event is not None and flight.error is None:
            try:
                flight.event.synchronize()
            except BaseException as exc:
                flight.error = exc
            else:  # the batch's copies are done: its event and input buffer can serve again
                self._events.append(flight.event)
                if flight.staging is not None:
                    self._staging_put(flight.staging)
        flight.event = flight.staging = None
        error = flight.error
        deliver = self._q_complete(flight.batch, None if error is not None else flight.results,
                                   error)
        flight.results = None
        try:
            self._inflight.remove(flight)
        except ValueError:
            pass
        if deliver:
            self._deliver(deliver)

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
        depth = self.pipeline_depth if self.device is not None else 1
        take, take_ready = self._q_take, self._q_take_ready
        while True:
            try:
                if pending:
                    # A batch is on the device: launch the next one now only if a full
                    # batch is already waiting; otherwise answer the oldest first.
                    got = take_ready(self._max_batch) if len(pending) < depth else None
                    if got is None:
                        self._complete(pending.popleft())
                        continue
                    batch, xs, sizes, lens, deliver = got
                    if deliver:
                        self._deliver(deliver)
                    if batch:
                        self._overlapped += 1
                        pending.append(self._launch(batch, xs, sizes, lens))
                    got = batch = xs = None
                    continue
                target = self.latency_target_ms
                got = take(self._max_batch, self._max_delay_ms / 1000.0,
                           None if target is None else target / 1000.0)
                if got is None:
                    return
                batch, xs, sizes, lens, deliver = got
                if deliver:
                    self._deliver(deliver)
                if not batch:
                    continue
                flight = self._launch(batch, xs, sizes, lens)
                got = batch = xs = None  # hold no request's input while waiting for the next
                if flight.event is None:
                    self._complete(flight)
                else:
                    pending.append(flight)
                flight = None
            except BaseException as exc:  # the loop's own machinery failed: fail what it held
                log.exception("Batcher %r: dispatcher error (it goes on)", self.name)
                held = [r for fl in list(self._inflight) for r in fl.batch]
                pending.clear()
                self._inflight.clear()
                try:
                    self._deliver(self._q_fail(held, RuntimeError,
                                               f"Batcher {self.name!r}: dispatcher error: {exc!r}",
                                               settle=True))
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
        self._closed = True
        dropped = self._q_close(self._closed_message(), cancel_pending)
        if cancel_pending:
            running = [r for fl in list(self._inflight) for r in fl.batch]
            self._deliver(self._q_fail(dropped, RuntimeError,
                                       f"Batcher {self.name!r} closed before this request ran"))
            self._deliver(self._q_fail(
                running, RuntimeError, f"Batcher {self.name!r} closed (cancel_pending) while this "
                f"request's batch ran; its answer is discarded"))
        if wait and threading.current_thread() is not self._thread and not self._fork_child:
            self._thread.join(timeout)
            if self._thread.is_alive():  # fn hung: answer everyone still waiting
                left = self._q_close(self._closed_message(), True)
                running = [r for fl in list(self._inflight) for r in fl.batch]
                message = (f"Batcher {self.name!r}: close(timeout={timeout}) passed while fn was "
                           f"still running; this request was not answered")
                self._deliver(self._q_fail(left, TimeoutError, message))
                self._deliver(self._q_fail(running, TimeoutError, message))
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
    def reset_stats(self) -> None:
        """Zero the counters and drop latency samples (e.g. after a warm-up)."""
        self._q_reset_stats()
        self._overlapped = 0
        self._staging_reused = 0

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
        staging_reused (device path: batches collated into a pinned input buffer of an
        earlier batch instead of a new one), staged_batches (device path: batches whose
        requests were copied into their pinned buffer as they arrived, mostly by their own
        callers, so nothing was concatenated), staged_by_callers (requests of those a
        caller copied itself, GIL released), queue_wait_mean_ms, queue_wait_p50_ms,
        queue_wait_p99_ms, batch_run_mean_ms (forming to answering, per batch), latency_mean_ms, latency_p50_ms,
        latency_p99_ms, latency_p999_ms (submit to answer, per request; the percentiles
        cover the newest 65,536 computed requests). Kept by the C queue (timestamps at
        enqueue, batch forming and answer).
        """
        out = self._q_stats()
        out["overlapped_batches"] = self._overlapped
        out["staging_reused"] = self._staging_reused
        return out
