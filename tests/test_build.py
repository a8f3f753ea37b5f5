"""Building agxguard from a source tree (issue 14 points 5 and 6), in a copy of the
tree so the checkout's own build is left alone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import agxguard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_tree(dst: str) -> None:
    """The tracked sources (csrc, agxguard's .py files, setup.py), no build output."""
    files = subprocess.run(["git", "ls-files", "csrc", "agxguard", "setup.py", "pyproject.toml"], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def _build(tree: str, no_objc: bool) -> None:
    env = dict(os.environ)
    env.pop("AGXGUARD_NO_OBJC", None)
    if no_objc:
        env["AGXGUARD_NO_OBJC"] = "1"
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]


def _have_objc(tree: str) -> bool:
    env = dict(os.environ, PYTHONPATH=tree)
    r = subprocess.run([sys.executable, "-c", "import agxguard._C as c; print(c.HAVE_OBJC)"], cwd=tree, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    return r.stdout.strip() == "True"


@pytest.mark.skipif(not agxguard._C.HAVE_OBJC, reason="needs an Objective-C runtime to switch swizzling on")
def test_a_changed_build_configuration_rebuilds(tmp_path):
    """Built once without the Objective-C runtime (as on a machine that had none yet),
    then again with it: the second build must compile the Objective-C parts in, not
    relink the first build's objects because no source file changed."""
    tree = str(tmp_path / "src")
    _copy_tree(tree)
    _build(tree, no_objc=True)
    assert not _have_objc(tree)
    _build(tree, no_objc=False)
    assert _have_objc(tree), "the rebuild kept the objects built without the Objective-C runtime"


def test_an_unbuilt_source_tree_says_so(tmp_path):
    """Python started in a source tree whose extension is not built imports that tree's
    agxguard (it shadows any installed one); the error must say that, not blame a
    circular import. `-S` leaves out site-packages, as a user without an editable install
    of this tree has it (an editable install's import hook would find the checkout's
    extension for the copy)."""
    tree = str(tmp_path / "src")
    _copy_tree(tree)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-S", "-c", "import agxguard"], cwd=tree, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode != 0
    assert "circular import" not in r.stdout, r.stdout
    assert "not built" in r.stdout and tree in r.stdout and "build_ext --inplace" in r.stdout, r.stdout
