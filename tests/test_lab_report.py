"""Issue 14, points 1, 7 (the CLI) and 8: the tradeoff picture, options checked before
torch is imported, and what a notebook needs (a DataFrame, ``load_report``, a progress bar)."""
import io
import json
import os
import subprocess
import sys
import types

import pytest

import agxguard
from agxguard import _runner as runner
from agxguard.lab import model
from agxguard.lab.report import Report
from agxguard.lab.suites import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = list(agxguard.MODES)
needs_model = pytest.mark.skipif(not model.available(),
                                 reason="driver model not built (no Objective-C runtime in this build)")
try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (pip install matplotlib)")


def _result(mode, chapter, threads, outcomes, ops=None, scaling=True, workload="w", claims=None):
    """One report entry as a suite writes it: ``outcomes`` are its attempts' outcomes."""
    passed = "passed" in outcomes
    value = {"threads": threads, "completed": 10, "expected": 10, "ops_per_s": ops,
             "spread": {"min": ops, "max": ops}} if passed else None
    if claims is not None and value is not None:
        value["claims"] = claims
    return {"id": "%s/%s/%s/%s" % (mode, chapter, workload, threads), "mode": mode,
            "chapter": chapter, "workload": workload, "threads": threads, "batch": 1,
            "scaling": scaling, "passed": passed, "raw_passed": outcomes[0] == "passed",
            "outcome": "passed" if passed else outcomes[-1],
            "crashes": {k: outcomes.count(k) for k in runner.CRASHES}, "value": value,
            "attempts": [{"outcome": o} for o in outcomes]}


def synthetic():
    """off crashes every run; op crashes above 1 thread; stream and global never."""
    rep = Report("story", "model", MODES, machine={})
    for mode in MODES:
        rep._results["%s/ts" % mode] = _result(mode, "thread_safety", 8,
                                                ["signal", "abort"] if mode in ("off", "op") else ["passed"],
                                                scaling=False)
        for t in (1, 2, 4, 8):
            if mode == "off" or (mode == "op" and t > 1):
                outcomes = ["signal", "signal"]
            elif mode == "stream" and t == 8:
                outcomes = ["signal", "passed"]  # crashed once, passed on the retry
            else:
                outcomes = ["passed"]
            rep._results["%s/eff/%d" % (mode, t)] = _result(mode, "efficiency", t, outcomes,
                                                              ops=100.0 * t ** 0.5)
    rep.finished = "now"
    return rep


# -- point 1: the tradeoff in one picture ------------------------------------------------

def test_tradeoff_points_keep_every_mode_with_raw_and_after_retry_crash_rates():
    pts = synthetic().tradeoff()
    assert list(pts) == MODES
    off, op, stream, glob = (pts[m] for m in MODES)
    assert off["crash_rate_raw"] == off["crash_rate_after_retries"] == 1.0
    assert off["has_throughput"] is False and off["efficiency"] is None
    assert off["no_throughput_at"] == {"w": [1, 2, 4, 8]} and off["curves"] == {"w": []}
    assert op["crash_rate_raw"] == pytest.approx(4 / 5) and op["curves"]["w"] == [(1, 1.0)]
    assert op["no_throughput_at"]["w"] == [2, 4, 8] and op["has_throughput"] is False
    # a crash that a retry got past counts raw, not after retries
    assert stream["crash_rate_raw"] == pytest.approx(1 / 5) and stream["crash_rate_after_retries"] == 0
    assert glob["crash_rate_raw"] == glob["crash_rate_after_retries"] == 0
    assert glob["top_threads"] == 8 and glob["efficiency"] == pytest.approx(8 ** 0.5 / 8)
    assert glob["ops_per_s_at_top"]["w"] == pytest.approx(100 * 8 ** 0.5)


@needs_mpl
def test_tradeoff_figure_draws_every_mode_and_linear_thread_labels():
    fig = synthetic().figure()
    ax1, ax2 = fig.axes[:2]
    for ax in (ax1, ax2):
        labels = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert all(m in labels for m in MODES), labels
    # the off point sits at 100% crashes on the no-throughput band, with its label
    texts = [t.get_text() for t in ax1.texts]
    assert any(t.startswith("off: no throughput") for t in texts), texts
    off_points = [ln.get_xydata().tolist() for ln in ax1.lines if ln.get_label() == "off"]
    assert off_points and off_points[0][0][0] == 100.0 and off_points[0][0][1] < 0
    fig.canvas.draw()
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["1", "2", "4", "8"]


