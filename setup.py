"""Build agxguard._C (the product) and agxguard._model (the lab) from csrc/.

The Objective-C parts (csrc/objc/, csrc/agx/) are compiled only where an
Objective-C runtime is found: Apple's on macOS, GCC's GNU runtime on Linux
(Debian: gobjc, libobjc-12-dev). Without one _C still builds and reports
swizzling unavailable, and _model holds only the measuring fixtures.

agxguard._model (csrc/model/: the driver model and the fixtures that measure
the product) is a module of its own: _C neither includes nor links it, and
_model reaches _C only through the capsule agxguard._C._capi (csrc/python/capi.h).
"""
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def probe_links(source, cflags, libs):
    """True if the C program `source` compiles and links with the platform's C compiler
    and these flags (how the build finds an optional library)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        r = subprocess.run([cc] + cflags + [src, "-o", os.path.join(tmp, "probe")] + libs,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def objc_runtime_flags():
    """Compile/link flags for the Objective-C runtime, or None if there is none."""
    if os.environ.get("AGXGUARD_NO_OBJC") == "1":
        return None
    if sys.platform == "darwin":
        # CoreGraphics: without it MTLCreateSystemDefaultDevice() returns nil in a command-line process
        return {"compile": [], "link": ["-lobjc", "-framework", "Foundation", "-framework", "Metal",
                                        "-framework", "CoreGraphics"]}
    probe = "#include <objc/runtime.h>\nint main(void){return objc_getClass(\"Object\") != 0;}\n"
    return {"compile": [], "link": ["-lobjc"]} if probe_links(probe, [], ["-lobjc"]) else None


def ffi_flags():
    """Compile/link flags for libffi (the swizzle engine's general forwarder), or None.

    macOS ships it (<ffi/ffi.h> in the SDK, /usr/lib/libffi.dylib); on Linux
    pkg-config or a probe compile finds it (Debian: libffi-dev)."""
    if os.environ.get("AGXGUARD_NO_FFI") == "1":
        return None
    if sys.platform == "darwin":
        return {"compile": [], "link": ["-lffi"]}
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "libffi"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, check=True).stdout.split()
        libs = subprocess.run(["pkg-config", "--libs", "libffi"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        cflags, libs = [], ["-lffi"]
    probe = "#include <ffi.h>\nint main(void){return ffi_prep_cif(0, FFI_DEFAULT_ABI, 0, &ffi_type_void, 0);}\n"
    return {"compile": cflags, "link": libs} if probe_links(probe, cflags, libs) else None


# The product: lock primitives, guard domains and modes, the CPython module.
CORE_DIRS = ["csrc/sync", "csrc/guard", "csrc/python"]
# Built only with an Objective-C runtime: the swizzle engine, the AGX hook set
# and discovery.
OBJC_DIRS = ["csrc/objc", "csrc/agx"]
INCLUDE_DIRS = CORE_DIRS + OBJC_DIRS
# agxguard._model, the lab: the driver model and the fixtures. It may include the
# product's headers; _C never sees csrc/model. Without an Objective-C runtime only
# MODEL_NATIVE is built (the measuring fixtures benchmarks need on any machine).
MODEL_DIRS = ["csrc/model"]
MODEL_NATIVE = ["csrc/model/measure.c", "csrc/model/model_capi.c", "csrc/model/model_module.c"]


def c_sources(dirs):
    return sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.c")))


sources = c_sources(CORE_DIRS)
define_macros = []
ffi_link = []
extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wno-missing-braces"]
extra_link = ["-pthread"]
objc = objc_runtime_flags()
if objc is not None:
    sources += c_sources(OBJC_DIRS)
    define_macros.append(("AGX_HAVE_OBJC", "1"))
    extra_compile += objc["compile"]
    extra_link += objc["link"]
    print("agxguard: building with the Objective-C runtime (swizzling available)")
    ffi = ffi_flags()
    define_macros.append(("AGX_HAVE_FFI", "1" if ffi else "0"))
    if ffi:
        extra_compile += ffi["compile"]
        ffi_link = ffi["link"]  # the product only: _model reaches the forwarder through capi.h
    else:
        print("agxguard: libffi not found; methods with no typed wrapper cannot be guarded")
else:
    print("agxguard: no Objective-C runtime found; building without swizzling")


def build_flags_stamp(macros, compile_args, link_args):
    """A file whose content is this build's configuration, rewritten only when that
    changes. It is a dependency of every source, so a build whose configuration differs
    from the last one (an Objective-C runtime installed since, AGXGUARD_NO_OBJC set or
    cleared) recompiles everything: setuptools itself compares only file times, and would
    link the old objects."""
    text = repr((sorted(macros), compile_args, link_args, sys.version)) + "\n"
    path = os.path.join(HERE, "build", "agxguard-build-flags.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return path


# a changed header rebuilds every source (setuptools tracks no includes), and so does a
# changed build configuration
DEPENDS = sorted(glob.glob("csrc/**/*.h", recursive=True)) + [build_flags_stamp(define_macros, extra_compile,
                                                                                extra_link)]
model_sources = c_sources(MODEL_DIRS) if objc is not None else MODEL_NATIVE
ext_modules = [
    Extension(
        "agxguard._C",
        sources=sources,
        include_dirs=INCLUDE_DIRS,
        depends=DEPENDS,
        define_macros=define_macros,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link + ffi_link,
    ),
    Extension(
        "agxguard._model",
        sources=model_sources,
        include_dirs=INCLUDE_DIRS + MODEL_DIRS,
        depends=DEPENDS,
        define_macros=define_macros,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
    ),
]

setup(ext_modules=ext_modules)
