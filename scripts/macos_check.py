"""Cross-build agxguard._C and agxguard._model for macOS with Apple's headers, and
check what each needs.

For each of aarch64-macos and x86_64-macos, and each of the two bundles setup.py
builds on a Mac (_C: the product, csrc/{sync,guard,python,objc,agx}; _model: the
lab, csrc/model, which may include the product's headers; both with AGX_HAVE_OBJC):
compile its C sources with zig's clang against Apple's libc and Objective-C headers
(the `ziglang` package from PyPI ships them), `-Wall -Werror`, with the include
directories setup.py gives it (the product never sees csrc/model); link the objects
as a bundle whose symbols resolve when it loads (`-undefined dynamic_lookup`, as
CPython extensions on macOS are linked); then read the bundle's undefined symbols
(with macholib) and fail on any that macOS does not provide. _model reaches _C only
through the capsule agxguard._C._capi, never by linking: an agxguard symbol
(agx_*) that _model leaves undefined is one macOS does not provide, and fails.

What macOS provides, for this check:
- the Python C API (names starting with Py or _Py),
- libSystem: Apple's export list for it, libSystem.tbd, which ziglang ships,
  read for the architecture at hand,
- libobjc: every function Apple's <objc/*.h> declare with OBJC_EXPORT, plus
  the autorelease-pool entry points that clang's ARC specification documents
  as runtime support (declared in no public header),
- libffi (/usr/lib/libffi.dylib, not part of libSystem: libSystem.tbd
  exports no ffi_ symbol): every function and ffi_type_* object that its
  header declares with FFI_API / FFI_EXTERN. ziglang has neither libffi's
  headers nor its .tbd, so the check compiles against libffi's own headers
  configured for each target (scripts/macos_ffi/, pinned to a release, made
  by scripts/macos_ffi/make_headers.py) and takes its export list from them;
  a Mac build uses the SDK's <ffi/ffi.h>,
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
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Werror", "-Wno-missing-braces", "-DAGX_HAVE_OBJC=1", "-DAGX_HAVE_FFI=1"]
FFI_HEADERS = os.path.join(ROOT, "scripts", "macos_ffi")  # <arch>/ffi/ffi.h, as <ffi/ffi.h> in the SDK
# The bundles (as setup.py builds them on a Mac): C folders compiled, include folders.
PRODUCT_PARTS = ("sync", "guard", "python", "objc", "agx")
BUNDLES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "_C": (PRODUCT_PARTS, PRODUCT_PARTS),
    "_model": (("model",), PRODUCT_PARTS + ("model",)),
}


def zig_root() -> str:
    try:
        import ziglang  # noqa: F401  (the package: its path holds Apple's headers)
    except ImportError:
        sys.exit("macos_check: the ziglang package is missing (pip install -r scripts/macos-check-requirements.txt)")
    return os.path.dirname(ziglang.__file__)


def sources(parts: Iterable[str]) -> List[str]:
    return sorted(f for part in parts for f in glob.glob(os.path.join(ROOT, "csrc", part, "*.c")))


def include_dirs(parts: Iterable[str]) -> List[str]:
    return sorted(os.path.join(ROOT, "csrc", part) for part in parts)


def zig_cc(arch: str, args: List[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", f"{arch}-macos"] + args
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def compile_all(arch: str, srcs: Iterable[str], inc_parts: Iterable[str], out_dir: str,
                jobs: int) -> Tuple[List[str], List[str]]:
    """Objects, and compiler messages (empty when every file compiled silently)."""
    inc = ["-I" + d for d in include_dirs(inc_parts)] + ["-I" + sysconfig.get_paths()["include"]]
    # <ffi/ffi.h> as on a Mac, and <ffitarget.h> beside it as libffi's ffi.h includes it
    inc += ["-I" + os.path.join(FFI_HEADERS, arch), "-I" + os.path.join(FFI_HEADERS, arch, "ffi")]

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


def ffi_exports(arch: str) -> Set[str]:
    """Functions and type objects libffi's header (configured for `arch`) declares as exported."""
    text = open(os.path.join(FFI_HEADERS, arch, "ffi", "ffi.h")).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    names = set(re.findall(r"\bFFI_EXTERN\s+ffi_type\s+(ffi_type_\w+)\s*;", text))
    for decl in re.findall(r"\bFFI_API\b(.*?)[;{]", text, flags=re.S):
        m = re.search(r"\b(ffi_\w+)\s*\(", decl)
        if m:
            names.add(m.group(1))
    return names


