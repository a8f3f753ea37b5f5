"""The pytest plugin, driven through a real pytest run in a subprocess."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TESTS = textwrap.dedent('''
    import ctypes, os, pytest, agxguard

    def test_mode_is_set(lock_mode):
        assert agxguard.get_mode() == lock_mode

    def test_mode_is_restored_after_each_test():
        assert agxguard.get_mode() == "op"

    @pytest.mark.agxguard_isolated
    def test_segfault():
        ctypes.string_at(0)

    @pytest.mark.agxguard_isolated
    def test_abort():
        os.write(2, b"A command encoder is already encoding to this command buffer\\n")
        os.abort()

    @pytest.mark.agxguard_isolated(timeout=1.0)
    def test_hang():
        import time
        while True:
            time.sleep(0.05)

    @pytest.mark.agxguard_isolated
    def test_runs_in_a_child(lock_mode):
        assert os.environ.get("AGXGUARD_ISOLATED_CHILD") == "1"
        assert agxguard.get_mode() == lock_mode

    @pytest.mark.agxguard_isolated
    def test_plain_failure():
        assert 1 == 2
''')


def run_pytest(tmp_path, *args, env_modes=None, ini=None):
    (tmp_path / "test_sample.py").write_text(TESTS)
    if ini is not None:
        (tmp_path / "pytest.ini").write_text("[pytest]\n" + ini + "\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               AGXGUARD_MODE="op", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # loaded once, by -p below
    env.pop("AGXGUARD_TEST_MODES", None)
    if env_modes is not None:
        env["AGXGUARD_TEST_MODES"] = env_modes
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "agxguard.pytest_plugin", "-p", "no:cacheprovider",
         "-rA", "-q", *args], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)


def outcomes(proc):
    """test id -> PASSED/FAILED from the -rA summary."""
    out = {}
    for line in proc.stdout.splitlines():
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            if line.startswith(word + " "):
                out[line.split(" ")[1]] = (word, line)
    return out


def test_mode_option_parametrizes_lock_mode_and_isolated_crashes_fail_by_name(tmp_path):
    proc = run_pytest(tmp_path, "--agxguard-mode=off,global")
    got = outcomes(proc)
    assert got["test_sample.py::test_mode_is_set[off]"][0] == "PASSED", proc.stdout
    assert got["test_sample.py::test_mode_is_set[global]"][0] == "PASSED"
    assert "test_sample.py::test_mode_is_set[op]" not in got
    assert got["test_sample.py::test_mode_is_restored_after_each_test"][0] == "PASSED"
    assert got["test_sample.py::test_runs_in_a_child[off]"][0] == "PASSED"
    assert got["test_sample.py::test_runs_in_a_child[global]"][0] == "PASSED"
    assert got["test_sample.py::test_segfault"][0] == "FAILED"
    assert "crashed with SIGSEGV" in got["test_sample.py::test_segfault"][1]
    assert got["test_sample.py::test_abort"][0] == "FAILED"
    assert "aborted (SIGABRT)" in got["test_sample.py::test_abort"][1]
    assert "already encoding" in proc.stdout
    assert got["test_sample.py::test_hang"][0] == "FAILED"
    assert "hung" in got["test_sample.py::test_hang"][1]
    assert got["test_sample.py::test_plain_failure"][0] == "FAILED"
    assert "assert 1 == 2" in proc.stdout
    assert proc.returncode == 1


def test_env_fallback_selects_modes(tmp_path):
    proc = run_pytest(tmp_path, "-k", "test_mode_is_set", env_modes="stream")
    assert list(outcomes(proc)) == ["test_sample.py::test_mode_is_set[stream]"], proc.stdout


def test_ini_key_beats_env(tmp_path):
    proc = run_pytest(tmp_path, "-k", "test_mode_is_set", env_modes="stream",
                      ini="agxguard_modes = op,off")
    assert sorted(outcomes(proc)) == ["test_sample.py::test_mode_is_set[off]",
                                      "test_sample.py::test_mode_is_set[op]"], proc.stdout


def test_default_is_every_mode(tmp_path):
    proc = run_pytest(tmp_path, "-k", "test_mode_is_set")
    assert len(outcomes(proc)) == 4, proc.stdout


def test_bad_mode_is_a_usage_error_naming_it(tmp_path):
    proc = run_pytest(tmp_path, "--agxguard-mode=off,turbo")
    assert proc.returncode == 4  # pytest's usage error
    assert "turbo" in proc.stderr and "off, op, stream, global" in proc.stderr


def test_a_crash_report_keeps_the_fatal_error_and_the_tests_frame(tmp_path):
    """The report of a crashed isolated test starts with the child's first lines (the
    fatal error and the faulting frames: the test's own), keeps the tail, and marks the
    cut between them (issue 14 point 4). The segfault happens under pytest's ~40 frames,
    so the whole stack is longer than the report keeps."""
    proc = run_pytest(tmp_path, "-k", "test_segfault")
    report = proc.stdout
    assert "Fatal Python error: Segmentation fault" in report, report
    assert "in test_segfault" in report, report


def test_clip_keeps_head_and_tail_and_marks_the_cut():
    from agxguard import _runner as harness
    lines = ["line %05d" % i for i in range(5000)]
    text = "\n".join(lines) + "\n"
    out = harness.clip(text, head=1000, tail=500)
    assert out.startswith("line 00000\n") and out.endswith("line 04999\n")
    head, marker, tail = out.partition("[... ")
    cut = int(marker and tail.split(" ", 1)[0])
    assert len(head) <= 1000 and len(tail.split("\n", 1)[1]) <= 500
    assert len(head) + cut + len(tail.split("\n", 1)[1]) == len(text)
    assert harness.clip("short\n", head=10, tail=10) == "short\n"
