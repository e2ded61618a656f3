"""The shape of the house: rooms (top-level modules and packages of ``src/sparsetrain``) on
floors, every import pointing down or staying in its room, no import circle, no oversized
module, and no product code reading files of ``benchmarks/``. The README's "Architecture"
section describes the same floors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsetrain"

# Lowest first. A module may import from a lower floor, or from its own room.
FLOORS = [
    {"errors", "tensor_tree"},
    {"kernels", "distributed", "checkpoint"},
    {"config"},
    {"model", "flops", "data"},
    {"sparsity", "optim"},
    {"hf"},
    {"memory", "training"},
    {"tools", "bench", "cli_args", "compare"},
    {"cli", "torchrun"},
    {"zoo_cli"},
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("sparsetrain", *parts))] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The sparsetrain modules ``name`` imports, at the top or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = {f"{base}.{alias.name}" for alias in node.names}
            found |= names
            if not names <= set(MODULES):  # names defined in ``base`` itself, not its submodules
                found.add(base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in MODULES} - {None}
    assert rooms == set(FLOOR), f"rooms without a floor: {rooms - set(FLOOR)}; floors without a room: {set(FLOOR) - rooms}"


def test_imports_point_down_or_stay_in_their_room():
    up = []
    for module, targets in GRAPH.items():
        room = _room(module)
        if room is None:  # the package root: its lazy public names only
            continue
        for target in targets:
            other = _room(target)
            if other is not None and other != room and FLOOR[other] >= FLOOR[room]:
                up.append(f"{module} -> {target}")
    assert not up, "imports that do not point down:\n" + "\n".join(sorted(up))


def test_kernels_import_nothing_of_sparsetrain_but_errors():
    outside = {
        f"{m} -> {t}" for m, ts in GRAPH.items() if _room(m) == "kernels"
        for t in ts if _room(t) not in ("kernels", "errors")
    }
    assert not outside, sorted(outside)


def test_no_import_circle():
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join([*trail[trail.index(target):], target]))
            if target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines (at most {MAX_LINES}); split it where the seams are"


def _code_strings(path: Path) -> list[str]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_product_reads_no_file_of_benchmarks():
    readers = [str(p) for p in MODULES.values() if any("benchmarks" in s for s in _code_strings(p))]
    assert not readers, readers
