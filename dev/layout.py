#!/usr/bin/env python3
"""The shape of the fastres source tree: its import graph, the cycles in it, and its longest functions.

    python3 dev/layout.py [--root DIR] [--top N]      # the tree on disk (default: the repo this script is in)
    python3 dev/layout.py --git REV [--top N]         # the tree at a git revision, e.g. --git 0f3abb4

Stdlib only. The functions take `files`, a dict of relative path ("fastres/data/gpu.py") to source text,
so tests can run them on the working tree or on made-up files:

    import_edges(files)     -> [Edge(source, target, lazy, path, lineno)], one per import statement and target
    import_graph(files)     -> {module: [(target, lazy), ...]}, among the package's modules only
    cycles(graph)           -> [[module, ...]]: strongly connected components of size > 1, and self-loops
    function_lengths(files) -> [Func(module, name, lineno, lines)], longest first

An import is "lazy" when it sits inside a function or method (at any depth); anything else (module body,
class body, `if`/`try` at module level, `if TYPE_CHECKING:`) is top level. Importing fastres.a.b is one edge
to fastres.a.b; the implicit import of the parent package fastres.a is not counted.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

PACKAGE = "fastres"
LONG = 60  # a function over this many lines is counted as long


class Edge(NamedTuple):
    source: str
    target: str
    lazy: bool
    path: str
    lineno: int


class Func(NamedTuple):
    module: str
    name: str  # "f", "Class.method", "Outer.Inner.method"
    lineno: int
    lines: int


def module_name(path: str) -> str:
    """fastres/data/gpu.py -> fastres.data.gpu; fastres/data/__init__.py -> fastres.data."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _known(files: dict[str, str]) -> set[str]:
    """Every module and every package (a folder holding modules, with or without __init__.py)."""
    names = set()
    for path in files:
        parts = module_name(path).split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _resolve(name: str, known: set[str]) -> str:
    """The module an absolute dotted name refers to: itself if known, else its longest known prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return name


def _imports(tree: ast.AST) -> Iterable[tuple[ast.stmt, bool]]:
    """Every Import/ImportFrom node, with whether it is inside a function (lazy)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def import_edges(files: dict[str, str], package: str = PACKAGE) -> list[Edge]:
    """One Edge per (import statement, package module it reaches), sorted by source, line and target."""
    known = _known(files)
    edges = set()
    for path, text in files.items():
        if not path.endswith(".py"):
            continue
        source = module_name(path)
        is_pkg = Path(path).name == "__init__.py"
        tree = ast.parse(text, filename=path)
        for node, lazy in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, known) for alias in node.names]
            else:
                if node.level:  # relative: the package this module is in, then up level - 1
                    base = source.split(".") if is_pkg else source.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    targets.append(sub if alias.name != "*" and sub in known else _resolve(mod, known))
            for target in targets:
                if target == package or target.startswith(package + "."):
                    edges.add(Edge(source, target, lazy, path, node.lineno))
    return sorted(edges, key=lambda e: (e.source, e.lineno, e.target, e.lazy))


def import_graph(files: dict[str, str], package: str = PACKAGE) -> dict[str, list[tuple[str, bool]]]:
    """{module: sorted unique [(target, lazy)]}, with every module of the package as a key."""
    graph: dict[str, set[tuple[str, bool]]] = {
        module_name(p): set() for p in files if p.endswith(".py")
    }
    for e in import_edges(files, package):
        graph[e.source].add((e.target, e.lazy))
    return {m: sorted(ts) for m, ts in sorted(graph.items())}


