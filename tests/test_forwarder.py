"""The swizzle engine's general forwarder (issue 13): methods whose shape has no
typed wrapper are forwarded through a libffi closure built from the type
encoding, with the same lock as the typed wrappers. The probe classes are in
csrc/model/forward_probes.c; every run that calls through a hook runs in a
child process with a timeout (a wrong call description can crash)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import agxguard._C as C
from agxguard import swizzle

M = pytest.importorskip("agxguard._model", reason="the lab's module agxguard._model is not built")

pytestmark = pytest.mark.skipif(not swizzle.swizzle_available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

THREADS, ITERS = 8, 60


def child(body):
    """Run `body` (Python, with C, swizzle, probes and out={} in scope) in a fresh
    interpreter; return the `out` dict it filled."""
    code = textwrap.dedent("""
        import json
        import agxguard._C as C
        import agxguard._model as M
        from agxguard import swizzle
        probes = M.forward_probes()
        out = {}
    """) + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"child failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def test_the_probes_cover_the_issues_signatures():
    encodings = dict(M.forward_probes())
    joined = " ".join(encodings.values())
    # structs of 8..64 bytes, nested, an array inside, float-only ones, Metal's q2/q3/q6
    for enc in ["{FPS8=if}", "{FPS16=dQ}", "{FPS24=fdi}", "{FPS32={FPS16=dQ}fiQ}",
                "{FPS48=dfiQ{_NSRange=QQ}d}", "{FPS64=", "{FPF4=[4f]}", "{FPD3=ddd}", "{?=QQ}",
                "{MTLOrigin=QQQ}", "{MTLRegion={MTLOrigin=QQQ}{MTLSize=QQQ}}"]:
        assert enc in joined, enc
    assert encodings["tenIntegers::::::::::"] == "Q@:" + "Q" * 10
    assert encodings["twelveFloats::::::::::::"].count("d") + encodings["twelveFloats::::::::::::"].count("f") > 8


def test_every_probe_arrives_bit_for_bit_through_the_forwarder():
    out = child("""
        out["direct"] = [M.forward_probe_call(i) for i in range(len(probes))]
        out["installed"] = swizzle.guard_methods("AGXForwardProbe", [s for s, _ in probes])
        C.set_mode("op")
        out["hooked"] = [M.forward_probe_call(i) for i in range(len(probes))]
        out["hooks"] = {h["selector"]: [h["shape"], h["calls"]] for h in swizzle.hooks()
                        if h["class"] == "AGXForwardProbe"}
    """)
    n = len(M.forward_probes())
    assert out["direct"] == [None] * n  # the callers and the methods agree unhooked
    assert out["installed"] == n
    assert out["hooked"] == [None] * n
    assert all(calls == 1 for _, calls in out["hooks"].values())  # each call went through its hook
    ffi = {s for s, (shape, _) in out["hooks"].items() if shape.startswith("ffi ")}
    # every Metal shape the issue lists, and every struct mix, goes through the forwarder
    for sel in ["setBuffersOffsetsWithRange:::", "setSamplerStateLodClamps::::", "copyFromBufferToTexture:::::::::",
                "getTextureAccessCounters:::::::", "s64Echo::", "structsOnTheStack:::::::::::::::::::",
                "narrowMix:::::::::::::::", "floatDoubleMix:::::::::::"]:
        assert sel in ffi, (sel, out["hooks"].get(sel))


def test_every_typed_shape_is_also_exact_through_the_forwarder():
    """The typed wrappers' probe methods (AGXShapeProbe), forced through the forwarder."""
    out = child("""
        shapes = M.swizzle_probes()
        M.swizzle_force_forwarder(True)
        out["installed"] = swizzle.guard_methods("AGXShapeProbe", [s for _, s in shapes])
        M.swizzle_force_forwarder(False)
        C.set_mode("global")
        out["hooked"] = [M.swizzle_probe_call(i) for i in range(len(shapes))]
        out["shapes"] = [h["shape"] for h in swizzle.hooks() if h["class"] == "AGXShapeProbe"]
    """)
    assert out["installed"] == len(out["hooked"])
    assert out["hooked"] == [None] * len(out["hooked"])
    assert out["shapes"] and all(s.startswith("ffi ") for s in out["shapes"])


