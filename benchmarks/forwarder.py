"""What a hooked call costs: the typed wrapper, the general forwarder (its
trampoline, and its libffi closure), and no hook, on one method, in one run.

Three classes share one method, -bench:with: (two integers, no return; its
body is one add), called from C in a loop (csrc/model/forward_probes.c,
agxguard._model.forward_bench): AGXForwardBenchPlain is not hooked, AGXForwardBenchTyped is
hooked through the typed wrapper of its shape, AGXForwardBenchFfi through the
general forwarder's trampoline and AGXForwardBenchLibffi through its libffi
closure (AGXGUARD_FORWARDER=libffi at install), both installed with the typed
path switched off. Each round
times every variant once, interleaved, in mode `off` (the hook counts the
call, takes no lock) and `op` (one process-wide lock per call, uncontended);
the table gives the median over rounds, the spread (min..max), and the cost
over the unhooked call. A second method of the classes has the shape of
Metal's copyFromBuffer:...toTexture:... (nine arguments, two 24-byte structs
by value, on the stack on x86-64), which has no typed wrapper: its rows
compare the forwarder's two paths with the unhooked call only.

    python benchmarks/forwarder.py [--calls 2000000] [--rounds 7] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from agxguard import _C, swizzle  # noqa: E402

try:
    from agxguard import _model  # noqa: E402  (the lab's module: the bench classes)
except ImportError:
    _model = None

VARIANTS = [("unhooked", "AGXForwardBenchPlain"), ("typed wrapper", "AGXForwardBenchTyped"),
            ("forwarder", "AGXForwardBenchFfi"), ("forwarder (libffi)", "AGXForwardBenchLibffi")]
MODES = ("off", "op")
COPY = ("benchCopy:sourceOffset:sourceBytesPerRow:sourceBytesPerImage:sourceSize:toTexture:destinationSlice:"
        "destinationLevel:destinationOrigin:")
COPY_VARIANTS = [("copy: unhooked", "AGXForwardBenchPlain"), ("copy: forwarder", "AGXForwardBenchFfi"),
                 ("copy: fwd (libffi)", "AGXForwardBenchLibffi")]


def commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2_000_000, help="calls per timing (default 2,000,000)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--out", help="also write the report to this file")
    a = ap.parse_args()
    if a.calls < 1 or a.rounds < 1:
        ap.error(f"--calls {a.calls} and --rounds {a.rounds} must be >= 1")
    if not swizzle.swizzle_available() or not hasattr(_model, "forward_bench"):
        print("this build has no swizzle engine or no forwarder probes (no Objective-C runtime)", file=sys.stderr)
        return 2
    _model.forward_bench("AGXForwardBenchPlain", 1)  # makes the classes
    swizzle.guard_methods("AGXForwardBenchTyped", "bench:with:")
    old_path = os.environ.pop("AGXGUARD_FORWARDER", None)
    _model.swizzle_force_forwarder(True)
    try:
        for cls, path in (("AGXForwardBenchFfi", "trampoline"), ("AGXForwardBenchLibffi", "libffi")):
            os.environ["AGXGUARD_FORWARDER"] = path  # read by the forwarder at install
            swizzle.guard_methods(cls, ["bench:with:", COPY])  # COPY has no typed wrapper: the forwarder
    finally:
        _model.swizzle_force_forwarder(False)
        os.environ.pop("AGXGUARD_FORWARDER", None)
        if old_path is not None:
            os.environ["AGXGUARD_FORWARDER"] = old_path
    shapes = {h["class"]: h["shape"] for h in swizzle.hooks() if h["selector"] == "bench:with:"}
    assert shapes["AGXForwardBenchTyped"] == "v(u64,u64)", shapes
    assert shapes["AGXForwardBenchFfi"].startswith("ffi ") and shapes["AGXForwardBenchLibffi"].startswith("ffi ")
    times = {(m, v): [] for m in MODES for v, _ in VARIANTS + COPY_VARIANTS}
    old = _C.get_mode()
    try:
        for m in MODES:
            _C.set_mode(m)
            for _, cls in VARIANTS:
                _model.forward_bench(cls, a.calls // 10 + 1)  # warm up
            for _ in range(a.rounds):
                for v, cls in VARIANTS:
                    times[(m, v)].append(_model.forward_bench(cls, a.calls))
                for v, cls in COPY_VARIANTS:
                    times[(m, v)].append(_model.forward_bench(cls, a.calls, COPY))
    finally:
        _C.set_mode(old)
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, Objective-C runtime {_C.OBJC_RUNTIME}",
        f"commit: {commit()}",
        f"{a.calls} calls per timing, {a.rounds} interleaved rounds; ns per call from C: median, spread "
        "(min..max), and best (the min: a shared machine only ever adds time); 'over unhooked' = the variant "
        "minus the unhooked call of the same mode, for the median and for the best",
        "",
        f"{'mode':5} {'variant':20} {'median':>8} {'spread':>19} {'over unhooked':>14} {'best':>7} "
        f"{'best over unhooked':>19}",
    ]
    for m in MODES:
        for group, base_name in ((VARIANTS, "unhooked"), (COPY_VARIANTS, "copy: unhooked")):
            base = statistics.median(times[(m, base_name)])
            best_base = min(times[(m, base_name)])
            for v, _ in group:
                t = times[(m, v)]
                med = statistics.median(t)
                lines.append(f"{m:5} {v:20} {med:8.1f} {min(t):9.1f}..{max(t):<8.1f} {med - base:14.1f} "
                             f"{min(t):7.1f} {min(t) - best_base:19.1f}")
    lines.append("")
    for m in MODES:
        def over(v: str, base: str) -> float:
            return min(times[(m, v)]) - min(times[(m, base)])
        typed, fwd = over("typed wrapper", "unhooked"), over("forwarder", "unhooked")
        copy = over("copy: forwarder", "copy: unhooked")
        lib, lib_copy = over("forwarder (libffi)", "unhooked"), over("copy: fwd (libffi)", "copy: unhooked")
        lines.append(f"{m}, best: the forwarder costs {fwd:.1f} ns over the unhooked call (target <= 100; "
                     f"{copy:.1f} ns on the copy shape), the typed wrapper {typed:.1f} ns (target < 15); "
                     f"forwarder/typed extra cost {fwd / typed if typed > 0 else float('nan'):.1f}x; "
                     f"through libffi's closure instead {lib:.1f} ns ({lib_copy:.1f} on the copy shape)")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
