"""The macOS cross-build check (scripts/macos_check.py, `make macos-check`):
it passes on the tree, and it fails when code uses what macOS lacks."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "macos_check.py")


def run_check(*args):
    r = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    return r.returncode, r.stdout


def extra(tmp_path, text):
    p = tmp_path / "extra.c"
    p.write_text(text)
    return str(p)


def test_the_tree_cross_builds_for_both_macos_architectures():
    rc, out = run_check()
    assert rc == 0, out
    assert "aarch64-macos: OK" in out and "x86_64-macos: OK" in out, out


def test_a_symbol_macos_does_not_provide_fails_the_check(tmp_path):
    # sched_getaffinity is glibc's; declared by hand it compiles, and only the
    # bundle's undefined symbols can tell
    src = extra(tmp_path, "extern int sched_getaffinity(int, unsigned long, void *);\n"
                          "int agx_linux_only(void) { return sched_getaffinity(0, 0, 0); }\n")
    rc, out = run_check("--arch", "aarch64", "--extra-source", src)
    assert rc == 1, out
    assert "does not provide: sched_getaffinity" in out, out


def test_the_model_bundle_linking_a_product_function_fails_the_check(tmp_path):
    # _model must reach _C through the capsule agxguard._C._capi: a direct call to
    # a product function compiles (its header is on _model's include path) and is
    # caught only as an undefined symbol of the _model bundle
    src = extra(tmp_path, '#include "guard.h"\nint agx_model_depth_by_link(void) { return agx_region_depth(); }\n')
    rc, out = run_check("--arch", "aarch64", "--extra-model-source", src)
    assert rc == 1, out
    assert "aarch64-macos: OK: _C" in out, out
    assert "_model: FAILED" in out and "agx_region_depth" in out and "agxguard._C._capi" in out, out


def test_a_linux_only_type_fails_the_check(tmp_path):
    src = extra(tmp_path, "#include <pthread.h>\nint agx_n(pthread_barrier_t *b) { return b != 0; }\n")
    rc, out = run_check("--arch", "x86_64", "--extra-source", src)
    assert rc == 1, out
    assert "FAILED to compile" in out and "pthread_barrier_t" in out, out


def test_a_warning_fails_the_check(tmp_path):
    src = extra(tmp_path, "int agx_w(void) { int unused_here; return 0; }\n")
    rc, out = run_check("--arch", "aarch64", "--extra-source", src)
    assert rc == 1, out
    assert "unused_here" in out, out


@pytest.mark.parametrize("args, word", [(["--arch", "arm64"], "allowed values are aarch64, x86_64"),
                                        (["--jobs", "0"], "must be >= 1"),
                                        (["--extra-source", "/nonexistent.c"], "no such file")])
def test_bad_arguments_are_refused_naming_the_value(args, word):
    rc, out = run_check(*args)
    assert rc == 2 and word in out, out


def _check_module():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import macos_check
    finally:
        sys.path.pop(0)
    return macos_check


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_libffi_is_allowed_from_its_own_header_not_from_libsystem(arch):
    """The forwarder's libffi calls are provided by /usr/lib/libffi.dylib (their
    names from libffi's header for the target); libSystem exports none of them,
    and a name the header does not declare is still missing."""
    m = _check_module()
    ffi = m.ffi_exports(arch)
    assert {"ffi_prep_cif", "ffi_call", "ffi_closure_alloc", "ffi_closure_free", "ffi_prep_closure_loc",
            "ffi_type_pointer", "ffi_type_uint64", "ffi_type_double"} <= ffi
    libsystem = m.libsystem_exports(m.zig_root(), arch)
    assert not {s for s in libsystem if s.startswith("_ffi_")}
    groups, missing = m.classify({"_ffi_call", "_ffi_type_sint8", "_ffi_made_up"}, libsystem, set(), ffi)
    assert groups["libffi"] == ["ffi_call", "ffi_type_sint8"] and missing == ["ffi_made_up"]
