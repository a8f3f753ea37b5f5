"""Child side of agxguard._runner: run cases of one target and stream each outcome.

Run as a script (``python agxguard/_runner_child.py SPEC PROGRESS``), not as ``-m``, so the
child does not need the package (or its C extension) to import before it can report.
SPEC is a JSON file ``{"target": "module:function", "cases": [...], "sys_path": [...]}``;
PROGRESS receives one JSON line per event: ``start`` before a case, ``done`` after it.
A case that kills the process leaves its ``start`` line without a ``done``: that is how
the parent knows which case crashed.
"""
import faulthandler
import importlib
import json
import os
import signal
import sys
import time
import traceback

# Running a file puts its folder first on sys.path; that folder is the package, whose
# module names must not shadow top-level ones.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    del sys.path[0]


def _load(target):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _emit(progress, **event):
    progress.write(json.dumps(event) + "\n")
    progress.flush()


def main(spec_path, progress_path):
    # Stacks of every thread on a fatal signal, and on SIGUSR1 (the parent's watchdog).
    faulthandler.enable(all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    with open(spec_path) as f:
        spec = json.load(f)
    for p in reversed(spec.get("sys_path", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    with open(progress_path, "a", buffering=1) as progress:
        _emit(progress, event="ready", pid=os.getpid(), t=time.time())
        try:
            fn = _load(spec["target"])
        except BaseException as exc:  # an import error fails the first case, not the parent
            _emit(progress, event="start", index=spec["cases"][0]["index"], t=time.time())
            _emit(progress, event="done", index=spec["cases"][0]["index"], outcome="failed",
                  error="cannot load target %s: %s: %s" % (spec["target"], type(exc).__name__, exc),
                  traceback=traceback.format_exc(), t=time.time())
            return 1
        for item in spec["cases"]:
            index = item["index"]
            _emit(progress, event="start", index=index, t=time.time())
            outcome, value, error, tb = "passed", None, None, None
            try:
                value = fn(item["case"])
            except BaseException as exc:  # every failure is a result here
                outcome = "failed"
                error = "%s: %s" % (type(exc).__name__, exc)
                tb = traceback.format_exc()
                # _runner.CheckFailed carries the figures measured before the check failed.
                value = getattr(exc, "agxguard_result", None)
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                outcome, value = "failed", None
                error = "result is not JSON-serialisable: %s" % exc
            _emit(progress, event="done", index=index, outcome=outcome, value=value,
                  error=error, traceback=tb, t=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
