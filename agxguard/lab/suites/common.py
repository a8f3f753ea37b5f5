"""What the two suites share: options, the worker-thread runner, the mode contexts, and
the parent loop that runs each mode's cases in child processes and fills the report.

Parent side: :func:`run_suite` (no torch, no driver: only the runner). Child side:
:func:`run_case` (called by each suite's runner target with its chapter function) and
:func:`run_threads`. This module imports neither suite: each suite passes its own
target to :func:`run_suite`, so the imports go one way (suite -> common).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from ... import MODES
from ... import _runner as runner
from ..report import Report
from .backends import DEVICES


# -- options (shared with the CLI) -------------------------------------------------------

class OptionError(ValueError):
    """A bad option value; the message names the value and the allowed ones."""


def parse_modes(value: Any) -> List[str]:
    """``"all"``, one mode, a comma-separated list, or a sequence of modes."""
    if value is None:
        return list(MODES)
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    if items == ["all"]:
        return list(MODES)
    bad = [i for i in items if i not in MODES]
    if bad or not items:
        raise OptionError("bad mode %r; allowed: %s, or all (comma-separate several)"
                          % (",".join(bad) if bad else value, ", ".join(MODES)))
    return list(dict.fromkeys(items))


def parse_threads(value: Any) -> List[int]:
    """``"1,2,4,8"`` or a sequence of ints, each in 1..256."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for i in items:
        try:
            n = int(str(i).strip())
        except ValueError:
            n = 0
        if not 1 <= n <= 256:
            raise OptionError("bad thread count %r; allowed: integers 1..256, comma-separated "
                              "(e.g. 1,2,4,8)" % (str(i).strip(),))
        out.append(n)
    if not out:
        raise OptionError("bad thread counts %r; allowed: integers 1..256, comma-separated" % (value,))
    return sorted(set(out))


def parse_choice(kind: str, value: Any, allowed: Sequence[str]) -> List[str]:
    """One of ``allowed``, several comma-separated, or ``all``."""
    if value is None:
        return list(allowed)
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [i for i in items if i not in allowed]
    if bad or not items:
        raise OptionError("bad %s %r; allowed: %s, or all" % (kind, ",".join(bad) or value, ", ".join(allowed)))
    return list(dict.fromkeys(items))


def parse_positive(kind: str, value: Any, integer: bool = True, allow_zero: bool = False):
    if value is None:
        return None
    try:
        v = int(value) if integer else float(value)
        if isinstance(value, float) and integer and v != value:
            raise ValueError
    except (TypeError, ValueError):
        v = -1
    if not (v > 0 or (allow_zero and v == 0)):
        raise OptionError("bad %s %r; allowed: %s" % (
            kind, value, ("an integer" if integer else "a number") + (" >= 0" if allow_zero else " > 0")))
    return v


def resolve_device(device: Optional[str]) -> str:
    """The device to run on (``None``: the best present); refuses one that is not here."""
    from .backends import best_device, devices_present
    if device is None:
        return best_device()
    if device not in DEVICES:
        raise OptionError("bad device %r; allowed: %s" % (device, ", ".join(DEVICES)))
    present = devices_present()
    if device not in present:
        raise OptionError("device %r is not available here; available: %s"
                          % (device, ", ".join(present) or "none"))
    return device


# -- child side: running one case -------------------------------------------------------

def region(mode: str):
    """The context around one request: ``global``/``stream`` take the guard (the lock
    that the mode assigns to a region); ``op`` and ``off`` take nothing here (``op``
    locks inside, per op; ``off`` is really unprotected)."""
    if mode in ("global", "stream"):
        import agxguard
        return agxguard.guard()
    return contextlib.nullcontext()


def total_acquisitions(stats: Dict[str, Any]) -> int:
    """Lock acquisitions over every domain of ``agxguard.stats()``."""
    return int(sum(d.get("acquisitions", 0) for d in (stats.get("domains") or {}).values()))


