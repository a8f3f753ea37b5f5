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

__all__ = ["Batcher"]

_LATENCY_SAMPLES = 65536  # per-request samples kept for the percentiles (the newest ones)


def _percentile(sorted_values: list, q: float) -> Optional[float]:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Request:
    """One caller's request: its tensor, its batching key, and where its answer goes.

    A ``submit()`` request answers through a concurrent.futures.Future; a blocking call
    answers through a plain lock that the caller waits on (cheaper than a Future).
    """

    __slots__ = ("x", "rows", "key", "future", "waiter", "value", "error",
                 "t_submit", "t_start")

    def __init__(self, x: Any, rows: int, key: tuple, future: Optional[concurrent.futures.Future]):
        self.x = x
        self.rows = rows
        self.key = key
        self.future = future
        self.waiter = None
        if future is None:
            self.waiter = _thread.allocate_lock()
            self.waiter.acquire()
        self.value = None
        self.error = None
        self.t_submit = 0.0
        self.t_start = 0.0

    def start(self, now: float) -> bool:
        """Mark the request running at ``now``; False if its future was cancelled meanwhile."""
        self.t_start = now
        return self.future is None or self.future.set_running_or_notify_cancel()

    def finish(self, value: Any) -> None:
        """Hand the caller its result."""
        if self.future is not None:
            self.future.set_result(value)
        else:
            self.value = value
            self.waiter.release()

    def fail(self, error: BaseException) -> None:
        """Hand the caller an exception."""
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(error)
        else:
            self.error = error
            self.waiter.release()


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
    """

    def __init__(self, fn: Callable[[Any], Any], max_batch: int = 8, max_delay_ms: float = 2.0,
                 max_queue: int = 1024, guard: Union[bool, Callable[[], Any]] = False,
                 name: Optional[str] = None):
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
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self._guard = self._guard_factory(guard)
        self._delay_s = self.max_delay_ms / 1000.0

        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)  # dispatcher waits here
        self._not_full = threading.Condition(self._lock)   # blocked submitters wait here
        self._queue: collections.deque = collections.deque()
        self._wake_at = 1  # queue length at which a submit wakes the dispatcher
        self._closed = False
        self._reset_counters()

        self._thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                        name=f"agxguard-batcher-{self.name}")
        self._thread.start()
        _live_batchers.add(self)

    @staticmethod
    def _guard_factory(guard: Union[bool, Callable[[], Any]]) -> Optional[Callable[[], Any]]:
        """Resolve ``guard`` to a context-manager factory, or None for no guard."""
        if guard is False or guard is None:
            return None
        if guard is True:
            import agxguard  # late: the package may still be importing this module

            factory = getattr(agxguard, "guard", None)
            if factory is None:
                raise RuntimeError("guard=True needs agxguard.guard(), which this build lacks")
            return factory
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
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(x, future, timeout)
        return future

    def __call__(self, x: Any, timeout: Optional[float] = None) -> Any:
        """Run one request and return its result (or raise its batch's exception).

        ``timeout`` (seconds) bounds the whole call: ``queue.Full`` while queueing,
        TimeoutError while waiting for the result.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        req = self._enqueue(x, None, timeout)
        if deadline is None:
            req.waiter.acquire()
        elif not req.waiter.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"Batcher {self.name!r}: no result within {timeout} s")
        if req.error is not None:
            raise req.error
        return req.value

    def _enqueue(self, x: Any, future: Optional[concurrent.futures.Future],
                 timeout: Optional[float]) -> _Request:
        """Check ``x``, wait for room, and append its request to the queue."""
        try:
            shape = x.shape
            key = (tuple(shape[1:]), x.dtype, x.device)
        except AttributeError:
            raise TypeError(f"Batcher requests must be tensors with a batch dimension, "
                            f"got {type(x).__name__}") from None
        if len(shape) == 0:
            raise ValueError("Batcher requests need a batch dimension (dim 0); got a 0-d tensor")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        req = _Request(x, shape[0], key, future)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"Batcher {self.name!r} is closed; it accepts no requests")
            q = self._queue
            if len(q) >= self.max_queue:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(q) >= self.max_queue and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise queue.Full(f"Batcher {self.name!r}: queue full "
                                         f"({self.max_queue} requests) for {timeout} s")
                    self._not_full.wait(left)
                if self._closed:
                    raise RuntimeError(f"Batcher {self.name!r} closed while this request "
                                       f"waited for room; it was not accepted")
            req.t_submit = time.perf_counter()
            q.append(req)
            if len(q) >= self._wake_at:
                self._not_empty.notify()
        return req

    # ------------------------------------------------------------------ dispatching
    def _take_compatible(self, key: tuple, batch: list) -> None:
        """Move queued requests with ``key`` into ``batch`` (oldest first, up to max_batch).

        Called with the lock held; skipped requests keep their place in the queue.
        """
        q = self._queue
        skipped = []
        while q and len(batch) < self.max_batch:
            r = q.popleft()
            if r.key == key:
                batch.append(r)
            else:
                skipped.append(r)
        if skipped:
            q.extendleft(reversed(skipped))

    def _next_batch(self) -> Optional[list]:
        """Wait for requests and return the next batch, or None when closed and drained."""
        with self._lock:
            while not self._queue:
                if self._closed:
                    return None
                self._wake_at = 1
                self._not_empty.wait()
            head = self._queue[0]
            batch: list = []
            self._take_compatible(head.key, batch)
            deadline = head.t_submit + self._delay_s
            while len(batch) < self.max_batch and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                # Wake when enough requests could have arrived to fill the batch.
                self._wake_at = len(self._queue) + self.max_batch - len(batch)
                self._not_empty.wait(left)
                self._take_compatible(head.key, batch)
            self._wake_at = 1
            self._not_full.notify(len(batch))
            return batch

    def _run_batch(self, batch: list) -> None:
        """Call ``fn`` once on the concatenated batch and answer each request."""
        now = time.perf_counter()
        live = [r for r in batch if r.start(now)]
        if not live:
            return
        error: Optional[BaseException] = None
        results = None
        sizes = [r.rows for r in live]
        try:
            if len(live) == 1:
                x = live[0].x
            else:
                import torch

                x = torch.cat([r.x for r in live], 0)
            if self._guard is None:
                out = self.fn(x)
            else:
                with self._guard():
                    out = self.fn(x)
            results = _split_output(out, sizes, sum(sizes))
        except BaseException as exc:  # every caller of this batch gets it, and only them
            error = exc
        t_done = time.perf_counter()
        if error is None:
            for r, value in zip(live, results):
                r.finish(value)
        else:
            for r in live:
                r.fail(error)
        n = len(live)
        with self._lock:
            self._batches += 1
            self._requests += n
            self._rows += sum(sizes) if error is None else sum(r.rows for r in live)
            self._failed += n if error is not None else 0
            if n > self._largest:
                self._largest = n
            self._queue_wait.extend([now - r.t_submit for r in live])
            self._latency.extend([t_done - r.t_submit for r in live])

    def _dispatch_loop(self) -> None:
        """The dispatcher thread: form and run batches until closed and drained."""
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run_batch(batch)
        finally:
            # Only reached early if the loop itself broke: fail whatever is left.
            with self._lock:
                self._closed = True
                left = list(self._queue)
                self._queue.clear()
                self._not_full.notify_all()
            for r in left:
                r.fail(RuntimeError(f"Batcher {self.name!r}: dispatcher stopped"))

    # ------------------------------------------------------------------ lifecycle
    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting requests; finish (or, with cancel_pending, fail) those accepted.

        With ``wait`` the call returns once every accepted request has its answer.
        Submitters blocked on a full queue get RuntimeError. Closing twice is harmless.
        """
        with self._lock:
            self._closed = True
            if cancel_pending:
                dropped = list(self._queue)
                self._queue.clear()
            else:
                dropped = []
            self._not_empty.notify_all()
            self._not_full.notify_all()
        for r in dropped:
            r.fail(RuntimeError(f"Batcher {self.name!r} closed before this request ran"))
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
        """Zero the counters (lock held, or before the dispatcher starts)."""
        self._batches = 0
        self._requests = 0
        self._rows = 0
        self._failed = 0
        self._largest = 0
        self._queue_wait: collections.deque = collections.deque(maxlen=_LATENCY_SAMPLES)
        self._latency: collections.deque = collections.deque(maxlen=_LATENCY_SAMPLES)

    def reset_stats(self) -> None:
        """Zero the counters and drop latency samples (e.g. after a warm-up)."""
        with self._lock:
            self._reset_counters()

    def stats(self) -> dict:
        """Counters and timings so far; times in milliseconds, None where nothing ran.

        Keys: batches, requests, rows, failed, mean_batch_size, largest_batch, queued,
        queue_wait_mean_ms, queue_wait_p50_ms, queue_wait_p99_ms, latency_mean_ms,
        latency_p50_ms, latency_p99_ms (latency: submit to answer, per request; the
        percentiles cover the newest 65,536 requests).
        """
        with self._lock:
            waits = sorted(self._queue_wait)
            lats = sorted(self._latency)
            out = {
                "batches": self._batches,
                "requests": self._requests,
                "rows": self._rows,
                "failed": self._failed,
                "mean_batch_size": (self._requests / self._batches) if self._batches else None,
                "largest_batch": self._largest,
                "queued": len(self._queue),
            }

        def ms(v: Optional[float]) -> Optional[float]:
            return None if v is None else v * 1000.0

        out["queue_wait_mean_ms"] = ms(sum(waits) / len(waits)) if waits else None
        out["queue_wait_p50_ms"] = ms(_percentile(waits, 50))
        out["queue_wait_p99_ms"] = ms(_percentile(waits, 99))
        out["latency_mean_ms"] = ms(sum(lats) / len(lats)) if lats else None
        out["latency_p50_ms"] = ms(_percentile(lats, 50))
        out["latency_p99_ms"] = ms(_percentile(lats, 99))
        return out
