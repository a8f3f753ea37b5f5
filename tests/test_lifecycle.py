"""Encoder lifecycle and lock order on the driver model (issue 10, items 5 and 6).

Item 5: every path that ends an encoder is seen, so commit safety never ends one
twice. Item 6: nothing on the driver's completion path waits for a mode or region
lock, so a thread blocked in ``commandBuffer`` (the queue is at its maximum) while
holding one is always woken by the completion that frees a slot.

Each scenario runs in a child process (a double end aborts, a deadlock hangs)
with a timeout; the driver model's own hang detector aborts a wait for a slot or a
completion after 5 s. The driver model is a test double, not Apple hardware.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import agxguard._C as C
import agxguard._model as M
from agxguard.lab import model

pytestmark = pytest.mark.skipif(not model.available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

FACTORIES = [("computeCommandEncoder", ()), ("computeCommandEncoderWithDescriptor:", (0,)),
             ("computeCommandEncoderWithDispatchType:", (0,)), ("blitCommandEncoder", ()),
             ("blitCommandEncoderWithDescriptor:", (0,))]
ENDS = ["endEncoding", "deferredEndEncoding", None]  # None: left open, commit safety ends it


def child(code, driver="model", timeout=60, **env):
    """Run PRELUDE + `code` (each dedented) in a fresh interpreter; AGXGUARD_* from
    the arguments only."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("AGXGUARD_")}
    e.update(env, AGXGUARD_DRIVER=driver)
    try:
        return subprocess.run([sys.executable, "-c", script(code)], capture_output=True, text=True, env=e,
                              timeout=timeout)
    except subprocess.TimeoutExpired as t:
        pytest.fail(f"the child hung for {timeout}s: {t.stderr}")


PRELUDE = """
    import json, sys, threading, time
    import agxguard, agxguard._C as C, agxguard._model as M
    S = M.model_send
    dev = M.model_device()
"""


def script(body):
    return textwrap.dedent(PRELUDE) + textwrap.dedent(body)


# ---------------------------------------------------------------- the model itself

def test_the_model_aborts_on_a_second_end_of_an_encoder():
    # as Metal: a driver assertion with the encoder and the selector, not a stray read
    p = child("""
        q = S(dev, "newCommandQueue"); cb = S(q, "commandBuffer"); enc = S(cb, "blitCommandEncoder")
        S(enc, "deferredEndEncoding"); S(enc, "endEncoding")
    """, driver="none")
    assert p.returncode == -6, (p.returncode, p.stderr)
    assert ("-[AGXModelG16XFamilyBlitContext endEncoding]: failed assertion "
            "`endEncoding on an encoder that has already ended'") in p.stderr


def test_the_model_reports_a_call_on_an_encoder_after_its_end():
    # the other half of the detector: any other call after the end reads the freed table (a fault)
    p = child("""
        q = S(dev, "newCommandQueue"); cb = S(q, "commandBuffer"); enc = S(cb, "computeCommandEncoder")
        S(enc, "endEncoding"); S(enc, "setBuffer:offset:atIndex:", 0, 0, 0)
    """, driver="none")
    assert p.returncode < 0 and "AGXModelG16XFamilyComputeContext]: encoder used after endEncoding" in p.stderr, (
        p.returncode, p.stderr)


def test_the_model_has_every_factory_and_end_path_on_both_encoders():
    M.model_device()  # the classes exist once the model does
    classes = model.classes()
    for role in ("compute_encoder", "blit_encoder"):
        for sel in ("endEncoding", "deferredEndEncoding", "dealloc"):
            assert M.objc_method_imp(classes[role], sel)
    for sel, _ in FACTORIES:
        assert M.objc_method_imp(classes["command_buffer"], sel)


