"""Settings chosen per tenant on its own held-out share (moe.lifecycle.selection), and the tenant shapes built from
CLINC150-like domains (moe.data.shapes). Adapter experts on the tiny trunk; one pathway store on MiniLM's top layer."""

from __future__ import annotations

import pytest
import torch

from moe.data import Example, Tenant
from moe.data.shapes import all_intents, closest_pairs, near_duplicates
from moe.lifecycle import Lifecycle
from moe.lifecycle import selection as selection_module
from moe.lifecycle.selection import held_out_rows
from moe.lifecycle.stream import EncodedRows
from moe.model.stats import MEAN
from moe.store import ExpertStore
from moe.trunk import HFEncoderTrunk, TinyTrunk
from tests.helpers import fast_growth, read_synthetic_tenants

WORSE_FIRST = [{"name": "untrained", "epochs": 0}, {"name": "trained"}]  # epochs 0: the head as initialised


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    return read_synthetic_tenants(tmp_path_factory.mktemp("select_tenants"))


@pytest.fixture(scope="module")
def tiny() -> TinyTrunk:
    return TinyTrunk(dim=32, freeze=True)


def grown(root, trunk, tenants, encode=None, **growth) -> Lifecycle:
    """A store of `weather` (grown today's way), then `bank` grown with `growth`."""
    lifecycle = Lifecycle(ExpertStore(root), trunk, encode or trunk.encode, fast_growth())
    lifecycle.grow(tenants["weather"])
    lifecycle.cfg = fast_growth(**growth)
    lifecycle.grow(tenants["bank"])
    return lifecycle


def shard(lifecycle: Lifecycle, name: str = "bank"):
    return lifecycle.store.load(name, trunk_fingerprint=lifecycle.trunk.fingerprint)


def test_the_held_out_share_is_stratified_seeded_and_spares_small_intents():
    labels = torch.tensor([0] * 10 + [1] * 25 + [2] * 4 + [1] * 5)  # intent 1's rows not contiguous
    kept, held = held_out_rows(labels, 0.2, seed=0)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(len(labels)))  # disjoint, every row once
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 6, 0]  # floor(0.2 m); 4 < 1 / 0.2 rows: none
    again, held_again = held_out_rows(labels, 0.2, seed=0)
    assert torch.equal(held, held_again) and torch.equal(kept, again)
    assert not torch.equal(held, held_out_rows(labels, 0.2, seed=1)[1])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        held_out_rows(labels, 1.0, seed=0)


