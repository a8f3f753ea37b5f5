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