def test_the_queue_blocks_at_its_maximum_until_a_completion_frees_a_slot():
    p = child("""
        q = S(dev, "newCommandQueueWithMaxCommandBufferCount:", 1)
        assert S(dev, "newCommandQueueWithMaxCommandBufferCount:", 0) == 0  # nil, as Metal
        cb1 = S(q, "commandBuffer")
        got = []
        t = threading.Thread(target=lambda: got.append(S(q, "commandBuffer")))
        t.start(); t.join(0.5)
        blocked = t.is_alive()  # the only slot is cb1's, uncompleted
        S(cb1, "commit"); S(cb1, "waitUntilCompleted"); S(cb1, "release")
        t.join(10)
        # 64 for newCommandQueue, as Metal's default
        q64 = S(dev, "newCommandQueue"); held = [S(q64, "commandBuffer") for _ in range(64)]
        t2 = threading.Thread(target=lambda: got.append(S(q64, "commandBuffer")))
        t2.start(); t2.join(0.5)
        blocked64 = t2.is_alive()
        S(held[0], "commit"); t2.join(10)
        print(json.dumps([blocked, len(got), blocked64, t2.is_alive()]))
    """, driver="none")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [True, 2, True, False]


def test_a_gpu_wait_for_a_shared_event_holds_completion_until_it_is_signaled():
    p = child("""
        q = S(dev, "newCommandQueue"); ev = S(dev, "newSharedEvent")
        cb = S(q, "commandBuffer"); S(cb, "encodeWaitForEvent:value:", ev, 2); S(cb, "encodeSignalEvent:value:", ev, 5)
        S(cb, "commit"); time.sleep(0.3)
        before = S(cb, "status")  # 2: committed, not completed
        S(ev, "setSignaledValue:", 2); S(cb, "waitUntilCompleted")
        print(json.dumps([before, S(cb, "status"), S(ev, "signaledValue")]))
    """, driver="none")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [2, 4, 5]


# ---------------------------------------------------------------- item 5: ends

@pytest.mark.parametrize("mode", ["op", "stream", "global"])
def test_every_factory_and_every_end_path_is_tracked_and_no_encoder_is_ended_twice(mode):
    # Each (factory, end) pair on its own buffer, then commit. Before the fix the blit
    # encoder's deferredEndEncoding was not hooked, so commit safety ended the encoder a
    # second time (driver abort), and encoders from blitCommandEncoderWithDescriptor: were
    # not tracked, so one left open reached commit open (driver abort).
    p = child(f"""
        agxguard.set_mode({mode!r})
        q = S(dev, "newCommandQueue")
        C.hooks_reset_lifecycle()
        for fac, args in {FACTORIES!r}:
            for end in {ENDS!r}:
                cb = S(q, "commandBuffer"); enc = S(cb, fac, *args)
                if end: S(enc, end)
                S(cb, "commit"); S(cb, "waitUntilCompleted"); S(cb, "release")
        print(json.dumps(C.hooks_lifecycle()))
    """)
    assert p.returncode == 0, p.stderr
    lc = json.loads(p.stdout)
    n = len(FACTORIES) * len(ENDS)
    assert lc["encoders_created"] == lc["encoders_ended"] == lc["retained"] == n, lc
    assert lc["forced_ends"] == len(FACTORIES), lc  # exactly the ones left open
    assert lc["encoders_open"] == 0 and lc["freed_open"] == 0, lc


def test_an_encoder_from_an_unhooked_factory_is_never_tracked_nor_ended_by_commit():
    # the blit descriptor factory unhooked: its encoder is the caller's to end; commit
    # safety must not touch it (it would end it a second time here)
    p = child("""
        agxguard.set_mode("op")
        assert C.swizzle_uninstall("AGXModelG16XFamilyCommandBuffer", "blitCommandEncoderWithDescriptor:") == 1
        q = S(dev, "newCommandQueue")
        C.hooks_reset_lifecycle()
        cb = S(q, "commandBuffer"); enc = S(cb, "blitCommandEncoderWithDescriptor:", 0)
        S(enc, "deferredEndEncoding")
        S(cb, "commit"); S(cb, "waitUntilCompleted"); S(cb, "release")
        print(json.dumps(C.hooks_lifecycle()))
    """)
    assert p.returncode == 0, p.stderr
    lc = json.loads(p.stdout)
    assert lc["encoders_created"] == lc["encoders_ended"] == lc["forced_ends"] == 0, lc


def test_the_table_hooks_every_end_and_factory_on_both_encoder_roles():
    rows = {r["selector"]: r for r in C.hooks_table()}
    for sel in ("endEncoding", "deferredEndEncoding"):
        assert rows[sel]["kind"] == "end_encoder" and {"compute_encoder", "blit_encoder"} <= set(rows[sel]["roles"])
    for sel, _ in FACTORIES:
        assert rows[sel]["kind"] == "make_encoder" and "command_buffer" in rows[sel]["roles"]


