"""agxguard: switchable, measurable locking for multi-threaded GPU inference.

Modes (one vocabulary everywhere):

    off     no locks (calls are still counted)
    op      each driver call / torch op under one process-wide op lock
    stream  each region or op under the lock of its stream
    global  each guarded region under one process-wide lock

Typical use::

    import agxguard
    agxguard.set_mode("stream")
    with agxguard.guard():          # a region of GPU work
        y = model(x)
    with agxguard.ops():            # every torch op of this thread, locked per op
        y = model(x)
"""
from __future__ import annotations

del annotations  # the __future__ feature object, not API (the compiler flag stays)

# Helper modules and typing names under underscore names: the public namespace
# (dir(agxguard)) is __all__ and the package's own submodules (tests/test_layout.py).
import contextlib as _contextlib
import dataclasses as _dataclasses
from typing import TYPE_CHECKING as _TYPE_CHECKING

try:
    from . import _C
except ImportError:  # pragma: no cover - exercised in a child by tests/test_build.py
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    if not any(f.startswith("_C.") and f.endswith((".so", ".pyd")) for f in _os.listdir(_here)):
        raise ImportError(
            f"agxguard's C extension is not built in {_here}. Python imported this source tree "
            "(it comes first on sys.path and shadows any installed agxguard): build it there with "
            "'python3 setup.py build_ext --inplace', or run Python from another directory") from None
    raise
from . import _config
from ._C import LockTimeout, LockWaitWarning
from ._decorate import guard
from ._decorate import stream_key as _stream_key
from ._config import ConfigWarning
from .batcher import Batcher
from .swizzle import guard_methods, unguard_methods

if _TYPE_CHECKING:  # annotations only (they are strings at run time)
    from typing import Any, Callable, Dict, Generator, Iterator, Optional

    from ._C import Guard, Lock

# The documented API, one to one with README.md's "The API in short" (tests/test_layout.py).
__all__ = [
    "MODES", "set_mode", "get_mode", "mode", "guard", "ops", "use_stream",
    "set_throttle", "throttle", "set_lock_timeout", "stats", "reset_stats", "status",
    "global_lock", "op_lock", "stream_lock", "LockTimeout", "LockWaitWarning", "ConfigWarning",
    "Batcher", "guard_methods", "unguard_methods", "install", "uninstall", "hooks",
]

__version__ = "0.1.0"

MODES = _C.MODES  # the one list of the modes, from the C core


# ---------------------------------------------------------------- modes

def set_mode(name: str) -> str:
    """Switch the process-wide mode; returns the previous one.

    Raises TypeError for a non-str, ValueError for a name not in MODES (a name
    with a NUL in it is not a mode). Regions already open keep the
    lock they took; the new mode applies to regions entered from now on."""
    return _C.set_mode(name)


def get_mode() -> str:
    """The current mode's name."""
    return _C.get_mode()


@_contextlib.contextmanager
def mode(name: str) -> Iterator[str]:
    """``with agxguard.mode("global"):`` switch the mode for the block, then restore."""
    previous = _C.set_mode(name)
    try:
        yield name
    finally:
        _C.set_mode(previous)


# ---------------------------------------------------------------- streams

@_contextlib.contextmanager
def use_stream(stream: Any) -> Iterator[Optional[int]]:
    """Make `stream` this thread's current stream for ``stream`` mode regions and ops
    (CPU threads and the driver model have no stream of their own); yields its key.

    ``use_stream(None)`` sets no stream for the block: an outer use_stream() does not
    apply in it, and regions use the caller's current stream as guard(stream=None)
    does (torch's current CUDA stream, else 0); it yields None."""
    key = None if stream is None else _stream_key(stream)
    previous = _C.set_thread_stream(key)
    try:
        yield key
    finally:
        _C.set_thread_stream(previous)


# ---------------------------------------------------------------- guards

_OPS_LEVELS = ("function", "dispatch")


def ops(pin_cpus: Any = None, level: str = "function") -> Any:
    """A torch mode that runs each torch op of this thread under the lock the
    current mode assigns to one op (``op``: the op lock). Use as a context manager
    in each worker thread (torch keeps its modes per thread).

    ``level``: ``"function"`` (default) locks each torch function call (a torch
    function mode; torch then skips its fused transformer path); ``"dispatch"`` locks
    each ATen operator at torch's Python dispatch key (a dispatch mode: below
    autograd, fused operators stay fused and are one locked call).

    ``pin_cpus`` (Linux, e.g. ``{0}``): pin the thread to these CPUs while inside,
    which makes op-lock handoffs between threads far cheaper on many-core VMs."""
    if level not in _OPS_LEVELS:
        raise ValueError(f"unknown ops level {level!r}; allowed: {', '.join(_OPS_LEVELS)}")
    from ._torch import GuardedDispatch, GuardedOps

    return (GuardedOps if level == "function" else GuardedDispatch)(pin_cpus)


# ---------------------------------------------------------------- throttle, waits

def set_throttle(n: Optional[int]) -> int:
    """Let at most `n` outermost guarded regions run at once (None or 0: no limit).
    Returns the previous limit (0 = none)."""
    if n is None:
        n = 0
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"throttle must be None or an int from 0 (no limit) to {_config.THROTTLE_MAX}, "
                        f"not {type(n).__name__}")
    return _C.set_throttle(n)  # ValueError naming the range outside 0..THROTTLE_MAX


