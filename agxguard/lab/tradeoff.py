"""The tradeoff in one picture: what each mode buys (fewer crashes) and what it costs
(efficiency), for a suite report.

:func:`points` computes, from a report's results, every figure the picture draws, per
mode, with no plotting library: the tests check the picture through it.
:func:`figure` draws it with matplotlib (optional) in two panels:

1. per mode, efficiency at the highest thread count against crash rate, the rate of
   runs whose first attempt crashed (hollow marker) and of runs still crashed after
   retries (filled marker, joined to the hollow one). A mode without an efficiency
   figure at that thread count (its runs crashed or failed) is drawn on a "no
   throughput" band below zero, so every mode stays visible even at 100% crashes;
2. efficiency against threads per mode (and workload), on thread ticks labelled
   1, 2, 4, 8; a thread count whose run gave no throughput is marked on the same band.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional

from .._runner import CRASHES

# one colour and marker per mode, the same in both panels and every report
STYLE = {"off": ("#d62728", "o"), "op": ("#ff7f0e", "s"),
         "stream": ("#1f77b4", "^"), "global": ("#2ca02c", "D")}
BAND = 0.11  # the "no throughput" band sits this share of the y range below zero


def _crashed(attempt: Dict[str, Any]) -> bool:
    return attempt.get("outcome") in CRASHES


def _label(group: Dict[str, Any]) -> str:
    label = str(group.get("workload") or "?")
    if group.get("batch", 1) != 1:
        label += " b%s" % group["batch"]
    return label


def points(report) -> "OrderedDict[str, Dict[str, Any]]":
    """Per mode (in the report's order), what the tradeoff figure plots.

    Each entry: ``runs``; ``crash_rate_raw`` (runs whose first attempt crashed, as a
    fraction of runs) and ``crash_rate_after_retries`` (runs with no passing attempt whose
    last attempt crashed); ``top_threads``, the highest thread count of the scaling
    chapters; ``efficiency_at_top`` and ``ops_per_s_at_top`` per workload label (None
    where that run gave no figure); ``efficiency`` (the mean over workloads of the figures
    at ``top_threads``, or None) and ``efficiency_range`` (min, max); ``has_throughput``;
    ``curves``: per workload label, the (threads, efficiency) points; and
    ``no_throughput_at``: per workload label, the thread counts whose run gave no
    throughput. Rates are None for a mode with no runs.
    """
    threads = report.thread_counts()
    top = max(threads) if threads else None
    summary = report.summary()
    out: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for mode in report.modes:
        rs = report.results_for(mode)
        n = len(rs)
        raw = sum(1 for r in rs if r.get("attempts") and _crashed(r["attempts"][0]))
        after = sum(1 for r in rs if r.get("attempts") and not r.get("passed")
                    and _crashed(r["attempts"][-1]))
        ran: "OrderedDict[str, set]" = OrderedDict()  # label -> thread counts run
        for r in rs:
            if r.get("scaling") and r.get("threads") is not None:
                ran.setdefault(_label(r), set()).add(int(r["threads"]))
        groups = {_label(g): g for g in summary[mode]["scaling"]}
        curves: "OrderedDict[str, List[tuple]]" = OrderedDict()
        missing: "OrderedDict[str, List[int]]" = OrderedDict()
        eff_top: "OrderedDict[str, Optional[float]]" = OrderedDict()
        ops_top: "OrderedDict[str, Optional[float]]" = OrderedDict()
        for label in list(ran) + [g for g in groups if g not in ran]:
            g = groups.get(label) or {"threads": {}}
            figs = dict((int(t), f) for t, f in g["threads"].items())
            curves[label] = [(t, figs[t]["efficiency"]) for t in sorted(figs)
                             if figs[t].get("efficiency") is not None]
            missing[label] = sorted(t for t in ran.get(label, set()) | set(figs)
                                    if (figs.get(t) or {}).get("ops_per_s") is None)
            at_top = figs.get(top) or {}
            eff_top[label] = at_top.get("efficiency")
            ops_top[label] = at_top.get("ops_per_s")
        effs = [e for e in eff_top.values() if e is not None]
        out[mode] = {
            "runs": n,
            "crash_rate_raw": raw / n if n else None,
            "crash_rate_after_retries": after / n if n else None,
            "top_threads": top,
            "efficiency_at_top": eff_top,
            "ops_per_s_at_top": ops_top,
            "efficiency": sum(effs) / len(effs) if effs else None,
            "efficiency_range": (min(effs), max(effs)) if effs else None,
            "has_throughput": bool(effs),
            "curves": curves,
            "no_throughput_at": missing,
        }
    return out


def figure(report):
    """The two-panel tradeoff figure of ``report`` as a matplotlib ``Figure`` (no pyplot,
    so no GUI backend is touched). Raises ImportError when matplotlib is not installed."""
    from matplotlib.figure import Figure

    pts = points(report)
    top = next((p["top_threads"] for p in pts.values()), None)
    fig = Figure(figsize=(11.5, 4.8))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    effs = [100 * e for p in pts.values() for c in p["curves"].values() for _, e in c]
    y_top = max([105.0] + [1.1 * e for e in effs])
    NO_THROUGHPUT_Y = -BAND * y_top
    for ax in (ax1, ax2):
        ax.axhspan(1.5 * NO_THROUGHPUT_Y, 0.5 * NO_THROUGHPUT_Y, color="0.92", zorder=0)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylim(1.65 * NO_THROUGHPUT_Y, y_top)
        ax.grid(True, alpha=0.3)
    band = "no throughput" + (" @%d" % top if top else "")

    # panel 1: efficiency at the top thread count against crash rate
    for i, (mode, p) in enumerate(pts.items()):
        color, marker = STYLE.get(mode, ("0.3", "o"))
        if p["runs"] == 0:
            continue
        x_raw, x_after = 100 * p["crash_rate_raw"], 100 * p["crash_rate_after_retries"]
        y = 100 * p["efficiency"] if p["has_throughput"] else NO_THROUGHPUT_Y
        if p["efficiency_range"] and p["efficiency_range"][0] != p["efficiency_range"][1]:
            lo, hi = (100 * v for v in p["efficiency_range"])
            ax1.plot([x_after, x_after], [lo, hi], color=color, lw=1, alpha=0.6)
        ax1.plot([x_raw, x_after], [y, y], color=color, lw=1.2, alpha=0.7)
        ms = max(5.0, 13.0 - 2.5 * i)  # later modes smaller: coinciding points stay visible
        ax1.plot([x_raw], [y], marker=marker, ms=ms, mfc="none", mec=color, mew=1.8, ls="none")
        ax1.plot([x_after], [y], marker=marker if p["has_throughput"] else "X", ms=ms,
                 color=color, ls="none", label=mode, alpha=0.9)
        text = mode if p["has_throughput"] else "%s: %s" % (mode, band)
        ax1.annotate(text, (x_after, y), xytext=(8, 6 + 11 * (i % 2) - (0 if p["has_throughput"] else 12)),
                     textcoords="offset points", fontsize=8.5, color=color)
    ax1.set_xlim(-6, 106)
    ax1.set_xlabel("crash rate, % of runs (hollow: first attempt, filled: after retries)")
    ax1.set_ylabel("efficiency at %s threads (%%)" % (top if top else "the most"))
    ax1.text(0.01, (NO_THROUGHPUT_Y - ax1.get_ylim()[0]) / (ax1.get_ylim()[1] - ax1.get_ylim()[0]),
             band, transform=ax1.transAxes, fontsize=7.5, color="0.35", va="center")
    ax1.set_title("what each mode buys and costs", fontsize=10)
    ax1.legend(fontsize="small", loc="upper right")

    # panel 2: efficiency against threads
    workloads = {label for p in pts.values() for label in p["curves"]}
    threads = report.thread_counts()
    for i, (mode, p) in enumerate(pts.items()):
        color, marker = STYLE.get(mode, ("0.3", "o"))
        nudge = 2 ** (0.05 * (i - (len(pts) - 1) / 2))  # modes' X marks side by side
        drawn = False
        for j, (label, curve) in enumerate(p["curves"].items()):
            name = mode if len(workloads) <= 1 else "%s / %s" % (mode, label)
            ls = ("-", "--", ":", "-.")[j % 4]
            if curve:
                ax2.plot([t for t, _ in curve], [100 * e for _, e in curve], marker=marker,
                         color=color, ls=ls, label=name)
                drawn = True
            gaps = p["no_throughput_at"].get(label) or []
            if gaps:
                ax2.plot([t * nudge for t in gaps], [NO_THROUGHPUT_Y] * len(gaps), marker="X", ms=9, color=color,
                         ls="none", label=None if curve else "%s (no throughput)" % name)
                drawn = True
        if not drawn:  # no scaling chapter ran for this mode: still in the legend
            ax2.plot([], [], marker=marker, color=color, ls="none", label="%s (no figures)" % mode)
    if threads:
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(threads)
        ax2.set_xticklabels([str(t) for t in threads])
        ax2.minorticks_off()
        ax2.set_xlim(min(threads) / 1.25, max(threads) * 1.25)
    ax2.set_xlabel("threads")
    ax2.set_ylabel("efficiency = speedup / threads (%)")
    ax2.set_title("efficiency against threads (X: no throughput)", fontsize=10)
    ax2.legend(fontsize="small" if len(workloads) <= 1 else "x-small", ncol=2 if len(workloads) > 1 else 1)

    title = "agxguard %s on %s" % (report.suite, report.device)
    if report.device == "model":
        title += " (driver model, not Apple GPU)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def png(report, dpi: int = 110) -> Optional[bytes]:
    """The figure as PNG bytes; None when matplotlib is not installed or the report has
    no runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    if not report.results:
        return None
    import io
    fig = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
