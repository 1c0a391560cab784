#!/usr/bin/env python3
"""Checks the crate's import structure (DESIGN.md, "rules of the house").

1. No import circle between source files: file A uses a path into file B, and B
   (directly or through others) uses a path back into A. A `mod.rs` that re-exports
   its own submodules (`pub use sub::{X}`) is the module's face, not a dependency: a
   path through the re-export counts as a path into the submodule that defines X.
2. No file under src/backend/ imports a product (search, eval, generate, chat,
   serve) or the CLI.
3. The model layer (src/model*, src/kvplan*, src/tokenizer*, src/gguf*) imports no
   backend, runtime or product.

Paths are read from `use crate::...` / `crate::...` (library) and `use super::...`,
outside `#[cfg(test)]` modules (a unit test may use any oracle).
Exit status 1 and one line per violation when a rule is broken.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> tuple:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


FILES = {module_of(p): p for p in ROOT.rglob("*.rs")}
# Files of the library only (the binary's cli/ is allowed to import everything).
LIB = {m: p for m, p in FILES.items() if not (m and m[0] == "cli")}


def strip_comments(text: str) -> str:
    """Comments and the unit-test module (tests may use any oracle) removed."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    return text[: m.start()] if m else text


def reexports(mod: tuple) -> dict:
    """Names a module file re-exports from its own submodules: name -> submodule."""
    path = FILES.get(mod)
    if path is None:
        return {}
    out = {}
    text = strip_comments(path.read_text())
    for m in re.finditer(r"pub\s+use\s+(\w+)::(\{[^}]*\}|\w+)", text):
        sub, names = m.group(1), m.group(2)
        if mod + (sub,) not in FILES:
            continue
        for name in re.findall(r"\w+", names):
            out[name] = mod + (sub,)
    return out


def resolve(segments: list) -> tuple:
    """The file a `crate::a::b::C` path lands in (longest module prefix, then a
    re-exported name followed into its submodule)."""
    best = ()
    for i in range(len(segments), 0, -1):
        if tuple(segments[:i]) in FILES:
            best = tuple(segments[:i])
            rest = segments[i:]
            break
    else:
        return ()
    # Follow re-exports while the next segment names a re-exported item.
    while rest:
        target = reexports(best).get(rest[0])
        if not target or target == best:
            break
        best, rest = target, rest[1:]
        if best + tuple(rest[:1]) in FILES:
            best, rest = best + tuple(rest[:1]), rest[1:]
    return best


def expand_use(body: str) -> list:
    """`a::{b, c::{d, e}}` -> [[a, b], [a, c, d], [a, c, e]] (names only)."""
    body = re.sub(r"\s+", "", body)
    out = []

    def walk(prefix, s):
        depth, start, items = 0, 0, []
        for i, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(s[start:i])
                start = i + 1
        items.append(s[start:])
        for item in filter(None, items):
            m = re.match(r"^((?:\w+::)*)\{(.*)\}$", item)
            if m:
                head = [x for x in m.group(1).split("::") if x]
                walk(prefix + head, m.group(2))
            else:
                segs = [x for x in item.split(" as ")[0].split("::") if x]
                segs = [x.split("as")[0] for x in segs]
                out.append(prefix + [x for x in segs if x != "self"])

    walk([], body)
    return out


def imports(mod: tuple, path: Path) -> set:
    text = strip_comments(path.read_text())
    deps = set()
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths.extend(expand_use(m.group(1)))
    for m in re.finditer(r"\bcrate((?:::\w+)+)", text):
        paths.append(["crate"] + m.group(1).strip(":").split("::"))
    for segs in paths:
        if not segs:
            continue
        if segs[0] == "crate":
            target = resolve(segs[1:])
        elif segs[0] == "super":
            base = list(mod[:-1])
            segs = segs[1:]
            while segs and segs[0] == "super":
                base, segs = base[:-1], segs[1:]
            target = resolve(base + segs)
        else:
            continue
        if not target or target == mod:
            continue
        # A module's own re-exports of its children are its face, not a dependency.
        if path.name == "mod.rs" and target[: len(mod)] == mod:
            continue
        deps.add(target)
    return deps


def main() -> int:
    graph = {m: imports(m, p) for m, p in LIB.items()}
    errors = []
    name = lambda m: "::".join(m) or "crate"

    # 1. cycles (depth-first search over the file graph)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                errors.append("import circle: " + " -> ".join(map(name, cyc)))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m != ():
            visit(m)

    products = {"search", "eval", "generate", "chat", "serve", "cli"}
    model_layer = {"model", "kvplan", "tokenizer", "gguf", "math"}
    above_model = {"backend", "runtime", "loader"} | products
    for m, deps in graph.items():
        for d in deps:
            if m[:1] == ("backend",) and d[:1] and d[0] in products:
                errors.append(f"backend imports a product: {name(m)} -> {name(d)}")
            if m[:1] and m[0] in model_layer and d[:1] and d[0] in above_model:
                errors.append(f"model layer imports a higher layer: {name(m)} -> {name(d)}")
    for e in sorted(set(errors)):
        print(e)
    n_edges = sum(len(v) for v in graph.values())
    print(f"check_layers: {len(graph)} library files, {n_edges} imports, {len(set(errors))} violations")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