def run_threads(backend, workload: str, mode: str, threads: int, *, batch: int = 1,
                iterations: Optional[int] = None, duration: Optional[float] = None,
                keep: bool = False, seed: int = 1) -> Dict[str, Any]:
    """Run ``threads`` worker threads, each doing requests of ``batch`` under ``mode``.

    Each thread does ``iterations`` requests, or as many as fit in ``duration`` seconds.
    Returns ops completed, the expected count, errors, timing and (``keep``) each
    thread's first and last outputs.
    """
    if iterations is None and duration is None:
        iterations = 1
    inputs = [backend.make_input(workload, batch=batch, seed=seed + i) for i in range(threads)]
    settle = getattr(backend, "settle", None)
    if settle is not None:
        settle()  # inputs made on this thread's stream are ready before workers read them
    barrier = threading.Barrier(threads + 1)
    done = [0] * threads
    errors: List[str] = []
    outputs: List[Any] = [None] * threads
    firsts: List[Any] = [None] * threads

    def worker(i: int) -> None:
        try:
            with backend.worker(mode):
                barrier.wait()
                end = time.perf_counter() + (duration or 0.0)
                n = 0
                while True:
                    if iterations is not None and n >= iterations:
                        break
                    if iterations is None and n > 0 and time.perf_counter() >= end:
                        break
                    with region(mode):
                        y = backend.run(workload, inputs[i])
                    n += 1
                    done[i] = n
                    if keep:
                        if firsts[i] is None:
                            firsts[i] = y
                        outputs[i] = y
        except BaseException as exc:  # recorded, and the count shows what did not run
            errors.append("thread %d: %s: %s" % (i, type(exc).__name__, exc))
            try:
                barrier.abort()
            except Exception:
                pass

    ts = [threading.Thread(target=worker, args=(i,), name="agxguard-worker-%d" % i, daemon=True)
          for i in range(threads)]
    for t in ts:
        t.start()
    try:
        barrier.wait()
        t0 = time.perf_counter()
    except threading.BrokenBarrierError:
        t0 = time.perf_counter()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    completed = sum(done)
    out = {
        "threads": threads, "batch": batch, "completed": completed,
        "expected": threads * iterations if iterations is not None else None,
        "elapsed_s": elapsed,
        "ops_per_s": completed / elapsed if elapsed > 0 else None,
        "samples_per_s": completed * batch / elapsed if elapsed > 0 else None,
        "errors": errors[:8], "error_count": len(errors),
    }
    if keep:
        out["_inputs"], out["_firsts"], out["_outputs"] = inputs, firsts, outputs
    return out


