"""Defaults that say what they do (issue 14 point 3): in mode 'op' with no driver hooks a
guard() region takes no lock, and the first one says so; status() says what each mode
locks here. Each case runs in a fresh child: the warning is once per process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import agxguard
from agxguard import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(code: str, **env: str) -> dict:
    e = dict(os.environ, PYTHONPATH=ROOT, **env)
    e.pop("AGXGUARD_MODE", None)
    r = subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


REGIONS = """
import json, warnings, agxguard
agxguard.set_mode({mode!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        with agxguard.guard():
            pass
print(json.dumps([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]))
"""


def test_an_op_mode_region_without_driver_hooks_warns_once():
    got = _child(REGIONS.format(mode="op"))
    assert len(got) == 1, got
    assert "takes no lock" in got[0] and "set_mode('global')" in got[0]


@pytest.mark.parametrize("mode", ["global", "stream", "off"])
def test_other_modes_do_not_warn(mode):
    assert _child(REGIONS.format(mode=mode)) == []


@pytest.mark.skipif(not _C.HAVE_OBJC, reason="the driver model needs an Objective-C runtime build")
def test_no_warning_when_the_driver_hooks_are_in():
    code = REGIONS.format(mode="op").replace("import json, warnings, agxguard",
                                             "import json, warnings, agxguard, agxguard.lab.model")
    assert _child(code, AGXGUARD_DRIVER="model") == []


def test_status_says_what_each_mode_protects_here():
    protects = agxguard.status()["protects"]
    assert sorted(protects) == sorted(agxguard.MODES)
    if not agxguard.status()["installed"]:
        assert "no driver hooks" in protects["op"] and "takes no lock" in protects["op"]
    assert "one process-wide lock" in protects["global"]
