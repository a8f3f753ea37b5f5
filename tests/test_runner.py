"""The child runner (agxguard._runner): each way a child can end is reported as exactly that."""
import ctypes
import json
import os
import sys
import time

import pytest

from agxguard import _runner as harness
from agxguard.lab.report import Report, atomic_write_json, summarize


# -- what the children run (module-level, so a child process can import them) -----------

def child_work(case):
    kind = case["kind"]
    if kind == "pass":
        return {"answer": 42}
    if kind == "raise":
        raise ValueError("bad input")
    if kind == "check":
        raise harness.CheckFailed("only 3 of 4 ops", {"completed": 3, "expected": 4})
    if kind == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if kind == "abort":
        os.write(2, b"-[Encoder commit]: commit an already committed command buffer\n")
        os.abort()
    if kind == "hang":
        hang_here_forever()
    if kind == "segfault_after_words":
        # earlier output longer than the kept head, and many threads, so that
        # faulthandler's dump of their stacks outgrows the kept tail
        import threading
        os.write(2, b"".join(b"progress line %d\n" % i for i in range(600)))
        for _ in range(60):
            threading.Thread(target=hang_here_forever, daemon=True).start()
        os.write(2, b"AGXModel: encoder used after endEncoding\n")
        ctypes.string_at(0)
    if kind == "crash_once":
        # First attempt: segfault and leave a marker; the retry finds it and passes.
        if not os.path.exists(case["marker"]):
            open(case["marker"], "w").close()
            ctypes.string_at(0)
        return "passed on retry"
    raise AssertionError("unknown kind %r" % kind)


def hang_here_forever():
    while True:
        time.sleep(0.05)


# -- tests -------------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_crash_message_is_kept_when_the_stack_dump_outgrows_the_tail():
    rec = harness.run_in_child(child_work, {"kind": "segfault_after_words"}, timeout=30)
    attempt = rec.attempts[-1]
    assert attempt.outcome == "signal" and "encoder used after endEncoding" not in attempt.stderr_tail
    assert attempt.message == "AGXModel: encoder used after endEncoding"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_segfaulting_child_is_reported_as_sigsegv():
    rec = harness.run_in_child(child_work, {"kind": "segfault"}, timeout=30)
    assert [a.outcome for a in rec.attempts] == ["signal"]
    assert rec.attempts[0].signal == "SIGSEGV"
    assert rec.crashes == {"signal": 1, "abort": 0, "hang": 0}
    assert not rec.passed and not rec.raw_passed
    assert "child_work" in rec.attempts[0].stderr_tail  # faulthandler's stack of the crash


def test_aborting_child_is_reported_as_abort_with_its_message():
    rec = harness.run_in_child(child_work, {"kind": "abort"}, timeout=30)
    (attempt,) = rec.attempts
    assert attempt.outcome == "abort"
    assert attempt.signal == "SIGABRT"
    assert "commit an already committed command buffer" in attempt.stderr_tail
    assert "already committed" in attempt.describe()


def test_hanging_child_is_reported_as_hang_with_its_python_stacks():
    t0 = time.monotonic()
    rec = harness.run_in_child(child_work, {"kind": "hang"}, timeout=1.0)
    (attempt,) = rec.attempts
    assert attempt.outcome == "hang"
    assert time.monotonic() - t0 < 15
    # The stacks were dumped by the child itself before it was killed.
    assert "hang_here_forever" in attempt.stacks
    assert "child_work" in attempt.stacks


def test_raising_child_is_a_failure_not_a_crash():
    rec = harness.run_in_child(child_work, {"kind": "raise"}, timeout=30)
    (attempt,) = rec.attempts
    assert attempt.outcome == "failed"
    assert attempt.error == "ValueError: bad input"
    assert rec.crashes == {"signal": 0, "abort": 0, "hang": 0}


def test_check_failure_keeps_the_figures_measured():
    rec = harness.run_in_child(child_work, {"kind": "check"}, timeout=30)
    assert rec.outcome == "failed"
    assert rec.value == {"completed": 3, "expected": 4}


def test_pass_after_retry_counts_the_crash_and_both_rates(tmp_path):
    marker = str(tmp_path / "crashed-once")
    rec = harness.run_in_child(child_work, {"kind": "crash_once", "marker": marker},
                               timeout=30, retries=2)
    assert [a.outcome for a in rec.attempts] == ["signal", "passed"]
    assert rec.passed and not rec.raw_passed
    assert rec.retries == 1
    assert rec.crashes["signal"] == 1  # the retry does not hide the crash
    s = summarize([rec])
    assert s["raw_pass_rate"] == 0.0 and s["pass_rate_after_retries"] == 1.0
    assert s["crashes"]["signal"] == 1


def test_retries_stop_at_the_limit():
    rec = harness.run_in_child(child_work, {"kind": "segfault"}, timeout=30, retries=2)
    assert [a.outcome for a in rec.attempts] == ["signal"] * 3


def test_cases_after_a_crash_still_run_and_the_report_file_is_complete(tmp_path):
    marker = str(tmp_path / "crashed-once")
    kinds = ["pass", "segfault", "pass", "abort", "hang", "crash_once", "pass"]
    cases = [{"id": "c%d" % i, "mode": "off", "chapter": "harness", "kind": k, "marker": marker}
             for i, k in enumerate(kinds)]
    path = str(tmp_path / "report.json")
    report = Report("harness_test", "cpu", ["off"], path=path)
    snapshots = []

    def on_attempt(rec, attempt):
        report.record(rec)  # written atomically after every attempt
        with open(path) as f:
            snapshots.append(len(json.load(f)["results"]))

    records = harness.run_cases(child_work, cases, timeout=1.5, retries=1, on_attempt=on_attempt)
    report.finish()
    assert [r.attempts[0].outcome for r in records] == \
        ["passed", "signal", "passed", "abort", "hang", "signal", "passed"]
    assert records[5].passed  # crash_once passed on its retry
    with open(path) as f:
        data = json.load(f)
    assert data["complete"] is True
    assert [r["id"] for r in data["results"]] == ["c%d" % i for i in range(len(kinds))]
    assert [r["outcome"] for r in data["results"]] == \
        ["passed", "signal", "passed", "abort", "hang", "passed", "passed"]
    s = data["summary"]["off"]
    assert s["runs"] == 7
    # signal: segfault twice (retried) + crash_once once; abort twice; hang twice.
    assert s["crashes"] == {"signal": 3, "abort": 2, "hang": 2}
    assert s["raw_pass_rate"] == pytest.approx(3 / 7)
    assert s["pass_rate_after_retries"] == pytest.approx(4 / 7)
    assert snapshots == sorted(snapshots) and snapshots[-1] == 7
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = str(tmp_path / "r.json")
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    with open(path) as f:
        assert json.load(f) == {"b": 2}
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_local_function_is_refused_with_a_clear_error():
    def local(case):
        return 1

    with pytest.raises(ValueError, match="module-level function"):
        harness.run_in_child(local)


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    """Result files are readable as any file the user writes (issue 14 point 7: they were
    0600, the PNG beside them 0644)."""
    import stat
    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "r.json"), {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644