def classify(undef: Set[str], libsystem: Set[str], objc: Set[str],
             ffi: Set[str] = frozenset()) -> Tuple[Dict[str, List[str]], List[str]]:
    """Group each undefined symbol by the library that provides it; the rest are missing."""
    groups: Dict[str, List[str]] = {"Python": [], "libSystem": [], "libobjc": [], "libffi": []}
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
        elif c in ffi:
            groups["libffi"].append(c)
        else:
            fw = next((f for f, names in FRAMEWORK_EXPORTS.items() if c in names), None)
            if fw:
                groups[fw].append(c)
            else:
                missing.append(c)
    return groups, missing


def check_bundle(arch: str, name: str, srcs: List[str], inc_parts: Iterable[str], zig: str, jobs: int,
                 verbose: bool) -> bool:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"agx-macos-{arch}-{name}-") as tmp:
        objs, messages = compile_all(arch, srcs, inc_parts, tmp, jobs)
        if messages:
            print(f"{arch}-macos: {name}: FAILED to compile cleanly (-Wall -Werror):")
            print("\n".join(messages))
            return False
        bundle = os.path.join(tmp, f"{name}.so")
        r = zig_cc(arch, ["-shared", "-Wl,-undefined,dynamic_lookup", "-o", bundle] + objs)
        if r.returncode != 0:
            print(f"{arch}-macos: {name}: FAILED to link the bundle:\n{r.stdout}")
            return False
        undef = undefined_symbols(bundle)
    groups, missing = classify(undef, libsystem_exports(zig, arch), objc_exports(zig), ffi_exports(arch))
    counts = ", ".join(f"{k} {len(v)}" for k, v in groups.items() if v)
    if verbose:
        for k, v in groups.items():
            if v:
                print(f"  {arch} {name} {k}: {' '.join(v)}")
    if missing:
        print(f"{arch}-macos: {name}: FAILED: the bundle needs symbols that macOS does not provide: "
              f"{', '.join(missing)}")
        if name != "_C" and any(m.startswith("agx_") for m in missing):
            print(f"  ({name} must reach agxguard._C through the capsule agxguard._C._capi, not by linking)")
        print(f"  (provided: {counts})")
        return False
    print(f"{arch}-macos: OK: {name}: {len(srcs)} sources compiled with -Wall -Werror, no warnings; "
          f"the bundle needs {len(undef)} symbols, all provided ({counts}); {time.monotonic() - t0:.1f} s")
    return True


def check_arch(arch: str, extra: Dict[str, List[str]], zig: str, jobs: int, verbose: bool) -> bool:
    """Both bundles for `arch`; extra[name]: more sources for bundle `name`."""
    ok = True
    for name, (parts, inc_parts) in BUNDLES.items():
        srcs = sources(parts) + extra.get(name, [])
        ok = check_bundle(arch, name, srcs, inc_parts, zig, jobs, verbose) and ok
    return ok


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(ARCHES),
                   help="comma-separated, from: " + ", ".join(ARCHES) + " (default: both)")
    p.add_argument("--extra-source", action="append", default=[],
                   help="compile this file into the _C bundle too (the tests use it to show the check fails)")
    p.add_argument("--extra-model-source", action="append", default=[],
                   help="compile this file into the _model bundle too (likewise)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles (default: CPUs)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every undefined symbol by library")
    a = p.parse_args(argv)
    arches = [x.strip() for x in a.arch.split(",") if x.strip()]
    bad = [x for x in arches if x not in ARCHES]
    if bad or not arches:
        p.error(f"--arch {a.arch!r}: allowed values are {', '.join(ARCHES)}")
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: must be >= 1")
    for opt, files in (("--extra-source", a.extra_source), ("--extra-model-source", a.extra_model_source)):
        for f in files:
            if not os.path.isfile(f):
                p.error(f"{opt} {f!r}: no such file")
    zig = zig_root()
    extra = {"_C": [os.path.abspath(f) for f in a.extra_source],
             "_model": [os.path.abspath(f) for f in a.extra_model_source]}
    ok = [check_arch(arch, extra, zig, a.jobs, a.verbose) for arch in arches]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
