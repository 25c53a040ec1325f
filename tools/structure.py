"""Structure figures of the source tree: the longest functions, the files over a size, and the
import circles between modules (pairs or longer cycles of modules that import each other,
counting imports inside functions too, but not those under ``if TYPE_CHECKING:``).

    python tools/structure.py [--top 10] [--over 400]

Reads ``edge/``, ``convert/`` and ``benchmarks/`` (not tests, not ``benchmarks/tiny_r1``) with
:mod:`ast`; runs nothing of the project."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the import name it installs as
PACKAGES = {"edge": "edge", "convert": "edge.convert", "benchmarks": "edge.benchmarks"}
SKIP = ("benchmarks/tiny_r1",)


def sources() -> dict[str, Path]:
    """module name -> file"""
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel.startswith(s) for s in SKIP):
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mod = ".".join([name, *parts])
            if folder == "edge" and parts[:1] in (["convert"], ["benchmarks"]):
                continue
            out[mod] = path
    return out


def functions(tree: ast.AST, rel: str):
    stack = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield child.end_lineno - child.lineno + 1, f"{rel}:{child.lineno} {name}"
                stack.append((child, name + "."))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, f"{prefix}{child.name}."))
            else:
                stack.append((child, prefix))


def imports(tree: ast.AST, mod: str, is_pkg: bool, known: set[str]) -> set[str]:
    out = set()
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    typing_only = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports run nothing: not an import circle
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = ".".join(base[: len(base) - node.level + 1])
                target = f"{pkg}.{node.module}" if node.module else pkg
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.add(n)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--over", type=int, default=400)
    args = ap.parse_args()
    mods = sources()
    known = set(mods)
    funcs, big, graph = [], [], {}
    for mod, path in mods.items():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(text)
        funcs.extend(functions(tree, rel))
        n = len(text.splitlines())
        if n > args.over:
            big.append((n, rel))
        graph[mod] = imports(tree, mod, path.name == "__init__.py", known)
    print("longest functions (lines):")
    for n, where in sorted(funcs, reverse=True)[: args.top]:
        print(f"  {n:4d}  {where}")
    print(f"files over {args.over} lines:")
    for n, rel in sorted(big, reverse=True):
        print(f"  {n:4d}  {rel}")
    # a package importing its own submodules (or being imported by them) is not a circle
    # worth naming: drop edges between a package and the modules inside it
    flat = {m: {t for t in ts if not t.startswith(m + ".") and not m.startswith(t + ".")} for m, ts in graph.items()}
    circles = cycles(flat)
    print(f"import circles: {len(circles)}")
    for c in circles:
        print("  " + " <-> ".join(c))


if __name__ == "__main__":
    main()