@needs_model
def test_story_on_the_model_plots_all_four_modes_off_and_op_crashing(tmp_path):
    """The acceptance check of issue 14 through the figure's data, and the PNG written."""
    path = str(tmp_path / "story_model.json")
    from agxguard.lab import story
    report = story("model", "all", threads="1,8", iterations=20, retries=1,
                   chapter="thread_safety,efficiency", json_path=path, progress=None)
    pts = report.tradeoff()
    assert list(pts) == MODES
    assert pts["off"]["crash_rate_raw"] > 0 and pts["op"]["crash_rate_raw"] > 0, report
    assert pts["stream"]["crash_rate_after_retries"] == pts["global"]["crash_rate_after_retries"] == 0
    assert pts["stream"]["crash_rate_raw"] == pts["global"]["crash_rate_raw"] == 0, report
    assert pts["global"]["has_throughput"] and pts["stream"]["has_throughput"]
    loaded = Report.load(path).tradeoff()
    assert {m: loaded[m]["crash_rate_raw"] for m in MODES} == {m: pts[m]["crash_rate_raw"] for m in MODES}
    if HAVE_MPL:
        png = os.path.splitext(path)[0] + ".png"
        assert report.plot_path == png and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert 'src="data:image/png;base64,' in report._repr_html_()


def test_claims_are_shown_and_a_failed_claim_reads_failed():
    rep = Report("story", "cpu", ["global"], machine={})
    claims = [{"name": "efficiency@8 < 50%", "expected": "< 0.5", "measured": 0.31, "passed": True},
              {"name": "batching beats 8 threads", "expected": ">= 2x", "measured": 0.57, "passed": False}]
    rep._results["x"] = _result("global", "batching", 8, ["passed"], ops=5.0, scaling=False, claims=claims)
    text = repr(rep)
    assert "passed global batching efficiency@8 < 50%: expected < 0.5, measured 0.31" in text
    assert "FAILED global batching batching beats 8 threads: expected >= 2x, measured 0.57" in text
    assert "FAILED" in rep._repr_html_()
    carried = [c for c in rep.frame_rows("claims") if c.get("chapter") == "batching"]
    assert [c["passed"] for c in carried] == [True, False]
    assert all(c["passed"] is not True for c in rep.frame_rows("claims") if "chapter" not in c)  # not measured


# -- point 7: bad options rejected before torch is imported ---------------------------------

CHILD = r"""
import json, sys
import agxguard.lab.__main__ as cli
out = []
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args)
        out.append([args, "ran", "torch" in sys.modules])
    except SystemExit as exc:
        out.append([args, exc.code, "torch" in sys.modules])
print(json.dumps(out))
"""


def test_cli_rejects_bad_options_before_importing_torch(tmp_path):
    bad = [["story", "--mode", "turbo"], ["story", "--threads", "1,zero"],
           ["story", "--retries", "-1"], ["story", "--iterations", "0"],
           ["story", "--duration", "x"], ["comprehensive", "--chapter", "speed"],
           ["story", "--device", "tpu"], ["story", "--json", str(tmp_path)],
           ["bench"]]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(bad)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(code, torch) for _, code, torch in results] == [(2, False)] * len(bad), results
    for word in ("turbo", "zero", "-1", "'0'", "'x'", "speed", "tpu", "folder", "bench"):
        assert word in proc.stderr, word
    assert proc.stderr.count("allowed") >= len(bad)


# -- point 8: notebooks ------------------------------------------------------------------------

def test_report_and_load_report_are_reachable_from_agxguard_lab(tmp_path):
    import agxguard.lab as lab
    rep = synthetic()
    path = rep.save(str(tmp_path / "r.json"))
    assert lab.Report is Report
    assert lab.load_report(path).summary() == rep.summary()
    assert {"Report", "load_report"} <= set(lab.__all__)


def test_frame_rows_one_per_run_with_figures_and_spread():
    rows = synthetic().frame_rows()
    assert len(rows) == 4 * 5
    g8 = [r for r in rows if r["mode"] == "global" and r["threads"] == 8 and r["chapter"] == "efficiency"][0]
    assert g8["efficiency"] == pytest.approx(8 ** 0.5 / 8) and g8["spread.max"] == g8["ops_per_s"]
    off1 = [r for r in rows if r["mode"] == "off" and r["threads"] == 1 and r["chapter"] == "efficiency"][0]
    assert off1["outcomes"] == "signal,signal" and off1["crashes"] == 2 and off1["passed"] is False
    summary = synthetic().frame_rows("summary")
    assert [r["mode"] for r in summary] == MODES and summary[0]["crash_rate_raw"] == 1.0
    with pytest.raises(ValueError, match="bad frame 'table'; allowed: results, summary, claims"):
        synthetic().frame_rows("table")


