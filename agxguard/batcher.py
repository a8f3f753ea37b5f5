"""Batcher: many threads submit single requests, one dispatcher thread runs them as batches.

Only the dispatcher thread ever calls ``fn``, so no two threads drive the GPU at once
(no driver race to guard against), and requests share one forward pass (the throughput
of batching). The dispatcher can run each batch inside ``agxguard.guard()`` so that it
also cooperates with other code protected by the guard modes.

    with Batcher(model, max_batch=8, max_delay_ms=2.0) as batcher:
        y = batcher(x)                  # blocking, from any thread
        fut = batcher.submit(x)         # concurrent.futures.Future

A request is a tensor whose dim 0 is its batch dimension. Requests with the same shape
except dim 0, the same dtype and the same device are concatenated along dim 0; others
are never mixed. ``fn``'s output (a tensor, or a tuple/list/dict of tensors) is split
back along dim 0 by each request's size. The slices are views of the batch's output.

torch is imported only when a batch runs, so this module imports without it.
"""
from __future__ import annotations

import _thread
import atexit
import collections
import concurrent.futures
import math
import queue
import threading
import time
import weakref
from typing import Any, Callable, Optional, Union

from ._affinity import check_pin_cpus, set_affinity

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

#: Default Batcher(spin_us=...): how long a waiting caller or the dispatcher spins
#: (GIL released) before it sleeps.
DEFAULT_SPIN_US = 2000.0

_LATENCY_SAMPLES = 65536  # per-request samples kept for the percentiles (the newest ones)


def _percentile(sorted_values: list, q: float) -> Optional[float]:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Request:
    """One queued request: its tensor, its batching key, and where its answer goes.

    A blocking call answers through ``done``, a Wakeup (agxguard._C.Wakeup: an event
    the caller waits on with the GIL released, spinning first); the dispatcher sets
    ``value`` or ``error`` and sets ``done``. Each thread keeps one such request in
    thread-local storage and reuses it call after call (no new object per call). A
    ``submit()`` request answers through ``future`` and has no ``done``.
    """

    __slots__ = ("x", "rows", "key", "t", "future", "done", "value", "error", "busy")

    def __init__(self, future: Optional[concurrent.futures.Future] = None):
        self.x = None
        self.rows = 0
        self.key = None
        self.t = 0.0  # time.perf_counter() at submit
        self.future = future
        self.done = None if future is not None else _Wakeup()
        self.value = None
        self.error = None
        self.busy = False  # a blocking call is using (or abandoned) this request


_tls = threading.local()  # .req: the calling thread's reusable blocking request


_perf_counter = time.perf_counter
_torch_cat = None


def _cat(xs: list) -> Any:
    """torch.cat(xs, 0); torch is imported on the first batch of more than one request."""
    global _torch_cat
    if _torch_cat is None:
        import torch

        _torch_cat = torch.cat
    return _torch_cat(xs, 0)


def _describe(r: _Request, x: Any) -> None:
    """Set ``r.key`` and ``r.rows`` from request tensor ``x``, or raise a clear error."""
    try:
        shape = x.shape
        r.key = (shape[1:], x.dtype, x.device)
        r.rows = shape[0]
    except AttributeError:
        raise TypeError(f"Batcher requests must be tensors with a batch dimension, "
                        f"got {type(x).__name__}") from None
    except IndexError:
        raise ValueError("Batcher requests need a batch dimension (dim 0); "
                         "got a 0-d tensor") from None


def _answer(r: _Request) -> Any:
    """In the caller, once ``r.done`` was set: free ``r`` for reuse, return or raise."""
    r.x = None
    r.busy = False
    error = r.error
    if error is not None:
        r.error = None
        raise error
    value = r.value
    r.value = None
    return value


def _fail(r: _Request, error: BaseException) -> None:
    """Hand ``r``'s caller ``error``."""
    f = r.future
    if f is None:
        r.error = error
        r.done.set()
    elif not f.done():
        try:
            f.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass


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


