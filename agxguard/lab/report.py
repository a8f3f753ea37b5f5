"""The suites' report: every raw figure, the tradeoff table, JSON and a plot.

A :class:`Report` holds one result per case (a runner record plus its labels: mode,
chapter, workload, threads, batch). Its ``repr`` is the readable tradeoff table; in
Jupyter it renders as an HTML table with the tradeoff plot inline (when matplotlib is
installed; the plot is :mod:`agxguard.lab.tradeoff`), and ``to_frame()`` gives a pandas
DataFrame (when pandas is installed).
``save()`` writes the JSON atomically, so a report file on disk is always complete up to
the last settled run, even when children crash.
"""
from __future__ import annotations

import base64
import datetime
import json
import os
import platform
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional

import tempfile

from .._runner import CRASHES, CaseRecord
from . import claims as _claims

SCHEMA = "agxguard.report/2"  # 2: each attempt's "outcome" (was "status"), suite "story" (was "complete_story")
MODEL_NOTE = ("device 'model' is agxguard's driver model, a Metal-shaped test double in C run on "
              "this machine's CPU: its figures are driver-model figures, not Apple GPU figures")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """JSON form of :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def summarize(records: Iterable[CaseRecord]) -> Dict[str, Any]:
    """Runner records in short: runs, crashes by outcome, raw pass rate and pass rate
    after retries."""
    records = list(records)
    n = len(records)
    crashes = {k: 0 for k in CRASHES}
    failures = 0
    exit_crashes = 0
    for r in records:
        for k, v in r.crashes.items():
            crashes[k] += v
        failures += sum(1 for a in r.attempts if a.outcome == "failed")
        exit_crashes += sum(1 for a in r.attempts if a.child_exit)
    return {
        "runs": n,
        "attempts": sum(len(r.attempts) for r in records),
        "crashes": crashes,
        "failures": failures,
        "crashes_after_last_case": exit_crashes,
        "raw_passed": sum(r.raw_passed for r in records),
        "passed": sum(r.passed for r in records),
        "raw_pass_rate": (sum(r.raw_passed for r in records) / n) if n else None,
        "pass_rate_after_retries": (sum(r.passed for r in records) / n) if n else None,
    }


def machine_info() -> Dict[str, Any]:
    """What the parent process can say about this machine without importing torch."""
    info = {
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }
    try:
        from importlib import metadata
        for dist in ("torch", "agxguard"):
            try:
                info[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    except ImportError:  # pragma: no cover - Python < 3.8
        pass
    if "torch" in sys.modules:
        info["torch"] = getattr(sys.modules["torch"], "__version__", info.get("torch"))
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else "%.0f%%" % (100.0 * x)


def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 1000:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


class Report:
    """Results of one suite run: options, machine, and one entry per case."""

    def __init__(self, suite: str, device: str, modes: Iterable[str],
                 options: Optional[Dict[str, Any]] = None,
                 machine: Optional[Dict[str, Any]] = None, path: Optional[str] = None):
        self.suite = suite
        self.device = device
        self.modes = list(modes)
        self.options = dict(options or {})
        self.machine = machine if machine is not None else machine_info()
        self.path = path
        self.notes: List[str] = [MODEL_NOTE] if device == "model" else []
        self.started = _now()
        self.finished: Optional[str] = None
        self.crash_reports_new: Optional[int] = None
        self.plot_path: Optional[str] = None
        self._results: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()

    # -- building -------------------------------------------------------------------

    @staticmethod
    def case_id(case: Dict[str, Any]) -> str:
        return case.get("id") or json.dumps(case, sort_keys=True)

    def record(self, rec: CaseRecord, save: bool = True) -> Dict[str, Any]:
        """Add or update the entry of ``rec``'s case; write the file if the report has a path."""
        entry = rec.to_dict()
        case = entry.pop("case")
        entry = dict(case, **entry)
        self._results[self.case_id(case)] = entry
        if save and self.path:
            self.save()
        return entry

    @property
    def results(self) -> List[Dict[str, Any]]:
        return list(self._results.values())

    def finish(self) -> "Report":
        self.finished = _now()
        if self.path:
            self.save()
        return self

    # -- figures --------------------------------------------------------------------

    def results_for(self, mode: Optional[str] = None, chapter: Optional[str] = None):
        return [r for r in self._results.values()
                if (mode is None or r.get("mode") == mode)
                and (chapter is None or r.get("chapter") == chapter)]

    def scaling(self, mode: str) -> "OrderedDict[tuple, Dict[int, Dict[str, Optional[float]]]]":
        """Per (chapter, workload, batch): threads -> ops/s, speedup and efficiency.

        Efficiency is speedup / threads, the speedup over the same mode's 1-thread run.
        """
        groups: "OrderedDict[tuple, Dict[int, Dict[str, Optional[float]]]]" = OrderedDict()
        for r in self.results_for(mode):
            v = r.get("value")
            if not r.get("scaling") or not isinstance(v, dict):
                continue
            key = (r.get("chapter"), r.get("workload"), r.get("batch", 1))
            rate = v.get("ops_per_s") if r.get("passed") else None
            groups.setdefault(key, {})[int(r["threads"])] = {"ops_per_s": rate}
        for per_threads in groups.values():
            base = (per_threads.get(1) or {}).get("ops_per_s")
            for n, fig in per_threads.items():
                rate = fig["ops_per_s"]
                if base and rate is not None:
                    fig["speedup"] = rate / base
                    fig["efficiency"] = rate / base / n
                else:
                    fig["speedup"] = fig["efficiency"] = None
        return groups

    def summary(self) -> "OrderedDict[str, Dict[str, Any]]":
        """Per mode: runs, crashes by kind, failures, raw and after-retry pass rates, scaling."""
        out: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        for mode in self.modes:
            rs = self.results_for(mode)
            n = len(rs)
            crashes = {k: sum(r["crashes"].get(k, 0) for r in rs) for k in CRASHES}
            out[mode] = {
                "runs": n,
                "attempts": sum(len(r["attempts"]) for r in rs),
                "crashes": crashes,
                "failures": sum(1 for r in rs for a in r["attempts"] if a["outcome"] == "failed"),
                "raw_pass_rate": (sum(bool(r["raw_passed"]) for r in rs) / n) if n else None,
                "pass_rate_after_retries": (sum(bool(r["passed"]) for r in rs) / n) if n else None,
                "scaling": [
                    {"chapter": k[0], "workload": k[1], "batch": k[2],
                     "threads": {str(t): f for t, f in sorted(v.items())}}
                    for k, v in self.scaling(mode).items()
                ],
                # the seeds' claims: [{name, source, expected, measured, passed}], passed
                # None where not measured (agxguard.lab.claims)
                "claims": _claims.evaluate(self.suite, rs),
            }
        return out

    def thread_counts(self) -> List[int]:
        return sorted({int(r["threads"]) for r in self._results.values()
                       if r.get("scaling") and r.get("threads") is not None})

    # -- output ---------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA,
            "suite": self.suite,
            "device": self.device,
            "notes": self.notes,
            "modes": self.modes,
            "options": self.options,
            "machine": self.machine,
            "started": self.started,
            "finished": self.finished,
            "complete": self.finished is not None,
            "crash_reports_new": self.crash_reports_new,
            "plot": self.plot_path,
            "summary": self.summary(),
            "results": self.results,
        }

    def to_json(self, path: Optional[str] = None) -> str:
        """The report as JSON text; also written (atomically) to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        if path:
            atomic_write_text(path, text)
        return text

    def save(self, path: Optional[str] = None) -> str:
        """Write the JSON atomically to ``path`` (default: the report's path); return the path."""
        path = path or self.path
        if not path:
            raise ValueError("no path to save the report to")
        self.to_json(path)
        return path

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Report":
        rep = cls(data["suite"], data["device"], data["modes"], data.get("options"),
                  machine=data.get("machine") or {})
        rep.notes = list(data.get("notes") or [])
        rep.started = data.get("started")
        rep.finished = data.get("finished")
        rep.crash_reports_new = data.get("crash_reports_new")
        rep.plot_path = data.get("plot")
        for r in data.get("results", []):
            rep._results[r.get("id") or json.dumps(r, sort_keys=True)] = r
        return rep

    @classmethod
    def load(cls, path: str) -> "Report":
        """The report saved at ``path`` (also :func:`agxguard.lab.load_report`)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def header(self) -> str:
        m = self.machine
        bits = [m.get("platform") or m.get("system") or "?"]
        if m.get("cpu_count"):
            bits.append("%s CPUs" % m["cpu_count"])
        if m.get("device_name"):
            bits.append(str(m["device_name"]))
        if m.get("torch"):
            bits.append("torch %s" % m["torch"])
        bits.append("Python %s" % m.get("python", "?"))
        return "agxguard %s on device %s (%s)" % (self.suite, self.device, ", ".join(bits))

    def rows(self) -> List[List[str]]:
        """The tradeoff table: header row then one row per mode (and scaling group)."""
        threads = self.thread_counts()
        head = ["mode", "runs", "crashes sig/abort/hang", "failed", "raw pass", "pass after retry",
                "workload"] + ["ops/s @%d" % t for t in threads] + ["eff @%d" % t for t in threads if t > 1]
        rows = [head]
        for mode, s in self.summary().items():
            base = [mode, str(s["runs"]),
                    "/".join(str(s["crashes"][k]) for k in CRASHES), str(s["failures"]),
                    _pct(s["raw_pass_rate"]), _pct(s["pass_rate_after_retries"])]
            groups = s["scaling"] or [None]
            for i, g in enumerate(groups):
                row = list(base) if i == 0 else [""] * len(base)
                if g is None:
                    row += ["-"] + ["-"] * (2 * len(threads) - (1 if 1 in threads else 0))
                else:
                    label = g["workload"] or "?"
                    if g.get("batch", 1) != 1:
                        label += " b%s" % g["batch"]
                    row.append(label)
                    figs = g["threads"]
                    row += [_num((figs.get(str(t)) or {}).get("ops_per_s")) for t in threads]
                    row += [_pct((figs.get(str(t)) or {}).get("efficiency")) for t in threads if t > 1]
                rows.append(row)
        return rows

    def findings(self) -> List[str]:
        """One line per mode and chapter: runs passed, ops completed, max diff, batching
        samples/s, and every run that did not pass, named with what happened."""
        lines = []
        for mode in self.modes:
            by_chapter: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
            for r in self.results_for(mode):
                by_chapter.setdefault(r.get("chapter") or "?", []).append(r)
            for chapter, rs in by_chapter.items():
                lines.append("%-7s %-14s %s" % (mode, chapter, _chapter_finding(chapter, rs)))
        return lines

    def table(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        fmt = lambda r: "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
        out = [self.header()]
        out += ["note: " + n for n in self.notes]
        out.append(fmt(rows[0]))
        out.append("  ".join("-" * w for w in widths))
        out += [fmt(r) for r in rows[1:]]
        found = self.findings()
        if found:
            out.append("")
            out += found
        claimed = _claims.lines(self) + self.claim_lines()
        if claimed:
            out.append("")
            out += claimed
        if self.crash_reports_new is not None:
            out.append("new macOS crash reports during the run: %d" % self.crash_reports_new)
        if not self.finished:
            out.append("(incomplete: the run has not finished)")
        return "\n".join(out)

    def __repr__(self) -> str:
        return self.table()

    __str__ = __repr__

    # -- plot -----------------------------------------------------------------------

    def plot(self, path: Optional[str] = None) -> Optional[str]:
        """PNG of the tradeoff (see :mod:`agxguard.lab.tradeoff`): efficiency at the
        highest thread count against crash rate per mode, and efficiency against threads.

        Returns the path written, or None when matplotlib is not installed (or there is
        nothing to plot). ``path`` defaults to the JSON path with ``.png`` (the JSON's folder).
        """
        png = self._plot_png()
        if png is None:
            return None
        if path is None:
            if not self.path:
                raise ValueError("no path for the plot")
            path = os.path.splitext(self.path)[0] + ".png"
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
        self.plot_path = path
        return path

    def _plot_png(self) -> Optional[bytes]:
        from . import tradeoff
        return tradeoff.png(self)

    def tradeoff(self) -> "OrderedDict[str, Dict[str, Any]]":
        """Per mode, the figures the tradeoff plot draws: crash rates (raw and after
        retries), efficiency at the highest thread count, the efficiency curves, and the
        thread counts with no throughput (see :func:`agxguard.lab.tradeoff.points`)."""
        from . import tradeoff
        return tradeoff.points(self)

    def figure(self):
        """The tradeoff plot as a matplotlib ``Figure`` (needs matplotlib)."""
        from . import tradeoff
        return tradeoff.figure(self)

    # -- claims and tables for notebooks ---------------------------------------------

    def claims(self) -> List[Dict[str, Any]]:
        """Every claim the suites checked (a result's ``claims`` list, or its value's),
        one dict per claim with the mode, chapter, workload and threads of its result."""
        out = []
        for mode in self.modes:  # the seeds' claims, evaluated per mode (claims.py)
            for c in _claims.evaluate(self.suite, self.results_for(mode)):
                out.append(dict({"mode": mode}, **c))
        return out + self._carried_claims()

    def _carried_claims(self) -> List[Dict[str, Any]]:
        """Claims a result carries itself (a suite's own checks), with where it ran."""
        out = []
        for r in self._results.values():
            value = r.get("value") if isinstance(r.get("value"), dict) else {}
            for c in (r.get("claims") or value.get("claims") or []):
                if isinstance(c, dict):
                    out.append(dict({"mode": r.get("mode"), "chapter": r.get("chapter"),
                                     "workload": r.get("workload"), "threads": r.get("threads")}, **c))
        return out

    def claim_lines(self) -> List[str]:
        """The claims results carry, as lines: a claim that did not hold reads FAILED,
        never passed (the seeds' claims per mode are claims.lines')."""
        lines = []
        for c in self._carried_claims():
            where = " ".join(str(x) for x in (c.get("mode"), c.get("chapter")) if x)
            lines.append("%-6s %s %s: expected %s, measured %s" % (
                "passed" if c.get("passed") is True else "FAILED", where, c.get("name", "?"),
                _show(c.get("expected")), _show(c.get("measured"))))
        return lines

    FRAMES = ("results", "summary", "claims")

    def frame_rows(self, what: str = "results") -> List[Dict[str, Any]]:
        """The rows of :meth:`to_frame` as plain dicts (no pandas needed)."""
        if what not in self.FRAMES:
            raise ValueError("bad frame %r; allowed: %s" % (what, ", ".join(self.FRAMES)))
        if what == "claims":
            return self.claims()
        if what == "summary":
            pts = self.tradeoff()
            rows = []
            for mode, s in self.summary().items():
                row = {"mode": mode, "runs": s["runs"], "attempts": s["attempts"]}
                row.update({"crashes_" + k: v for k, v in s["crashes"].items()})
                row.update(failures=s["failures"], raw_pass_rate=s["raw_pass_rate"],
                           pass_rate_after_retries=s["pass_rate_after_retries"],
                           crash_rate_raw=pts[mode]["crash_rate_raw"],
                           crash_rate_after_retries=pts[mode]["crash_rate_after_retries"],
                           top_threads=pts[mode]["top_threads"],
                           efficiency_at_top=pts[mode]["efficiency"])
                rows.append(row)
            return rows
        scaling = {}
        for mode in self.modes:
            for key, per_threads in self.scaling(mode).items():
                for t, fig in per_threads.items():
                    scaling[(mode,) + key + (t,)] = fig
        rows = []
        for r in self._results.values():
            row: Dict[str, Any] = {}
            for k in ("mode", "chapter", "workload", "threads", "batch", "iterations", "duration"):
                row[k] = r.get(k)
            attempts = r.get("attempts") or []
            row.update(passed=r.get("passed"), raw_passed=r.get("raw_passed"),
                       outcome=r.get("outcome"), attempts=len(attempts),
                       outcomes=",".join(str(a.get("outcome")) for a in attempts),
                       crashes=sum((r.get("crashes") or {}).values()))
            fig = scaling.get((r.get("mode"), r.get("chapter"), r.get("workload"), r.get("batch", 1),
                               int(r["threads"]) if r.get("threads") is not None else None))
            if r.get("scaling") and fig is not None:
                row.update(speedup=fig.get("speedup"), efficiency=fig.get("efficiency"))
            value = r.get("value") if isinstance(r.get("value"), dict) else {}
            for k, v in value.items():
                if k in row or k.startswith("_") or k in ("lock_stats", "errors", "claims"):
                    continue
                if isinstance(v, dict):  # one level of nesting: spread figures and the like
                    for k2, v2 in v.items():
                        if isinstance(v2, (int, float, str, bool)) or v2 is None:
                            row["%s.%s" % (k, k2)] = v2
                elif isinstance(v, (int, float, str, bool)) or v is None:
                    row[k] = v
            claims = r.get("claims") or value.get("claims") or []
            if claims:
                row["claims_failed"] = sum(1 for c in claims if c.get("passed") is not True)
            rows.append(row)
        return rows

    def to_frame(self, what: str = "results"):
        """A pandas DataFrame: ``"results"`` (default) one row per run with its labels,
        outcome, attempts, crashes, efficiency and every figure of its value (nested
        dicts one level deep as ``key.sub``); ``"summary"`` one row per mode; ``"claims"``
        one row per checked claim. Needs pandas, which agxguard does not depend on."""
        rows = self.frame_rows(what)
        try:
            import pandas
        except ImportError as exc:
            raise ImportError("Report.to_frame() needs pandas, which is not installed here "
                              "(pip install pandas); agxguard does not depend on it. "
                              "Report.frame_rows(%r) gives the same rows as dicts." % what) from exc
        return pandas.DataFrame(rows)

    def _repr_html_(self) -> str:
        import html
        rows = self.rows()
        parts = ["<div><p><b>%s</b></p>" % html.escape(self.header())]
        for n in self.notes:
            parts.append("<p><i>%s</i></p>" % html.escape(n))
        parts.append("<table><thead><tr>%s</tr></thead><tbody>" %
                     "".join("<th>%s</th>" % html.escape(c) for c in rows[0]))
        for r in rows[1:]:
            parts.append("<tr>%s</tr>" % "".join("<td>%s</td>" % html.escape(c) for c in r))
        parts.append("</tbody></table>")
        found = self.findings()
        if found:
            parts.append("<pre>%s</pre>" % html.escape("\n".join(found)))
        claims = self.claim_lines()
        if claims:
            parts.append("<p><b>claims</b></p><pre>%s</pre>" % html.escape("\n".join(claims)))
        png = self._plot_png()
        if png is not None:
            parts.append('<img src="data:image/png;base64,%s"/>' % base64.b64encode(png).decode())
        parts.append("</div>")
        return "".join(parts)


def load_report(path: str) -> Report:
    """The :class:`Report` saved at ``path`` (a suite's ``--json`` file)."""
    return Report.load(path)


def _show(x: Any) -> str:
    if isinstance(x, float):
        return "%.3g" % x
    return str(x)


def _label(r: Dict[str, Any]) -> str:
    bits = [str(r["workload"])] if r.get("workload") else []
    if r.get("threads") is not None:
        bits.append("%sx" % r["threads"] + ("b%s" % r["batch"] if r.get("batch", 1) != 1 else ""))
    return " ".join(bits)


def _chapter_finding(chapter: str, rs: List[Dict[str, Any]]) -> str:
    """What one chapter of one mode found, in a line."""
    values = [r["value"] for r in rs if isinstance(r.get("value"), dict)]
    parts = ["%d/%d runs passed" % (sum(bool(r.get("passed")) for r in rs), len(rs))]
    done = [v for v in values if v.get("expected")]
    if done:
        parts.append("%d/%d ops completed" % (sum(v.get("completed") or 0 for v in done),
                                              sum(v["expected"] for v in done)))
    diffs = [v["max_abs_diff"] for v in values if v.get("max_abs_diff") is not None]
    if diffs:
        parts.append("max abs diff %.2g" % max(diffs))
    if chapter == "batching":
        parts.append(", ".join("%sx b%s %s samples/s" % (r.get("threads"), r.get("batch", 1),
                                                       _num(r["value"].get("samples_per_s")))
                               for r in rs if r.get("passed") and isinstance(r.get("value"), dict)))
    retried = sum(max(0, len(r.get("attempts") or []) - 1) for r in rs)
    if retried:
        parts.append("%d retries" % retried)
    bad = []
    for r in rs:
        for a in r.get("attempts") or []:
            if a.get("outcome") != "passed":
                what = a.get("signal") if a.get("outcome") == "signal" else a.get("outcome")
                bad.append("%s %s" % (_label(r), what.upper() if what else "?"))
    if bad:
        shown = sorted(set(bad), key=bad.index)
        parts.append("not passed: " + ", ".join(shown[:6]) + (" ..." if len(shown) > 6 else ""))
    return "; ".join(p for p in parts if p)
