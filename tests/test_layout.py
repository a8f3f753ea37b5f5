"""The package's shape: no import circles, the product never imports the lab, the public
namespace is __all__ and README's API section names it, and the mode list has one home.

The import graph comes from grimp (pinned in scripts/layout-check-requirements.txt),
which reads the sources without importing them, so an import inside a function counts
as much as one at the top of a module.
"""
import ast
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
import types

import pytest

import agxguard

grimp = pytest.importorskip("grimp", reason="grimp is not installed: bash scripts/setup.sh installs it "
                                            "(scripts/layout-check-requirements.txt)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(REPO, "agxguard")
LAB = "lab"  # agxguard.lab: what only measures the product


# -- the import graph -------------------------------------------------------------------

def _extension_modules(package_dir):
    """Names of the compiled submodules of a package folder (``_C``, ...): grimp sees
    only Python sources, and records ``from . import _C`` as an import of the package."""
    names = set()
    for entry in os.listdir(package_dir):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if entry.endswith(suffix):
                names.add(entry[:-len(suffix)])
    stub_names = {e[:-len(".pyi")] for e in os.listdir(package_dir) if e.endswith(".pyi")}
    return names | stub_names  # a stub says there is an extension, built or not


def import_graph(package, package_dir):
    """{module: set of modules it imports} inside ``package``. An import that grimp
    charges to the package itself but only names its compiled or Python submodules
    (``from . import _C, _config``) is an import of those submodules, not of the package."""
    graph = grimp.build_graph(package, cache_dir=None)
    extensions = _extension_modules(package_dir)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for importer in graph.modules:
        if package not in edges[importer]:
            continue
        lines = [d["line_contents"] for d in graph.get_import_details(importer=importer, imported=package)]
        if all(_only_submodules(line, package, extensions, graph.modules) for line in lines):
            edges[importer].discard(package)
            for ext in extensions:
                if any(re.search(r"\b%s\b" % re.escape(ext), line) for line in lines):
                    edges[importer].add("%s.%s" % (package, ext))
    for targets in list(edges.values()):
        for t in targets:
            edges.setdefault(t, set())
    return edges


def _only_submodules(line, package, extensions, modules):
    """Whether import statement ``line`` only names submodules of ``package``."""
    try:
        node = ast.parse(line.strip()).body[0]
    except (SyntaxError, IndexError):
        return False
    if not isinstance(node, ast.ImportFrom):
        return False
    relative = node.level == 1 and node.module is None        # from . import _C
    absolute = node.level == 0 and node.module == package     # from agxguard import _C
    if not (relative or absolute):
        return False
    return all(a.name in extensions or "%s.%s" % (package, a.name) in modules for a in node.names)


def cycles(edges):
    """Every strongly connected group of two or more modules, and every module that
    imports itself (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1 or v in edges[v]:
                        found.append(sorted(group))
    return found


def lab_imports(edges, package):
    """Each product module (outside ``package.lab``) that reaches a lab module, with the
    chain of imports that gets there."""
    lab = package + "." + LAB
    in_lab = lambda m: m == lab or m.startswith(lab + ".")  # noqa: E731
    out = {}
    for start in sorted(m for m in edges if not in_lab(m)):
        parent = {start: None}
        queue = [start]
        while queue:
            v = queue.pop(0)
            if in_lab(v):
                chain = [v]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                out[start] = " -> ".join(reversed(chain))
                break
            for w in sorted(edges.get(v, ())):
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
    return out


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.find_spec("agxguard")
    assert os.path.dirname(spec.origin) == PACKAGE_DIR, (spec.origin, "set PYTHONPATH to this checkout")
    return import_graph("agxguard", PACKAGE_DIR)


def test_the_graph_sees_the_package_and_its_lab(graph):
    assert {"agxguard", "agxguard.batcher", "agxguard.lab.suites.common", "agxguard._C"} <= set(graph)


def test_the_import_graph_of_agxguard_has_no_cycle(graph):
    assert cycles(graph) == []


def test_no_product_module_imports_the_lab(graph):
    assert lab_imports(graph, "agxguard") == {}


def _planted_copy(tmp_path, relpath, line):
    """A copy of the package's sources as package ``agxguard_planted`` with ``line``
    added to module ``relpath``; returns its import graph."""
    dest = tmp_path / "agxguard_planted"
    shutil.copytree(PACKAGE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with open(dest / relpath, "a") as f:
        f.write("\n" + line + "\n")
    sys.path.insert(0, str(tmp_path))
    try:
        return import_graph("agxguard_planted", str(dest))
    finally:
        sys.path.remove(str(tmp_path))


def test_a_planted_circle_is_found(tmp_path):
    """What the cycle check sees: the suites' old circle (common imports a suite that
    imports common), planted again in a copy."""
    edges = _planted_copy(tmp_path, "lab/suites/common.py", "from . import story  # planted")
    assert ["agxguard_planted.lab.suites.common", "agxguard_planted.lab.suites.story"] in cycles(edges)


def test_a_planted_lab_import_in_the_product_is_found_even_inside_a_function(tmp_path):
    edges = _planted_copy(tmp_path, "batcher.py", "def _planted():\n    from .lab import report")
    found = lab_imports(edges, "agxguard_planted")
    assert found["agxguard_planted.batcher"] == "agxguard_planted.batcher -> agxguard_planted.lab.report"
    # and every module that imports the batcher reaches the lab through it
    assert found["agxguard_planted"].startswith("agxguard_planted -> agxguard_planted.batcher")


# -- the public namespace ---------------------------------------------------------------

def test_all_has_at_most_25_names_and_each_exists():
    assert len(agxguard.__all__) <= 25, agxguard.__all__
    assert len(set(agxguard.__all__)) == len(agxguard.__all__)
    assert [n for n in agxguard.__all__ if not hasattr(agxguard, n)] == []


def test_every_public_name_of_the_package_is_in_all():
    """No helper leaks (typing names, sys, contextlib, ...); the package's own submodules
    (agxguard.batcher, agxguard.swizzle, agxguard.lab once imported) are where names live,
    not names of the API."""
    def own_submodule(value):
        return isinstance(value, types.ModuleType) and value.__name__.startswith("agxguard.")

    leaked = [n for n in dir(agxguard) if not n.startswith("_") and n not in agxguard.__all__
              and not own_submodule(getattr(agxguard, n))]
    assert leaked == []


def readme_api_names():
    """Names ``agxguard.NAME`` in README.md's API section ("## The API in short" up to
    the next "## "), module paths (``agxguard.hooks.rediscover``) left out."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("\n## The API in short")
    end = text.index("\n## ", start + 1)
    return set(re.findall(r"\bagxguard\.([A-Za-z]\w*)\b(?![.\w])", text[start:end]))