# ---------------------------------------------------------------- item 6: lock order

DEADLOCK = """
    mode, region = sys.argv[1], sys.argv[2] == "region"
    agxguard.set_mode(mode)
    KEY = 0x51AB
    q = S(dev, "newCommandQueueWithMaxCommandBufferCount:", 1)
    M.swizzle_set_stream(q, KEY)
    ev = S(dev, "newSharedEvent")
    # cb1 takes the only slot; on the GPU it waits for `ev`, so it completes (and its
    # encoder is dealloc'd and its slot freed, on the driver's completion thread) only
    # once B below is blocked for a slot
    cb1 = S(q, "commandBuffer")
    S(cb1, "encodeWaitForEvent:value:", ev, 1)
    enc = S(cb1, "computeCommandEncoder"); S(enc, "endEncoding")
    S(cb1, "commit"); S(cb1, "release")  # the driver's reference is the last one
    done = []

    def b():
        with agxguard.use_stream(KEY):
            if region:
                with agxguard.guard():
                    cb2 = S(q, "commandBuffer")  # blocks for a slot holding the region's lock
            else:
                cb2 = S(q, "commandBuffer")  # blocks for a slot holding the hooked call's lock
            S(cb2, "commit"); S(cb2, "waitUntilCompleted"); S(cb2, "release")
            done.append(cb2)

    t = threading.Thread(target=b)
    t.start()
    time.sleep(0.5)
    S(ev, "setSignaledValue:", 1)  # not a hooked selector: the GPU may go on
    t.join(20)
    lc = C.hooks_lifecycle()
    print(json.dumps({"done": len(done), "open": lc["encoders_open"], "freed_open": lc["freed_open"]}))
"""


@pytest.mark.parametrize("mode,region", [("op", False), ("stream", False), ("global", False),
                                         ("stream", True), ("global", True)])
def test_a_thread_blocked_for_a_queue_slot_under_a_lock_is_woken_by_the_completion(mode, region):
    # Before the fix the completion thread's hooked dealloc and release waited for the
    # lock that B holds while B waits for the slot they free: a deadlock, which the
    # model reports as a hang (abort) after 5 s.
    e = {k: v for k, v in os.environ.items() if not k.startswith("AGXGUARD_")}
    e["AGXGUARD_DRIVER"] = "model"
    p = subprocess.run([sys.executable, "-c", script(DEADLOCK), mode, "region" if region else "call"],
                       capture_output=True, text=True, env=e, timeout=60)
    assert p.returncode == 0 and "(hang)" not in p.stderr, (p.returncode, p.stderr[-600:])
    assert json.loads(p.stdout) == {"done": 1, "open": 0, "freed_open": 0}


def test_completion_path_rows_take_no_lock_and_encoder_calls_still_do():
    rows = {(r["selector"], tuple(r["roles"])): r for r in C.hooks_table()}
    unlocked = {sel for (sel, _), r in rows.items() if r["unlocked"]}
    assert unlocked == {"release", "dealloc"}


UNCOMMITTED = """
    agxguard.set_mode("op")
    q = S(dev, "newCommandQueueWithMaxCommandBufferCount:", 1)
    cb1 = S(q, "commandBuffer")  # A holds the only slot, not committed yet
    t = threading.Thread(target=lambda: S(q, "commandBuffer"))  # B blocks for it, holding the op lock
    t.start()
    time.sleep(0.5)
    S(cb1, "commit")  # A's hooked commit waits for the op lock: B waits for A, A for B
    t.join(20)
    print("OK")
"""


@pytest.mark.xfail(strict=True, reason=(
    "known limit: a hooked commandBuffer holds its mode lock while the queue blocks for a slot, and a slot held by "
    "another thread's uncommitted buffer is freed only by that thread's hooked calls. Metal's queue is thread-safe, "
    "but the driver model's buffer_recycle race lives in commandBuffer, so the call stays locked; regions that "
    "cover a whole op (global) cannot meet it"))
def test_a_slot_held_by_an_uncommitted_buffer_deadlocks_a_locked_command_buffer_call():
    p = child(UNCOMMITTED)
    assert p.returncode == 0 and p.stdout.strip() == "OK", (p.returncode, p.stderr[-300:])