@_contextlib.contextmanager
def throttle(n: Optional[int]) -> Iterator[int]:
    """``with agxguard.throttle(2):`` at most 2 guarded regions at once in the block."""
    previous = set_throttle(n)
    try:
        yield _C.get_throttle()
    finally:
        _C.set_throttle(previous)


def set_lock_timeout(timeout_ms: Optional[float] = None, warn_ms: Optional[float] = None,
                     action: str = "raise") -> Dict[str, Any]:
    """Warn once when a wait passes `warn_ms`; past `timeout_ms`, raise LockTimeout
    (action="raise") or abort the process (action="abort"). None or 0 turns each off.
    Returns the previous policy, ``{"timeout_ms", "warn_ms", "action"}`` (pass it back
    as keywords to restore it; ``status()["lock_timeout"]`` reads the current one).

    Each limit is a number of milliseconds from 0.001 (1 us) to 1e12: a positive
    value below 0.001 is refused (ValueError) rather than rounded to no limit, and a
    bool is refused (TypeError)."""
    if not isinstance(action, str):
        raise TypeError(f"timeout action must be a str, one of {', '.join(_config.TIMEOUT_ACTIONS)}; "
                        f"not {type(action).__name__}")
    if action not in _config.TIMEOUT_ACTIONS:
        raise ValueError(f"unknown timeout action {action!r}; allowed: {', '.join(_config.TIMEOUT_ACTIONS)}")
    previous = _lock_timeout()
    _C.set_lock_timeout(warn_ms=warn_ms, timeout_ms=timeout_ms, abort=(action == "abort"))
    return previous


def _lock_timeout() -> Dict[str, Any]:
    """The wait policy: ``{"timeout_ms", "warn_ms", "action"}``."""
    w = _C.get_lock_timeout()
    return {"timeout_ms": w["timeout_ms"], "warn_ms": w["warn_ms"], "action": "abort" if w["abort"] else "raise"}


# ---------------------------------------------------------------- locks, stats

def global_lock() -> Lock:
    """The process-wide region lock (the one ``global`` mode takes)."""
    return _C.global_lock()


def op_lock() -> Lock:
    """The process-wide op lock (the one ``op`` mode takes per call)."""
    return _C.op_lock()


def stream_lock(stream: Any) -> Lock:
    """The lock of a stream (see _stream_key: an int, a torch stream, any hashable)."""
    return _C.stream_lock(_stream_key(stream))


def stats() -> Dict[str, Any]:
    """Counters since the last reset: per domain (global, op, stream, object)
    acquisitions, reentries, contentions, timeouts, wait/hold/max-wait ns; the
    throttle; the current mode; nested_skips (nested entries that ran under their
    thread's stream locks because the lock of their own stream was busy and came
    before those in the lock order: README, "Modes")."""
    return _C.stats()


def reset_stats() -> None:
    """Zero every counter."""
    _C.reset_stats()


# ---------------------------------------------------------------- import-time config

_env = _config.from_env()
_C.set_mode(_env.mode)
_C.set_lock_timeout(warn_ms=_env.warn_ms, timeout_ms=_env.timeout_ms, abort=_env.timeout_action == "abort")
_C.set_throttle(_env.throttle)


# ---------------------------------------------------------------- driver hooks at import (issue 4)
# Installs the AGX hook set when a supported driver is present (Apple GPU, or
# AGXGUARD_DRIVER=model) unless AGXGUARD_DISABLE=1; otherwise quiet and cheap,
# and agxguard.status() says why (a Mac with a GPU and no hooks also warns).
# Classes of frameworks loaded later (MPS with torch) are hooked as they load.
# See agxguard/hooks.py.
from . import hooks as _hooks_module  # noqa: E402
from .hooks import hooks, install, uninstall  # noqa: E402


def status() -> Dict[str, Any]:
    """What agxguard is doing now: ``mode``, ``throttle`` (0 = none), ``lock_timeout``
    (the wait policy), ``config`` (what the environment asked for at import), and the
    driver hooks: driver found ('metal' | 'model' | None), ``installed``, why nothing is
    installed when nothing is, what discovery found, hook counts, image-load watching
    and the encoder lifecycle counters (see agxguard/hooks.py); ``protects``: what each
    mode locks in this process (in mode 'op' with no driver hooks, a guard() region takes
    no lock, and its first one warns)."""
    out: Dict[str, Any] = {"mode": _C.get_mode(), "throttle": _C.get_throttle(),
                           "lock_timeout": _lock_timeout(), "config": _dataclasses.asdict(_env)}
    out.update(_hooks_module.status())
    out["protects"] = _protects(bool(out.get("installed")))
    return out


def _protects(hooked: bool) -> Dict[str, str]:
    """What each mode locks in this process, given whether the driver hooks are in."""
    driver = ("each hooked driver call (the AGX encoder methods), under one process-wide lock"
              if hooked else "no driver call: no driver hooks are installed here (no Metal, or they failed)")
    return {
        "off": "nothing (calls are counted)",
        "op": f"{driver}; inside ops(), each torch op; a guard() region itself takes no lock",
        "stream": "each guard() region under the lock of its stream" + (
            "; hooked driver calls under the lock of their queue's stream" if hooked else ""),
        "global": "each guard() region under one process-wide lock (the seeds' Semaphore(1))",
    }


_hooks_module._install_at_import(_env)
