"""The seeds' claims, evaluated on a suite's results, mode by mode.

The seed project's suites end in verdicts: complete_story_test_suite.py checks that
efficiency at 8 threads is under 50% and that batching beats 8 threads;
test_mps_parallel_story.py asserts ranges (5% <= efficiency@8 <= 60%, efficiency falls
with threads, batching >= 2x threading, batch-8 efficiency > 50%);
comprehensive_test_suite.py calls a workload's scaling a PASS when its best speedup over
1 thread is at least 1.0x. Here each becomes a record ::

    {"name", "source", "expected", "measured", "passed"}

``passed`` is True, False, or None when the figures it needs were not measured (a
chapter not run, a run that did not pass, a sample under the floor): a claim is never
counted as passed without its figures. :func:`evaluate` takes one mode's results as the
report holds them; :func:`lines` renders a report's claims as text.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

__all__ = ["evaluate", "lines", "verdict"]

STORY = "complete_story_test_suite.py"
STORY_TEST = "test_mps_parallel_story.py"
COMPREHENSIVE = "comprehensive_test_suite.py"
SEED_BATCHING_RATIO = 3.9  # batched / threaded samples/s, as the seeds measured it


def verdict(passed: Optional[bool]) -> str:
    """PASSED, FAILED or NOT MEASURED."""
    return "NOT MEASURED" if passed is None else ("PASSED" if passed else "FAILED")


def _rate(rs: Iterable[Dict[str, Any]], chapter: str, threads: int, batch: int = 1,
          key: str = "ops_per_s", workload: Optional[str] = None) -> Optional[float]:
    """The figure ``key`` of the passed run (chapter, threads, batch[, workload]), or None."""
    for r in rs:
        if (r.get("chapter") == chapter and int(r.get("threads") or 0) == threads
                and int(r.get("batch") or 1) == batch
                and (workload is None or r.get("workload") == workload)):
            v = r.get("value")
            if r.get("passed") and isinstance(v, dict):
                return v.get(key)
    return None


def _claim(name: str, source: str, expected: str, measured: Optional[str],
           passed: Optional[bool]) -> Dict[str, Any]:
    return {"name": name, "source": source, "expected": expected,
            "measured": measured if measured is not None else "not measured",
            "passed": None if passed is None else bool(passed)}


def _pct(x: Optional[float]) -> Optional[str]:
    return None if x is None else "%.1f%%" % (100 * x)


def _story(rs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    base = _rate(rs, "efficiency", 1)
    eff = {}
    for n in (2, 4, 8):
        rate = _rate(rs, "efficiency", n)
        eff[n] = rate / base / n if (rate is not None and base) else None
    e8 = eff[8]
    out.append(_claim("efficiency at 8 threads below 50%", STORY, "efficiency@8 < 50%",
                      _pct(e8), None if e8 is None else e8 < 0.5))
    out.append(_claim("efficiency at 8 threads in the seeds' range", STORY_TEST,
                      "5% <= efficiency@8 <= 60%", _pct(e8),
                      None if e8 is None else 0.05 <= e8 <= 0.60))
    falls = None
    if None not in eff.values():
        falls = eff[2] < 1.0 and eff[4] < eff[2] and eff[8] < eff[4]
    out.append(_claim("efficiency falls with threads", STORY_TEST,
                      "efficiency@2 < 100%, @4 < @2, @8 < @4",
                      None if falls is None else "@2 %s, @4 %s, @8 %s" % (_pct(eff[2]), _pct(eff[4]), _pct(eff[8])),
                      falls))
    batched = _rate(rs, "batching", 1, 8, "samples_per_s")
    threaded = _rate(rs, "batching", 8, 1, "samples_per_s")
    single = _rate(rs, "batching", 1, 1, "samples_per_s")
    ratio = batched / threaded if (batched is not None and threaded) else None
    shown = None if ratio is None else "%.2fx (%.1f vs %.1f samples/s)" % (ratio, batched, threaded)
    out.append(_claim("batching beats 8 threads", STORY,
                      "1 thread x batch 8 > 8 threads x batch 1 in samples/s (seeds: %.1fx)"
                      % SEED_BATCHING_RATIO, shown, None if ratio is None else ratio > 1.0))
    out.append(_claim("batching at least 2x threading", STORY_TEST,
                      "1 thread x batch 8 >= 2 x (8 threads x batch 1) in samples/s", shown,
                      None if ratio is None else ratio >= 2.0))
    b8 = batched / single / 8 if (batched is not None and single) else None
    out.append(_claim("batch-8 efficiency above 50%", STORY_TEST,
                      "samples/s at batch 8 > 50% of 8 x samples/s at batch 1 (1 thread)",
                      _pct(b8), None if b8 is None else b8 > 0.5))
    return out


def _comprehensive(rs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    workloads = list(dict.fromkeys(r.get("workload") for r in rs if r.get("chapter") == "throughput"))
    for wl in workloads:
        threads = sorted({int(r["threads"]) for r in rs if r.get("chapter") == "throughput"
                          and r.get("workload") == wl})
        base = _rate(rs, "throughput", 1, workload=wl)
        speedups = {}
        for n in threads:
            rate = _rate(rs, "throughput", n, workload=wl)
            if rate is not None and base:
                speedups[n] = rate / base
        complete = bool(base) and len(speedups) == len(threads) and len(threads) > 1
        best = max(speedups, key=speedups.get) if complete else None
        out.append(_claim("%s scaling" % wl, COMPREHENSIVE,
                          "best speedup over 1 thread >= 1.00x, else WARN (as the seeds count it, "
                          "the best includes 1 thread at 1.00x)",
                          None if best is None else "%.2fx at %d threads" % (speedups[best], best),
                          None if best is None else speedups[best] >= 1.0))
    return out


def evaluate(suite: str, results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The seeds' claims for one mode's results (a report's entries of that mode)."""
    if suite == "story":
        return _story(results)
    if suite == "comprehensive":
        return _comprehensive(results)
    return []


def sample_line(mode: str, results: List[Dict[str, Any]]) -> Optional[str]:
    """One mode's throughput samples in a line: how many, the floor, the widest spread
    between repeats, and how many were under the floor (short: no rate reported)."""
    vs = [(r, r["value"]) for r in results
          if isinstance(r.get("value"), dict) and r["value"].get("ops_per_s_spread")]
    if not vs:
        return None
    widest = max(vs, key=lambda rv: rv[1]["ops_per_s_spread"].get("rel_spread") or 0.0)
    sp = widest[1]["ops_per_s_spread"].get("rel_spread")
    short = sum(v.get("short_samples") or 0 for _, v in vs)
    return "%-7s samples: %d runs x %s repeats, floor %.2g s; widest spread %s (%s %s %sx); %d short" % (
        mode, len(vs), max(v.get("repeats") or 0 for _, v in vs), widest[1].get("min_sample_s") or 0.0,
        "-" if sp is None else "%.0f%%" % (100 * sp), widest[0].get("chapter"), widest[0].get("workload"),
        widest[0].get("threads"), short)


def lines(report) -> List[str]:
    """Per mode, a line on its throughput samples, then one line per claim: the verdict,
    what was measured, what the seeds expect."""
    out = []
    for mode in report.modes:
        line = sample_line(mode, report.results_for(mode))
        if line:
            out.append(line)
        for c in evaluate(report.suite, report.results_for(mode)):
            out.append("%-7s claim %-12s %s: %s (expected %s; %s)" % (
                mode, verdict(c["passed"]), c["name"], c["measured"], c["expected"], c["source"]))
    return out
