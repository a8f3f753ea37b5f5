"""Cross-build agxguard._C for macOS with Apple's headers, and check what it needs.

For each of aarch64-macos and x86_64-macos: compile every C source that
setup.py compiles on a Mac (every csrc/<part>/*.c but csrc/tests, with AGX_HAVE_OBJC)
with zig's clang against Apple's libc and Objective-C headers (the `ziglang`
package from PyPI ships them), `-Wall -Werror`; link the objects as a bundle
whose symbols resolve when it loads (`-undefined dynamic_lookup`, as CPython
extensions on macOS are linked); then read the bundle's undefined symbols
(with macholib) and fail on any that macOS does not provide.

What macOS provides, for this check:
- the Python C API (names starting with Py or _Py),
- libSystem: Apple's export list for it, libSystem.tbd, which ziglang ships,
  read for the architecture at hand,
- libobjc: every function Apple's <objc/*.h> declare with OBJC_EXPORT, plus
  the autorelease-pool entry points that clang's ARC specification documents
  as runtime support (declared in no public header),
- the few framework entry points listed in FRAMEWORK_EXPORTS (Metal,
  CoreGraphics, Foundation): ziglang has no framework stubs, so this list is
  ours, taken from Apple's documentation; keep it to what the code calls.

It cannot run the bundle: that needs a Mac. The Python headers are the host's
(their pyconfig.h describes Linux); the C API's names and layout are the same.

    python3 scripts/macos_check.py [--arch aarch64,x86_64] [--extra-source F.c]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, Iterable, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHES = ("aarch64", "x86_64")
# clang's ARC spec ("Runtime support") documents these; libobjc exports them.
OBJC_RUNTIME_SUPPORT = {"objc_autoreleasePoolPush", "objc_autoreleasePoolPop"}
FRAMEWORK_EXPORTS: Dict[str, Set[str]] = {
    "Metal": {"MTLCreateSystemDefaultDevice", "MTLCopyAllDevices"},
    "CoreGraphics": set(),  # linked so that Metal finds the GPU in a command-line process
    "Foundation": set(),
}
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Werror", "-Wno-missing-braces", "-DAGX_HAVE_OBJC=1"]


def zig_root() -> str:
    try:
        import ziglang  # noqa: F401  (the package: its path holds Apple's headers)
    except ImportError:
        sys.exit("macos_check: the ziglang package is missing (pip install -r scripts/macos-check-requirements.txt)")
    return os.path.dirname(ziglang.__file__)


def sources() -> List[str]:
    return sorted(f for f in glob.glob(os.path.join(ROOT, "csrc", "*", "*.c"))
                  if os.path.basename(os.path.dirname(f)) != "tests")


def include_dirs() -> List[str]:
    return sorted(d for d in glob.glob(os.path.join(ROOT, "csrc", "*"))
                  if os.path.isdir(d) and os.path.basename(d) != "tests")


def zig_cc(arch: str, args: List[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", f"{arch}-macos"] + args
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def compile_all(arch: str, srcs: Iterable[str], out_dir: str, jobs: int) -> Tuple[List[str], List[str]]:
    """Objects, and compiler messages (empty when every file compiled silently)."""
    inc = ["-I" + d for d in include_dirs()] + ["-I" + sysconfig.get_paths()["include"]]

    def one(src: str) -> Tuple[str, str]:
        obj = os.path.join(out_dir, os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")
        r = zig_cc(arch, CFLAGS + inc + ["-c", src, "-o", obj])
        text = r.stdout.strip()
        if r.returncode != 0 and not text:
            text = f"{src}: the compiler failed (exit {r.returncode})"
        return obj, text

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, srcs))
    return [o for o, _ in results], [t for _, t in results if t]


def undefined_symbols(path: str) -> Set[str]:
    from macholib.MachO import MachO
    from macholib.SymbolTable import SymbolTable

    m = MachO(path)
    names: Set[str] = set()
    for header in m.headers:
        for _, name in SymbolTable(m, header).undefsyms:
            names.add(name.decode())
    return names


def libsystem_exports(zig: str, arch: str) -> Set[str]:
    """Symbols libSystem.tbd exports (or re-exports) for `arch`."""
    text = open(os.path.join(zig, "lib", "libc", "darwin", "libSystem.tbd")).read()
    want = ("arm64-macos", "arm64e-macos") if arch == "aarch64" else ("x86_64-macos",)
    out: Set[str] = set()
    # each export block starts with "- targets: [...]" and lists symbols in [...] after keys
    for block in re.split(r"\n\s*-\s+targets:", text)[1:]:
        targets = block[: block.find("]")]
        if not any(t in targets for t in want):
            continue
        for key, body in re.findall(r"(symbols|weak-symbols|thread-local-symbols):\s*\[([^\]]*)\]", block):
            out.update(s.strip().strip("'") for s in body.split(","))
    out.discard("")
    return out


def objc_exports(zig: str) -> Set[str]:
    """Functions Apple's Objective-C headers declare as exported by libobjc."""
    names: Set[str] = set(OBJC_RUNTIME_SUPPORT)
    for h in glob.glob(os.path.join(zig, "lib", "libc", "include", "any-darwin-any", "objc", "*.h")):
        text = open(h, errors="replace").read()
        for decl in re.findall(r"OBJC_EXPORT\b(.*?)[;{]", text, flags=re.S):
            m = re.search(r"\b([A-Za-z_]\w*)\s*\(", re.sub(r"/\*.*?\*/", "", decl, flags=re.S))
            if m:
                names.add(m.group(1))
    return names


