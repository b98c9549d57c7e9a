"""The shape of the code: imports run one way, without cycles, and the contracts between parts hold.

The import graph is read with `ast` from the source of `wan`, `storage` and `flows`, counting imports inside
functions too (they still tie the modules together), so that a change that brings a cycle back, or makes
`storage` reach into the model code, fails here rather than in a reviewer's head.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wan", "storage", "flows")

# Cycles that are known and being taken apart: none may be added (and today there are none). Each entry is
# the sorted list of modules of one strongly connected component.
KNOWN_CYCLES: list[list[str]] = []
# Edges against the direction of the layers that are known: the same.
KNOWN_WRONG_WAY: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported(name: str, path: Path) -> Iterator[str]:
    """Every dotted name `path` imports (and, for `from x import y`, `x.y` too: y may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports (the deepest module a dotted name names)."""
    modules = _modules()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for dotted in _imported(name, path):
            if dotted.split(".")[0] in PACKAGES and (target := owner(dotted)) not in (None, name):
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def wrong_way(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges against the layers: `flows -> storage, wan`; `storage` imports no model code (nor flows);
    `wan` imports neither; `wan.distributed` imports nothing of `wan.pipeline`."""
    bad = set()
    for source, targets in graph.items():
        for target in targets:
            top, target_top = source.split(".")[0], target.split(".")[0]
            if (top == "storage" and target_top in ("wan", "flows")) or (
                top == "wan" and target_top in ("storage", "flows")
            ):
                bad.add((source, target))
            if source.startswith("wan.distributed") and target == "wan.pipeline":
                bad.add((source, target))
    return bad


def test_the_graph_reader_sees_cycles_and_layers():
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}, "b": set()}
    assert cycles(graph) == [["a.x", "a.y", "a.z"]]
    assert wrong_way({"storage.catalog": {"wan.model"}, "flows.cli": {"storage.catalog"}}) == {
        ("storage.catalog", "wan.model")
    }
    graph = import_graph()
    assert "flows.shard" in graph and "storage.catalog" in graph["flows.shard"]  # a top-level import
    assert "flows.group" in graph["flows.models"]  # an import inside a function counts too


def test_no_new_import_cycle():
    found = cycles(import_graph())
    assert [c for c in found if c not in KNOWN_CYCLES] == [], found


def test_imports_run_one_way():
    found = wrong_way(import_graph())
    assert found - KNOWN_WRONG_WAY == set(), sorted(found)


def test_the_group_protocol_imports_nothing_of_wanflow():
    """Both sides of a worker group import it; it must pull in neither."""
    assert import_graph()["flows.group_protocol"] == set()


FULL_LAYOUT = {
    "ulysses_size": 2, "ring_size": 2, "cfg_parallel": True, "dit_zero3": True, "t5_zero3": True,
    "deepspeed_config": "/etc/ds.json", "offload_model": False, "t5_cpu": True, "vae_tiling": "32:8",
}  # fmt: skip


@pytest.mark.parametrize("layout", [{}, {"cfg_parallel": False, "ulysses_size": None}, FULL_LAYOUT])
def test_a_group_spec_survives_the_command_line(layout):
    from flows.group_protocol import GroupSpec

    spec = GroupSpec.from_layout("tiny-t2v", "/ckpt dir", "bfloat16", layout)
    assert GroupSpec.from_argv(spec.to_argv()) == spec
    assert {k: v for k, v in spec.layout().items() if k in layout} == {
        k: v for k, v in layout.items() if k in spec.layout()
    }


def test_a_group_spec_refuses_an_unknown_layout_key():
    from flows.group_protocol import GroupSpec

    with pytest.raises(ValueError, match="unknown key 'ulysses'"):
        GroupSpec.from_layout("tiny-t2v", layout={"ulysses": 2})


def test_both_backends_satisfy_the_protocol():
    """The shard talks to an in-process pipeline and a worker group alike, through `GenerationBackend`."""
    from flows.backend import GenerationBackend
    from flows.group import GroupPipeline
    from wan.pipeline import WanPipeline

    pipe = WanPipeline.from_config("tiny-t2v", seed=0, device="cpu")
    assert isinstance(pipe, GenerationBackend)
    assert pipe.describe() == {} and pipe.peak_memory_bytes is None
    members = [name for name in dir(GenerationBackend) if not name.startswith("_") and name != "memory"]
    assert members and all(hasattr(GroupPipeline, name) for name in members), members
