"""What Apple's Objective-C runtime asks of agxguard that GCC's does not, checked
on the runtime this build has (docs/apple-runtime.md)."""
import itertools

import pytest

import agxguard._C as C
from agxguard import model, swizzle

pytestmark = pytest.mark.skipif(not swizzle.swizzle_available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")

_names = itertools.count()


def _make_every_agxguard_root_class():
    """The driver model's root, the shape-probe class and a race class: every
    root class agxguard makes at run time."""
    model.configure()  # makes the model's classes
    C.swizzle_probe_call(0)
    name = f"AGXInitRace{next(_names)}"
    C.objc_make_race_class(name, 1)
    return name


def test_every_root_class_agxguard_makes_answers_initialize():
    # Apple's runtime sends +initialize on a class's first use; a root class
    # without it is an unrecognized selector there (GCC's runtime skips it).
    race = _make_every_agxguard_root_class()
    roots = C.objc_root_classes()
    ours = {name: ok for name, ok in roots.items() if name.startswith("AGX")}
    assert {"AGXModelObject", "AGXShapeProbe", race} <= set(ours), sorted(roots)
    assert [name for name, ok in ours.items() if not ok] == []


def test_root_classes_lists_only_root_classes():
    _make_every_agxguard_root_class()
    roots = C.objc_root_classes()
    assert "AGXModelObject" in roots
    assert model.classes()["device"] not in roots  # a subclass of AGXModelObject


NARROW = "passed on the stack"


@pytest.mark.parametrize("types, what", [
    ("v@:QQQQQQc", "narrow integer"),                               # 9th integer argument: on the stack
    ("v@:ddddddddf", "float"),                                      # 9th floating-point argument
    ("v@:{MTLClearColor=dddd}{MTLClearColor=dddd}f", "float"),      # two HFAs fill the 8 FP registers
    ("v@:QQQQQ{_NSRange=QQ}c", "narrow integer"),                   # the range no longer fits: stack
])
def test_apple_arm64_refuses_narrow_arguments_on_the_stack(types, what):
    # Apple's arm64 packs stack arguments to their natural size, so a wrapper
    # that widens them to 64 bits would read the wrong bytes
    with pytest.raises(ValueError, match=f"a {what} {NARROW}, which apple-arm64 packs"):
        swizzle.shape_for(types, abi="apple-arm64")
    for abi in ("aapcs64", "sysv-x86_64"):  # 8-byte stack slots: widening is exact there
        try:
            swizzle.shape_for(types, abi=abi)
        except ValueError as e:
            assert NARROW not in str(e)


@pytest.mark.parametrize("types", ["v@:QQQQQc", "v@:dddddddf", "v@:{CGPoint=dd}c"])
def test_apple_arm64_accepts_narrow_arguments_in_registers(types):
    try:
        swizzle.shape_for(types, abi="apple-arm64")
    except ValueError as e:
        assert NARROW not in str(e)


def test_the_host_abi_is_one_the_classifier_knows():
    assert C.swizzle_host_abi() in swizzle.ABIS


def test_an_unknown_abi_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed values are sysv-x86_64, aapcs64, apple-arm64"):
        swizzle.shape_for("v@:", abi="arm64")
