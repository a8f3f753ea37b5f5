"""The general forwarder's trampoline (csrc/objc/fwd_tramp.c, issue 13's cost
target): a hooked method without a typed wrapper runs through a stub of the
trampoline, which passes every argument and return register through untouched,
instead of a libffi closure + ffi_call. tests/test_forwarder.py checks the
default path (now the trampoline) bit for bit; this file checks that the
trampoline is what runs, that the libffi closure (AGXGUARD_FORWARDER=libffi)
stays exact too, and the trampoline alone, without Objective-C, natively and
for arm64 under qemu-user. Runs that call through hooks are child processes
with a timeout."""
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from agxguard import swizzle

M = pytest.importorskip("agxguard._model", reason="the lab's module agxguard._model is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS, ITERS = 8, 60
ARCH = platform.machine().lower()
HAS_TRAMP = ARCH in ("x86_64", "amd64", "aarch64", "arm64")
needs_objc = pytest.mark.skipif(not swizzle.swizzle_available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")


def child(body, forwarder=None):
    """Run `body` in a fresh interpreter with AGXGUARD_FORWARDER=forwarder (None:
    unset); return the `out` dict it filled."""
    code = textwrap.dedent("""
        import json
        import agxguard._C as C
        import agxguard._model as M
        from agxguard import swizzle
        probes = M.forward_probes()
        out = {}
    """) + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(out))\n"
    env = dict(os.environ)
    env.pop("AGXGUARD_FORWARDER", None)
    if forwarder is not None:
        env["AGXGUARD_FORWARDER"] = forwarder
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"child failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def is_stub(code: bytes) -> bool:
    """Whether code starts like one of the trampoline's stubs: x86-64
    [endbr64] lea 0(%rip),%r11; arm64 [bti c] adr x16, ."""
    if ARCH in ("x86_64", "amd64"):
        if code.startswith(bytes.fromhex("f30f1efa")):
            code = code[4:]
        return code.startswith(bytes.fromhex("4c8d1d00000000"))
    if code[:4] == (0xd503245f).to_bytes(4, "little"):
        code = code[4:]
    return code[:4] == (0x10000010).to_bytes(4, "little")


CODE_OF_FORWARDED = """
    swizzle.guard_methods("AGXForwardProbe", [s for s, _ in probes])
    ffi = [h["selector"] for h in swizzle.hooks() if h["class"] == "AGXForwardProbe" and h["shape"].startswith("ffi ")]
    out["code"] = {s: M.forward_imp_code("AGXForwardProbe", s, 16).hex() for s in ffi}
"""


@needs_objc
@pytest.mark.skipif(not HAS_TRAMP, reason=f"no trampoline for {ARCH}: the forwarder uses libffi closures there")
def test_forwarded_methods_run_through_the_trampoline_stubs():
    out = child(CODE_OF_FORWARDED)
    assert len(out["code"]) >= 10  # the Metal shapes, struct mixes, stack arguments
    not_stubs = {s: c for s, c in out["code"].items() if not is_stub(bytes.fromhex(c))}
    assert not_stubs == {}


@needs_objc
def test_agxguard_forwarder_libffi_keeps_the_libffi_closure():
    """The control for the test above: the same hooks made with libffi's closures
    are not stubs (so the check can fail)."""
    out = child(CODE_OF_FORWARDED, forwarder="libffi")
    assert out["code"] and not any(is_stub(bytes.fromhex(c)) for c in out["code"].values())


@needs_objc
def test_a_bad_agxguard_forwarder_value_is_refused_naming_it_and_the_choices():
    out = child("""
        try:
            swizzle.guard_methods("AGXForwardProbe", "setSamplerStateLodClamps::::")
            out["error"] = None
        except Exception as e:
            out["error"] = [type(e).__name__, str(e)]
    """, forwarder="fastest")
    assert out["error"] is not None
    assert "AGXGUARD_FORWARDER=fastest is not one of trampoline, libffi" in out["error"][1]


@needs_objc
@pytest.mark.parametrize("forwarder", ["trampoline", "libffi"])
def test_every_probe_is_exact_and_locked_on_both_paths(forwarder):
    """Bit for bit through either path, and no update lost with 8 threads in op."""
    out = child(f"""
        out["installed"] = swizzle.guard_methods("AGXForwardProbe", [s for s, _ in probes])
        C.set_mode("op")
        out["hooked"] = [M.forward_probe_call(i) for i in range(len(probes))]
        out["runs"] = [M.forward_probe_race(i, {THREADS}, {ITERS}) for i in range(len(probes))]
    """, forwarder=forwarder)
    n = len(M.forward_probes())
    assert out["installed"] == n
    assert out["hooked"] == [None] * n
    assert [r for r in out["runs"] if r != [THREADS * ITERS, 0]] == []


def build_and_run(cc, out_path, runner=()):
    src = [os.path.join(ROOT, "csrc", "tests", "fwd_tramp_test.c"), os.path.join(ROOT, "csrc", "objc", "fwd_tramp.c")]
    inc = [f"-I{os.path.join(ROOT, 'csrc', d)}" for d in ("objc", "guard", "sync")]
    b = subprocess.run(cc + ["-std=gnu11", "-O2", "-Wall", "-Werror", *inc, *src, "-o", out_path],
                       capture_output=True, text=True, timeout=240)
    assert b.returncode == 0, b.stderr
    r = subprocess.run([*runner, out_path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.skipif(not HAS_TRAMP, reason=f"no trampoline for {ARCH}")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build csrc/tests/fwd_tramp_test.c")
def test_the_trampoline_alone_passes_every_register_through(tmp_path):
    """Structs of 8..64 bytes, HFAs, 16-byte integer returns, stack arguments,
    narrow and long double arguments and returns, with the C halves overwriting
    every argument and return register."""
    out = build_and_run(["cc"], str(tmp_path / "fwd_tramp_test"))
    assert "cases ok" in out


def zig():
    try:
        import ziglang  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "ziglang", "cc"]


@pytest.mark.skipif(zig() is None, reason="no zig (pip install ziglang) to cross-build for aarch64-linux")
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64 (Debian: qemu-user) to run arm64")
@pytest.mark.parametrize("flags", [[], ["-mbranch-protection=standard"]], ids=["plain", "bti"])
def test_the_arm64_trampoline_passes_every_register_through_under_qemu(tmp_path, flags):
    """The arm64 body (macOS's ABI differs from Linux's only where stack
    arguments sit, which the trampoline copies as a block) run on qemu-user;
    also built for branch target identification (16-byte stubs with a landing
    pad; qemu-user does not enforce the landing pads, so this checks the layout)."""
    out = build_and_run(zig() + ["-target", "aarch64-linux-musl", *flags], str(tmp_path / "fwd_tramp_test_arm64"),
                        runner=["qemu-aarch64", "-cpu", "max"])
    assert "cases ok" in out