@pytest.mark.parametrize("mode", ["op", "global"])
def test_forwarded_calls_lose_no_update_with_8_threads(mode):
    """Each probe method bumps one counter with a read-yield-write race: only the
    forwarder's lock around the original keeps every update."""
    out = child(f"""
        swizzle.guard_methods("AGXForwardProbe", [s for s, _ in probes])
        C.set_mode({mode!r})
        out["runs"] = [M.forward_probe_race(i, {THREADS}, {ITERS}) for i in range(len(probes))]
    """)
    lost = {M.forward_probes()[i][0]: n for i, (n, bad) in enumerate(out["runs"]) if n != THREADS * ITERS}
    changed = {M.forward_probes()[i][0]: bad for i, (n, bad) in enumerate(out["runs"]) if bad}
    assert lost == {} and changed == {}


def test_without_the_hook_the_probe_race_loses_updates():
    """The control for the test above: the same runs unhooked lose updates, so
    a forwarder that called the original outside the lock would fail it."""
    out = child(f"""
        C.set_mode("op")
        out["runs"] = [M.forward_probe_race(i, {THREADS}, {ITERS}) for i in range(3)]
    """)
    assert any(n < THREADS * ITERS for n, _ in out["runs"]), out["runs"]
    assert all(bad == 0 for _, bad in out["runs"])


def test_uninstall_puts_a_forwarded_method_back():
    out = child("""
        sel = "setSamplerStateLodClamps::::"
        i = [s for s, _ in probes].index(sel)
        before = M.objc_method_imp("AGXForwardProbe", sel)
        swizzle.guard_methods("AGXForwardProbe", sel)
        out["hooked_imp_differs"] = M.objc_method_imp("AGXForwardProbe", sel) != before
        out["removed"] = swizzle.unguard_methods("AGXForwardProbe", sel)
        out["restored"] = M.objc_method_imp("AGXForwardProbe", sel) == before
        out["call"] = M.forward_probe_call(i)
        out["again"] = swizzle.guard_methods("AGXForwardProbe", sel)
        out["call2"] = M.forward_probe_call(i)
    """)
    assert out == {"hooked_imp_differs": True, "removed": 1, "restored": True, "call": None, "again": 1,
                   "call2": None}


@pytest.mark.parametrize("selector,encoding,reason", M.forward_refused() if swizzle.swizzle_available() else [])
def test_a_signature_the_forwarder_cannot_describe_is_refused_naming_it(selector, encoding, reason):
    with pytest.raises(ValueError) as e:
        swizzle.guard_methods("AGXForwardRefuse", selector)
    msg = str(e.value)
    assert "AGXForwardRefuse" in msg and selector in msg and f'"{encoding}"' in msg and reason in msg
    assert not any(h["class"] == "AGXForwardRefuse" for h in swizzle.hooks())


def test_the_benchmark_classes_refuse_an_unknown_name():
    with pytest.raises(ValueError, match="AGXForwardBenchPlain"):
        M.forward_bench("NoSuchBench", 10)
    with pytest.raises(ValueError, match="calls=0"):
        M.forward_bench("AGXForwardBenchPlain", 0)


def test_classes_hooked_before_their_first_message_each_dispatch_to_their_own_hook():
    """The three bench classes share one selector and one IMP and get no message
    before they are hooked. GCC's runtime builds a dispatch table on the first
    message; the engine makes it build first (objc_compat.h), else the typed
    class's calls were seen to land in the forwarded class's hook."""
    out = child("""
        M.forward_bench("AGXForwardBenchPlain", 1)
        swizzle.guard_methods("AGXForwardBenchTyped", "bench:with:")
        M.swizzle_force_forwarder(True)
        swizzle.guard_methods("AGXForwardBenchFfi", "bench:with:")
        M.swizzle_force_forwarder(False)
        M.forward_bench("AGXForwardBenchTyped", 100)
        M.forward_bench("AGXForwardBenchFfi", 10)
        M.forward_bench("AGXForwardBenchPlain", 1)
        out["calls"] = {h["class"]: h["calls"] for h in swizzle.hooks() if h["selector"] == "bench:with:"}
    """)
    assert out["calls"] == {"AGXForwardBenchTyped": 100, "AGXForwardBenchFfi": 10}


