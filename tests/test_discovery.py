"""Discovery (issue 10, items 2, 3, 4, 7) on the driver model: classes that appear
with images loaded after the hooks are hooked as they come; under a debug layer
both the wrapper classes and the driver's classes under them are hooked; discovery
leaves nothing alive that it made; a Mac with a GPU but no hooks warns at import.
Runs that can crash or that need a fresh process (an image loads once per process)
run in child processes with a timeout. The driver model is a test double, not Apple
hardware."""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

import agxguard
import agxguard._C as C
import agxguard._model as M
from agxguard.lab import model

hooks_module = sys.modules["agxguard.hooks"]  # (agxguard.hooks is also the name of a function)

pytestmark = pytest.mark.skipif(not model.available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

NO_BUGS = dict(context_race=False, encoder_recycle=False, buffer_recycle=False, bypass=False)
ALL_BUGS = dict(context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True, window_yields=1)
DEBUG = {"AGXGUARD_DRIVER": "model", "AGX_MODEL_DEBUG_LAYER": "1"}
RUNS = 6  # child runs per row here; the 200-run figures are in the commit message


def child(*parts, timeout=60, **env):
    """Run the code `parts` (each dedented, then joined) in a fresh interpreter with
    AGXGUARD_*/AGX_MODEL_* from `env` only; returns the JSON object it prints last."""
    code = "\n".join(textwrap.dedent(p) for p in parts)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AGXGUARD_", "AGX_MODEL_"))}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                       timeout=timeout)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


WAIT_HOOKED = """
def wait_hooked(cls, timeout=10.0):
    # the image-load callback hands the work to a worker thread: wait for it
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = [h for h in agxguard.hooks() if h["class"] == cls]
        # every row the class implements is installed (the rest: "the class does not implement it")
        if rows and all(h["installed"] or h["skipped"] == "the class does not implement it" for h in rows):
            return rows
        time.sleep(0.01)
    return [h for h in agxguard.hooks() if h["class"] == cls]
"""


# ---------------------------------------------------------------- item 3: images loaded later

def test_an_image_loaded_after_the_hooks_gets_its_classes_hooked_and_its_calls_locked():
    out = child("""
        import json, agxguard, agxguard._C as C, agxguard._model as M
        from agxguard.lab import model
    """, WAIT_HOOKED, """
        before = [h for h in agxguard.hooks() if h["role"] == "mps_command_buffer"]
        agx_before = sorted((h["class"], h["selector"]) for h in C.swizzle_hooks() if h["active"])
        assert M.model_load_image("mps") is True
        rows = wait_hooked("MPSModelCommandBuffer")
        model.set_bugs(False)
        agxguard.set_mode("op")
        agxguard.reset_stats()
        C.swizzle_reset_counts()
        ok = M.model_mps_run_op(a=3.0)
        agx_after = sorted((h["class"], h["selector"]) for h in C.swizzle_hooks()
                           if h["active"] and not h["class"].startswith("MPS"))
        calls = {h["selector"]: h["calls"] for h in C.swizzle_hooks() if h["class"] == "MPSModelCommandBuffer"}
        print(json.dumps({"before": before, "rows": rows, "ok": ok, "calls": calls,
                          "op": agxguard.stats()["domains"]["op"]["acquisitions"], "kept": agx_before == agx_after,
                          "abandoned": agxguard.status()["abandoned"],
                          "images": agxguard.status()["images"], "classes": agxguard.status()["discovery"]["classes"]}))
    """, AGXGUARD_DRIVER="model")
    assert out["before"] and not any(h["installed"] for h in out["before"])  # not there at import
    assert out["classes"]["mps_command_buffer"] == ["MPSModelCommandBuffer"]
    selectors = {h["selector"] for h in out["rows"] if h["installed"]}
    assert {"computeCommandEncoder", "blitCommandEncoder", "commit"} <= selectors, out["rows"]
    assert out["ok"]
    # the MPS command buffer's own calls went through its hooks, each under the op lock
    assert out["calls"]["computeCommandEncoder"] == 1 and out["calls"]["commit"] == 1, out["calls"]
    assert out["op"] >= sum(out["calls"].values())
    assert out["images"]["mechanism"] == "the driver model's image loader" and out["images"]["events"] >= 2
    # incremental: the hooks already there stayed installed throughout, no encoder was abandoned
    assert out["kept"] and out["abandoned"] == 0


def test_an_image_loading_while_8_threads_encode_is_hooked_without_a_fault():
    out = child("""
        import json, threading, agxguard, agxguard._C as C, agxguard._model as M
        from agxguard.lab import model
    """, WAIT_HOOKED, """
        model.configure(context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=False, window_yields=1)
        agxguard.set_mode("op")
        res = {}
        t = threading.Thread(target=lambda: res.update(model.run_threads(8, 400, hooks=False, region=False)))
        t.start()
        M.model_load_image("mps")
        rows = wait_hooked("MPSModelCommandBuffer")
        mps_ok = [M.model_mps_run_op(queue=1, a=2.0) for _ in range(20)]
        t.join(60)
        st = agxguard.status()
        hooked = bool(rows) and all(h["installed"] or h["skipped"] == "the class does not implement it" for h in rows)
        print(json.dumps({"result_ok": res.get("result_ok"), "hooked": hooked and any(h["installed"] for h in rows),
                          "mps_ok": all(mps_ok), "abandoned": st["abandoned"], "open": st["encoders_open"]}))
    """, timeout=120, AGXGUARD_DRIVER="model")
    assert out == {"result_ok": True, "hooked": True, "mps_ok": True, "abandoned": 0, "open": 0}, out


def test_rediscover_and_a_later_install_pick_up_an_image_loaded_while_nothing_was_installed():
    out = child("""
        import json, agxguard, agxguard._C as C, agxguard._model as M
        from agxguard.hooks import rediscover
        nothing = rediscover()
        M.model_load_image("mps")       # before any install: no hook set to add to
        first = agxguard.install("model")
        mps = sorted(h["selector"] for h in agxguard.hooks() if h["class"] == "MPSModelCommandBuffer" and h["installed"])
        again = rediscover()   # nothing new since
        print(json.dumps({"nothing": nothing, "mps": mps, "again": again, "new": first["new"]}))
    """, AGXGUARD_DRIVER="none")
    assert out["nothing"] == {"driver": None, "new": 0}
    assert "computeCommandEncoder" in out["mps"] and "commit" in out["mps"]
    assert out["again"] == {"driver": "model", "new": 0}


def test_loading_an_unknown_model_image_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model image nope.*known: mps"):
        M.model_load_image("nope")


# ---------------------------------------------------------------- item 4: the debug layer

def test_under_the_debug_layer_discovery_hooks_the_wrappers_and_the_driver_classes_under_them():
    out = child("""
        import json, agxguard, agxguard.lab.model  # the model registers itself: AGXGUARD_DRIVER=model hooks it then
        from agxguard.hooks import table
        print(json.dumps({"status": agxguard.status(), "hooks": agxguard.hooks(), "table": table()}))
    """, **DEBUG)
    st = out["status"]
    assert st["installed"], st["reason"]
    d = st["discovery"]
    assert d["device_class"] == "MTLModelDebugDevice" and d["base_device_class"] == "AGXModelG16XDevice"
    assert d["layers"] == 1
    classes = d["classes"]
    assert classes["compute_encoder"] == ["MTLModelDebugComputeCommandEncoder", "AGXModelG16XFamilyComputeContext"]
    assert classes["command_buffer"] == ["MTLModelDebugCommandBuffer", "AGXModelG16XFamilyCommandBuffer"]
    assert classes["command_queue"] == ["MTLModelDebugCommandQueue", "AGXModelG16XFamilyCommandQueue"]
    assert classes["blit_encoder"] == ["MTLModelDebugBlitCommandEncoder", "AGXModelG16XFamilyBlitContext"]
    installed = {(h["class"], h["selector"]) for h in out["hooks"] if h["installed"]}
    not_there = {(h["class"], h["selector"]) for h in out["hooks"] if h["skipped"] == "the class does not implement it"}
    for row in out["table"]:
        for role in row["roles"]:
            for cls in classes.get(role, []):
                assert (cls, row["selector"]) in installed | not_there, (cls, row["selector"])
                # the wrapper and the class under it implement the same selectors
                assert ((cls, row["selector"]) in installed) == ((classes[role][-1], row["selector"]) in installed)


def test_the_debug_layer_can_be_turned_on_before_the_device_is_made():
    out = child("""
        import json, agxguard, agxguard._C as C, agxguard._model as M
        was = M.model_debug_layer(True)
        agxguard.install("model")
        print(json.dumps({"was": was, "now": M.model_debug_layer(), "d": agxguard.status()["discovery"]}))
    """, AGXGUARD_DRIVER="none")
    assert out["was"] is False and out["now"] is True
    assert out["d"]["device_class"] == "MTLModelDebugDevice" and out["d"]["layers"] == 1


def test_under_the_debug_layer_every_encoder_of_both_layers_ends_exactly_once():
    out = child("""
        import json, agxguard
        from agxguard.lab import model
        model.set_bugs(False)
        agxguard.set_mode("op")
        from agxguard.hooks import reset_counts; reset_counts()
        ok = [model.run_op(a=3.0), model.run_op(a=2.0, end_encoding=False)]  # the second: commit safety ends it
        st = agxguard.status()
        print(json.dumps({"ok": ok, "lc": {k: st[k] for k in ("encoders_created", "encoders_ended", "forced_ends",
                                                                "encoders_open", "retained", "freed_open")}}))
    """, **DEBUG)
    assert out["ok"] == [True, True]
    # two ops, each one wrapper encoder over one driver encoder; the model faults on a second end
    assert out["lc"] == {"encoders_created": 4, "encoders_ended": 4, "forced_ends": 1, "encoders_open": 0,
                         "retained": 4, "freed_open": 0}


def test_under_the_debug_layer_off_crashes_and_stream_and_global_stop_every_fault_with_both_layers_tracked():
    outcomes = {}
    for mode in ("off", "stream", "global"):
        outs = [model.run_in_child(mode, threads=8, iterations=100, bugs=ALL_BUGS, env=DEBUG, hooks=False,
                                   timeout=60) for _ in range(RUNS)]
        assert not [o for o in outs if model.is_error(o)], outs
        outcomes[mode] = outs
    assert any(o.outcome != "passed" for o in outcomes["off"]), [o.outcome for o in outcomes["off"]]
    for mode in ("stream", "global"):
        bad = [o.message for o in outcomes[mode] if o.outcome != "passed"]
        assert not bad, (mode, bad)
        for o in outcomes[mode]:
            lc = o.value["lifecycle"]
            # 800 ops, each a wrapper encoder over a driver encoder: both layers tracked, each ended once
            assert lc["encoders_created"] == lc["encoders_ended"] == 1600, (mode, lc)
            assert lc["encoders_open"] == 0 and lc["freed_open"] == 0, (mode, lc)


# ---------------------------------------------------------------- item 7: nothing left alive

@pytest.mark.parametrize("env, kept", [({}, {}), ({"AGX_MODEL_DEBUG_LAYER": "1"}, {"debug_wrappers": 1})],
                         ids=["plain", "debug_layer"])
def test_discovery_leaves_no_model_object_alive_that_it_made(env, kept):
    out = child("""
        import json, agxguard, agxguard._C as C, agxguard._model as M
        before = M.model_live_objects()
        agxguard.install("model")
        after = M.model_live_objects()
        print(json.dumps({"before": before, "after": after}))
    """, AGXGUARD_DRIVER="none", **env)
    # kept: the debug layer's device, which lives as long as the process (as Metal's does)
    want = {k: v + kept.get(k, 0) for k, v in out["before"].items()}
    assert out["after"] == want, out


def test_live_object_counts_see_what_a_caller_keeps_and_what_it_gives_back():
    # the detector behind the test above: run_op keeps its queue, gives its command buffer back
    out = child("""
        import json, agxguard._C as C, agxguard._model as M
        from agxguard.lab import model
        model.set_bugs(False)
        before = M.model_live_objects()
        model.run_op(queue=5)
        print(json.dumps({"before": before, "after": M.model_live_objects()}))
    """, AGXGUARD_DRIVER="none")
    b, a = out["before"], out["after"]
    assert a["command_queues"] == b["command_queues"] + 1
    assert a["command_buffers"] == b["command_buffers"] and a["encoders"] == b["encoders"]


# ---------------------------------------------------------------- item 2: a Mac with a GPU and no hooks

@pytest.fixture
def fake_mac(monkeypatch):
    """This build seen as macOS's: Metal supported, the install's outcome chosen by the test."""
    monkeypatch.setattr(C, "METAL_SUPPORTED", True, raising=False)
    monkeypatch.setattr(hooks_module, "_reason", hooks_module._reason)
    state = types.SimpleNamespace(gpus=["AGXG14GDevice"], error="no Metal device: MTLCreateSystemDefaultDevice() "
                                                                  "returned nil and MTLCopyAllDevices() has no Apple GPU")
    monkeypatch.setattr(C, "metal_devices", lambda: list(state.gpus))

    def fake_install(driver):
        assert driver == "metal"
        raise RuntimeError(state.error)

    monkeypatch.setattr(C, "hooks_install", fake_install)
    monkeypatch.setattr(C, "hooks_driver", lambda: None)
    return state


AUTO = types.SimpleNamespace(disable=False, driver="auto")


def test_a_mac_with_a_gpu_and_no_hooks_warns_at_import_with_the_reason(fake_mac):
    with pytest.warns(RuntimeWarning, match=r"no driver hooks installed on this Mac with a GPU \(AGXG14GDevice\): "
                                            r"no Metal device: MTLCreateSystemDefaultDevice\(\) returned nil"):
        hooks_module._install_at_import(AUTO)
    assert "MTLCopyAllDevices" in agxguard.status()["reason"]


def test_a_mac_without_a_gpu_stays_quiet(fake_mac, recwarn):
    fake_mac.gpus = []
    hooks_module._install_at_import(AUTO)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_hooks_turned_off_on_purpose_do_not_warn(fake_mac, recwarn):
    hooks_module._install_at_import(types.SimpleNamespace(disable=False, driver="none"))
    hooks_module._install_at_import(types.SimpleNamespace(disable=True, driver="auto"))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_metal_devices_is_empty_off_macos():
    if C.METAL_SUPPORTED:
        pytest.skip("this build has Metal: the list is the Mac's")
    assert C.metal_devices() == []
