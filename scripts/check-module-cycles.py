#!/usr/bin/env python3
"""Fails if the server crate's top-level modules import each other in a cycle.

Reads every `crate::` path in src/ (excluding the binaries, which are their
own crates), in `use` items, including grouped ones such as
`use crate::{a::X, b}`, and inline paths such as `crate::a::f()`, and in
test modules and doc links too: a test or a doc that reaches up the layers
is read as the dependency it is for a reader. A file
`src/foo.rs` or `src/foo/...` belongs to module `foo`. The edges form a
graph between modules; any strongly connected component with more than one
module is a cycle, printed with one path through it.

    python3 scripts/check-module-cycles.py          # exit 1 on a cycle
    python3 scripts/check-module-cycles.py --graph  # print the edges too
    python3 scripts/check-module-cycles.py crates/custos-core/src  # another crate
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
_roots = [a for a in sys.argv[1:] if not a.startswith("--")]
if _roots:
    ROOT = Path(_roots[0]).resolve()


def module_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "bin" or rel.name == "lib.rs" and len(rel.parts) == 1:
        return None
    return rel.parts[0].removesuffix(".rs")


def use_targets(tree: str) -> list[str]:
    """First path segment of every path in a `use crate::...` tree."""
    tree = tree.strip()
    if tree.startswith("{"):
        inner = tree[1:-1]
        parts, depth, current = [], 0, ""
        for ch in inner:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
        return [p.strip().split("::", 1)[0].split(" ", 1)[0] for p in parts if p.strip()]
    return [tree.split("::", 1)[0].split(" ", 1)[0]]


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = {module_of(p) for p in ROOT.rglob("*.rs")} - {None}
    modules.add("proto")
    for path in sorted(ROOT.rglob("*.rs")):
        source = module_of(path)
        if source is None:
            continue
        text = path.read_text()
        targets: set[str] = set()
        for m in re.finditer(r"\buse\s+crate::(\{.*?\}|[^;]+);", text, flags=re.S):
            targets.update(use_targets(m.group(1)))
        for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)", text):
            targets.add(m.group(1))
        graph.setdefault(source, set()).update(t for t in targets if t in modules and t != source)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A cycle inside `component`, found by walking from its first module."""
    members = set(component)
    start = component[0]
    trail = [start]
    seen = {start}
    v = start
    while True:
        nxt = sorted(w for w in graph.get(v, ()) if w in members)
        back = [w for w in nxt if w in seen]
        if back:
            first = back[0]
            return trail[trail.index(first):] + [first]
        v = next(w for w in nxt if w not in seen)
        trail.append(v)
        seen.add(v)


def main() -> int:
    graph = edges()
    if "--graph" in sys.argv:
        for source in sorted(graph):
            print(f"{source} -> {', '.join(sorted(graph[source])) or '(nothing)'}", flush=True)
    found = cycles(graph)
    for component in found:
        print(f"module cycle among {', '.join(component)}: {' -> '.join(path_through(graph, component))}",
              file=sys.stderr)
    if found:
        print("check-module-cycles: dependencies inside src/ must point one way (docs/ARCHITECTURE.md)",
              file=sys.stderr)
        return 1
    print(f"check-module-cycles: {len(graph)} modules, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
