"""Expert kinds behind one interface (moe.model.kinds): outside the kinds themselves, the code asks an expert's kind and
does not branch on which kind it is, read from the code itself as tests/test_layers.py reads imports; and an
architecture is read once from every format a shard has recorded it in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from moe.lifecycle.growth import GROWERS
from moe.model.kinds import KINDS, Architecture
from moe.model.pathway import PathwayLayout, PathwaySpec
from moe.store import ExpertMeta
from tests.helpers import ROOT

# The kinds themselves: the registry and each kind's own modules (its layout, forward and training).
KIND_MODULES = {"moe/model/kinds.py", "moe/model/pathway.py", "moe/training/pathway.py"}
KIND_NAMES = set(KINDS)
KIND_CLASSES = {
    "ExpertKind",
    "AdapterKind",
    "PathwayKind",
    "ExpertForward",
    "PathwayForward",
    "Grower",
    "PathwayGrower",
}
KIND_KEYS = set(PathwayLayout.KEYS)  # a pathway's entries in a shard's metadata: `"pathway_layers" in arch`
MOST = 3  # branches on the kind allowed outside the kinds


def _names(node: ast.AST) -> str:
    """The dotted name of a Name or Attribute chain (`self.model.pathways`), else ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_names(node.value)}.{node.attr}".lstrip(".")
    return ""


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def kind_branch(node: ast.AST) -> str | None:
    """What makes `node` a branch on an expert's kind (None: it is not one)."""
    if isinstance(node, ast.Call):
        name = _names(node.func)
        if name.split(".")[-1] == "is_pathway":
            return "is_pathway(...)"
        if name == "isinstance" and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if found := [_names(c) for c in classes if _names(c).split(".")[-1] in KIND_CLASSES]:
                return f"isinstance(..., {found[0]})"
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        names = [_names(o) for o in operands]
        if any(isinstance(o, ast.Constant) and o.value in KIND_NAMES for o in operands):
            return "a comparison with a kind's name"
        if any(isinstance(o, ast.Constant) and o.value in KIND_KEYS for o in operands):
            return "a look for a kind's metadata entry"
        if any(n.endswith(("expert_kind", "arch.kind", "architecture.kind")) for n in names):
            return "a comparison of a kind"
        if any(_is_none(o) for o in operands) and any("pathway" in n.split(".")[-1] for n in names):
            return "a pathway tested against None"
    return None


def kind_branches(root: Path) -> list[str]:
    """`path:line what` for every branch on an expert's kind under `root/moe`, outside the kinds' own modules."""
    found = []
    for path in sorted((root / "moe").rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative in KIND_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if (what := kind_branch(node)) is not None:
                found.append((relative, node.lineno, what))
    return [f"{path}:{line} {what}" for path, line, what in sorted(found)]


def test_the_code_asks_the_kind_instead_of_branching_on_it():
    found = kind_branches(ROOT)
    assert len(found) <= MOST, "\n".join(found)


def test_the_count_catches_every_form_of_branch(tmp_path):
    """The count itself can fail: each form of branch on a kind, in a module outside the kinds, is counted."""
    (tmp_path / "moe" / "model").mkdir(parents=True)
    (tmp_path / "moe" / "model" / "kinds.py").write_text("if arch.kind == 'pathway':\n    pass\n")  # the kinds: free
    branches = [
        "if is_pathway(meta.architecture):\n    pass\n",
        "x = 1 if self.pathways is None else 2\n",
        "if cfg.pathway is not None:\n    pass\n",
        "if cfg.expert.get('kind', 'features') != 'pathway':\n    pass\n",
        "if 'pathway_layers' in arch:\n    pass\n",
        "if arch.kind == other:\n    pass\n",
        "if isinstance(forward, kinds.PathwayForward):\n    pass\n",
    ]
    (tmp_path / "moe" / "stray.py").write_text("".join(branches) + "if arch.expert_kind.trains_on_texts:\n    pass\n")
    found = kind_branches(tmp_path)
    assert [int(line.split(":")[1].split()[0]) for line in found] == [1, 3, 4, 6, 8, 10, 12], found
    assert all(line.startswith("moe/stray.py:") for line in found)


def test_every_kind_has_a_grower_and_says_what_it_needs():
    assert set(GROWERS) == set(KINDS)
    assert all(isinstance(kind.trains_on_texts, bool) for kind in KINDS.values())


PATHWAY = PathwayLayout(PathwaySpec(layers=1, rank=2, alpha=4.0), trunk_layers=2, intermediate_size=32)


@pytest.mark.parametrize(
    "arch",
    [
        Architecture(16, 8),
        Architecture(16, 0, "one", 4.0, "bfloat16"),
        Architecture(16, 0, kind="pathway", pathway=PATHWAY),
    ],
)
def test_an_architecture_is_written_once_and_read_back_as_it_was(arch):
    recorded = arch.to_dict()
    assert recorded["kind"] == arch.kind and Architecture.from_dict(recorded) == arch
    old = {k: v for k, v in recorded.items() if k != "kind"}  # as shards recorded it before kinds were named
    assert Architecture.from_dict(old) == arch
    meta = ExpertMeta("t", ("a", "b"), "f" * 64, old)  # a mapping is read as an architecture, once
    assert meta.architecture == arch and (arch | {"dtype": "float16"}).dtype == "float16"


def test_shapes_and_weights_are_the_kind_s():
    adapter, pathway = Architecture(16, 8), Architecture(16, 0, kind="pathway", pathway=PATHWAY)
    lora = set(PATHWAY.lora_shapes(16))
    assert len(lora) == 12 and set(pathway.weight_names()) - set(adapter.weight_names()) == lora
    assert set(pathway.shapes(3)) - set(adapter.shapes(3)) == lora | {
        "pathway.mean",
        "pathway.count",
        "pathway.scatter",
    }
    assert pathway.shapes(3)["pathway.mean"] == (3, 16) and adapter.shapes(3)["down.weight"] == (16, 8)


@pytest.mark.parametrize(
    "recorded, problem",
    [
        ({"dim": 16, "rank": 8, "gate_rows": "labels"}, "lacks \\['input_scale'\\]"),
        ({"dim": 16, "rank": 8, "gate_rows": "labels", "input_scale": 8.0, "kind": "moe"}, "unknown expert kind"),
        ({"dim": 16, "rank": 8, "gate_rows": "labels", "input_scale": 8.0, "lora_rank": 2}, "does not have"),
        ({"dim": 16, "rank": -1, "gate_rows": "labels", "input_scale": 8.0}, "are sizes"),
        ({"dim": 16, "rank": 8, "gate_rows": "all", "input_scale": 8.0}, "gate_rows must be one of"),
        ({"dim": 16, "rank": 8, "gate_rows": "labels", "input_scale": 8.0, "dtype": "gloat32"}, "names no torch"),
        ({"dim": 16, "rank": 0, "gate_rows": "labels", "input_scale": 8.0, "kind": "pathway"}, "needs integer"),
    ],
)
def test_a_bad_architecture_is_named(recorded, problem):
    with pytest.raises(TypeError, match=problem):
        Architecture.from_dict(recorded)