def test_to_frame_without_pandas_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas.*does not depend"):
        synthetic().to_frame()


def test_to_frame_with_pandas_is_a_dataframe():
    pandas = pytest.importorskip("pandas", reason="pandas is not installed: to_frame's error is "
                                                  "tested without it")
    df = synthetic().to_frame()
    assert isinstance(df, pandas.DataFrame) and len(df) == 20
    assert {"mode", "chapter", "threads", "passed", "crashes", "efficiency", "ops_per_s"} <= set(df.columns)
    assert df[df["mode"] == "off"]["passed"].sum() == 0
    assert list(synthetic().to_frame("summary")["mode"]) == MODES


class _JupyterStream(io.StringIO):
    """Stands in for ipykernel's OutStream (what sys.stderr is in a notebook)."""


_JupyterStream.__module__ = "ipykernel.iostream"


class _FakeDisplay:
    """IPython's display() with display_id=True: one output, updated in place."""

    def __init__(self):
        self.shown, self.updates = [], []

    def __call__(self, obj, display_id=None):
        assert display_id is True
        self.shown.append(obj)
        return types.SimpleNamespace(update=self.updates.append)


def test_progress_in_jupyter_is_one_bar_per_mode_updated_in_place(monkeypatch):
    from agxguard.lab import progress
    fake = _FakeDisplay()
    monkeypatch.setattr(progress, "_tqdm", lambda: None)
    monkeypatch.setattr(progress, "_display_tools", lambda: (fake, str))
    stream = _JupyterStream()
    prog = progress.make_progress("story", stream, common.Progress)
    assert isinstance(prog, progress.ProgressBar)
    for mode in ("off", "global"):
        for i in range(3):
            rec = runner.CaseRecord({"id": "%s/%d" % (mode, i), "mode": mode, "chapter": "efficiency",
                                     "threads": 2})
            a = runner.Attempt(outcome="signal" if mode == "off" and i == 0 else "passed", value={})
            rec.attempts.append(a)
            prog.attempt(rec, a, 3, i)
    assert stream.getvalue() == ""  # no output per line in the notebook
    assert len(fake.shown) == 2  # one bar per mode
    assert len(fake.updates) == 6 and "3/3 runs" in fake.updates[-1] and "<progress" in fake.updates[-1]
    assert "1 crashes" in fake.updates[2] and "story global" in fake.updates[-1]
    assert len(prog.log) == 6  # every line kept


def test_progress_in_a_terminal_is_lines_and_names_bad_choices():
    from agxguard.lab import progress
    out = io.StringIO()
    prog = progress.make_progress("story", out, common.Progress)
    prog.line("hello")
    assert "hello" in out.getvalue() and not isinstance(prog, progress.ProgressBar)
    assert not isinstance(progress.make_progress("story", "auto", common.Progress), progress.ProgressBar)
    with pytest.raises(ValueError, match="bad progress 'fancy'; allowed: auto, bar, lines, none"):
        progress.make_progress("story", "fancy", common.Progress)


def test_jupyter_is_detected_from_ipythons_shell(monkeypatch):
    from agxguard.lab import progress
    ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    assert progress.in_jupyter()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not progress.in_jupyter()


def test_progress_bar_uses_tqdm_where_installed(capsys):
    pytest.importorskip("tqdm", reason="tqdm is not installed: the display-handle bar is tested instead")
    from agxguard.lab import progress
    prog = progress.make_progress("story", "bar", common.Progress)
    assert isinstance(prog, progress.ProgressBar)
    for i in range(2):
        rec = runner.CaseRecord({"id": str(i), "mode": "op", "chapter": "x"})
        a = runner.Attempt(outcome="passed", value={})
        rec.attempts.append(a)
        prog.attempt(rec, a, 2, i)
    prog.close()
    err = capsys.readouterr().err
    assert "story op" in err and "2/2" in err


@needs_model
def test_a_suite_in_jupyter_shows_a_bar_not_lines(monkeypatch):
    from agxguard.lab import progress, story
    fake = _FakeDisplay()
    monkeypatch.setattr(progress, "_tqdm", lambda: None)
    monkeypatch.setattr(progress, "_display_tools", lambda: (fake, str))
    stream = _JupyterStream()
    story("model", "global", chapter="thread_safety,correctness", threads="2", iterations=5,
          retries=0, progress=stream)
    assert stream.getvalue() == ""
    assert len(fake.shown) == 1 and "2/2 runs" in fake.updates[-1]