def test_the_best_candidate_on_held_out_rows_is_kept_and_recorded(tmp_path, tiny, tenants):
    """An untrained candidate, listed first, loses to the trained one; the winner retrained on all rows is exactly
    today's growth of the same settings (seeded), and the shard says what was chosen and what it cost."""
    chosen = grown(tmp_path / "chosen", tiny, tenants, select=WORSE_FIRST)
    today = grown(tmp_path / "today", tiny, tenants)
    metrics = chosen.store.meta("bank").metrics
    assert metrics["selected"] == "trained" and metrics["growth_method"] == "full"
    assert metrics["select_acc.trained"] > metrics["select_acc.untrained"]
    assert metrics["selected_held_out_acc"] == metrics["select_acc.trained"]
    assert metrics["select_held_out_rows"] == 12 and metrics["select_trained_on"] == "all"  # floor(0.2 * 30) of 2
    assert 0 < metrics["select_s"] <= metrics["grow_s"]
    ours, theirs = shard(chosen)[0], shard(today)[0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_ties_keep_the_first_listed_and_without_retraining_the_winner_is_the_one_grown_on_the_rest(
    tmp_path, tiny, tenants
):
    twins = [{"name": "first"}, {"name": "second"}]
    kept = grown(tmp_path / "kept", tiny, tenants, select=twins, select_retrain=False)
    metrics = kept.store.meta("bank").metrics
    assert metrics["select_acc.first"] == metrics["select_acc.second"] and metrics["selected"] == "first"
    assert metrics["select_trained_on"] == "kept"
    retrained = grown(tmp_path / "retrained", tiny, tenants, select=twins)
    assert not torch.equal(shard(kept)[0]["head.weight"], shard(retrained)[0]["head.weight"])
    assert torch.equal(shard(kept)[0][MEAN], shard(retrained)[0][MEAN])  # statistics: of all rows


def test_selection_reads_only_the_tenant_s_own_rows(tmp_path, tiny, tenants, monkeypatch):
    """Every text encoded while growing `bank` is its own, and every held-out row scored is one of its train rows."""
    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return tiny.encode(texts)

    scored = []
    real = selection_module.accuracy

    def spy(grower, expert, own, texts, features, labels):
        scored.append(features)
        return real(grower, expert, own, texts, features, labels)

    lifecycle = Lifecycle(ExpertStore(tmp_path), tiny, encode, fast_growth())
    lifecycle.grow(tenants["weather"])
    encoded.clear()
    monkeypatch.setattr(selection_module, "accuracy", spy)
    lifecycle.cfg = fast_growth(select=WORSE_FIRST + [{"name": "statistics", "method": "statistics"}])
    lifecycle.grow(tenants["bank"])
    own = {e.text for split in ("train", "val", "test") for e in tenants["bank"].split(split)}
    assert encoded and set(encoded) <= own
    train = tiny.encode([e.text for e in tenants["bank"].split("train")])
    assert len(scored) == 3
    for features in scored:
        assert len(features) == 12 and all((train == row).all(-1).any() for row in features)


def test_select_off_is_today_s_growth_exactly(tmp_path, tiny, tenants, monkeypatch):
    """With `select` None or empty, the grower's own `grow` runs once, nothing is held out, the shard records no
    choice."""
    calls = []
    monkeypatch.setattr(selection_module, "held_out_rows", lambda *a: calls.append(a))
    shards = [shard(grown(tmp_path / str(i), tiny, tenants, select=select)) for i, select in enumerate((None, []))]
    assert not calls
    for tensors, meta in shards:
        assert not any(key.startswith("select") for key in meta.metrics) and meta.metrics["growth_method"] == "full"
        assert all(torch.equal(tensors[k], shards[0][0][k]) for k in tensors)


def test_candidates_are_checked_before_anything_is_grown(tmp_path, tiny, tenants):
    lifecycle = Lifecycle(ExpertStore(tmp_path), tiny, tiny.encode, fast_growth(select=[{"name": "x", "epoch": 3}]))
    with pytest.raises(ValueError, match="'x'.*\\['epoch'\\] are not growth settings"):
        lifecycle.grow(tenants["bank"])
    lifecycle.cfg = fast_growth(select=[{"name": "x"}, {"name": "x", "epochs": 1}])
    with pytest.raises(ValueError, match="distinct names"):
        lifecycle.grow(tenants["bank"])
    assert "bank" not in lifecycle.store.tenants()


def test_a_pathway_store_chooses_between_the_linear_probe_inside_its_expert_and_the_statistics_head(tmp_path, tenants):
    """`head`: a pathway that changes nothing and a trained head; the store's architecture is kept."""
    trunk = HFEncoderTrunk()
    pathway = dict(layers=1, lora_rank=4, lora_alpha=8.0, lr=3e-3, epochs=1, batch_size=16)
    candidates = [{"name": "statistics", "method": "statistics"}, {"name": "head", "method": "head", "epochs": 20}]
    lifecycle = Lifecycle(ExpertStore(tmp_path), trunk, trunk.encode, fast_growth(kind="pathway", pathway=pathway))
    lifecycle.grow(tenants["weather"])
    lifecycle.cfg = fast_growth(kind="pathway", pathway=pathway, select=candidates)
    lifecycle.grow(tenants["bank"])
    tensors, meta = shard(lifecycle)
    assert meta.architecture == lifecycle.store.meta("weather").architecture
    assert {meta.metrics["selected"], meta.metrics["growth_method"]} <= {"statistics", "head"}
    assert meta.metrics["selected_held_out_acc"] == max(meta.metrics[f"select_acc.{c['name']}"] for c in candidates)
    assert all(not tensors[name].any() for name in tensors if name.startswith("lora.") and name.endswith(".B"))
    assert not tensors["up.weight"].any()


def domain(name: str, intents: dict[str, list[str]]) -> Tenant:
    splits = {
        split: [Example(f"{w} {split} {i}", label) for label, words in intents.items() for i, w in enumerate(words)]
        for split in ("train", "val", "test")
    }
    return Tenant(name, tuple(sorted(intents)), splits)


def test_shapes_merge_intents_across_domains_with_all_their_rows():
    """Near duplicates: the closest cross-domain pairs of class means, each intent once."""
    a = domain("a", {"x": ["apple", "apple"], "y": ["boat", "boat"], "z": ["cat", "cat"]})
    b = domain("b", {"x2": ["apple", "apple"], "y2": ["bolt", "boat"], "w": ["dog", "dog"]})
    vectors = {
        "apple": [1.0, 0, 0],
        "boat": [0, 1.0, 0],
        "bolt": [0, 0.8, 0.6],
        "cat": [0, 0, 1.0],
        "dog": [0.6, 0, 0.8],
    }

    def encode(texts):
        return torch.tensor([vectors[t.split()[0]] for t in texts])

    pairs = closest_pairs([a, b], encode, 2)
    assert [(p[0], p[1]) for p in pairs] == [("x", "x2"), ("y", "y2")]
    tenant = near_duplicates([a, b], encode, pairs=2)
    assert tenant.labels == ("x", "x2", "y", "y2") and len(tenant.split("test")) == 8
    assert all_intents([a, b]).labels == ("w", "x", "x2", "y", "y2", "z")
    with pytest.raises(ValueError, match="only 3 cross-domain pairs"):
        closest_pairs([a, b], encode, 4)


def test_a_tenant_streamed_as_encoded_rows_is_chosen_for_the_same_way(tmp_path, tiny, tenants):
    """scripts/grow.py hands growth the train rows as features only (no texts): the choice and the expert are those of
    the same rows given as texts."""
    bank = tenants["bank"]
    rows = EncodedRows(
        tiny.encode([e.text for e in bank.split("train")]),
        torch.tensor([bank.label_index(e.label) for e in bank.split("train")]),
    )
    lifecycle = Lifecycle(ExpertStore(tmp_path / "encoded"), tiny, tiny.encode, fast_growth(select=WORSE_FIRST))
    lifecycle.grow(Tenant("bank", bank.labels), rows)
    texts = grown(tmp_path / "texts", tiny, tenants, select=WORSE_FIRST)
    ours, theirs = shard(lifecycle)[0], shard(texts)[0]
    for key in ("select_acc.trained", "select_acc.untrained", "selected"):
        assert lifecycle.store.meta("bank").metrics[key] == texts.store.meta("bank").metrics[key]
    assert all(torch.equal(ours[k], theirs[k]) for k in ("head.weight", "down.weight", "up.weight"))