def public(result: Dict[str, Any]) -> Dict[str, Any]:
    """``result`` without its private (non-JSON) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


_warmed = set()


def warm_up(backend, workload: str, batch: int = 1) -> None:
    """One unmeasured request (builds the model, allocates, compiles kernels)."""
    key = (workload, batch)
    if key not in _warmed:
        with backend.worker("off"):
            backend.run(workload, backend.make_input(workload, batch=batch, seed=0))
        _warmed.add(key)


def check_outputs(backend, workload: str, r: Dict[str, Any], value: Dict[str, Any],
                  problems: List[str], *, against_reference: bool = False,
                  repeatable: bool = False) -> None:
    """Checks on kept outputs: all present and finite; optionally each right against the
    reference (max abs diff where the backend has one), and each thread's last output
    equal to its first (same input, same answer)."""
    outs = r["_outputs"]
    value["finite"] = all(y is not None and backend.finite(y) for y in outs)
    if not value["finite"]:
        problems.append("missing, non-finite or wrong outputs")
    if against_reference:
        checks = [backend.compare(workload, x, y) for x, y in zip(r["_inputs"], outs)]
        value["results_ok"] = sum(ok for ok, _ in checks)
        diffs = [d for _, d in checks if d is not None]
        if diffs:
            value["max_abs_diff"] = max(diffs)
        tol = getattr(backend, "tolerance", None)
        if tol is not None:
            value["tolerance"] = tol(workload)
        if value["results_ok"] != len(checks):
            problems.append("%d of %d outputs wrong%s" % (
                len(checks) - value["results_ok"], len(checks),
                " (max abs diff %.3g)" % value["max_abs_diff"] if diffs else ""))
    if repeatable and value["finite"]:
        value["repeat_max_abs_diff"] = max(backend.same(a, b) for a, b in zip(r["_firsts"], outs))
        tol = getattr(backend, "tolerance", None)
        limit = tol(workload) if tol is not None else 0.0
        if not value["repeat_max_abs_diff"] <= limit:
            problems.append("same input gave different outputs (max diff %.3g)" % value["repeat_max_abs_diff"])


def finish_case(backend, workload: str, r: Dict[str, Any], keep: bool, *,
                against_reference: bool = False, repeatable: bool = False) -> Dict[str, Any]:
    """The end of a case: the public result of :func:`run_threads` ``r``, after the
    checks (errors, ops completed against expected, and with ``keep`` the
    :func:`check_outputs` ones); raises ``runner.CheckFailed`` with the value if any
    failed."""
    value = public(r)
    problems = list(r["errors"])
    if r["expected"] is not None and r["completed"] != r["expected"]:
        problems.append("%d of %d ops completed" % (r["completed"], r["expected"]))
    if keep:
        check_outputs(backend, workload, r, value, problems,
                      against_reference=against_reference, repeatable=repeatable)
    if problems:
        raise runner.CheckFailed("; ".join(problems[:4]), value)
    return value


def run_case(case: Dict[str, Any], run_chapter: Callable[[Any, Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
    """Child side of one case: set the case's mode, run ``run_chapter(backend, case)``
    (the suite's), record the honesty figures."""
    import agxguard
    from .backends import get_backend
    mode = case["mode"]
    agxguard.set_mode(mode)
    backend = get_backend(case["device"], case.get("backend_options"))
    agxguard.reset_stats()
    try:
        value = run_chapter(backend, case)
    except runner.CheckFailed as exc:
        exc.agxguard_result = _honesty(exc.agxguard_result or {}, mode)
        raise
    return _honesty(value, mode)


def _honesty(value: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """Record the mode the case really ran under and the locks it really took."""
    import agxguard
    s = agxguard.stats()
    value = dict(value)
    value["mode_ran"] = agxguard.get_mode()
    value["acquisitions"] = total_acquisitions(s)
    value["lock_stats"] = {k: {"acquisitions": d.get("acquisitions", 0),
                               "contentions": d.get("contentions", 0),
                               "wait_ns": d.get("wait_ns", 0)}
                           for k, d in (s.get("domains") or {}).items()}
    value["protected"] = value["acquisitions"] > 0
    if value["mode_ran"] != mode:
        raise runner.CheckFailed("ran under mode %r, not %r" % (value["mode_ran"], mode), value)
    if mode == "off" and value["acquisitions"]:
        raise runner.CheckFailed("an 'off' run took %d locks: it was not unprotected"
                                  % value["acquisitions"], value)
    return value


def probe(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target: what the child sees, versions and the device (run once before a suite)."""
    import agxguard
    from .backends import get_backend
    info = dict(get_backend(case["device"], case.get("backend_options")).info())
    info["agxguard"] = getattr(agxguard, "__version__", None)
    return info


# -- parent side ---------------------------------------------------------------------------

class Progress:
    """Progress lines on a stream (stderr by default); silent when ``stream`` is None."""

    def __init__(self, suite: str, stream=sys.stderr):
        self.suite = suite
        self.stream = stream
        self.t0 = time.monotonic()

    def line(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write("[%s %6.1fs] %s\n" % (self.suite, time.monotonic() - self.t0, text))
            self.stream.flush()

    def attempt(self, rec: runner.CaseRecord, attempt: runner.Attempt, total: int, index: int) -> None:
        c = rec.case
        what = attempt.describe()
        v = attempt.value if isinstance(attempt.value, dict) else {}
        if attempt.outcome == "passed":
            if v.get("expected"):
                what = "passed %s/%s ops" % (v.get("completed"), v.get("expected"))
            if v.get("ops_per_s"):
                what += ", %.1f ops/s" % v["ops_per_s"]
            if "max_abs_diff" in v:
                what += ", max diff %.2g" % v["max_abs_diff"]
        n = len(rec.attempts)
        self.line("%s %s %s%s: %s%s (%.1fs)" % (
            c.get("mode"), c.get("chapter"), c.get("workload", ""),
            " %sx" % c["threads"] + ("b%s" % c["batch"] if c.get("batch", 1) != 1 else "")
            if c.get("threads") else "",
            what, " [attempt %d]" % n if n > 1 else "", attempt.duration_s))


def run_suite(suite: str, device: str, modes: List[str], cases_for_mode: Callable[[str], List[Dict[str, Any]]],
              options: Dict[str, Any], *, target: Callable[[Dict[str, Any]], Dict[str, Any]],
              retries: int, timeout: float, json_path: Optional[str],
              progress=sys.stderr, plot: bool = True,
              backend_options: Optional[Dict[str, Any]] = None) -> Report:
    """Run every mode's cases in child processes (mode by mode) with the suite's runner
    target ``target`` (a module-level function of one case) and return the report."""
    prog = Progress(suite, progress)
    before = runner.crash_report_names()
    prog.line("device %s: probing in a child process" % device)
    if device == "model":
        from .model_backend import DEFAULTS
        backend_options = dict(DEFAULTS, **(backend_options or {}))
        options = dict(options, model=backend_options)
    probe_rec = runner.run_in_child(probe, {"device": device, "backend_options": backend_options},
                                    timeout=max(timeout, 120.0))
    if not probe_rec.passed:
        a = probe_rec.attempts[-1]
        raise RuntimeError("device %s does not work in a child process: %s\n%s"
                           % (device, a.describe(), (a.traceback or a.stderr_tail or "")[-2000:]))
    report = Report(suite, device, modes, options, path=json_path)
    report.machine.update({k: v for k, v in probe_rec.value.items() if k not in ("device",)})
    if json_path:
        report.save()
    for mode in modes:
        cases = cases_for_mode(mode)
        for c in cases:
            c.setdefault("suite", suite)
            c.setdefault("device", device)
            if backend_options:
                c.setdefault("backend_options", backend_options)
            c["mode"] = mode
            c.setdefault("id", "%s/%s/%s/%s/%sx%s" % (mode, c.get("chapter"), c.get("workload", ""),
                                                      c.get("threads", ""), c.get("batch", 1),
                                                      c.get("iterations", "")))
        prog.line("mode %s: %d runs" % (mode, len(cases)))
        index = {c["id"]: i for i, c in enumerate(cases)}

        def on_attempt(rec, attempt, _index=index, _n=len(cases)):
            report.record(rec)
            prog.attempt(rec, attempt, _n, _index.get(rec.case["id"], 0))

        runner.run_cases(target, cases, timeout=timeout, retries=retries, on_attempt=on_attempt)
    if before is not None:
        time.sleep(2.0)  # macOS writes crash reports a moment after the crash
        report.crash_reports_new = runner.count_new_crash_reports(before)
    if plot and json_path:
        try:
            report.plot()
        except Exception as exc:  # a plot is a nicety; never lose the report for it
            prog.line("plot not written: %s" % exc)
    report.finish()
    return report
