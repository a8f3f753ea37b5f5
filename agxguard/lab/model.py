"""The driver model: a Metal-shaped set of Objective-C classes, built in C at run
time, that carries the AGX driver's thread-safety bugs (a test double for Apple
hardware we do not have; its numbers are the model's, not a GPU's).

Bugs (each switchable): ``context_race`` (a device-wide compute context that
another thread's endEncoding nulls while a dispatch reads it: SIGSEGV at 0x98),
``encoder_recycle`` (an unlocked encoder pool hands one encoder to two threads:
SIGSEGV in the recycled encoder's next call), ``buffer_recycle`` (an unlocked
command-buffer pool: "commit an already committed command buffer" or "A command
encoder is already encoding to this command buffer" aborts), ``bypass`` (the
internal dispatch path calls implementations cached at class creation, so no
swizzle sees them). ``window_spins`` / ``window_yields`` widen the races.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Dict, List, Optional, Tuple

from .. import _C
from .. import _runner as runner

try:  # the lab's C module: the model itself (built only with an Objective-C runtime)
    from .. import _model
    _MISSING = ""
except ImportError as _e:
    _model = None  # type: ignore[assignment]
    _MISSING = f" ({_e})"

BUGS = ("context_race", "encoder_recycle", "buffer_recycle", "bypass")

_UNAVAILABLE = ("the driver model is unavailable in this build: agxguard._model is built only with an "
                "Objective-C runtime (on Linux install gobjc and libobjc-12-dev, then rebuild)")


def available() -> bool:
    """Whether this build has the driver model (agxguard._model; it needs an Objective-C runtime)."""
    return _model is not None and bool(_model.HAVE_MODEL)


def _need() -> None:
    if not available():
        raise RuntimeError(_UNAVAILABLE + _MISSING)


def configure(**settings: Any) -> Dict[str, Any]:
    """Switch bugs (names in BUGS, bool) and set the window (window_spins,
    window_yields, int >= 0); unnamed settings keep their value. Returns the
    whole configuration."""
    _need()
    return dict(_model.model_configure(**settings))


def set_bugs(on: bool = True, window_yields: int = 0, window_spins: int = 0) -> Dict[str, Any]:
    """All bugs on (or off) at once, with the given window."""
    return configure(**{b: on for b in BUGS}, window_yields=window_yields, window_spins=window_spins)


def config() -> Dict[str, Any]:
    """The model's current configuration."""
    _need()
    return dict(_model.model_config())


def classes() -> Dict[str, str]:
    """The model's class names (AGX family names), by role."""
    _need()
    return dict(_model.model_classes())


def hook() -> int:
    """Install the AGX hook set on the model's classes (``agxguard.install("model")``:
    discovery, the one selector table, lifecycle tracking); returns how many
    hooks were new."""
    _need()
    from ..hooks import install  # (agxguard.hooks is also the name of a function)
    return int(install("model")["new"])


def unhook() -> int:
    """Remove the hook set; returns how many hooks were removed."""
    _need()
    from ..hooks import uninstall
    return int(uninstall()["removed"])


def activate() -> Dict[str, Any]:
    """Select the model as agxguard's driver (``AGXGUARD_DRIVER=model``): create
    it and install its hook set. Returns {"driver", "hooks", "classes"}."""
    n = hook()
    return {"driver": "model", "hooks": n, "classes": classes()}


def run_threads(threads: int, iterations: int, shared_queue: bool = True, region: bool = True,
                internal_every: int = 4, length: int = 256, hooks: bool = True) -> Dict[str, Any]:
    """Run the MPS op pattern (command buffer, encoder, set pipeline, set
    buffers, dispatch, end, commit, wait) `iterations` times on each of
    `threads` native threads with the GIL released. `region` wraps each op in a
    region as ``with agxguard.guard():`` would; every `internal_every`-th op takes
    the internal dispatch path. Returns ops, seconds, ops_per_s, mismatches,
    result_ok and the mode. A modelled fault ends the process: run it in a child."""
    _need()
    if hooks:
        hook()
    r = dict(_model.model_run(threads, iterations, shared_queue=shared_queue, region=region,
                          internal_every=internal_every, length=length))
    r["ops_per_s"] = r["ops"] / r["seconds"] if r["seconds"] > 0 else float("inf")
    r["lifecycle"] = dict(_C.hooks_lifecycle())
    r["hooks_driver"] = _C.hooks_driver()
    r.update(threads=threads, iterations=iterations, shared_queue=shared_queue, mode=_C.get_mode())
    return r


