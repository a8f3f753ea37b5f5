"""The swizzle engine on classes made in the test (GNU or Apple runtime)."""
import itertools
import threading

import pytest

import agxguard._C as C
import agxguard._model as M
from agxguard import swizzle

pytestmark = pytest.mark.skipif(not swizzle.swizzle_available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

_names = itertools.count()
THREADS, ITERS = 4, 300


def new_race_class(step=1):
    name = f"AGXTestRace{next(_names)}"
    M.objc_make_race_class(name, step)
    return name


@pytest.fixture(autouse=True)
def restore_mode():
    old = C.get_mode()
    yield
    C.set_mode(old)


def test_off_mode_loses_updates_of_a_guarded_read_modify_write():
    cls = new_race_class()
    assert swizzle.guard_methods(cls, ["increment"]) == 1
    C.set_mode("off")
    assert M.objc_race_run(cls, THREADS, ITERS) < THREADS * ITERS


@pytest.mark.parametrize("mode", ["op", "stream", "global"])
def test_guarded_read_modify_write_loses_no_update(mode):
    cls = new_race_class()
    swizzle.guard_methods(cls, "increment")
    C.set_mode(mode)
    assert M.objc_race_run(cls, THREADS, ITERS) == THREADS * ITERS
    assert swizzle.hooked_calls(cls) == THREADS * ITERS


def test_installing_twice_is_a_no_op():
    cls = new_race_class()
    assert swizzle.guard_methods(cls, ["increment"]) == 1
    imp = M.objc_method_imp(cls, "increment")
    assert swizzle.guard_methods(cls, ["increment"]) == 0
    assert M.objc_method_imp(cls, "increment") == imp


def test_uninstall_restores_the_original_exactly():
    cls = new_race_class()
    original = M.objc_method_imp(cls, "increment")
    swizzle.guard_methods(cls, ["increment", "value"])
    assert M.objc_method_imp(cls, "increment") != original
    assert swizzle.unguard_methods(cls) == 2
    assert M.objc_method_imp(cls, "increment") == original
    C.set_mode("global")  # no hook any more: the race is back even in global mode
    v = M.objc_race_run(cls, THREADS, ITERS)
    assert v < THREADS * ITERS, (swizzle.hooks(), C.get_mode())


def test_same_selector_on_two_classes_calls_each_original():
    one, ten = new_race_class(step=1), new_race_class(step=10)
    swizzle.guard_methods(one, "increment")
    swizzle.guard_methods(ten, "increment")
    C.set_mode("op")
    assert M.objc_race_run(one, 2, 100) == 200
    assert M.objc_race_run(ten, 2, 100) == 2000


def test_subclass_inheriting_a_hooked_method_goes_through_the_hook():
    cls = new_race_class()
    swizzle.guard_methods(cls, "increment")
    C.set_mode("op")
    assert M.objc_race_run(cls + "Sub", THREADS, ITERS) == THREADS * ITERS
    assert swizzle.hooked_calls(cls) == THREADS * ITERS


def test_hooking_a_subclass_that_only_inherits_leaves_the_superclass_alone():
    cls = new_race_class()
    sub = cls + "Sub"
    base_imp = M.objc_method_imp(cls, "increment")
    assert swizzle.guard_methods(sub, "increment") == 1
    assert M.objc_method_imp(cls, "increment") == base_imp
    C.set_mode("op")
    assert M.objc_race_run(sub, THREADS, ITERS) == THREADS * ITERS
    assert swizzle.unguard_methods(sub, "increment") == 1
    assert M.objc_race_run(sub, THREADS, ITERS) < THREADS * ITERS  # forwards unguarded again


def test_a_shape_with_no_typed_wrapper_goes_through_the_general_forwarder():
    """{int, char} by value has no typed wrapper: the forwarder (issue 13) takes it."""
    cls = new_race_class()
    assert swizzle.guard_methods(cls, "oddShape:") == 1
    (h,) = [h for h in swizzle.hooks() if h["class"] == cls and h["selector"] == "oddShape:"]
    assert h["shape"] == "ffi v@:{AGXOdd=ic}"


def test_unsupported_shape_is_refused_naming_class_selector_and_encoding():
    M.forward_probes()  # makes AGXForwardRefuse
    with pytest.raises(ValueError) as e:
        swizzle.guard_methods("AGXForwardRefuse", "takeUnion:")
    msg = str(e.value)
    assert "AGXForwardRefuse" in msg and "takeUnion:" in msg and "(FPUnion=if)" in msg


def test_unknown_class_or_selector_is_an_error():
    with pytest.raises(ValueError, match="no Objective-C class"):
        swizzle.guard_methods("AGXNoSuchClass", "x")
    with pytest.raises(ValueError, match="no such instance method"):
        swizzle.guard_methods(new_race_class(), "noSuchSelector")


def test_every_supported_shape_forwards_arguments_and_return_exactly():
    probes = M.swizzle_probes()
    assert {"v(q3,q3)", "q6(u64)", "f64(f64,f64)", "v(u64,q2,u64)", "d4()",
            "u64(u64,u64,u64,u64,u64,u64,u64,u64)", "f64(u64,f64,f32,u64,q3,f64,f32,u64)"} <= {k for k, _ in probes}
    for i, _ in enumerate(probes):
        assert M.swizzle_probe_call(i) is None  # unhooked baseline
    installed = swizzle.guard_methods("AGXShapeProbe", [s for _, s in probes])
    assert installed in (0, len(probes))
    before = {h["selector"]: h["calls"] for h in swizzle.hooks() if h["class"] == "AGXShapeProbe"}
    C.set_mode("op")
    failures = [M.swizzle_probe_call(i) for i in range(len(probes))]
    assert [f for f in failures if f] == []
    after = {h["selector"]: h["calls"] for h in swizzle.hooks() if h["class"] == "AGXShapeProbe"}
    assert all(after[s] == before[s] + 1 for _, s in probes)  # each call went through its wrapper


@pytest.mark.parametrize("types,shape", [
    ("v@:{MTLSize=QQQ}{MTLSize=QQQ}", "v(q3,q3)"),
    ("v40@0:8@16Q24Q32", "v(u64,u64,u64)"),
    ("{MTLRegion={MTLOrigin=QQQ}{MTLSize=QQQ}}@:Q", "q6(u64)"),
    ("v@:@{_NSRange=QQ}C", "v(u64,q2,u64)"),
    ("d@:dd", "f64(f64,f64)"),
])
def test_type_encodings_map_to_shapes(types, shape):
    assert swizzle.shape_for(types) == shape


@pytest.mark.parametrize("types", ["v@:D", "v@:{X=ic}", "v@:(u=id)", "v@:[4i]", "v@:{Opaque}"])
def test_encodings_without_an_exact_wrapper_are_refused(types):
    with pytest.raises(ValueError):
        swizzle.shape_for(types)


def test_install_and_uninstall_are_safe_while_other_threads_call():
    cls = new_race_class()
    C.set_mode("op")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("v", M.objc_race_run(cls, 4, 2000)))
    t.start()
    while t.is_alive():
        swizzle.guard_methods(cls, "increment")
        swizzle.unguard_methods(cls, "increment")
    t.join()
    assert 0 < result["v"] <= 8000


def test_unavailable_build_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(C, "HAVE_OBJC", False)
    assert not swizzle.swizzle_available()
    with pytest.raises(RuntimeError, match="swizzling is unavailable in this build"):
        swizzle.guard_methods("X", ["y"])
