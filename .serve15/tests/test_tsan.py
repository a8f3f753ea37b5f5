"""The C lock domains under ThreadSanitizer: clean with the locks, and a
reported race without them (so the check is known to be able to fail)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"futex": "stress_locks.bin", "portable": "stress_locks_portable.bin"}
TSAN_ENV = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def stress_binary(request):
    """The stress test built with ThreadSanitizer, once per sleep implementation
    (futex on Linux; the mutex/condvar one that macOS uses)."""
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("make or a C compiler is missing, so the ThreadSanitizer build cannot be made")
    target = os.path.join("csrc", "tests", VARIANTS[request.param])
    r = subprocess.run(["make", "-s", target], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 and "fsanitize" in r.stderr + r.stdout:
        pytest.skip(f"this compiler cannot build with -fsanitize=thread: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr
    return os.path.join(ROOT, target)


def test_lock_domains_run_clean_under_thread_sanitizer(stress_binary):
    r = subprocess.run([stress_binary, "8", "1500"], env=TSAN_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "WARNING: ThreadSanitizer" not in r.stderr
    assert "failures 0" in r.stdout


def test_thread_sanitizer_reports_the_race_when_the_lock_is_skipped(stress_binary):
    r = subprocess.run([stress_binary, "8", "300", "unlocked"], env=TSAN_ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 66, (r.returncode, r.stderr[-2000:])
    assert "WARNING: ThreadSanitizer: data race" in r.stderr
