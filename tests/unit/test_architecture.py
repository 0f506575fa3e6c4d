"""The package's layers (docs/architecture.md): every module has one, and imports only go down.

Every module of ``megatron_dchag`` is parsed with :mod:`ast`; all its ``import`` and
``from ... import`` statements count, those inside functions too (a function-local import is
still a dependency, only a later one). The tests assert that

- every module belongs to a layer of :data:`LAYERS` (a new package or top-level module needs an
  entry here, and a line in docs/architecture.md);
- no module imports from a higher layer;
- the packages do not import each other in a cycle, within a layer either;
- ``config`` imports neither torch nor megatron-core.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = "megatron_dchag"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Lowest first. A module may import from its own layer and the layers before it. An entry names a
# package (all modules under it) or a module; the package root (its __init__) is matched exactly.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("package root", ("megatron_dchag",)),
    ("data", ("megatron_dchag.data",)),
    ("config", ("megatron_dchag.config",)),
    ("runtime", ("megatron_dchag.launch_env", "megatron_dchag.compat", "megatron_dchag.device",
                 "megatron_dchag.distributed")),
    ("building blocks", ("megatron_dchag.layers", "megatron_dchag.metrics", "megatron_dchag.segmentation_metrics")),
    ("models", ("megatron_dchag.models",)),
    ("cost models", ("megatron_dchag.flops", "megatron_dchag.memory_model")),
    ("tasks", ("megatron_dchag.tasks",)),
    ("training", ("megatron_dchag.training",)),
    ("inference", ("megatron_dchag.inference",)),
    ("cli", ("megatron_dchag.cli",)),
)


def _modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def layer_of(module: str) -> Optional[int]:
    """Index into :data:`LAYERS` of the most specific entry covering ``module``; None if none does."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            covers = module == entry or (entry != PACKAGE and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def _known(name: str) -> Optional[str]:
    """The package module ``name`` refers to: itself, else its longest known prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> List[Tuple[int, str]]:
    """``(line, imported module)`` for every import of a package module in ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import name``: name may be a submodule of pkg
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                     for alias in node.names]
        else:
            continue
        for name in dict.fromkeys(names):  # ``from m import a, b``: one import of m
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _known(name)
                if target is not None and target != module:
                    found.append((node.lineno, target))
    return found


def unit_of(module: str) -> str:
    """The package a module belongs to, for the cycle check: its innermost package, or itself for
    a module directly under the package root."""
    if _is_package(module):
        return module
    parent = module.rpartition(".")[0]
    return module if parent == PACKAGE else parent


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, (
        f"modules without a layer: {missing}; add each (or its package) to LAYERS in {Path(__file__).name} "
        "and a line to docs/architecture.md"
    )


def test_every_layer_entry_names_a_module():
    stale = [entry for _, entries in LAYERS for entry in entries if entry not in MODULES]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_import_goes_to_a_higher_layer():
    violations = []
    for module in MODULES:
        own = layer_of(module)
        for line, target in imports_of(module):
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                violations.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line}: {module} "
                                  f"({LAYERS[own][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_cycles_between_packages():
    graph: Dict[str, Set[str]] = {}
    where: Dict[Tuple[str, str], str] = {}
    for module in MODULES:
        for line, target in imports_of(module):
            a, b = unit_of(module), unit_of(target)
            if a != b:
                graph.setdefault(a, set()).add(b)
                where.setdefault((a, b), f"{module}:{line} imports {target}")
    cycle = _find_cycle(graph)
    assert cycle is None, "packages import each other in a cycle: " + " -> ".join(cycle) + "\n" + "\n".join(
        where[a, b] for a, b in zip(cycle, cycle[1:]))


def test_config_imports_neither_torch_nor_megatron():
    config_layer = [name for name, _ in LAYERS].index("config")
    heavy = []
    for module, path in MODULES.items():
        if layer_of(module) != config_layer:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            heavy += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in ("torch", "megatron")]
    assert not heavy, heavy


# -- the checker itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("module, layer", [
    ("megatron_dchag", "package root"),
    ("megatron_dchag.data.era5.naming", "data"),
    ("megatron_dchag.device", "runtime"),
    ("megatron_dchag.tasks.base", "tasks"),
    ("megatron_dchag.training.builder", "training"),
])
def test_layer_table_places_modules(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def test_imports_are_found_inside_functions_and_through_from_imports():
    # checkpoint_conversion: ``from megatron_dchag.distributed import ...`` inside a function, and
    # trainer: ``from megatron_dchag.training import fault_injection`` (a submodule by from-import)
    conversion = {t for _, t in imports_of("megatron_dchag.training.checkpoint_conversion")}
    assert {"megatron_dchag.distributed", "megatron_dchag.tasks.registry", "megatron_dchag.training.builder"} <= conversion
    assert "megatron_dchag.training.fault_injection" in {t for _, t in imports_of("megatron_dchag.training.trainer")}


def test_cycle_finder():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
