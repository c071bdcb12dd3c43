"""SetFit-style growth of a pathway from a few examples (`train_contrastive`), and pathways started from another's
tensors (`initial`), on the shipped MiniLM trunk with pathways over its top two layers."""

from __future__ import annotations

import pytest
import torch

from moe.model import TENSOR_NAMES
from moe.model.pathway import PATHWAY_STATISTICS, Pathways
from moe.training.pathway import PathwayClassifier, PathwayConfig, draw_pairs, train_contrastive, train_pathway
from moe.trunk import HFEncoderTrunk

TEXTS = [  # three labels, three texts each: weather, music, banking
    "will it rain tomorrow",
    "how hot is it outside today",
    "is snow expected this weekend",
    "play some jazz music",
    "put on my workout playlist",
    "skip to the next song",
    "what is my account balance",
    "transfer fifty dollars to savings",
    "show my recent card transactions",
]
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
FEW = dict(layers=2, lora_rank=4, lora_alpha=8.0, lr=3e-3, epochs=2, batch_size=16)
PAIRS = 6


@pytest.fixture(scope="module")
def trunk() -> HFEncoderTrunk:
    return HFEncoderTrunk()


@pytest.fixture(scope="module")
def pathways(trunk) -> Pathways:
    return Pathways(trunk, PathwayConfig(**FEW).spec())


@pytest.fixture(scope="module")
def grown(pathways):
    return train_contrastive(pathways, TEXTS, LABELS, 3, PathwayConfig(**FEW), pairs=PAIRS, head_epochs=20)


def lora_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors.items() if name.startswith("lora.")}


def same_minus_different(features: torch.Tensor) -> float:
    """Mean cosine of same-label pairs (distinct texts) less that of different-label pairs."""
    cosine = features @ features.T  # the features are L2-normalised
    same = LABELS[:, None] == LABELS[None, :]
    distinct = ~torch.eye(len(LABELS), dtype=torch.bool)
    return float(cosine[same & distinct].mean() - cosine[~same].mean())


def random_pathway(pathways: Pathways, seed: int) -> dict[str, torch.Tensor]:
    """A pathway with B drawn too (a fresh one has B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = pathways.init_tensors(generator)
    return {k: torch.randn(t.shape, generator=generator) * 0.05 if k.endswith(".B") else t for k, t in tensors.items()}


def test_pairs_are_half_same_label_half_other(pathways):
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # label 2 has one text: its positive partner is itself
    first, second = draw_pairs(labels, 5, torch.Generator().manual_seed(0))
    assert first.tolist() == [i for i in range(6) for _ in range(5)]
    partners = second.view(6, 5)
    assert torch.equal(labels[partners[:, :3]], labels[:, None].expand(6, 3))  # 3 of 5 (half, rounded up)
    assert (labels[partners[:, 3:]] != labels[:, None]).all()
    assert (partners[:3, :3] != torch.arange(3)[:, None]).all() and (partners[5, :3] == 5).all()
    assert torch.equal(second, draw_pairs(labels, 5, torch.Generator().manual_seed(0))[1])
    with pytest.raises(ValueError, match="at least two labels"):
        draw_pairs(torch.zeros(4, dtype=torch.long), 4, torch.Generator())
    with pytest.raises(ValueError, match="at least one pair"):
        draw_pairs(labels, 0, torch.Generator())


def test_contrastive_growth_returns_a_pathway_shard_and_an_expert(pathways, grown):
    pathway, expert = grown
    shapes = pathways.shapes()
    assert {name: tuple(t.shape) for name, t in lora_of(pathway).items()} == shapes
    assert set(pathway) == set(shapes) | set(PATHWAY_STATISTICS)
    assert set(expert) == set(TENSOR_NAMES)
    assert expert["head.weight"].shape == (pathways.trunk.dim, 3) and expert["head.bias"].shape == (3,)
    assert all(torch.isfinite(t).all() for t in [*pathway.values(), *expert.values()])
    assert any(t.abs().sum() > 0 for name, t in pathway.items() if name.endswith(".B"))  # the pathway moved


def test_contrastive_growth_pulls_labels_together(pathways, grown):
    before = same_minus_different(pathways.encode(TEXTS, pathways.init_tensors()))  # B = 0: the trunk's features
    after = same_minus_different(pathways.encode(TEXTS, lora_of(grown[0])))
    assert after > before + 0.2, (before, after)  # about 0.29 -> 0.8 or more


def test_contrastive_growth_is_seeded(pathways, grown):
    again = train_contrastive(pathways, TEXTS, LABELS, 3, PathwayConfig(**FEW), pairs=PAIRS, head_epochs=20)
    other = train_contrastive(pathways, TEXTS, LABELS, 3, PathwayConfig(**FEW, seed=1), pairs=PAIRS, head_epochs=20)
    for mine, theirs in zip(grown, again, strict=True):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not torch.equal(grown[0]["lora.5.output.dense.B"], other[0]["lora.5.output.dense.B"])
    assert not torch.equal(grown[1]["head.weight"], other[1]["head.weight"])


def test_a_pathway_starts_from_initial_tensors(pathways):
    """With every learning rate 0 the pathway returned is the one it started from: `initial`'s exactly, or a new one
    (A as `init_tensors` draws it from the seed, B zero) when there is none, the same on every call."""
    cfg = PathwayConfig(**FEW | dict(lr=0.0, head_lr=0.0, epochs=1))
    initial = random_pathway(pathways, 3) | {"pathway.mean": torch.zeros(3, pathways.trunk.dim)}  # as a shard has
    for train in (train_pathway, train_contrastive):
        started = lora_of(train(pathways, TEXTS, LABELS, 3, cfg, initial=initial)[0])
        assert started.keys() == pathways.shapes().keys()
        assert all(torch.equal(started[k], initial[k]) for k in started)
    new = pathways.init_tensors(torch.Generator().manual_seed(cfg.seed))
    assert all(torch.equal(t, new[k]) for k, t in PathwayClassifier(pathways, 3, cfg).tensors().items())
    fresh = lora_of(train_pathway(pathways, TEXTS, LABELS, 3, cfg)[0])
    assert all(torch.equal(fresh[k], new[k]) for k in new)  # B all zero, A the seed's
    trained = [train_pathway(pathways, TEXTS, LABELS, 3, PathwayConfig(**FEW | dict(epochs=1))) for _ in range(2)]
    assert all(torch.equal(t, trained[1][0][k]) for k, t in trained[0][0].items())
    assert trained[0][0]["lora.5.output.dense.B"].abs().sum() > 0  # and a learning rate moves it


def test_an_initial_pathway_of_another_shape_is_refused(pathways):
    cfg = PathwayConfig(**FEW)
    initial = random_pathway(pathways, 0)
    with pytest.raises(ValueError, match="does not fit this trunk and spec: missing"):
        PathwayClassifier(pathways, 3, cfg, initial={k: t for k, t in initial.items() if ".4." not in k})
    initial["lora.5.output.dense.A"] = torch.zeros(8, pathways.trunk.dim * 4)
    with pytest.raises(ValueError, match=r"wrong shapes \[\('lora.5.output.dense.A'"):
        PathwayClassifier(pathways, 3, cfg, initial=initial)
