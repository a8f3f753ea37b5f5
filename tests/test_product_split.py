"""The product module and the lab module stay apart (issue 12).

agxguard._C is what a user's process loads; agxguard._model (csrc/model: the driver
model, race classes, shape probes, measuring knobs) is the lab's. _C exports only what
the package uses, includes nothing from csrc/model and holds none of its code; the
product's Python never imports _model, and ``import agxguard`` does not load it. The
model reaches the product only through the capsule agxguard._C._capi, and registers
itself as the provider of the "model" driver when it loads."""
from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import agxguard
import agxguard._C as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What _C exports: exactly what agxguard/*.py (the product) uses, plus the capsule that
# agxguard._model imports. A name added to _C must be added here, and used by the product.
C_NAMES = {
    # csrc/python/module.c, wakeup.c
    "Guard", "Lock", "LockTimeout", "LockWaitWarning", "Wakeup", "MODES", "HAVE_OBJC",
    "set_mode", "get_mode", "set_throttle", "get_throttle", "set_lock_timeout", "get_lock_timeout",
    "stats", "reset_stats", "set_thread_stream", "set_stream_resolver",
    "global_lock", "op_lock", "stream_lock", "torch_function", "_set_op_passthrough",
    "_affinity_changed",
    "RequestQueue",  # csrc/python/reqqueue.c: the Batcher's queue (agxguard/batcher.py)
    "_capi",  # the C API (csrc/python/capi.h) for agxguard._model; no product Python uses it
}
# Exported but used by no product Python: Wakeup is the Python handle on the wait that
# RequestQueue's callers and dispatcher use in C (csrc/python/wakeup.h), kept for
# benchmarks/wakeup_ring.py and tests/test_wakeup.py.
C_UNUSED_OK = {"_capi", "Wakeup"}
# ... and with an Objective-C runtime (csrc/python/objc_module.c, discovery_module.c)
C_OBJC_NAMES = {
    "OBJC_RUNTIME", "METAL_SUPPORTED",
    "swizzle_install", "swizzle_uninstall", "swizzle_hooks", "swizzle_reset_counts", "swizzle_shape_for",
    "hooks_driver_present", "hooks_install", "hooks_uninstall", "hooks_driver", "hooks_report",
    "hooks_discovery", "hooks_lifecycle", "hooks_reset_lifecycle", "hooks_table", "hooks_rediscover",
    "hooks_images", "metal_devices",
}

# C folders of the product (agxguard._C) and of the lab (agxguard._model)
PRODUCT_C = ("sync", "guard", "python", "objc", "agx")
LAB_C = "model"
# Python files of the lab (everything else in agxguard/ is the product)
LAB_PY = {"model.py", "harness.py", "report.py", "workloads.py", "__main__.py", "_child.py"}
LAB_PY_DIRS = {"suites", "lab"}


def _product_py():
    pkg = os.path.join(ROOT, "agxguard")
    out = []
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, pkg).split(os.sep)
        if rel[0] in LAB_PY_DIRS or (len(rel) == 1 and rel[0] in LAB_PY):
            continue
        out.append(path)
    return sorted(out)


def _exported():
    return {n for n in dir(C) if not (n.startswith("__") and n.endswith("__"))}


def test_C_exports_exactly_the_documented_set():
    want = C_NAMES | (C_OBJC_NAMES if C.HAVE_OBJC else set())
    got = _exported()
    assert got - want == set(), f"_C exports names the product does not use (a fixture? agxguard._model): {got - want}"
    assert want - got == set(), f"documented but not exported: {want - got}"


def test_the_C_stub_names_the_same_set():
    tree = ast.parse(open(os.path.join(ROOT, "agxguard", "_C.pyi")).read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    names.discard("_F")  # the stub's own TypeVar
    assert names == C_NAMES | C_OBJC_NAMES


def test_every_C_name_is_used_by_the_product():
    text = "\n".join(open(p).read() for p in _product_py())
    unused = sorted(n for n in (C_NAMES | C_OBJC_NAMES) - C_UNUSED_OK if not re.search(rf"\b{re.escape(n)}\b", text))
    assert unused == [], f"_C exports names no product file uses: {unused}"


def test_no_product_C_file_includes_a_model_header():
    lab_headers = {os.path.basename(h) for h in glob.glob(os.path.join(ROOT, "csrc", LAB_C, "*.h"))}
    assert "driver_model.h" in lab_headers  # the check looks at the right folder
    bad = []
    for part in PRODUCT_C:
        for path in glob.glob(os.path.join(ROOT, "csrc", part, "*.[ch]")):
            for n, line in enumerate(open(path), 1):
                m = re.match(r'\s*#\s*include\s*[<"]([^">]+)[">]', line)
                if m and os.path.basename(m.group(1)) in lab_headers:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert bad == [], "product C includes the lab's headers:\n" + "\n".join(bad)


def test_setup_gives_the_product_no_model_include_directory():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    assert "csrc/model" not in values["CORE_DIRS"] + values["OBJC_DIRS"]


def test_the_product_shared_object_holds_no_model_code():
    # every symbol name (dynamic and static, unless stripped) and string of the file:
    # a model function, a model class name or a model message would show here
    data = open(C.__file__, "rb").read()
    for marker in (b"agx_model_", b"AGXModelG16X", b"MPSModelCommandBuffer", b"race_increment"):
        assert marker not in data, f"{C.__file__} contains {marker!r}"


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to read the symbol tables")
def test_the_model_links_nothing_of_the_product():
    import agxguard._model as M
    if sys.platform == "darwin":
        cmd = ["nm", "-u", M.__file__]
    else:
        cmd = ["nm", "-D", "--undefined-only", M.__file__]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    undefined = re.findall(r"\b_?(agx_\w+)", out)
    assert undefined == [], f"_model resolves these by linking instead of through agxguard._C._capi: {undefined}"


def test_the_capsule_is_there_under_its_name():
    cap = C._capi
    assert type(cap).__name__ == "PyCapsule"
    assert "agxguard._C._capi" in repr(cap)


def test_product_python_never_imports_the_lab_module():
    bad = []
    for path in _product_py():
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{a.name}" for a in node.names] + [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # importlib.import_module("agxguard._model") and friends
                names = [node.value] if re.fullmatch(r"[\w.]*\b_model", node.value) else []
            if any(re.search(r"(^|\.)_model$", n) for n in names):
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert bad == [], f"product files import agxguard._model: {bad}"


def _child(code, warnings_fail=True, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AGXGUARD_", "AGX_MODEL_"))}
    e.update(env)
    e["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    flags = ["-W", "error"] if warnings_fail else []
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=e, timeout=60)


@pytest.mark.parametrize("driver", ["none", "model"])
def test_importing_agxguard_does_not_load_the_lab(driver):
    # (a build without a runtime warns that AGXGUARD_DRIVER=model installs nothing: allowed here)
    p = _child("import sys, agxguard; agxguard.status(); agxguard.guard(); "
               "print(sorted(m for m in sys.modules if m.startswith('agxguard')))", warnings_fail=C.HAVE_OBJC,
               AGXGUARD_DRIVER=driver)
    assert p.returncode == 0, p.stderr
    loaded = eval(p.stdout.strip().splitlines()[-1])
    assert "agxguard._model" not in loaded and "agxguard.lab.model" not in loaded, loaded


def test_the_product_works_with_the_lab_module_absent():
    p = _child("import sys; sys.modules['agxguard._model'] = None\n"  # any import of it now fails
               "import agxguard\n"
               "agxguard.set_mode('global')\n"
               "with agxguard.guard():\n"
               "    assert agxguard.global_lock().owned()\n"
               "print(agxguard.status()['installed'])")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


@pytest.mark.skipif(not C.HAVE_OBJC, reason="the driver model needs an Objective-C runtime build")
def test_driver_model_from_the_environment_waits_for_the_model_to_register():
    p = _child("import json, sys, agxguard\n"
               "before = agxguard.status()\n"
               "present = agxguard._C.hooks_driver_present('model')\n"
               "import agxguard.lab.model  # loads agxguard._model, which registers the model\n"
               "after = agxguard.status()\n"
               "print(json.dumps({'before': [before['installed'], before['reason']], 'present': present,\n"
               "                  'now': agxguard._C.hooks_driver_present('model'),\n"
               "                  'after': [after['installed'], after['driver'], after['reason']]}))",
               AGXGUARD_DRIVER="model")
    assert p.returncode == 0, p.stderr  # -W error: no warning while it waits
    out = __import__("json").loads(p.stdout.strip().splitlines()[-1])
    installed, reason = out["before"]
    assert not installed and "waiting for the driver model" in reason and "agxguard._model" in reason
    assert out["present"] is False and out["now"] is True
    assert out["after"] == [True, "model", None]


@pytest.mark.skipif(not C.HAVE_OBJC, reason="the driver model needs an Objective-C runtime build")
def test_installing_the_model_before_it_loaded_says_how_to_load_it():
    p = _child("import agxguard\n"
               "try:\n"
               "    agxguard.install('model')\n"
               "except RuntimeError as e:\n"
               "    print(e)\n", AGXGUARD_DRIVER="none")
    assert p.returncode == 0, p.stderr
    assert "the driver model is not loaded" in p.stdout and "import agxguard._model" in p.stdout, p.stdout


@pytest.mark.skipif(not C.HAVE_OBJC, reason="the driver model needs an Objective-C runtime build")
def test_uninstall_while_waiting_for_the_model_cancels_the_wait():
    p = _child("import agxguard\n"
               "agxguard.uninstall()\n"
               "import agxguard.lab.model\n"
               "print(agxguard.status()['installed'])", AGXGUARD_DRIVER="model")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
