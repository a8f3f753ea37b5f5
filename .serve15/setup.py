"""Build agxguard._C from csrc/.

The Objective-C parts (csrc/objc/) are compiled only where an Objective-C
runtime is found: Apple's on macOS, GCC's GNU runtime on Linux (Debian:
gobjc, libobjc-12-dev). Without one the module still builds and reports
swizzling unavailable.
"""
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def objc_runtime_flags():
    """Compile/link flags for the Objective-C runtime, or None if there is none."""
    if os.environ.get("AGXGUARD_NO_OBJC") == "1":
        return None
    if sys.platform == "darwin":
        # CoreGraphics: without it MTLCreateSystemDefaultDevice() returns nil in a command-line process
        return {"compile": [], "link": ["-lobjc", "-framework", "Foundation", "-framework", "Metal",
                                        "-framework", "CoreGraphics"]}
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    probe = "#include <objc/runtime.h>\nint main(void){return objc_getClass(\"Object\") != 0;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(probe)
        r = subprocess.run([cc, src, "-o", os.path.join(tmp, "probe"), "-lobjc"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode != 0:
        return None
    return {"compile": [], "link": ["-lobjc"]}


# The product: lock primitives, guard domains and modes, the CPython module.
CORE_DIRS = ["csrc/sync", "csrc/guard", "csrc/python"]
# Built only with an Objective-C runtime: the swizzle engine, the AGX hook set
# and discovery, the driver model.
OBJC_DIRS = ["csrc/objc", "csrc/agx", "csrc/model"]
INCLUDE_DIRS = CORE_DIRS + OBJC_DIRS


def c_sources(dirs):
    return sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.c")))


sources = c_sources(CORE_DIRS)
define_macros = []
extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wno-missing-braces"]
extra_link = ["-pthread"]
objc = objc_runtime_flags()
if objc is not None:
    sources += c_sources(OBJC_DIRS)
    define_macros.append(("AGX_HAVE_OBJC", "1"))
    extra_compile += objc["compile"]
    extra_link += objc["link"]
    print("agxguard: building with the Objective-C runtime (swizzling available)")
else:
    print("agxguard: no Objective-C runtime found; building without swizzling")

setup(
    ext_modules=[
        Extension(
            "agxguard._C",
            sources=sources,
            include_dirs=INCLUDE_DIRS,
            # a changed header rebuilds every source (setuptools tracks no includes)
            depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
            define_macros=define_macros,
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ],
)
