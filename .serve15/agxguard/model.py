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
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List, Optional, Tuple

from . import _C

BUGS = ("context_race", "encoder_recycle", "buffer_recycle", "bypass")

_UNAVAILABLE = ("the driver model is unavailable in this build: agxguard._C was compiled without an "
                "Objective-C runtime (on Linux install gobjc and libobjc-12-dev, then rebuild)")


def available() -> bool:
    """Whether this build has the driver model (it needs an Objective-C runtime)."""
    return bool(getattr(_C, "HAVE_OBJC", False))


def _need() -> None:
    if not available():
        raise RuntimeError(_UNAVAILABLE)


def configure(**settings: Any) -> Dict[str, Any]:
    """Switch bugs (names in BUGS, bool) and set the window (window_spins,
    window_yields, int >= 0); unnamed settings keep their value. Returns the
    whole configuration."""
    _need()
    return dict(_C.model_configure(**settings))


def set_bugs(on: bool = True, window_yields: int = 0, window_spins: int = 0) -> Dict[str, Any]:
    """All bugs on (or off) at once, with the given window."""
    return configure(**{b: on for b in BUGS}, window_yields=window_yields, window_spins=window_spins)


def config() -> Dict[str, Any]:
    """The model's current configuration."""
    _need()
    return dict(_C.model_config())


def classes() -> Dict[str, str]:
    """The model's class names (AGX family names), by role."""
    _need()
    return dict(_C.model_classes())


def hook() -> int:
    """Install the AGX hook set on the model's classes (``agxguard.install("model")``:
    discovery, the one selector table, lifecycle tracking); returns how many
    hooks were new."""
    _need()
    from .hooks import install  # (agxguard.hooks is also the name of a function)
    return int(install("model")["new"])


def unhook() -> int:
    """Remove the hook set; returns how many hooks were removed."""
    _need()
    from .hooks import uninstall
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
    r = dict(_C.model_run(threads, iterations, shared_queue=shared_queue, region=region,
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
    return bool(_C.model_run_op(queue=queue, a=a, length=length, internal=internal, end_encoding=end_encoding))


_CHILD = textwrap.dedent("""
    import json, sys
    import agxguard._C as C
    from agxguard import model
    cfg = json.loads(sys.argv[1])
    C.set_mode(cfg.pop("mode"))
    model.configure(**cfg.pop("bugs"))
    r = model.run_threads(**cfg)
    print("AGXMODEL-RESULT " + json.dumps(r), flush=True)
""")


def run_in_child(mode: str, threads: int = 8, iterations: int = 100, bugs: Optional[Dict[str, Any]] = None,
                 timeout: float = 60.0, env: Optional[Dict[str, str]] = None, **run_kw: Any) -> Dict[str, Any]:
    """run_threads in a fresh child process so a modelled fault is counted, not
    fatal; `env` adds environment variables (e.g. AGXGUARD_DRIVER=model with
    hooks=False: the hooks then come from the import). Returns {"outcome": "ok" | "wrong_result" | "signal" | "abort" | "hang"
    | "error", "returncode", "message", "result", "seconds"}."""
    import json
    _need()
    cfg = {"mode": mode, "bugs": bugs or {}, "threads": threads, "iterations": iterations, **run_kw}
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True,
                           timeout=timeout, env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        return {"outcome": "hang", "returncode": None, "message": f"no exit in {timeout}s", "result": None,
                "seconds": time.monotonic() - t0}
    out = {"returncode": p.returncode, "result": None, "seconds": time.monotonic() - t0,
           "message": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""}
    for line in p.stdout.splitlines():
        if line.startswith("AGXMODEL-RESULT "):
            out["result"] = json.loads(line.split(" ", 1)[1])
    if p.returncode == 0 and out["result"] is not None:
        out["outcome"] = "ok" if out["result"]["result_ok"] else "wrong_result"
    elif p.returncode == -6 and "never completes (hang)" in p.stderr:
        out["outcome"] = "hang"
    elif p.returncode == -6:
        out["outcome"] = "abort"
    elif p.returncode < 0:
        out["outcome"] = "signal"
        out["signal"] = -p.returncode
    else:
        out["outcome"] = "error"
    return out


def tally_in_child(mode: str, runs: int, message_chars: int = 100,
                   **run_kw: Any) -> Tuple["collections.Counter[str]", "collections.Counter[str]",
                                           List[Dict[str, Any]]]:
    """run_in_child(mode, **run_kw) ``runs`` times and count what happened. Returns
    (outcomes, messages, results): a Counter of outcomes, a Counter of the first
    ``message_chars`` characters of each message of a run that was not ok, and the
    result of each ok run, in order."""
    outcomes: "collections.Counter[str]" = collections.Counter()
    messages: "collections.Counter[str]" = collections.Counter()
    results: List[Dict[str, Any]] = []
    for _ in range(runs):
        r = run_in_child(mode, **run_kw)
        outcomes[r["outcome"]] += 1
        if r["outcome"] != "ok":
            messages[r["message"][:message_chars]] += 1
        else:
            results.append(r["result"])
    return outcomes, messages, results
