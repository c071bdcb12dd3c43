"""The package's layers point one way: no module under moe/ imports a module of a layer above its own, read from the
imports themselves (every `import` and `from ... import`, at any depth of the file)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_python

# Lowest first. A module may import its own package and anything in a lower layer; packages that share a layer
# never import each other.
LAYERS = [
    ["moe.paths"],
    ["moe.data"],
    ["moe.trunk"],
    ["moe.model"],
    ["moe.store"],
    ["moe.inference"],  # build a mixture from a store or bundle, page, decode answers
    ["moe.evaluation"],
    ["moe.training"],
    ["moe.lifecycle", "moe.export"],
    ["moe.experiments", "moe.serving"],  # the research experiments and benchmarks; the serving runtime
    ["moe.tasks"],  # the entry points' Hydra glue: `moe.tasks.<script>.run(cfg)`
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """The layer unit a dotted module name belongs to (`moe.store.shard` -> `moe.store`); None outside the package."""
    parts = module.split(".")
    for length in (2, 1):
        if ".".join(parts[:length]) in RANK:
            return ".".join(parts[:length])
    return None


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import in a file of `package`, relative ones resolved against it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "moe" else [node.module]
            found += [(node.lineno, name) for name in names]
    return found


def violations(root: Path) -> list[str]:
    wrong = []
    for path in sorted((root / "moe").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        own = unit_of(module)
        if own is None:
            if module != "moe":
                wrong.append(f"{module}: in no layer (add it to LAYERS)")
            continue
        for line, name in imports(path, package):
            other = unit_of(name)
            if other is not None and other != own and RANK[other] >= RANK[own]:
                wrong.append(f"{path.relative_to(root)}:{line} {own} imports {name} ({other}, a layer not below)")
    return wrong


def test_no_module_imports_a_layer_above_its_own():
    assert violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: a model module importing serving, and an unplaced module, are both reported."""
    (tmp_path / "moe" / "model").mkdir(parents=True)
    (tmp_path / "moe" / "__init__.py").write_text("")
    (tmp_path / "moe" / "model" / "mixture.py").write_text("def f():\n    from moe.serving import Server\n")
    (tmp_path / "moe" / "model" / "router.py").write_text("from ..serving import runtime\n")
    (tmp_path / "moe" / "stray.py").write_text("import moe.model\n")
    found = violations(tmp_path)
    assert len(found) == 4 and all("moe.model imports moe.serving" in line for line in found[:3]), found
    assert "moe.stray: in no layer" in found[3]


@pytest.mark.parametrize("module", ["moe.serving", "moe.inference"])
def test_serving_and_inference_load_without_lightning_hydra_or_wandb(module):
    code = f"import sys, {module}; print(sorted(m for m in ('lightning', 'hydra', 'wandb') if m in sys.modules))"
    assert run_python("-c", code).stdout.strip() == "[]"
