"""Configuration from the environment: good values apply, bad ones warn (naming
the variable, the value and what is allowed) and fall back to a safe default;
import never fails on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agxguard import _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_without_any_variable():
    c = _config.from_env({})
    assert (c.mode, c.disable, c.warn_ms, c.timeout_ms, c.timeout_action, c.throttle) == \
        ("op", False, None, None, "raise", 0)


def test_good_values_apply():
    c = _config.from_env({"AGXGUARD_MODE": "Global", "AGXGUARD_LOCK_WARN_MS": "250",
                          "AGXGUARD_LOCK_TIMEOUT_MS": "5000", "AGXGUARD_LOCK_TIMEOUT_ACTION": "abort",
                          "AGXGUARD_THROTTLE": "2", "AGXGUARD_DRIVER": "model"})
    assert (c.mode, c.warn_ms, c.timeout_ms, c.timeout_action, c.throttle, c.driver) == \
        ("global", 250.0, 5000.0, "abort", 2, "model")


def test_disable_forces_off_whatever_the_mode():
    c = _config.from_env({"AGXGUARD_DISABLE": "1", "AGXGUARD_MODE": "global"})
    assert c.disable and c.mode == "off"


@pytest.mark.parametrize("name,value,allowed", [
    ("AGXGUARD_MODE", "serial", "off, op, stream, global"),
    ("AGXGUARD_DISABLE", "maybe", "1/true/yes/on"),
    ("AGXGUARD_LOCK_WARN_MS", "soon", "milliseconds from 0.001 to 1e+12"),
    ("AGXGUARD_LOCK_TIMEOUT_MS", "-3", "milliseconds from 0.001 to 1e+12"),
    ("AGXGUARD_LOCK_TIMEOUT_ACTION", "explode", "raise, abort"),
    ("AGXGUARD_THROTTLE", "two", "an integer from 0 (no limit) to 1000000"),
    ("AGXGUARD_DRIVER", "cuda", "auto, metal, model, none"),
])
def test_bad_value_warns_naming_it_and_uses_the_default(name, value, allowed):
    with pytest.warns(_config.ConfigWarning) as record:
        c = _config.from_env({name: value})
    message = str(record[0].message)
    assert name in message and repr(value) in message and allowed in message
    assert c == _config.from_env({})


def test_import_with_bad_values_warns_and_still_works():
    env = dict(os.environ, AGXGUARD_MODE="bogus", AGXGUARD_LOCK_TIMEOUT_MS="x", PYTHONPATH=ROOT)
    code = ("import json, warnings, agxguard; "
            "print(json.dumps([agxguard.get_mode(), agxguard.status()['lock_timeout']['timeout_ms']]))")
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["op", None]
    assert "AGXGUARD_MODE='bogus'" in r.stderr and "AGXGUARD_LOCK_TIMEOUT_MS='x'" in r.stderr


def test_import_applies_mode_throttle_and_timeouts():
    env = dict(os.environ, AGXGUARD_MODE="stream", AGXGUARD_THROTTLE="3", AGXGUARD_LOCK_WARN_MS="100",
               AGXGUARD_LOCK_TIMEOUT_MS="2000", AGXGUARD_LOCK_TIMEOUT_ACTION="abort", PYTHONPATH=ROOT)
    code = ("import json, agxguard; "
            "print(json.dumps([agxguard.get_mode(), agxguard.status()['throttle'], agxguard.status()['lock_timeout']]))")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mode, throttle, wait = json.loads(r.stdout.strip().splitlines()[-1])
    assert (mode, throttle) == ("stream", 3)
    assert wait == {"warn_ms": 100.0, "timeout_ms": 2000.0, "action": "abort"}
