"""Bad input to the public API gives a clear error (or, for the environment, a warning
and the default), never a crash, a silent misreading or a bare OverflowError
(issue 11, points 4 to 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

import agxguard
import agxguard._model
from agxguard import _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT = 120


def _child(code: str, env: dict = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's agxguard."""
    full = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    for name in [k for k in full if k.startswith("AGXGUARD_") and k not in (env or {})]:
        del full[name]
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT)


# ---------------------------------------------------------------- point 4: environment

_IMPORT_AND_REPORT = (
    "import json, agxguard; "
    "print(json.dumps([agxguard.get_mode(), agxguard.status()['throttle'], agxguard.status()['lock_timeout']]))")
_DEFAULTS = ["op", 0, {"warn_ms": None, "timeout_ms": None, "action": "raise"}]

# Every variable agxguard reads at import, with values that are out of range, of the
# wrong kind, too small to mean anything, too big to convert, or not numbers at all.
BAD_ENV = [
    ("AGXGUARD_THROTTLE", "1000001", "0 (no limit) to 1000000"),
    ("AGXGUARD_THROTTLE", "99999999999999999999", "0 (no limit) to 1000000"),
    ("AGXGUARD_THROTTLE", "-1", "0 (no limit) to 1000000"),
    ("AGXGUARD_THROTTLE", "2.5", "0 (no limit) to 1000000"),
    ("AGXGUARD_THROTTLE", "9" * 5000, "0 (no limit) to 1000000"),
    ("AGXGUARD_LOCK_TIMEOUT_MS", "1e-12", "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_TIMEOUT_MS", "1e400", "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_TIMEOUT_MS", "nan", "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_TIMEOUT_MS", "-inf", "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_TIMEOUT_MS", "9" * 5000, "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_WARN_MS", "0.0000001", "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_WARN_MS", "1e13", "0.001 to 1e+12"),
    ("AGXGUARD_LOCK_WARN_MS", "true", "0.001 to 1e+12"),
    ("AGXGUARD_MODE", "global\tjunk", "off, op, stream, global"),
    ("AGXGUARD_MODE", "\u00e9", "off, op, stream, global"),
    ("AGXGUARD_DISABLE", "2", "1/true/yes/on"),
    ("AGXGUARD_LOCK_TIMEOUT_ACTION", "raise abort", "raise, abort"),
    ("AGXGUARD_DRIVER", "model model", "auto, metal, model, none"),
]


@pytest.mark.parametrize("name,value,allowed", BAD_ENV, ids=[f"{n}={v[:24]!r}" for n, v, _ in BAD_ENV])
def test_import_with_a_bad_environment_value_warns_and_uses_the_default(name, value, allowed):
    r = _child(_IMPORT_AND_REPORT, {name: value})
    assert r.returncode == 0, f"import agxguard failed with {name}={value[:40]!r}:\n{r.stderr[-2000:]}"
    assert json.loads(r.stdout.strip().splitlines()[-1]) == _DEFAULTS
    warning = [line for line in r.stderr.splitlines() if "ConfigWarning" in line]
    assert warning, f"no ConfigWarning for {name}={value[:40]!r}: {r.stderr[-2000:]}"
    assert name in warning[0] and allowed in warning[0]
    assert repr(value)[:40] in warning[0] or "..." in warning[0]


@pytest.mark.parametrize("name,value,allowed", BAD_ENV, ids=[f"{n}={v[:24]!r}" for n, v, _ in BAD_ENV])
def test_from_env_never_raises_and_returns_the_defaults(name, value, allowed):
    with pytest.warns(_config.ConfigWarning) as record:
        c = _config.from_env({name: value})
    assert c == _config.from_env({})
    message = str(record[0].message)
    assert name in message and allowed in message


def test_environment_limits_are_the_ones_the_core_enforces():
    """The bounds _config checks are exactly those of _C: the largest value it accepts
    is accepted by the core, and the next one is refused by both."""
    agxguard.set_throttle(_config.THROTTLE_MAX)
    with pytest.raises(ValueError):
        agxguard.set_throttle(_config.THROTTLE_MAX + 1)
    agxguard.set_lock_timeout(_config.WAIT_MS_MIN, _config.WAIT_MS_MAX)
    assert agxguard.status()["lock_timeout"]["timeout_ms"] == pytest.approx(_config.WAIT_MS_MIN)
    for bad in (_config.WAIT_MS_MIN / 2, _config.WAIT_MS_MAX * 2):
        with pytest.raises(ValueError):
            agxguard.set_lock_timeout(bad)


def test_a_long_bad_environment_value_is_shortened_in_the_warning():
    with pytest.warns(_config.ConfigWarning) as record:
        _config.from_env({"AGXGUARD_MODE": "x" * 100000})
    assert len(str(record[0].message)) < 400


