"""The driver model: real results, and what each mode prevents (crashing runs in
child processes). Numbers are the model's on this machine, not Apple hardware."""
import os
import shutil
import subprocess
import threading

import pytest

import agxguard._C as C
from agxguard.lab import model

pytestmark = pytest.mark.skipif(not model.available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

ALL_BUGS = dict(context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True, window_yields=1)
RUNS = 8  # per configuration here; benchmarks/model_crash_table.py runs 200


def crashes(mode, runs=RUNS, bugs=ALL_BUGS, **kw):
    attempts = [model.run_in_child(mode, threads=8, iterations=100, bugs=bugs, timeout=60, **kw)
                for _ in range(runs)]
    assert not [a for a in attempts if model.is_error(a)], attempts
    outcomes = [a.outcome for a in attempts]
    return sum(o != "passed" for o in outcomes), outcomes


def test_classes_carry_agx_family_names():
    names = model.classes()
    assert names["compute_encoder"] == "AGXModelG16XFamilyComputeContext"
    assert names["device"] == "AGXModelG16XDevice"


def test_gpu_computes_for_real_and_checks_results():
    model.set_bugs(False)
    assert model.run_op(a=3.0, length=1000)
    r = model.run_threads(4, 50, hooks=False)
    assert r["result_ok"] and r["ops"] == 200 and r["mismatches"] == 0


def test_window_widens_races_but_never_creates_one():
    # one thread, every bug on, a wide window: no other thread, so no fault
    r = model.run_in_child("off", threads=1, iterations=200,
                           bugs=dict(ALL_BUGS, window_yields=3, window_spins=1000))
    assert r.outcome == "passed", r


def test_python_threads_can_run_single_ops():
    model.set_bugs(False)
    results = []
    ts = [threading.Thread(target=lambda q=q: results.extend(model.run_op(queue=q) for _ in range(20)))
          for q in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [True] * 80


def test_off_crashes_with_the_bugs_on():
    n, outcomes = crashes("off")
    assert n > 0, outcomes


def test_global_prevents_every_fault():
    n, outcomes = crashes("global")
    assert n == 0, outcomes


def test_op_alone_cannot_reach_zero_because_of_the_bypass():
    n, outcomes = crashes("op")
    assert n > 0, outcomes


def test_op_prevents_every_fault_once_nothing_bypasses_the_hooks():
    n, outcomes = crashes("op", bugs=dict(ALL_BUGS, bypass=False))
    assert n == 0, outcomes


def test_stream_on_one_shared_queue_prevents_every_fault():
    n, outcomes = crashes("stream", shared_queue=True)
    assert n == 0, outcomes


def test_stream_with_a_queue_per_thread_misses_device_wide_state():
    n, outcomes = crashes("stream", shared_queue=False)
    assert n > 0, outcomes


def test_context_race_alone_faults_with_a_real_segfault():
    n, outcomes = crashes("off", bugs=dict(context_race=True, window_yields=1))
    assert n > 0 and set(outcomes) <= {"passed", "signal"}, outcomes


def test_unavailable_build_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(model, "_model", None)  # as a build whose agxguard._model did not import
    assert not model.available()
    with pytest.raises(RuntimeError, match="driver model is unavailable in this build"):
        model.run_threads(2, 2)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None, reason="needs make and gcc")
def test_thread_sanitizer_reports_the_planted_race_in_off_and_nothing_in_global():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["make", "-s", "-f", "csrc/tests/tsan_model.mk", "csrc/tests/tsan_model.bin"], cwd=root,
                   check=True, timeout=120)
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66")
    binary = os.path.join(root, "csrc", "tests", "tsan_model.bin")
    off = subprocess.run([binary, "off", "30", "4"], capture_output=True, text=True, env=env, timeout=120)
    glob = subprocess.run([binary, "global", "30", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert "WARNING: ThreadSanitizer: data race" in off.stderr
    assert "ThreadSanitizer" not in glob.stderr and glob.returncode == 0, glob.stderr[-2000:]
