"""Structure checks on zo2tier/: import cycles (imports inside functions counted), reads of another object's
underscored attributes, os.environ reads. Prints what it finds; exits 1 on a cycle or a private read (an
os.environ read is listed for review, not counted: the launcher reads torchrun's environment by design).

    python tools/check_structure.py
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zo2tier")


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def imports(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                parts = name.split(".")[: -node.level]
                base = ".".join(parts + [node.module])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    out, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                out.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return out


# documented entry points that live under an underscored module of a library
PUBLIC_UNDERSCORED = {"torch._dynamo"}
# underscored attributes a library offers for reading: a torch tensor's version counter, bumped by every in-place
# write (autograd checks saved tensors with it; proxy.run_groups checks its inputs before a retry)
PUBLIC_ATTRIBUTES = {"_version"}


def private_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Reads of ``x._name`` where ``x`` is not the object itself: ``self``, ``cls``, or a name bound to
    ``cls(...)`` (an alternative constructor building its instance)."""
    own = {"self", "cls"}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "cls"):
            own.update(t.id for t in node.targets if isinstance(t, ast.Name))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in own:
                continue
            what = f"{ast.unparse(owner)}.{node.attr}"
            if what not in PUBLIC_UNDERSCORED and node.attr not in PUBLIC_ATTRIBUTES:
                out.append((node.lineno, what))
    return out


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def main() -> int:
    mods = modules()
    trees = {n: ast.parse(_read(p)) for n, p in mods.items()}
    graph = {n: {m for m in imports(n, t, set(mods)) if not (n.startswith(m + ".") and mods[m].endswith("__init__.py"))}
             for n, t in trees.items()}
    bad = 0
    for c in cycles(graph):
        print("import cycle:", " -> ".join(c))
        bad += 1
    for n, t in trees.items():
        for line, what in private_reads(t):
            print(f"{mods[n]}:{line}: private attribute {what}")
            bad += 1
        src = _read(mods[n])
        for i, l in enumerate(src.splitlines(), 1):
            if "os.environ" in l and "setdefault" not in l:
                print(f"{mods[n]}:{i}: os.environ: {l.strip()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
