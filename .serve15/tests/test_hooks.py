"""The AGX hook set (issue 4) on the driver model: installed by ``import agxguard``
with AGXGUARD_DRIVER=model, found by discovery as Metal is. Every run that can
crash runs in a child process. The driver model is a test double, not Apple
hardware; benchmarks/hooks_crash_table.py measures the same rows with more runs."""
import json
import os
import subprocess
import sys
import threading

import pytest

import agxguard
import agxguard._C as C
from agxguard import model, swizzle

pytestmark = pytest.mark.skipif(not model.available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

RUNS = 6  # child runs per row here; the benchmark runs 200
NO_BUGS = dict(context_race=False, encoder_recycle=False, buffer_recycle=False, bypass=False)
MODEL_ROLES = {"command_queue", "command_buffer", "compute_encoder", "blit_encoder"}


def child(code, **env):
    """Run `code` in a fresh interpreter with AGXGUARD_* from `env` only."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("AGXGUARD_")}
    e.update(env)
    return subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, env=e,
                          timeout=60)


def race(mode, runs=RUNS, **bugs):
    """Outcomes of `runs` child runs, 8 threads on one queue, hooks from the import."""
    outcomes = []
    for _ in range(runs):
        r = model.run_in_child(mode, threads=8, iterations=100, bugs=dict(NO_BUGS, window_yields=1, **bugs),
                               env={"AGXGUARD_DRIVER": "model"}, hooks=False, region=(mode == "global"),
                               internal_every=4, timeout=60)
        assert r["outcome"] != "error", r
        if r["outcome"] == "ok":
            assert r["result"]["hooks_driver"] == "model", r  # the import installed them
        outcomes.append(r)
    return sum(r["outcome"] != "ok" for r in outcomes), outcomes


@pytest.fixture
def model_hooks():
    """The hook set installed in this process, bugs off; put back as found."""
    was = C.hooks_driver()
    saved = model.config()
    model.set_bugs(False)
    agxguard.install("model")
    yield
    model.configure(**saved)
    if was is None:
        agxguard.uninstall()


# ---------------------------------------------------------------- install at import

def test_import_with_driver_model_installs_the_full_hook_set_and_lists_it():
    p = child("import agxguard, json; from agxguard.hooks import table; print(json.dumps({'status': "
              "agxguard.status(), 'hooks': agxguard.hooks(), 'table': table(), 'engine': agxguard._C.swizzle_hooks()}))",
              AGXGUARD_DRIVER="model")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    st, rows = out["status"], out["hooks"]
    assert st["driver"] == "model" and st["installed"] and st["reason"] is None
    classes = st["discovery"]["classes"]
    assert classes["compute_encoder"] == ["AGXModelG16XFamilyComputeContext"]
    assert classes["command_buffer"] == ["AGXModelG16XFamilyCommandBuffer"]
    # every table row, on every model class of its roles, is installed
    want = {(classes[role][0], r["selector"]) for r in out["table"] for role in r["roles"] if role in MODEL_ROLES}
    got = {(h["class"], h["selector"]) for h in rows if h["installed"]}
    assert got == want and len(want) == st["hooks_installed"] >= 35
    # ... and the engine really has each of them active, with the table's kind
    active = {(h["class"], h["selector"]) for h in out["engine"] if h["active"]}
    assert want <= active


def test_a_role_with_no_class_is_skipped_with_the_reason_not_fatal():
    rows = [h for h in agxguard.hooks() if h["role"] == "mps_command_buffer"] if agxguard.installed() else None
    if rows is None:
        agxguard.install("model")
        rows = [h for h in agxguard.hooks() if h["role"] == "mps_command_buffer"]
        agxguard.uninstall()
    assert rows and all(not h["installed"] and "MPSCommandBuffer" in h["skipped"] for h in rows)


def test_import_without_a_driver_is_quiet_cheap_and_says_why():
    p = child("import sys, agxguard; s = agxguard.status(); "
              "print(s['installed'], s['driver'], 'torch' in sys.modules); print(s['reason'])")
    assert p.returncode == 0 and p.stderr == "", p.stderr  # -W error: not even a warning
    first, reason = p.stdout.splitlines()
    assert first == "False None False"
    assert "Metal" in reason and "AGXGUARD_DRIVER=model" in reason


def test_disable_wins_over_the_driver():
    p = child("import agxguard; s = agxguard.status(); print(s['installed'], s['reason'])",
              AGXGUARD_DRIVER="model", AGXGUARD_DISABLE="1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False disabled by AGXGUARD_DISABLE=1"


def test_a_build_without_objc_runtime_reports_why(monkeypatch):
    monkeypatch.setattr(C, "HAVE_OBJC", False)
    assert not agxguard.installed() and agxguard.hooks() == []
    assert "no Objective-C runtime" in agxguard.status()["reason"]
    with pytest.raises(RuntimeError, match="no Objective-C runtime"):
        agxguard.install("model")


# ---------------------------------------------------------------- race classes, children

def test_recycled_encoder_crashes_without_protection_and_not_under_op():
    # 12 runs: the off-side rate falls with the box's load (about a third of the runs at a load
    # of 5 on 2 cores, before and after issue 10's asynchronous completion)
    off, outs = race("off", runs=12, encoder_recycle=True)
    assert off > 0, [o["outcome"] for o in outs]
    op, outs = race("op", encoder_recycle=True)
    assert op == 0, [o["message"] for o in outs if o["outcome"] != "ok"]


def test_two_open_encoders_and_double_commit_stop_under_op():
    off, outs = race("off", runs=16, buffer_recycle=True)  # about half the runs fault at 8 threads
    assert off > 0 and any(o["outcome"] == "abort" for o in outs), [o["outcome"] for o in outs]
    op, outs = race("op", buffer_recycle=True)
    assert op == 0, [o["message"] for o in outs if o["outcome"] != "ok"]


def test_the_bypass_path_still_crashes_under_op_with_the_hooks():
    n, outs = race("op", context_race=True, bypass=True)
    assert n > 0, [o["outcome"] for o in outs]
    clean, outs = race("op", context_race=True)  # the same race through the hooks only
    assert clean == 0, [o["message"] for o in outs if o["outcome"] != "ok"]


def test_global_regions_stop_every_fault():
    n, outs = race("global", context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True)
    assert n == 0, [o["message"] for o in outs if o["outcome"] != "ok"]


def test_commit_with_an_open_encoder_aborts_without_the_hooks():
    p = child("import agxguard; from agxguard import model; agxguard.set_mode('op'); "
              "model.set_bugs(False); model.run_op(end_encoding=False)", AGXGUARD_DRIVER="none")
    assert p.returncode == -6 and "commit command buffer with uncommitted encoder" in p.stderr, p.stderr


def test_commit_safety_ends_the_open_encoder_first(model_hooks):
    agxguard.set_mode("op")
    before = agxguard.status()
    assert model.run_op(a=3.0, end_encoding=False)  # the dispatch still ran: it was ended, not dropped
    after = agxguard.status()
    assert after["forced_ends"] == before["forced_ends"] + 1
    assert after["encoders_created"] - before["encoders_created"] == 1
    assert after["encoders_ended"] - before["encoders_ended"] == 1 and after["encoders_open"] == 0


# ---------------------------------------------------------------- lifecycle, streams

def test_no_encoder_is_used_after_its_end_with_8_threads_and_every_one_ends():
    n, outs = race("op", runs=3, context_race=True, encoder_recycle=True, buffer_recycle=True)
    assert n == 0, [o["message"] for o in outs if o["outcome"] != "ok"]
    for o in outs:
        lc = o["result"]["lifecycle"]
        assert lc["encoders_created"] == lc["encoders_ended"] == 800, lc
        assert lc["retained"] == 800 and lc["encoders_open"] == 0 and lc["freed_open"] == 0, lc


def test_the_model_reports_an_encoder_used_after_its_end():
    # the detector behind the test above: without protection a recycled encoder is caught, by a
    # call on it after its end or by a second end (a driver assertion since issue 10)
    caught = ("encoder used after endEncoding", "endEncoding on an encoder that has already ended")
    _, outs = race("off", runs=24, encoder_recycle=True)
    assert any(c in o["message"] for o in outs for c in caught), [o["message"] for o in outs]


def test_stream_mode_locks_encoder_calls_by_their_queue(model_hooks):
    agxguard.set_mode("stream")
    agxguard.reset_stats()
    assert model.run_op(queue=7)
    s = agxguard.stats()["domains"]
    assert s["stream"]["acquisitions"] > 0
    assert s["object"]["acquisitions"] == 0  # no hooked call fell back to an object lock


def test_uninstall_then_install_works_repeatedly_while_threads_keep_calling(model_hooks):
    agxguard.set_mode("op")
    stop = threading.Event()
    results, errors = [], []

    def worker(q):
        try:
            while not stop.is_set():
                results.append(model.run_op(queue=q, length=64))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(q,)) for q in range(4)]
    for t in threads:
        t.start()
    full = agxguard.status()["hooks_installed"]
    for _ in range(20):
        assert agxguard.uninstall()["removed"] == full
        assert not agxguard.installed()
        assert agxguard.install("model")["hooks"] == full
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors and results and all(results)
    assert agxguard.installed() and agxguard.status()["encoders_open"] == 0
    assert sum(h["active"] for h in swizzle.hooks() if h["class"].startswith("AGXModelG16X")) == full
