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
from ..progress import make_progress
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


def parse_floor(value: Any) -> float:
    """The sample floor in seconds: a number >= 0 (0: no time floor)."""
    v = parse_positive("min_sample_s", value, integer=False, allow_zero=True)
    return 0.0 if v is None else float(v)


def parse_run_options(threads: Any, iterations: Any, duration: Any, min_sample_s: Any, min_requests: Any,
                      repeats: Any, torch_threads: Any, retries: Any) -> Dict[str, Any]:
    """The options every suite takes, checked (a bad value raises ValueError naming it)."""
    return {"threads": parse_threads(threads),
            "iterations": parse_positive("iterations", iterations),
            "duration": parse_positive("duration", duration, integer=False),
            "min_sample_s": parse_floor(min_sample_s),
            "min_requests": parse_positive("min_requests", min_requests),
            "repeats": parse_positive("repeats", repeats),
            "torch_threads": parse_positive("torch_threads", torch_threads),
            "retries": parse_positive("retries", retries, allow_zero=True)}


def backend_options(device: str, model_options: Optional[Dict[str, Any]],
                    torch_threads: Optional[int]) -> Optional[Dict[str, Any]]:
    """What the child's backend is built with: the driver model's options, or on a torch
    device the intra-op thread count where one was asked for."""
    if device == "model":
        return model_options
    return {"torch_threads": torch_threads} if torch_threads else None


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


#: Default floor of a throughput sample, in seconds (``min_sample_s``).
MIN_SAMPLE_S = 0.5
#: Default repeats of a throughput sample (the report keeps each and their spread).
REPEATS = 3


