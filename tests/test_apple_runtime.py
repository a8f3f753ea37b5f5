"""What Apple's Objective-C runtime asks of agxguard that GCC's does not, checked
on the runtime this build has (docs/apple-runtime.md)."""
import json
import os
import subprocess
import sys

import pytest

import agxguard._C as C
import agxguard._model as M
from agxguard import swizzle
from agxguard.lab import model

pytestmark = pytest.mark.skipif(not swizzle.swizzle_available(),
                                reason="this build has no Objective-C runtime (install gobjc, libobjc-12-dev)")


# Every kind of root class agxguard makes at run time: the driver model's root,
# its debug layer's root (the debug layer on, from the environment) and its MPS
# image's command buffer, the shape-probe class and a race class. In a child,
# so that the debug layer stays out of this process.
ROOTS_CHILD = """
import json
import agxguard._model as M
M.model_run_op(0, 2.0, 4)
M.model_load_image("mps")
M.swizzle_probe_call(0)
M.objc_make_race_class("AGXInitRace", 1)
print(json.dumps(M.objc_root_classes()))
"""


def _root_classes():
    env = dict(os.environ, AGX_MODEL_DEBUG_LAYER="1", AGXGUARD_DRIVER="none")
    r = subprocess.run([sys.executable, "-c", ROOTS_CHILD], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# GCC's runtime brings its own root class, Object, without +initialize (it needs none)
RUNTIME_ROOTS = {"Object"}


def test_every_root_class_agxguard_makes_answers_initialize():
    # Apple's runtime sends +initialize on a class's first use; a root class
    # without it is an unrecognized selector there (GCC's runtime skips it).
    roots = _root_classes()
    made = {"AGXModelObject", "MTLModelToolsObject", "MPSModelCommandBuffer", "AGXShapeProbe", "AGXInitRace"}
    assert made <= set(roots), sorted(roots)
    assert [name for name, ok in roots.items() if not ok and name not in RUNTIME_ROOTS] == []


def test_root_classes_lists_only_root_classes():
    roots = _root_classes()
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
    assert M.swizzle_host_abi() in swizzle.ABIS


def test_an_unknown_abi_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed values are sysv-x86_64, aapcs64, apple-arm64"):
        swizzle.shape_for("v@:", abi="arm64")
