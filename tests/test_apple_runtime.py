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