# ---------------------------------------------------------------- point 5: the type-encoding parser

needs_objc = pytest.mark.skipif(not agxguard.swizzle.swizzle_available(),
                                reason="this build has no Objective-C runtime (no swizzle engine)")

DEEP_ENCODINGS = {
    "nested structs": "'v@:' + '{a=' * 10**6 + 'q' + '}' * 10**6",
    "nested struct arguments": "'v@:q' + '{a=' * 100000 + 'q' + '}' * 100000",
    "pointer chain": "'v@:' + '^' * 10**6 + 'q'",
    "nested struct return": "'{a=' * 10**6 + 'q' + '}' * 10**6 + '@:'",
    "struct of pointer chain": "'v@:{a=' + '^' * 10**6 + 'q}'",
}


@needs_objc
@pytest.mark.parametrize("what", sorted(DEEP_ENCODINGS))
def test_a_deeply_nested_type_encoding_is_a_value_error_not_a_crash(what):
    code = ("import agxguard.swizzle as s\n"
            f"enc = {DEEP_ENCODINGS[what]}\n"
            "try:\n"
            "    print('shape', s.shape_for(enc))\n"
            "except ValueError as e:\n"
            "    print('ValueError', str(e)[:200])\n")
    r = _child(code)
    assert r.returncode == 0, f"the child died (rc {r.returncode}) on {what}: {r.stderr[-2000:]}"
    out = r.stdout.strip()
    assert out.startswith("ValueError") or out == "shape v(u64)", out


@needs_objc
def test_nesting_past_the_limit_names_the_limit():
    limit = agxguard.swizzle.TYPE_ENCODING_MAX_DEPTH
    ok = "v@:" + "{a=" * limit + "qq" + "}" * limit
    assert agxguard.swizzle.shape_for(ok) == "v(q2)"
    deep = "v@:" + "{a=" * (limit + 1) + "qq" + "}" * (limit + 1)
    with pytest.raises(ValueError, match=f"nested deeper than {limit}"):
        agxguard.swizzle.shape_for(deep)


@needs_objc
def test_shape_for_refuses_a_nul_and_a_non_str():
    with pytest.raises(ValueError, match="NUL"):
        agxguard.swizzle.shape_for("v@:\x00q")
    with pytest.raises(TypeError, match="bytes"):
        agxguard.swizzle.shape_for(b"v@:")


# ---------------------------------------------------------------- point 6: arguments

@pytest.mark.parametrize("name", ["global\x00junk", "off\x00", "\x00"])
def test_a_mode_name_with_nul_is_refused(name):
    with pytest.raises(ValueError, match="NUL|unknown agxguard mode"):
        agxguard.set_mode(name)
    assert agxguard.get_mode() == "off"
    with pytest.raises(ValueError):
        with agxguard.mode(name):
            pass


@pytest.mark.parametrize("value", [1e-9, 1e-4, 0.0009999, 5e-324])
def test_a_tiny_positive_timeout_is_refused_not_turned_off(value):
    with pytest.raises(ValueError, match=r"0\.001 to 1e\+12"):
        agxguard.set_lock_timeout(value)
    with pytest.raises(ValueError, match=r"0\.001 to 1e\+12"):
        agxguard.set_lock_timeout(None, warn_ms=value)
    assert agxguard.status()["lock_timeout"]["timeout_ms"] is None


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_timeout_is_refused(value):
    with pytest.raises(TypeError, match="bool"):
        agxguard.set_lock_timeout(value)
    with pytest.raises(TypeError, match="bool"):
        agxguard.set_lock_timeout(None, warn_ms=value)
    with pytest.raises(TypeError, match="bool"):
        agxguard._C.set_lock_timeout(timeout_ms=value)


@pytest.mark.parametrize("value", [10**400, float("inf"), float("nan"), -1, 1e12 * 1.5])
def test_an_out_of_range_timeout_names_the_range(value):
    with pytest.raises(ValueError, match=r"0\.001 to 1e\+12"):
        agxguard.set_lock_timeout(value)


def test_timeouts_in_range_apply():
    agxguard.set_lock_timeout(0.001, 2.5)
    assert agxguard.status()["lock_timeout"] == {"timeout_ms": pytest.approx(0.001), "warn_ms": 2.5, "action": "raise"}
    agxguard.set_lock_timeout(0, 0)  # 0 is off, as None
    assert agxguard.status()["lock_timeout"] == {"timeout_ms": None, "warn_ms": None, "action": "raise"}


@pytest.mark.parametrize("value", ["raise\x00", b"raise", None, ["raise"]])
def test_a_bad_timeout_action_is_refused(value):
    with pytest.raises((ValueError, TypeError), match="action"):
        agxguard.set_lock_timeout(None, None, value)


