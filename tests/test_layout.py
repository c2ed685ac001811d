"""The intended architecture of fastres/, checked with dev/layout.py: no import cycle, no lazy import
between fastres modules, layers that import only downward, and a training loop well under 100 lines.
The tool itself is tested first, on made-up files, so a broken tool fails here rather than passing vacuously."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_layout():
    spec = importlib.util.spec_from_file_location("layout", ROOT / "dev" / "layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


layout = _load_layout()

# Layers: 0 leaves, 1 components (everything not named here), 2 the training loop, 3 tools. A module belongs to a
# group when it is the name or inside it (fastres.tools.bench belongs to fastres.tools), so a module turned into a
# package keeps its layer.
LEAVES = {"fastres.errors", "fastres.rng"}
TRAIN = {"fastres.train"}
TOOLS = {"fastres.tools"}  # bench, profile, dispatch, scaling, stack, report and their argument helpers
REPORT_MAY_IMPORT = {"fastres.log", "fastres.errors"}
TOOLS_PACKAGE = "fastres.tools"  # the argument helpers every tool shares (its __init__)
TRAIN_MAX_LINES = 100
# Lazy imports allowed: fastres.data.dali imports nvidia (DALI) inside a function; nvidia is not a fastres module,
# so it is not in the graph at all. No fastres -> fastres import may be lazy.


def _in(module: str, group: set[str]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in group)


def _layer(module: str) -> int:
    if _in(module, LEAVES):
        return 0
    if _in(module, TOOLS):
        return 3
    if _in(module, TRAIN):
        return 2
    return 1


def _fmt(edges) -> str:
    return "\n".join(f"  {e.source} -> {e.target}{'  (lazy)' if e.lazy else ''}   [{e.path}:{e.lineno}]"
                     for e in edges)


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    tree = layout.read_tree(ROOT)
    assert "fastres/__init__.py" in tree, f"no fastres package under {ROOT}"
    return tree


@pytest.fixture(scope="module")
def edges(files):
    return layout.import_edges(files)


# --- the tool, on made-up files ----------------------------------------------------------------------------------

FAKE = {
    "fastres/__init__.py": "VERSION = 1\n",
    "fastres/a.py": "from fastres import b\nimport os\n",                       # a -> b (fastres.b is a module)
    "fastres/b.py": "import fastres.c\n\ndef f():\n    from fastres.a import x\n    return x\n",  # b -> c, b -> a lazy
    "fastres/c.py": "from fastres import VERSION\nfrom fastres.pkg import mod\n",  # c -> fastres (a name), c -> pkg.mod
    "fastres/pkg/__init__.py": "from . import mod\nfrom .mod import thing\n",    # relative: pkg -> pkg.mod
    "fastres/pkg/mod.py": (
        "import torch\nfrom ..c import y\n\n"                                     # relative up a level: pkg.mod -> c
        "class K:\n    from fastres import c\n\n"                                 # class body: top level
        "    def m(self):\n        import fastres.pkg.mod\n"                      # self-loop, lazy
        "        return 1\n"
    ),
    "fastres/long.py": "def g():\n" + "    x = 1\n" * 70 + "\n\nclass C:\n    def h(self):\n"
                       "        def inner():\n            pass\n        return inner\n",
}


def test_tool_graph_on_fake_files():
    assert layout.import_graph(FAKE) == {
        "fastres": [],
        "fastres.a": [("fastres.b", False)],
        "fastres.b": [("fastres.a", True), ("fastres.c", False)],
        "fastres.c": [("fastres", False), ("fastres.pkg.mod", False)],
        "fastres.long": [],
        "fastres.pkg": [("fastres.pkg.mod", False)],
        "fastres.pkg.mod": [("fastres.c", False), ("fastres.pkg.mod", True)],
    }
    lazy = [(e.source, e.target, e.lineno) for e in layout.import_edges(FAKE) if e.lazy]
    assert lazy == [("fastres.b", "fastres.a", 4), ("fastres.pkg.mod", "fastres.pkg.mod", 8)]


def test_tool_cycles_on_fake_files():
    graph = layout.import_graph(FAKE)
    # a -> b -> (lazy) a; c -> pkg.mod -> c; pkg.mod -> pkg.mod is inside the second component, not separate
    assert layout.cycles(graph) == [["fastres.a", "fastres.b"], ["fastres.c", "fastres.pkg.mod"]]
    assert layout.cycles({"x": [("x", True)], "y": [("x", False)]}) == [["x"]]  # a lone self-loop
    assert layout.cycles({"x": [("y", False)], "y": [("z", True)], "z": []}) == []
    chain = {f"m{i}": [(f"m{i + 1}", False)] for i in range(3000)}  # deep: no recursion limit
    chain["m3000"] = [("m0", True)]
    assert layout.cycles(chain) == [sorted(chain)]


def test_tool_function_lengths_on_fake_files():
    funcs = layout.function_lengths(FAKE)
    assert funcs[0] == layout.Func("fastres.long", "g", 1, 71)
    names = {(f.module, f.name): f.lines for f in funcs}
    assert names[("fastres.long", "C.h")] == 4            # the nested inner() is part of h, not listed
    assert ("fastres.long", "inner") not in names and ("fastres.long", "C.h.inner") not in names
    assert names[("fastres.pkg.mod", "K.m")] == 3
    assert len(funcs) == 4 and sum(f.lines > layout.LONG for f in funcs) == 1


def test_tool_report_runs_on_fake_files():
    text = layout.report(FAKE, top=2)
    assert "fastres.a, fastres.b" in text and "over 60 lines" in text


# --- the architecture of today's fastres/ -------------------------------------------------------------------------

def test_no_import_cycle(files):
    graph = layout.import_graph(files)
    found = layout.cycles(graph)
    detail = []
    for scc in found:
        members = set(scc)
        detail.append("cycle: " + ", ".join(scc))
        detail += [f"  {m} -> {t}{'  (lazy)' if lazy else ''}" for m in scc for t, lazy in graph[m] if t in members]
    assert not found, "fastres import graph (lazy edges included) has cycles:\n" + "\n".join(detail)


def test_no_lazy_import_between_fastres_modules(edges):
    lazy = [e for e in edges if e.lazy]
    assert not lazy, "fastres modules imported inside a function; make them top-level imports:\n" + _fmt(lazy)


def test_leaves_import_only_leaves(edges):
    bad = [e for e in edges if _layer(e.source) == 0 and _layer(e.target) != 0]
    assert not bad, f"leaf modules {sorted(LEAVES)} may import only each other:\n" + _fmt(bad)


def test_components_import_no_train_or_tool(edges):
    bad = [e for e in edges if _layer(e.source) == 1 and _layer(e.target) >= 2]
    assert not bad, "components may not import fastres.train or a tool:\n" + _fmt(bad)


def test_train_imports_no_tool(edges):
    bad = [e for e in edges if _layer(e.source) == 2 and _layer(e.target) == 3]
    assert not bad, f"fastres.train may not import a tool {sorted(TOOLS)}:\n" + _fmt(bad)


def test_report_imports_only_log_errors_config(edges):
    bad = [e for e in edges if _in(e.source, {"fastres.tools.report"})
           and not _in(e.target, REPORT_MAY_IMPORT | {"fastres.tools.report"}) and e.target != TOOLS_PACKAGE]
    assert not bad, (f"fastres.tools.report may import only {sorted(REPORT_MAY_IMPORT)} and {TOOLS_PACKAGE} among "
                     "fastres modules:\n" + _fmt(bad))


def test_every_edge_goes_down_or_level(edges):
    """The rules above, together: no edge from a lower layer to a higher one."""
    bad = [e for e in edges if _layer(e.target) > _layer(e.source)]
    assert not bad, "imports that go up a layer (0 leaves, 1 components, 2 train, 3 tools):\n" + "\n".join(
        f"  [{_layer(e.source)}->{_layer(e.target)}] {e.source} -> {e.target}   [{e.path}:{e.lineno}]" for e in bad)


def test_training_loop_is_short(files):
    funcs = [f for f in layout.function_lengths(files) if _in(f.module, TRAIN)]
    assert funcs, "no functions found in fastres.train"
    long = [f for f in funcs if f.lines > TRAIN_MAX_LINES]
    assert not long, f"fastres.train functions over {TRAIN_MAX_LINES} lines:\n" + "\n".join(
        f"  {f.lines} lines  {f.module}:{f.name} (line {f.lineno})" for f in long)


CORE_MAX_LINES = 60  # the trainer core reads in one sitting: no function longer than a screen
# what a reader of fastres.train may have to open, at most: 14 core modules and the data package's rooms (the
# sources, the draws the loaders share, a file per loader family), each with one job
CORE_MAX_MODULES = 24


def test_no_core_function_is_over_60_lines(files):
    funcs = [f for f in layout.function_lengths(files) if not _in(f.module, TOOLS)]
    assert funcs, "no core functions found"
    long = [f for f in funcs if f.lines > CORE_MAX_LINES]
    assert not long, f"core functions over {CORE_MAX_LINES} lines:\n" + "\n".join(
        f"  {f.lines} lines  {f.module}:{f.name} (line {f.lineno})" for f in long)


def test_the_trainer_loads_at_most_24_fastres_modules_and_no_tool():
    code = "import sys, fastres.train; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'fastres')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert "fastres.train" in loaded and not [m for m in loaded if _in(m, TOOLS)], loaded
    assert len(loaded) <= CORE_MAX_MODULES, f"import fastres.train loads {len(loaded)} fastres modules: {loaded}"