def _split_output(out: Any, sizes: list, total: int) -> list:
    """Split ``fn``'s output into one result per request.

    A tensor is split along dim 0; a tuple, list (namedtuples too) or dict of tensors is
    split element by element and rebuilt with the same type for each request.
    """
    if isinstance(out, (tuple, list)):
        parts = [_split_tensor(t, sizes, total) for t in out]
        n = len(sizes)
        if hasattr(out, "_fields"):  # namedtuple
            return [type(out)(*(p[i] for p in parts)) for i in range(n)]
        return [type(out)(p[i] for p in parts) for i in range(n)]
    if isinstance(out, dict):
        parts = {k: _split_tensor(v, sizes, total) for k, v in out.items()}
        return [type(out)((k, p[i]) for k, p in parts.items()) for i in range(len(sizes))]
    return _split_tensor(out, sizes, total)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int >= minimum, else raise TypeError/ValueError saying so."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} "
                        f"(type {type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


_live_batchers: "weakref.WeakSet[Batcher]" = weakref.WeakSet()


@atexit.register
def _close_live_batchers() -> None:
    """At interpreter exit, let every open Batcher finish what it accepted."""
    for b in list(_live_batchers):
        b.close(wait=True)


class Batcher:
    """Run single requests from many threads as batches on one dispatcher thread.

    Args:
        fn: callable taking one batched tensor and returning a tensor (or a tuple, list or
            dict of tensors) with the same number of rows along dim 0.
        max_batch: most requests concatenated into one call of ``fn`` (>= 1).
        max_delay_ms: longest time the oldest waiting request is held back while the
            dispatcher waits for more to fill the batch (>= 0; 0 means never wait).
        max_queue: most accepted requests waiting at once (>= 1); past it ``submit``
            blocks (backpressure), or raises ``queue.Full`` after its timeout.
        guard: False; True to run each batch inside ``agxguard.guard()``; or a callable
            returning a context manager to enter around each batch.
        name: used in the dispatcher thread's name and in ``repr``.
        pin_cpus: None (default), or CPU numbers (e.g. ``{0}``): pin the dispatcher thread
            and, on its first request, every thread that calls ``submit`` or the Batcher to
            these CPUs (Linux, ``os.sched_setaffinity``; it changes the calling threads'
            affinity for good). A Batcher's threads take turns on the GIL; on one core
            they hand over by plain context switches instead of waking idle (virtual)
            CPUs, which costs several times more per request on many-core VMs. Meant for
            ``fn`` on a GPU: a CPU-bound ``fn`` or client would lose the other cores.
        spin_us: how long (microseconds, 0 to 1,000,000) a waiting caller, and the
            dispatcher waiting for requests, spin with the GIL released before they
            sleep (default 2000). An answer that comes within it reaches its caller
            without a wake-up from sleep, and callers take the GIL back one at a time;
            on many-core VMs that is most of a small batch's cost. Spinning uses a CPU
            per waiter, and only while the thread's usable CPUs less two are not all
            spinning already; 0 never spins (least CPU, most latency).
    """

    def __init__(self, fn: Callable[[Any], Any], max_batch: int = 8, max_delay_ms: float = 2.0,
                 max_queue: int = 1024, guard: Union[bool, Callable[[], Any]] = False,
                 name: Optional[str] = None, pin_cpus: Optional[Any] = None,
                 spin_us: float = DEFAULT_SPIN_US):
        if not callable(fn):
            raise TypeError(f"fn must be callable (a model or function of one batched tensor), "
                            f"got {fn!r} (type {type(fn).__name__})")
        self.max_batch = _check_int("max_batch", max_batch, 1)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        if isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, (int, float)):
            raise TypeError(f"max_delay_ms must be a number >= 0, got {max_delay_ms!r} "
                            f"(type {type(max_delay_ms).__name__})")
        if not (max_delay_ms >= 0) or math.isinf(max_delay_ms):
            raise ValueError(f"max_delay_ms must be a finite number >= 0, got {max_delay_ms!r}")
        self.max_delay_ms = float(max_delay_ms)
        if isinstance(spin_us, bool) or not isinstance(spin_us, (int, float)):
            raise TypeError(f"spin_us must be a number from 0 to 1000000, got {spin_us!r} "
                            f"(type {type(spin_us).__name__})")
        if not (0 <= spin_us <= 1e6):
            raise ValueError(f"spin_us must be a number from 0 to 1000000 (1 s), got {spin_us!r}")
        self.spin_us = float(spin_us)
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self._guard = self._guard_factory(guard)
        self._pin = check_pin_cpus(pin_cpus)
        self._delay_s = self.max_delay_ms / 1000.0

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
        self._stats_lock = _thread.allocate_lock()
        self._reset_counters()

        self._thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                        name=f"agxguard-batcher-{self.name}")
        self._thread.start()
        _live_batchers.add(self)

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
            # agxguard.guard is the C core's guard(); taken from _C, not from the package,
            # so that this module does not import the package that imports it
            from . import _C

            return _C.guard
        if callable(guard):
            return guard
        raise TypeError(f"guard must be True, False or a callable returning a context manager, "
                        f"got {guard!r}")

    # ------------------------------------------------------------------ submitting
    def submit(self, x: Any, timeout: Optional[float] = None) -> concurrent.futures.Future:
        """Queue one request and return a Future for its result.

        Blocks while the queue is full; with ``timeout`` (seconds) raises ``queue.Full``
        if no room opened in time. Raises RuntimeError once the Batcher is closed.
        The Future's done-callbacks run on the dispatcher thread: keep them short, and
        never wait on this Batcher from one.
        """
        if self._pin is not None and getattr(_tls, "pin", None) is not self._pin:
            self._pin_caller()
        future: concurrent.futures.Future = concurrent.futures.Future()
        r = _Request(future)
        _describe(r, x)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        self._push(r, x, timeout)
        return future

    def __call__(self, x: Any, timeout: Optional[float] = None) -> Any:
        """Run one request and return its result (or raise its batch's exception).

        ``timeout`` (seconds) bounds the whole call: ``queue.Full`` while queueing,
        TimeoutError while waiting for the result.
        """
        # The calling thread's reusable request (its lock is held: released to answer).
        # One still busy belongs to an abandoned call (timeout, KeyboardInterrupt) or to
        # a call this one interrupts (a signal handler): it is left to the dispatcher.
        try:
            r = _tls.req
            if r.busy:
                raise AttributeError
        except AttributeError:
            r = _tls.req = _Request()
        if self._pin is not None and getattr(_tls, "pin", None) is not self._pin:
            self._pin_caller()
        _describe(r, x)
        if timeout is not None:
            return self._call_with_timeout(r, x, timeout)
        self._enqueue_call(r, x, None)
        r.done.wait(None, self.spin_us)
        return _answer(r)

    def _call_with_timeout(self, r: _Request, x: Any, timeout: float) -> Any:
        """``__call__`` with a timeout (the blocking path without one stays lean)."""
        if timeout < 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout
        self._enqueue_call(r, x, timeout)
        if not r.done.wait(max(0.0, deadline - time.monotonic()), self.spin_us):
            # r stays busy and queued: the dispatcher answers it to nobody, and this
            # thread's next call takes a fresh request.
            raise TimeoutError(f"Batcher {self.name!r}: no result within {timeout} s")
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
            if self._sleeping and len(q) >= self._wake_at:
                self._sleeping = False
                self._wake.set()

    def _wait_for_room(self, timeout: Optional[float]) -> None:
        """With the mutex held: wait until the queue has room; raise if closed or timed out."""
        if self._closed:
            raise RuntimeError(f"Batcher {self.name!r} is closed; it accepts no requests")
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

    def _take(self, key: tuple, batch: list) -> None:
        """With the mutex held: move queued requests with ``key`` into ``batch`` (oldest
        first, up to max_batch); the others keep their places in the queue."""
        q = self._queue
        room = self.max_batch - len(batch)
        skipped = None
        while q and room:
            r = q.popleft()
            k = r.key
            if k is key or k == key:
                batch.append(r)
                room -= 1
            else:
                if skipped is None:
                    skipped = []
                skipped.append(r)
        if skipped:
            q.extendleft(reversed(skipped))

    def _next_batch(self) -> Optional[list]:
        """Wait for requests and return the next batch, or None when closed and drained.

        Under load the dispatcher wakes once per batch: with an empty queue it sleeps
        until a full batch could be there or max_delay passed (one timed wake when idle),
        then, still empty, until the first arrival. A partial batch waits until its oldest
        request has waited max_delay, waking only when enough could have arrived to fill it.
        """
        q = self._queue
        max_batch = self.max_batch
        delay = self._delay_s
        self._mutex.acquire()
        try:
            if not q and not self._closed and delay > 0 and max_batch > 1:
                self._sleep(max_batch, delay)
            while not q:
                if self._closed:
                    return None
                self._sleep(1, None)
            head = q[0]
            key = head.key
            batch: list = []
            self._take(key, batch)
            if len(batch) < max_batch and delay > 0 and not self._closed:
                deadline = head.t + delay
                while True:
                    left = deadline - _perf_counter()
                    if left <= 0:
                        break
                    self._sleep(len(q) + max_batch - len(batch), left)
                    self._take(key, batch)
                    if len(batch) >= max_batch or self._closed:
                        break
            if self._full_waiters:
                self._not_full.notify(len(batch))
            return batch
        finally:
            self._mutex.release()

    def _run_batch(self, batch: list) -> None:
        """Call ``fn`` once on the concatenated batch and answer each request."""
        t_start = _perf_counter()
        for r in batch:
            if r.future is not None:  # drop requests whose futures were cancelled
                batch = [r for r in batch
                         if r.future is None or r.future.set_running_or_notify_cancel()]
                if not batch:
                    return
                break
        n = len(batch)
        sizes = [r.rows for r in batch]
        times = [r.t for r in batch]  # read now: an answered request is reused at once
        error: Optional[BaseException] = None
        results = None
        try:
            if n == 1:
                x = batch[0].x
            else:
                x = _cat([r.x for r in batch])
            if self._guard is None:
                out = self.fn(x)
            else:
                with self._guard():
                    out = self.fn(x)
            x = None
            results = _split_output(out, sizes, sum(sizes))
        except BaseException as exc:  # every caller of this batch gets it, and only them
            error = exc
        t_done = _perf_counter()
        # Count first, answer last: woken callers then find the GIL about to be free.
        with self._stats_lock:
            self._batches += 1
            self._requests += n
            self._rows += sum(sizes)
            if error is not None:
                self._failed += n
            if n > self._largest:
                self._largest = n
            self._samples.append((t_start, t_done, times))
            self._sampled += n
            while self._sampled - len(self._samples[0][2]) >= _LATENCY_SAMPLES:
                self._sampled -= len(self._samples.popleft()[2])
        if error is None:
            for r, value in zip(batch, results):
                f = r.future
                if f is None:
                    r.value = value
                    r.done.set()  # r belongs to its caller again from here on
                else:
                    f.set_result(value)
        else:
            for r in batch:
                _fail(r, error)

    def _dispatch_loop(self) -> None:
        """The dispatcher thread: form and run batches until closed and drained."""
        try:
            if self._pin is not None:
                try:
                    set_affinity(self._pin)
                except OSError:  # pinning is only a speed-up
                    pass
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run_batch(batch)
        finally:
            # Only reached early if the loop itself broke: fail whatever is left.
            with self._mutex:
                self._closed = True
                left = list(self._queue)
                self._queue.clear()
                if self._full_waiters:
                    self._not_full.notify_all()
            for r in left:
                _fail(r, RuntimeError(f"Batcher {self.name!r}: dispatcher stopped"))

    # ------------------------------------------------------------------ lifecycle
    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting requests; finish (or, with cancel_pending, fail) those accepted.

        With ``wait`` the call returns once every accepted request has its answer.
        Submitters blocked on a full queue get RuntimeError. Closing twice is harmless.
        """
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
        for r in dropped:
            _fail(r, RuntimeError(f"Batcher {self.name!r} closed before this request ran"))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
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
        self._failed = 0
        self._largest = 0
        # Per batch (t_start, t_done, submit times): expanded into per-request samples
        # only when stats() asks, covering at least the newest _LATENCY_SAMPLES requests.
        self._samples: collections.deque = collections.deque()
        self._sampled = 0

    def reset_stats(self) -> None:
        """Zero the counters and drop latency samples (e.g. after a warm-up)."""
        with self._stats_lock:
            self._reset_counters()

    def stats(self) -> dict:
        """Counters and timings so far; times in milliseconds, None where nothing ran.

        Keys: batches, requests, rows, failed, mean_batch_size, largest_batch, queued,
        queue_wait_mean_ms, queue_wait_p50_ms, queue_wait_p99_ms, batch_run_mean_ms (concat,
        fn and split, per batch), latency_mean_ms, latency_p50_ms, latency_p99_ms (latency:
        submit to answer, per request; the percentiles cover the newest 65,536 requests).
        """
        with self._stats_lock:
            samples = list(self._samples)
            out = {
                "batches": self._batches,
                "requests": self._requests,
                "rows": self._rows,
                "failed": self._failed,
                "mean_batch_size": (self._requests / self._batches) if self._batches else None,
                "largest_batch": self._largest,
            }
        with self._mutex:
            out["queued"] = len(self._queue)
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
        return out
