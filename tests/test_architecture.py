"""The floors of docs/architecture.md, checked: every module's imports (function-level ones included) go down.

The floor table is read from the ```floors block of docs/architecture.md, so the written order and the checked
order are one text. A module belongs to the floor whose prefix matches it longest. The checker fails on an
import into a higher floor, on a cycle between floors, and on a run-time module reaching into `exporters`
other than through the doors the document names.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# Top-level folders installed under edge_mmm (pyproject's package-dir). exporters/data holds scripts that run
# inside a Triton server, not package modules.
SOURCE_ROOTS = {"edge_mmm": "edge_mmm", "kernels": "edge_mmm.kernels", "exporters": "edge_mmm.exporters",
                "devices": "edge_mmm.devices"}
SKIP_DIRS = {"data", "static", "__pycache__"}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # file:line
    scope: str = ""  # enclosing function or method ("Class.method"), "" at module level


@dataclass(frozen=True)
class Floors:
    names: Tuple[str, ...]  # bottom first
    prefixes: Dict[str, str]  # module prefix -> floor name
    doors: Tuple[str, ...]  # "module:function" (or a whole "module") allowed to import the build-time floors
    build: Tuple[str, ...]  # build-time floors (exporters)

    def floor_of(self, module: str) -> str:
        best = ""
        for prefix in self.prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best = prefix
        if not best:
            raise AssertionError(f"module {module} is on no floor of {DOC.name}; add it to the floors block")
        return self.prefixes[best]

    def rank(self, floor: str) -> int:
        return self.names.index(floor)


def read_floors(text: str) -> Floors:
    """Parse the ```floors block: `N name prefix, prefix` lines, then `doors:` and `build:` lines."""
    body = text.split("```floors\n", 1)[1].split("```", 1)[0]
    names, prefixes, doors, build = [], {}, (), ()
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("doors:"):
            doors = tuple(p.strip() for p in line[6:].split(",") if p.strip())
        elif line.startswith("build:"):
            build = tuple(p.strip() for p in line[6:].split(",") if p.strip())
        else:
            _, name, rest = line.split(None, 2)
            names.append(name)
            for prefix in rest.split(","):
                prefixes[prefix.strip()] = name
    return Floors(tuple(names), prefixes, doors, build)


def module_files() -> Dict[str, Tuple[Path, bool]]:
    """module name -> (file, is_package) for every source module of the installed package."""
    out = {}
    for top, package in SOURCE_ROOTS.items():
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT / top)
            if SKIP_DIRS & set(rel.parts[:-1]):
                continue
            parts = [p for p in rel.with_suffix("").parts if p != "__init__"]
            out[".".join([package] + parts)] = (path, path.name == "__init__.py")
    return out


def imports_of(module: str, path: Path, is_package: bool, known: Iterable[str]) -> List[Edge]:
    """Every edge_mmm import in the file, at any depth (function bodies, TYPE_CHECKING blocks), with the
    function it sits in."""
    known = set(known)
    edges: List[Edge] = []

    def visit(node, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{scope}.{child.name}" if scope else child.name)
                continue
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    origin = ".".join(base + ([child.module] if child.module else []))
                else:
                    origin = child.module or ""
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in child.names]
            for target in dict.fromkeys(targets):
                if target == "edge_mmm" or target.startswith("edge_mmm."):
                    edges.append(Edge(module, target, f"{_shown(path)}:{child.lineno}", scope))
            visit(child, scope)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return edges


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def package_edges() -> List[Edge]:
    files = module_files()
    edges = []
    for module, (path, is_package) in files.items():
        edges += imports_of(module, path, is_package, files)
    return edges


def upward(edges: Sequence[Edge], floors: Floors) -> List[str]:
    """Imports into a higher floor."""
    bad = []
    for e in edges:
        a, b = floors.floor_of(e.src), floors.floor_of(e.dst)
        if floors.rank(b) > floors.rank(a):
            bad.append(f"{e.where}: {e.src} ({a}) imports {e.dst} ({b}), a higher floor")
    return bad


def floor_cycles(edges: Sequence[Edge], floors: Floors) -> List[List[str]]:
    """Strongly connected groups of more than one floor (Tarjan)."""
    graph: Dict[str, set] = {n: set() for n in floors.names}
    for e in edges:
        a, b = floors.floor_of(e.src), floors.floor_of(e.dst)
        if a != b:
            graph[a].add(b)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in floors.names:
        if v not in index:
            visit(v)
    return groups


def side_doors(edges: Sequence[Edge], floors: Floors) -> List[str]:
    """Run-time code that imports a build-time floor outside the named doors (`module:function`, or a whole
    module such as the CLI). A function nested in a door is part of it (e.g. the build step it runs on a
    cache miss, which imports the exporter only then)."""
    bad = []
    for e in edges:
        a, b = floors.floor_of(e.src), floors.floor_of(e.dst)
        outer = e.scope.split(".")
        scopes = {f"{e.src}:{'.'.join(outer[:i])}" for i in range(1, len(outer) + 1)}
        if b in floors.build and a not in floors.build and e.src not in floors.doors \
                and not scopes & set(floors.doors):
            bad.append(f"{e.where}: run-time {e.src} imports build-time {e.dst}; go through a door")
    return bad


def check(edges: Sequence[Edge], floors: Floors) -> List[str]:
    problems = upward(edges, floors) + side_doors(edges, floors)
    problems += [f"import cycle between floors: {' <-> '.join(g)}" for g in floor_cycles(edges, floors)]
    return problems


FLOORS = read_floors(DOC.read_text(encoding="utf-8"))


def test_every_module_imports_down_only():
    problems = check(package_edges(), FLOORS)
    assert not problems, "\n".join(problems)


def test_every_floor_prefix_names_a_module():
    modules = module_files()
    stale = [p for p in FLOORS.prefixes if not any(m == p or m.startswith(p + ".") for m in modules)]
    assert not stale, f"floors block names modules that do not exist: {stale}"
    missing_doors = [d for d in FLOORS.doors if d.split(":")[0] not in modules]
    assert not missing_doors, f"doors that do not exist: {missing_doors}"


def test_function_level_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    if True:\n        from edge_mmm.runtime import retry\n"
                   "class C:\n    def g(self):\n        from ..errors import InputError\n", encoding="utf-8")
    edges = imports_of("edge_mmm.audio.m", src, False, {"edge_mmm.runtime.retry"})
    assert sorted((e.dst, e.scope) for e in edges) == [("edge_mmm.errors", "C.g"), ("edge_mmm.runtime.retry", "f")]


SYNTHETIC = read_floors("""```floors
1 core    edge_mmm, edge_mmm.errors
2 low     edge_mmm.low
3 build   edge_mmm.exporters
4 high    edge_mmm.high
doors: edge_mmm.high.door:export_on_first_use
build: build
```""")


def test_checker_finds_a_cycle_and_an_upward_import():
    edges = [Edge("edge_mmm.high.a", "edge_mmm.low.b", "a:1"), Edge("edge_mmm.low.b", "edge_mmm.high.a", "b:2")]
    problems = check(edges, SYNTHETIC)
    assert any("b:2" in p and "higher floor" in p for p in problems)
    assert "import cycle between floors: high <-> low" in problems
    assert not check(edges[:1], SYNTHETIC)


def test_checker_allows_only_the_doors_into_build_time():
    door = Edge("edge_mmm.high.door", "edge_mmm.exporters.onnx", "d:1", "export_on_first_use")
    beside = Edge("edge_mmm.high.door", "edge_mmm.exporters.onnx", "d:9", "load")
    side = Edge("edge_mmm.high.other", "edge_mmm.exporters.onnx", "o:1")
    inner = Edge("edge_mmm.high.door", "edge_mmm.exporters.onnx", "d:2", "export_on_first_use.build")
    lookalike = Edge("edge_mmm.high.door", "edge_mmm.exporters.onnx", "d:8", "export_on_first_use_x")
    assert not check([door], SYNTHETIC)
    assert not check([inner], SYNTHETIC)
    assert check([lookalike], SYNTHETIC)
    assert check([beside], SYNTHETIC) == ["d:9: run-time edge_mmm.high.door imports build-time "
                                          "edge_mmm.exporters.onnx; go through a door"]
    assert check([side], SYNTHETIC) == ["o:1: run-time edge_mmm.high.other imports build-time "
                                        "edge_mmm.exporters.onnx; go through a door"]
    with pytest.raises(AssertionError, match="on no floor"):
        check([Edge("other.x", "edge_mmm.low", "x:1")], SYNTHETIC)


# The cycles and upward imports issue 14 found, each put back into today's graph: the checker must refuse each.
REINTRODUCED = [
    ("edge_mmm.runners.tensorrt", "edge_mmm.asr.backends"),  # TensorRT runner -> asr DecoderState
    ("edge_mmm.exporters.onnx_vision", "edge_mmm.vision.backends"),  # vision export -> run-time encoder
    ("edge_mmm.exporters.onnx_lm", "edge_mmm.text.ort_backend"),
    ("edge_mmm.kernels.quant_matmul", "edge_mmm.quant.packed"),  # kernels <-> quant
    ("edge_mmm.runtime.assistant", "edge_mmm.exporters.bundle"),  # live runtime reads bundles via exporters
    ("edge_mmm.audio.microphone", "edge_mmm.runtime.retry"),  # capture thread outside the runtime
    ("edge_mmm.vision.camera", "edge_mmm.runtime.retry"),  # (both now live in runtime/)
    ("edge_mmm.quant.io", "edge_mmm.weights.export_cache"),  # a file format outside weights/
    ("edge_mmm.weights.idefics3", "edge_mmm.text.tokenizer"),  # tokenizer assembly inside weights/
    ("edge_mmm.weights.idefics3", "edge_mmm.vision.processor"),
]


@pytest.mark.parametrize("src,dst", REINTRODUCED)
def test_checker_refuses_each_reintroduced_import(src, dst):
    edges = package_edges() + [Edge(src, dst, "reintroduced:1")]
    assert any("reintroduced:1" in p for p in check(edges, FLOORS))