def latency_figures(times: List[float]) -> Dict[str, Optional[float]]:
    """Mean, p50 and p99 in milliseconds of per-request times in seconds (nearest rank)."""
    if not times:
        return {"latency_mean_ms": None, "latency_p50_ms": None, "latency_p99_ms": None}
    ts = sorted(times)

    def rank(p: float) -> float:
        return ts[min(len(ts) - 1, max(0, int(-(-p * len(ts) // 1)) - 1))]

    return {"latency_mean_ms": 1e3 * sum(ts) / len(ts), "latency_p50_ms": 1e3 * rank(0.50),
            "latency_p99_ms": 1e3 * rank(0.99)}


def sample_is_short(elapsed: float, completed: int, min_sample_s: float,
                    min_requests: Optional[int]) -> bool:
    """True when a sample met neither floor: it ran under ``min_sample_s`` seconds and
    (where a request floor is set) did fewer than ``min_requests`` requests."""
    if elapsed >= min_sample_s:
        return False
    return not (min_requests and completed >= min_requests)


def mark_short(value: Dict[str, Any], min_sample_s: float, min_requests: Optional[int]) -> Dict[str, Any]:
    """Record the floors on a throughput result; one below them keeps its rates only as
    ``short_ops_per_s``/``short_samples_per_s`` (``ops_per_s`` None: never a result)."""
    value["min_sample_s"] = min_sample_s
    value["min_requests"] = min_requests
    value["short_sample"] = sample_is_short(value.get("elapsed_s") or 0.0, value.get("completed") or 0,
                                            min_sample_s, min_requests)
    if value["short_sample"]:
        for k in ("ops_per_s", "samples_per_s"):
            value["short_" + k] = value.get(k)
            value[k] = None
    return value


def run_threads(backend, workload: str, mode: str, threads: int, *, batch: int = 1,
                iterations: Optional[int] = None, duration: Optional[float] = None,
                keep: bool = False, seed: int = 1, rows: Optional[int] = None,
                shared_model: bool = False, min_sample_s: float = 0.0,
                min_requests: Optional[int] = None) -> Dict[str, Any]:
    """Run ``threads`` worker threads, each doing requests of ``batch`` under ``mode``.

    Each thread does ``iterations`` requests, or as many as fit in ``duration`` seconds;
    then, while the sample is under its floor (``min_sample_s`` seconds, or
    ``min_requests`` requests in all where set), it keeps going. Each thread runs its own
    copy of the model, as the seeds' suites do (``shared_model``: one for all).
    Returns ops completed, the minimum expected, errors, timing, per-request latency
    (mean, p50, p99, including any wait for the mode's region lock) and (``keep``) each
    thread's first and last outputs.
    """
    if iterations is None and duration is None:
        iterations = 1
    inputs = [backend.make_input(workload, batch=batch, seed=seed + i, rows=rows) for i in range(threads)]
    replicas = [0 if shared_model else i for i in range(threads)]
    for i in sorted(set(replicas)):  # build each model before the clock starts
        with backend.worker("off"):
            backend.run(workload, inputs[i], replica=i)
    settle = getattr(backend, "settle", None)
    if settle is not None:
        settle()  # inputs made on this thread's stream are ready before workers read them
    barrier = threading.Barrier(threads + 1)
    done = [0] * threads
    times: List[List[float]] = [[] for _ in range(threads)]
    errors: List[str] = []
    outputs: List[Any] = [None] * threads
    firsts: List[Any] = [None] * threads
    clock = time.perf_counter

    def worker(i: int) -> None:
        try:
            with backend.worker(mode):
                barrier.wait()
                start = clock()
                end = start + (duration or 0.0)
                floor_end = start + min_sample_s
                n = 0
                while True:
                    now = clock()
                    if iterations is not None:
                        enough = n >= iterations
                    else:
                        enough = n > 0 and now >= end
                    if enough and (now >= floor_end or (min_requests and sum(done) >= min_requests)):
                        break
                    t = clock()
                    with region(mode):
                        y = backend.run(workload, inputs[i], replica=replicas[i])
                    times[i].append(clock() - t)
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
        t0 = clock()
    except threading.BrokenBarrierError:
        t0 = clock()
    for t in ts:
        t.join()
    elapsed = clock() - t0
    completed = sum(done)
    out = {
        "threads": threads, "batch": batch, "completed": completed,
        "expected": threads * iterations if iterations is not None else None,
        "elapsed_s": elapsed,
        "ops_per_s": completed / elapsed if elapsed > 0 else None,
        "samples_per_s": completed * batch / elapsed if elapsed > 0 else None,
        "models": len(set(replicas)),
        "errors": errors[:8], "error_count": len(errors),
    }
    out.update(latency_figures([x for per in times for x in per]))
    if keep:
        out["_inputs"], out["_firsts"], out["_outputs"] = inputs, firsts, outputs
    return out


def spread(xs: List[Optional[float]]) -> Dict[str, Any]:
    """Median, min, max and relative spread ((max - min) / median) of repeated rates;
    None entries (short or failed samples) are left out and counted."""
    good = sorted(x for x in xs if x is not None)
    if not good:
        return {"median": None, "min": None, "max": None, "rel_spread": None, "n": 0,
                "left_out": len(xs)}
    m = len(good)
    med = good[m // 2] if m % 2 else (good[m // 2 - 1] + good[m // 2]) / 2
    return {"median": med, "min": good[0], "max": good[-1],
            "rel_spread": (good[-1] - good[0]) / med if med else None, "n": m,
            "left_out": len(xs) - m}


def measure(backend, workload: str, mode: str, case: Dict[str, Any], *, keep: bool = True) -> Dict[str, Any]:
    """A throughput case: ``case["repeats"]`` samples of :func:`run_threads`, each with the
    case's floor; the result is the last sample's (outputs and counts) with ``ops_per_s``
    and ``samples_per_s`` the median of the samples that met the floor, every sample's
    rate in ``repeat_ops_per_s``, and the spread in ``ops_per_s_spread``."""
    repeats = int(case.get("repeats") or 1)
    floor = float(case.get("min_sample_s") or 0.0)
    min_requests = case.get("min_requests")
    rates, srates, shorts, lat, rs = [], [], 0, [], None
    for k in range(repeats):
        rs = run_threads(backend, workload, mode, case["threads"], batch=case.get("batch", 1),
                         iterations=case.get("iterations"), duration=case.get("duration"),
                         keep=keep, rows=case.get("rows"), shared_model=bool(case.get("shared_model")),
                         min_sample_s=floor, min_requests=min_requests)
        if rs["errors"]:
            break
        v = mark_short(dict(rs), floor, min_requests)
        shorts += bool(v["short_sample"])
        rates.append(v["ops_per_s"])
        srates.append(v["samples_per_s"])
        lat.append((rs["latency_mean_ms"], rs["latency_p50_ms"], rs["latency_p99_ms"]))
    out = dict(rs)
    out["repeats"] = len(rates)
    out["repeat_ops_per_s"] = rates
    out["ops_per_s_spread"] = spread(rates)
    out["ops_per_s"] = out["ops_per_s_spread"]["median"]
    out["samples_per_s"] = spread(srates)["median"]
    out["short_samples"] = shorts
    out["short_sample"] = bool(rates) and shorts == len(rates)
    out["min_sample_s"], out["min_requests"] = floor, min_requests
    if lat:  # the latency of the median sample's neighbourhood: each figure's median
        for j, key in enumerate(("latency_mean_ms", "latency_p50_ms", "latency_p99_ms")):
            out[key] = sorted(x[j] for x in lat)[len(lat) // 2]
    return out


def public(result: Dict[str, Any]) -> Dict[str, Any]:
    """``result`` without its private (non-JSON) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


_warmed = set()


def warm_up(backend, workload: str, batch: int = 1, rows: Optional[int] = None) -> None:
    """One unmeasured request (builds the model, allocates, compiles kernels)."""
    key = (workload, batch, rows)
    if key not in _warmed:
        with backend.worker("off"):
            backend.run(workload, backend.make_input(workload, batch=batch, seed=0, rows=rows))
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
    if r["expected"] is not None and r["completed"] < r["expected"]:
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
            if v.get("expected") and v.get("repeats"):
                what = "passed %s ops (>= %s)" % (v.get("completed"), v.get("expected"))
            elif v.get("expected"):
                what = "passed %s/%s ops" % (v.get("completed"), v.get("expected"))
            if v.get("ops_per_s"):
                what += ", %.1f ops/s" % v["ops_per_s"]
                sp = v.get("ops_per_s_spread") or {}
                if sp.get("n", 0) > 1 and sp.get("rel_spread") is not None:
                    what += " (median of %d samples, spread %.0f%%)" % (sp["n"], 100 * sp["rel_spread"])
            elif v.get("short_sample"):
                what += ", SHORT sample (under the %.2g s floor): no rate" % (v.get("min_sample_s") or 0)
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
              backend_options: Optional[Dict[str, Any]] = None,
              notes: Sequence[str] = ()) -> Report:
    """Run every mode's cases in child processes (mode by mode) with the suite's runner
    target ``target`` (a module-level function of one case) and return the report."""
    prog = make_progress(suite, progress, Progress)  # lines, or a bar in Jupyter
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
    report.notes.extend(notes)
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
    getattr(prog, "close", lambda: None)()
    report.finish()
    return report