def classify(undef: Set[str], libsystem: Set[str], objc: Set[str]) -> Tuple[Dict[str, List[str]], List[str]]:
    """Group each undefined symbol by the library that provides it; the rest are missing."""
    groups: Dict[str, List[str]] = {"Python": [], "libSystem": [], "libobjc": []}
    groups.update({fw: [] for fw in FRAMEWORK_EXPORTS})
    missing = []
    for sym in sorted(undef):
        c = sym[1:] if sym.startswith("_") else sym  # Mach-O prefixes C names with "_"
        if c.startswith("Py") or c.startswith("_Py"):
            groups["Python"].append(c)
        elif sym in libsystem:
            groups["libSystem"].append(c)
        elif c in objc:
            groups["libobjc"].append(c)
        else:
            fw = next((f for f, names in FRAMEWORK_EXPORTS.items() if c in names), None)
            if fw:
                groups[fw].append(c)
            else:
                missing.append(c)
    return groups, missing


def check_arch(arch: str, srcs: List[str], zig: str, jobs: int, verbose: bool) -> bool:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"agx-macos-{arch}-") as tmp:
        objs, messages = compile_all(arch, srcs, tmp, jobs)
        if messages:
            print(f"{arch}-macos: FAILED to compile cleanly (-Wall -Werror):")
            print("\n".join(messages))
            return False
        bundle = os.path.join(tmp, "_C.so")
        r = zig_cc(arch, ["-shared", "-Wl,-undefined,dynamic_lookup", "-o", bundle] + objs)
        if r.returncode != 0:
            print(f"{arch}-macos: FAILED to link the bundle:\n{r.stdout}")
            return False
        undef = undefined_symbols(bundle)
    groups, missing = classify(undef, libsystem_exports(zig, arch), objc_exports(zig))
    counts = ", ".join(f"{k} {len(v)}" for k, v in groups.items() if v)
    if verbose:
        for k, v in groups.items():
            if v:
                print(f"  {arch} {k}: {' '.join(v)}")
    if missing:
        print(f"{arch}-macos: FAILED: the bundle needs symbols that macOS does not provide: {', '.join(missing)}")
        print(f"  (provided: {counts})")
        return False
    print(f"{arch}-macos: OK: {len(srcs)} sources compiled with -Wall -Werror, no warnings; "
          f"the bundle needs {len(undef)} symbols, all provided ({counts}); {time.monotonic() - t0:.1f} s")
    return True


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(ARCHES),
                   help="comma-separated, from: " + ", ".join(ARCHES) + " (default: both)")
    p.add_argument("--extra-source", action="append", default=[],
                   help="compile this file into the bundle too (the tests use it to show the check fails)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles (default: CPUs)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every undefined symbol by library")
    a = p.parse_args(argv)
    arches = [x.strip() for x in a.arch.split(",") if x.strip()]
    bad = [x for x in arches if x not in ARCHES]
    if bad or not arches:
        p.error(f"--arch {a.arch!r}: allowed values are {', '.join(ARCHES)}")
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: must be >= 1")
    for f in a.extra_source:
        if not os.path.isfile(f):
            p.error(f"--extra-source {f!r}: no such file")
    zig = zig_root()
    srcs = sources() + [os.path.abspath(f) for f in a.extra_source]
    ok = [check_arch(arch, srcs, zig, a.jobs, a.verbose) for arch in arches]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