def cycles(graph: dict[str, list[tuple[str, bool]]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1, plus [m] for every self-loop; lazy edges count.
    Each component sorted, the list sorted."""
    succ = {m: sorted({t for t, _ in ts}) for m, ts in graph.items()}
    for ts in list(succ.values()):
        for t in ts:
            succ.setdefault(t, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, 0)]  # iterative DFS: (node, next successor to look at)
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if work:  # v is done: pass its low link up to its DFS parent
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                scc = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    scc.append(w)
                    if w == v:
                        break
                if len(scc) > 1 or v in succ[v]:
                    found.append(sorted(scc))
    return sorted(found)


def function_lengths(files: dict[str, str]) -> list[Func]:
    """Top-level functions and methods (of classes at any nesting), `end_lineno - lineno + 1` each (decorators
    not counted); a function nested in a function is part of it. Longest first."""
    out = []

    def walk(body: list[ast.stmt], module: str, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append(Func(module, prefix + node.name, node.lineno, node.end_lineno - node.lineno + 1))
            elif isinstance(node, ast.ClassDef):
                walk(node.body, module, f"{prefix}{node.name}.")

    for path, text in files.items():
        if path.endswith(".py"):
            walk(ast.parse(text, filename=path).body, module_name(path), "")
    return sorted(out, key=lambda f: (-f.lines, f.module, f.lineno))


def read_tree(root: Path, package: str = PACKAGE) -> dict[str, str]:
    """{relative path: text} for every .py file under root/package."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted((root / package).rglob("*.py"))
    }


def read_git(rev: str, repo: Path, package: str = PACKAGE) -> dict[str, str]:
    """{relative path: text} for every .py file under package at git revision rev (reads only)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                              text=True, encoding="utf-8").stdout

    names = git("ls-tree", "-r", "--name-only", rev, package).splitlines()
    return {n: git("show", f"{rev}:{n}") for n in names if n.endswith(".py")}


def report(files: dict[str, str], top: int = 25, package: str = PACKAGE) -> str:
    graph = import_graph(files, package)
    edges = import_edges(files, package)
    out = [f"== import graph: {len(graph)} modules, {sum(map(len, graph.values()))} edges "
           f"({sum(lazy for ts in graph.values() for _, lazy in ts)} lazy) =="]
    for m, ts in graph.items():
        top_level = [t for t, lazy in ts if not lazy]
        lazy = [t for t, lz in ts if lz]
        out.append(f"{m}")
        out.append(f"    top:  {', '.join(top_level) or '-'}")
        if lazy:
            lines = {t: sorted({e.lineno for e in edges if e.source == m and e.target == t and e.lazy})
                     for t in lazy}
            out.append("    lazy: " + ", ".join(f"{t} (line {', '.join(map(str, lines[t]))})" for t in lazy))
    found = cycles(graph)
    out.append("")
    out.append(f"== cycles (lazy edges included): {len(found)} ==")
    for scc in found:
        out.append(("self-loop: " if len(scc) == 1 else f"{len(scc)} modules: ") + ", ".join(scc))
        members = set(scc)
        for m in scc:
            for t, lazy in graph.get(m, []):
                if t in members:
                    out.append(f"    {m} -> {t}{'  (lazy)' if lazy else ''}")
    funcs = function_lengths(files)
    long = [f for f in funcs if f.lines > LONG]
    out.append("")
    out.append(f"== function lengths: {len(funcs)} functions, {len(long)} over {LONG} lines; top {top} ==")
    for f in funcs[:top]:
        out.append(f"{f.lines:5d}  {f.module}:{f.name}  (line {f.lineno})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the directory holding the package (default: the repo this script is in)")
    ap.add_argument("--git", metavar="REV", help="read the tree at this git revision of --root instead of the disk")
    ap.add_argument("--top", type=int, default=25, help="how many of the longest functions to list (default 25)")
    ap.add_argument("--package", default=PACKAGE, help=f"the package's name (default {PACKAGE})")
    args = ap.parse_args(argv)
    root = args.root
    if not (root / args.package).is_dir() and root.name == args.package:
        root = root.parent  # --root pointed at the package itself
    try:
        files = read_git(args.git, root, args.package) if args.git else read_tree(root, args.package)
    except subprocess.CalledProcessError as e:
        print(f"layout: git failed: {e.stderr.strip()}", file=sys.stderr)
        return 2
    if not files:
        print(f"layout: no {args.package}/*.py under {root}" + (f" at {args.git}" if args.git else ""),
              file=sys.stderr)
        return 2
    where = f"{root} at {args.git}" if args.git else str(root)
    print(f"# {args.package} layout: {where}, {len(files)} files\n")
    print(report(files, args.top, args.package))
    return 0


if __name__ == "__main__":
    sys.exit(main())