def test_readme_api_section_names_exactly_all():
    names = readme_api_names()
    assert sorted(set(agxguard.__all__) - names) == [], "in __all__, not in README's API section"
    assert sorted(names - set(agxguard.__all__)) == [], "in README's API section, not in __all__"


# -- one list of modes ------------------------------------------------------------------

def mode_lists(root):
    """(file, line) of every literal list of the modes in the Python sources under
    ``root``: a list, tuple or set of strings holding every mode name, or a string
    (not a docstring) that lists them all in a row ("off, op, stream, global")."""
    modes = list(agxguard._C.MODES)
    in_a_row = re.compile(r"[\s,|/]+".join(r"\b%s\b" % re.escape(m) for m in modes))
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            docstrings = set()
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = node.body
                    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                        docstrings.add(id(body[0].value))
            for node in ast.walk(tree):
                if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                    strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                    if set(modes) <= strings:
                        found.append((os.path.relpath(path, REPO), node.lineno))
                elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and id(node) not in docstrings and in_a_row.search(node.value)):
                    found.append((os.path.relpath(path, REPO), node.lineno))
    return found


def test_the_mode_list_lives_only_in_the_c_core():
    assert mode_lists(PACKAGE_DIR) == []


def test_a_planted_mode_list_is_found(tmp_path):
    (tmp_path / "a.py").write_text('MODES = ("off", "op", "stream", "global")\n')
    (tmp_path / "b.py").write_text('HELP = "one of off, op, stream, global"\n'
                                   'def f():\n    """Modes: off, op, stream, global (a docstring may say so)."""\n')
    assert sorted(name for name, _ in mode_lists(str(tmp_path))) == [os.path.relpath(str(tmp_path / n), REPO)
                                                                   for n in ("a.py", "b.py")]
