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
from agxguard import swizzle
from agxguard.lab import model

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
        assert not model.is_error(r), r
        if r.outcome == "passed":
            assert r.value["hooks_driver"] == "model", r  # the import installed them
        outcomes.append(r)
    return sum(r.outcome != "passed" for r in outcomes), outcomes


def race_until(mode, found, rounds=4, runs=12, **bugs):
    """The unprotected side of a race: faults come by chance, and fewer of them on a
    loaded machine (fewer threads really run at once), so run up to `rounds` rounds of
    `runs` children, stopping once found(outcomes) holds. With the race gone, no round
    finds it and the caller's assertion fails."""
    outcomes = []
    for _ in range(rounds):
        outcomes += race(mode, runs=runs, **bugs)[1]
        if found(outcomes):
            break
    return sum(r.outcome != "passed" for r in outcomes), outcomes


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
    # the driver model is not part of the product: it registers itself when agxguard.lab.model loads
    p = child("import agxguard, agxguard.lab.model, json; from agxguard.hooks import table; print(json.dumps({'status': "
              "agxguard.status(), 'hooks': agxguard.hooks(), 'table': table(), 'engine': agxguard._C.swizzle_hooks()}))",
              AGXGUARD_DRIVER="model")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    st, rows = out["status"], out["hooks"]
    assert st["driver"] == "model" and st["installed"] and st["reason"] is None
    classes = st["discovery"]["classes"]
    assert classes["compute_encoder"] == ["AGXModelG16XFamilyComputeContext"]
    assert classes["command_buffer"] == ["AGXModelG16XFamilyCommandBuffer"]
    # every table row is listed for every model class of its roles: installed
    # where the class implements it, else skipped because it does not (the
    # model has no render encoders, nor every Metal selector); never because a
    # signature could not be forwarded (the general forwarder takes those)
    listed = {(classes[role][0], r["selector"]) for r in out["table"] for role in r["roles"] if role in MODEL_ROLES}
    assert listed <= {(h["class"], h["selector"]) for h in rows}
    got = {(h["class"], h["selector"]) for h in rows if h["installed"]}
    skipped = {(h["class"], h["selector"]): h["skipped"] for h in rows if not h["installed"] and h["class"]}
    assert set(skipped.values()) <= {"the class does not implement it"}, skipped
    assert got | set(skipped) == listed and len(got) == st["hooks_installed"] >= 40
    shapes = {(h["class"], h["selector"]): h["shape"] for h in out["engine"]}
    for cls, sel in [(classes["compute_encoder"][0], "setBuffers:offsets:withRange:"),
                     (classes["compute_encoder"][0], "setSamplerState:lodMinClamp:lodMaxClamp:atIndex:"),
                     (classes["blit_encoder"][0], "resetTextureAccessCounters:region:mipLevel:slice:")]:
        assert (cls, sel) in got and shapes[(cls, sel)].startswith("ffi "), (cls, sel)
    # the roles the model has no class for are listed once per row, with the reason
    for role in ("render_encoder", "parallel_render_encoder", "resource_state_encoder",
                 "acceleration_structure_encoder"):
        assert classes[role] == []
        none = [h for h in rows if h["role"] == role]
        assert none and all(not h["installed"] and h["skipped"].startswith(f"no {role} class") for h in none)
    want = got
    # ... and the engine really has each of them active, with the table's kind
    active = {(h["class"], h["selector"]) for h in out["engine"] if h["active"]}
    assert want <= active


def test_a_role_with_no_class_is_skipped_with_the_reason_not_fatal():
    rows = [h for h in agxguard.hooks() if h["role"] == "mps_command_buffer"] if agxguard.status()["installed"] else None
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
    assert not agxguard.status()["installed"] and agxguard.hooks() == []
    assert "no Objective-C runtime" in agxguard.status()["reason"]
    with pytest.raises(RuntimeError, match="no Objective-C runtime"):
        agxguard.install("model")


# ---------------------------------------------------------------- race classes, children

def test_recycled_encoder_crashes_without_protection_and_not_under_op():
    # 12 runs: the off-side rate falls with the box's load (about a third of the runs at a load
    # of 5 on 2 cores, before and after issue 10's asynchronous completion)
    off, outs = race_until("off", lambda os: any(o.outcome != "passed" for o in os), encoder_recycle=True)
    assert off > 0, [o.outcome for o in outs]
    op, outs = race("op", encoder_recycle=True)
    assert op == 0, [o.message for o in outs if o.outcome != "passed"]


def test_two_open_encoders_and_double_commit_stop_under_op():
    # about half the runs fault at 8 threads on an idle machine
    off, outs = race_until("off", lambda os: any(o.outcome == "abort" for o in os), runs=16, buffer_recycle=True)
    assert off > 0 and any(o.outcome == "abort" for o in outs), [o.outcome for o in outs]
    op, outs = race("op", buffer_recycle=True)
    assert op == 0, [o.message for o in outs if o.outcome != "passed"]


def test_the_bypass_path_still_crashes_under_op_with_the_hooks():
    n, outs = race("op", context_race=True, bypass=True)
    assert n > 0, [o.outcome for o in outs]
    clean, outs = race("op", context_race=True)  # the same race through the hooks only
    assert clean == 0, [o.message for o in outs if o.outcome != "passed"]


def test_global_regions_stop_every_fault():
    n, outs = race("global", context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True)
    assert n == 0, [o.message for o in outs if o.outcome != "passed"]


def test_commit_with_an_open_encoder_aborts_without_the_hooks():
    p = child("import agxguard; from agxguard.lab import model; agxguard.set_mode('op'); "
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
    assert n == 0, [o.message for o in outs if o.outcome != "passed"]
    for o in outs:
        lc = o.value["lifecycle"]
        assert lc["encoders_created"] == lc["encoders_ended"] == 800, lc
        assert lc["retained"] == 800 and lc["encoders_open"] == 0 and lc["freed_open"] == 0, lc


def test_the_model_reports_an_encoder_used_after_its_end():
    # the detector behind the test above: without protection a recycled encoder is caught, by a
    # call on it after its end or by a second end (a driver assertion since issue 10)
    caught = ("encoder used after endEncoding", "endEncoding on an encoder that has already ended")
    # each run catches it by chance (other runs end in another assertion of the same race,
    # e.g. a commit with an uncommitted encoder)
    _, outs = race_until("off", lambda os: any(c in o.message for o in os for c in caught), rounds=5, runs=24,
                         encoder_recycle=True)
    assert any(c in o.message for o in outs for c in caught), [o.message for o in outs]


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
        assert not agxguard.status()["installed"]
        assert agxguard.install("model")["hooks"] == full
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors and results and all(results)
    assert agxguard.status()["installed"] and agxguard.status()["encoders_open"] == 0
    assert sum(h["active"] for h in swizzle.hooks() if h["class"].startswith("AGXModelG16X")) == full