def run_op(queue: int = 0, a: float = 2.0, length: int = 256, internal: bool = False,
           end_encoding: bool = True) -> bool:
    """One op (y = a*x + y on fresh buffers) on model queue `queue`, with the
    GIL released; True if the result is right. Safe to call from Python threads
    (as safe as the mode makes it). ``end_encoding=False`` commits with the
    encoder still open (a caller bug: the driver aborts unless commit safety
    ends it first)."""
    _need()
    return bool(_model.model_run_op(queue=queue, a=a, length=length, internal=internal, end_encoding=end_encoding))


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target (in the child): set the mode and the bugs, run_threads; a wrong
    result is a failed check (``runner.CheckFailed``, the figures kept)."""
    cfg = dict(case)
    _C.set_mode(cfg.pop("mode"))
    configure(**cfg.pop("bugs"))
    r = run_threads(**cfg)
    if not r["result_ok"]:
        raise runner.CheckFailed("wrong result: %d mismatched values over %d ops"
                                 % (r.get("mismatches", 0), r["ops"]), r)
    return r


def run_in_child(mode: str, threads: int = 8, iterations: int = 100, bugs: Optional[Dict[str, Any]] = None,
                 timeout: float = 60.0, env: Optional[Dict[str, str]] = None, **run_kw: Any) -> runner.Attempt:
    """run_threads in a fresh child process (agxguard's one child runner), so a modelled
    fault is counted, not fatal; `env` adds environment variables (e.g.
    AGXGUARD_DRIVER=model with hooks=False: the hooks then come from the import).
    Returns the runner's Attempt: ``outcome`` (one of ``runner.OUTCOMES``: passed,
    failed (a wrong result, or an error), signal, abort, hang), ``message`` (what the
    child said last), ``value`` (run_threads' result, also of a wrong-result run),
    ``duration_s``."""
    _need()
    case = {"mode": mode, "bugs": bugs or {}, "threads": threads, "iterations": iterations, **run_kw}
    child_env = dict(os.environ, **(env or {}))
    return runner.run_in_child(run_case, case, timeout=timeout, startup_timeout=max(timeout, 60.0),
                               env=child_env).attempts[-1]


def is_error(attempt: runner.Attempt) -> bool:
    """Whether a run_in_child attempt failed for a reason of its own (the child could
    not run: an import error, a bad argument) rather than by what the model modelled
    (a crash, or a wrong result)."""
    return attempt.outcome == "failed" and "wrong result" not in (attempt.error or "")


def tally_in_child(mode: str, runs: int, message_chars: int = 100,
                   **run_kw: Any) -> Tuple["collections.Counter[str]", "collections.Counter[str]",
                                           List[Dict[str, Any]]]:
    """run_in_child(mode, **run_kw) ``runs`` times and count what happened. Returns
    (outcomes, messages, results): a Counter of outcomes (``runner.OUTCOMES``), a
    Counter of the first ``message_chars`` characters of the message of each run that
    did not pass, and the result of each run that passed, in order."""
    outcomes: "collections.Counter[str]" = collections.Counter()
    messages: "collections.Counter[str]" = collections.Counter()
    results: List[Dict[str, Any]] = []
    for _ in range(runs):
        a = run_in_child(mode, **run_kw)
        outcomes[a.outcome] += 1
        if a.outcome != "passed":
            messages[a.message[:message_chars]] += 1
        else:
            results.append(a.value)
    return outcomes, messages, results