# Every selector issue 13 names, by the role the seed fix guarded it on.
ISSUE_13_ROWS = {
    "compute_encoder": [
        "setBuffers:offsets:withRange:", "setBuffers:offsets:attributeStrides:withRange:",
        "setSamplerStates:lodMinClamps:lodMaxClamps:withRange:", "setSamplerState:lodMinClamp:lodMaxClamp:atIndex:",
        "setTextures:withRange:", "setSamplerStates:withRange:", "setStageInRegion:", "setBufferOffset:atIndex:",
        "setBuffer:offset:attributeStride:atIndex:", "executeCommandsInBuffer:withRange:",
        "executeCommandsInBuffer:indirectBuffer:indirectBufferOffset:",
        "sampleCountersInBuffer:atSampleIndex:withBarrier:"],
    "blit_encoder": [
        "copyFromBuffer:sourceOffset:sourceBytesPerRow:sourceBytesPerImage:sourceSize:toTexture:destinationSlice:"
        "destinationLevel:destinationOrigin:",
        "copyFromTexture:sourceSlice:sourceLevel:sourceOrigin:sourceSize:toBuffer:destinationOffset:"
        "destinationBytesPerRow:destinationBytesPerImage:",
        "copyIndirectCommandBuffer:sourceRange:destination:destinationIndex:",
        "resolveCounters:inRange:destinationBuffer:destinationOffset:",
        "getTextureAccessCounters:region:mipLevel:slice:resetCounters:countersBuffer:countersBufferOffset:",
        "resetTextureAccessCounters:region:mipLevel:slice:", "deferredEndEncoding", "generateMipmapsForTexture:",
        "optimizeContentsForGPUAccess:", "optimizeContentsForGPUAccess:slice:level:",
        "optimizeContentsForCPUAccess:", "optimizeContentsForCPUAccess:slice:level:",
        "synchronizeTexture:slice:level:", "resetCommandsInBuffer:withRange:",
        "sampleCountersInBuffer:atSampleIndex:withBarrier:"],
    "command_buffer": [
        "blitCommandEncoderWithDescriptor:", "resourceStateCommandEncoder",
        "resourceStateCommandEncoderWithDescriptor:", "accelerationStructureCommandEncoder",
        "accelerationStructureCommandEncoderWithDescriptor:", "renderCommandEncoderWithDescriptor:",
        "parallelRenderCommandEncoderWithDescriptor:"],
}
ENCODER_ROLES = ["compute_encoder", "blit_encoder", "render_encoder", "parallel_render_encoder",
                 "resource_state_encoder", "acceleration_structure_encoder"]


def test_the_hook_table_has_every_selector_issue_13_names():
    from agxguard.hooks import table
    rows = {(role, r["selector"]): r["kind"] for r in table() for role in r["roles"]}
    missing = [(role, sel) for role, sels in ISSUE_13_ROWS.items() for sel in sels if (role, sel) not in rows]
    assert missing == []
    # every encoder kind: made by a factory row, ended, deallocated without a lock
    for role in ENCODER_ROLES:
        assert rows[(role, "endEncoding")] == "end_encoder" and rows[(role, "dealloc")] == "dealloc", role
    factories = {sel for (role, sel), kind in rows.items() if kind == "make_encoder"}
    assert {"renderCommandEncoderWithDescriptor:", "parallelRenderCommandEncoderWithDescriptor:",
            "resourceStateCommandEncoder", "accelerationStructureCommandEncoder",
            "renderCommandEncoder"} <= factories