@pytest.mark.parametrize("value", [10**20, -10**20, 1000001, -1])
def test_an_out_of_range_throttle_names_the_range(value):
    for setter in (agxguard.set_throttle, agxguard._C.set_throttle):
        with pytest.raises(ValueError, match="0 .*to 1000000"):
            setter(value)
    assert agxguard.status()["throttle"] == 0


@pytest.mark.parametrize("value", [True, 2.0, "2"])
def test_a_throttle_that_is_not_an_int_is_a_type_error(value):
    for setter in (agxguard.set_throttle, agxguard._C.set_throttle):
        with pytest.raises(TypeError, match="throttle"):
            setter(value)


def test_a_thread_cannot_leave_another_threads_region():
    agxguard.set_mode("global")
    theirs = agxguard._C.Guard()
    entered, release, done = threading.Event(), threading.Event(), threading.Event()

    def owner():
        theirs.__enter__()
        entered.set()
        release.wait(30)
        theirs.__exit__(None, None, None)
        done.set()

    t = threading.Thread(target=owner)
    t.start()
    try:
        assert entered.wait(30)
        with agxguard.guard(stream=7) as mine:
            depth = agxguard._model.region_depth()
            with pytest.raises(RuntimeError, match="did not enter"):
                theirs.__exit__(None, None, None)
            assert agxguard._model.region_depth() == depth, "another thread's exit popped this thread's region"
        with pytest.raises(RuntimeError):
            theirs.__exit__(None, None, None)  # this thread is in no region at all
    finally:
        release.set()
        t.join(30)
    assert done.is_set() and not agxguard.global_lock().locked()
    assert mine is not None


def test_regions_are_left_innermost_first():
    outer, inner = agxguard._C.Guard(), agxguard._C.Guard(stream=3)
    with outer:
        inner.__enter__()
        with pytest.raises(RuntimeError, match="did not enter"):
            outer.__exit__(None, None, None)
        inner.__exit__(None, None, None)
    assert agxguard._model.region_depth() == 0


def test_the_shared_guard_is_left_by_each_thread_that_entered_it():
    agxguard.set_mode("stream")

    done = []

    def body(i):
        for _ in range(200):
            with agxguard.guard():
                with agxguard.guard():
                    pass
        done.append(agxguard._model.region_depth())  # each thread left every region it entered

    from conftest import run_threads
    run_threads(4, body)
    assert done == [0, 0, 0, 0]


def test_use_stream_none_means_no_explicit_stream():
    agxguard.set_mode("stream")
    with agxguard.use_stream(5):
        with agxguard.use_stream(None) as key:
            assert key is None
            assert agxguard._model.get_thread_stream() is None
        assert agxguard._model.get_thread_stream() == 5


@pytest.mark.parametrize("fn", [agxguard._stream_key, agxguard.stream_lock])
def test_a_none_stream_key_is_refused(fn):
    with pytest.raises(TypeError, match="None"):
        fn(None)


@pytest.mark.parametrize("value", [2**64, -2**63 - 1, 10**30])
def test_a_stream_int_outside_64_bits_is_refused(value):
    for call in (agxguard._stream_key, agxguard.stream_lock, agxguard.guard, agxguard._C.Guard,
                 agxguard._C.stream_lock, agxguard._C.set_thread_stream):
        with pytest.raises(ValueError, match="64"):
            call(value)


def test_stream_ints_at_the_ends_of_the_range_are_keys():
    assert agxguard._stream_key(2**64 - 1) == 2**64 - 1
    assert agxguard._stream_key(-2**63) == 2**63
    assert agxguard._stream_key(-1) == 2**64 - 1


@pytest.mark.parametrize("selectors,words", [
    (b"sel", "bytes"), ([b"sel"], "bytes"), (7, "int"), (["ok", 3], "int"), ("a\x00b", "NUL"),
])
def test_guard_methods_names_a_bad_selector(selectors, words):
    for fn in (agxguard.guard_methods, agxguard.unguard_methods):
        with pytest.raises((TypeError, ValueError), match=words):
            fn("NSObject", selectors)


@pytest.mark.parametrize("class_name,words", [(b"NSObject", "bytes"), ("NS\x00Object", "NUL"), (None, "NoneType")])
def test_guard_methods_names_a_bad_class_name(class_name, words):
    for fn in (agxguard.guard_methods, agxguard.unguard_methods):
        with pytest.raises((TypeError, ValueError), match=words):
            fn(class_name, "init")


def test_ops_level_with_nul_is_refused():
    with pytest.raises(ValueError, match="level"):
        agxguard.ops(level="function\x00")
