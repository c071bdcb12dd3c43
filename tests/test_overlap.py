"""Overlap known before queries arrive: which intents of different tenants the statistics gate will confuse, from their
stored statistics alone (moe.model.overlap, moe.lifecycle.overlap, the grow-time warning, scripts/overlap.py)."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest
import torch

from moe.data import Example, Tenant, load_clinc150
from moe.lifecycle import Lifecycle
from moe.lifecycle.operations import OVERLAP_WARN
from moe.lifecycle.overlap import overlap_report, write_overlap_report
from moe.model.overlap import ExpertStatistics, closest_intents, intent_overlap, pooled_scatter
from moe.model.stats import SHRINKAGE, PooledScatter, class_statistics
from moe.store import ExpertMeta, ExpertStore
from moe.tasks import overlap
from moe.trunk import TinyTrunk
from tests.helpers import compose_config, fast_growth, run_python


def random_experts(sizes: dict[str, int], dim: int = 6, seed: int = 0) -> list[ExpertStatistics]:
    generator = torch.Generator().manual_seed(seed)
    experts = []
    for name, classes in sizes.items():
        labels = torch.randint(0, classes, (40 * classes,), generator=generator)
        centres = 2.5 * torch.randn(classes, dim, generator=generator)
        features = torch.randn(len(labels), dim, generator=generator) + centres[labels]
        stats = class_statistics(features, labels, classes)
        experts.append(ExpertStatistics(name, tuple(f"{name}_{c}" for c in range(classes)), stats))
    return experts


def test_distance_matches_a_direct_mahalanobis_computation():
    experts = random_experts({"a": 3, "b": 4, "c": 1, "d": 2})
    precision = PooledScatter.of([e.stats for e in experts]).precision(SHRINKAGE)  # the statistics gate's
    scatter = sum(e.stats["stats.scatter"].double() for e in experts)
    count = sum(e.stats["stats.count"].sum().item() for e in experts)
    d_eff = torch.trace(precision @ scatter / (count - 10)).item()
    means = {}  # (tenant, intent) -> (mean, count)
    for e in experts:
        for i, label in enumerate(e.labels):
            means[e.tenant, label] = e.stats["stats.mean"][i].double(), e.stats["stats.count"][i].item()

    def direct(p):
        (a, n_a), (b, n_b) = means[p.tenant_a, p.intent_a], means[p.tenant_b, p.intent_b]
        return ((a - b) @ precision @ (a - b)).sqrt().item(), math.sqrt(d_eff * (1 / n_a + 1 / n_b))

    overlap = intent_overlap(experts, min_confusion=0.0, top=None, within=True, chunk=3)  # several blocks
    assert (
        overlap.compared == len(overlap.pairs) == (10 * 10 - 9 - 16 - 1 - 4) // 2 and len(overlap.within) == 3 + 6 + 1
    )
    assert overlap.effective_dimension == pytest.approx(d_eff)
    for p in overlap.pairs + overlap.within:
        distance, noise = direct(p)
        assert p.distance == pytest.approx(distance, rel=1e-9) and p.noise == pytest.approx(noise, rel=1e-9)
        assert p.confusion == pytest.approx(0.5 * math.erfc(distance / 2 / math.sqrt(2)), rel=1e-9)
        adjusted = math.sqrt(max(distance**2 - noise**2, 0))
        assert p.adjusted == pytest.approx(0.5 * math.erfc(adjusted / 2 / math.sqrt(2)), rel=1e-6)
    assert all(p.tenant_a != p.tenant_b for p in overlap.pairs) and all(
        p.tenant_a == p.tenant_b for p in overlap.within
    )
    assert [p.distance for p in overlap.pairs] == sorted(p.distance for p in overlap.pairs)
    for i, a in enumerate(overlap.tenants):  # the tenant matrix: the smallest Δ of each pair of tenants
        for j, b in enumerate(overlap.tenants):
            found = [p.distance for p in overlap.pairs + overlap.within if {p.tenant_a, p.tenant_b} == {a, b}]
            assert overlap.min_distance[i, j].item() == pytest.approx(min(found, default=math.inf))
    whole = intent_overlap(experts, min_confusion=0.0, top=None, within=True)  # one block: the same pairs
    assert [p[:4] for p in whole.pairs] == [p[:4] for p in overlap.pairs]
    assert torch.allclose(whole.min_distance, overlap.min_distance)

    new, existing = experts[1], [experts[0], experts[2], experts[3]]  # one tenant against the others only
    nearest = closest_intents(new, existing, pooled_scatter(experts), k=2)
    assert len(nearest) == 2 * 4 and all(p.tenant_a == "b" for p in nearest)
    for label in new.labels:
        expected = sorted((p for p in overlap.pairs if label in (p.intent_a, p.intent_b)), key=lambda p: p.distance)
        assert [p.distance for p in nearest if p.intent_a == label] == pytest.approx([p.distance for p in expected[:2]])
    floor = 1e-3  # every pair of b's at that floor, most confusable first
    at_floor = closest_intents(new, existing, pooled_scatter(experts), min_adjusted=floor)
    expected = [p for p in overlap.pairs if "b" in (p.tenant_a, p.tenant_b) and p.adjusted >= floor]
    assert 0 < len(at_floor) < 4 * 6 and all(p.tenant_a == "b" for p in at_floor)
    assert {frozenset([p[:2], p[2:4]]) for p in at_floor} == {frozenset([p[:2], p[2:4]]) for p in expected}
    assert [p.adjusted for p in at_floor] == sorted((p.adjusted for p in at_floor), reverse=True)


def test_closest_intents_at_a_floor_name_every_confusable_intent_most_confusable_first():
    """Under the identity covariance (d_eff = 2), `near` (100 examples) is closer to `x` by Δ, but `small` (one
    example: a noisier mean) is the more confusable once the sampling noise is taken out; `far` is neither."""

    def expert(tenant: str, labels: tuple[str, ...], means, counts, scatter: torch.Tensor) -> ExpertStatistics:
        stats = {"stats.mean": torch.tensor(means), "stats.count": torch.tensor(counts), "stats.scatter": scatter}
        return ExpertStatistics(tenant, labels, stats)

    new = expert("a", ("x",), [[0.0, 0.0]], [100.0], 297 * torch.eye(2))  # 301 examples of 4 classes: covariance I
    means, counts = [[3.0, 0.0], [3.2, 0.0], [10.0, 0.0]], [100.0, 1.0, 100.0]
    old = expert("b", ("near", "small", "far"), means, counts, torch.zeros(2, 2))
    pooled = pooled_scatter([new, old])
    [closest] = closest_intents(new, [old], pooled)
    assert closest.intent_b == "near"
    small, near = closest_intents(new, [old], pooled, min_adjusted=0.05)
    assert (small.intent_b, near.intent_b) == ("small", "near") and small.distance > near.distance
    assert small.adjusted > near.adjusted >= 0.05
    assert small.adjusted == pytest.approx(0.5 * math.erfc(math.sqrt(3.2**2 - 2 * (1 / 100 + 1)) / 2 / math.sqrt(2)))
    assert closest_intents(new, [old], pooled, min_adjusted=0.5) == []


def test_pairs_kept_are_those_above_the_floor_and_at_least_the_top_closest():
    experts = random_experts({"a": 5, "b": 5, "c": 5}, dim=3, seed=1)
    every = intent_overlap(experts, min_confusion=0.0, top=None)
    fifth, fourth = sorted(p.adjusted for p in every.pairs)[-5:-3]
    floor = (fifth + fourth) / 2  # the four most confusable pairs reach it
    assert fifth < floor < fourth
    assert len(intent_overlap(experts, min_confusion=floor, top=None, chunk=4).pairs) == 4
    assert [p[:4] for p in intent_overlap(experts, min_confusion=1.0, top=6, chunk=4).pairs] == [
        p[:4] for p in every.pairs[:6]
    ]
    assert intent_overlap(experts, min_confusion=0.6, top=None).pairs == []
    with pytest.raises(ValueError, match="named twice"):
        intent_overlap([experts[0], experts[0]])


# -- CLINC150 on the tiny trunk: tenant "kitchen" gets an intent made of half of bank's `balance` examples -----------


@pytest.fixture(scope="module")
def clinc_tenants(clinc_dir):
    """bank (CLINC's banking, `balance` with the first half of its examples), cards (credit_cards) and kitchen
    (kitchen_and_dining plus `balance_copy`: the other half of `balance`), with a memoised tiny-trunk encoder (128
    dimensions: distinct CLINC intents stay apart in it)."""
    bank, cards, kitchen = load_clinc150(clinc_dir, ["banking", "credit_cards", "kitchen_and_dining"]).tenants
    balance = [e for e in bank.split("train") if e.label == "balance"]
    tenants = {
        "bank": Tenant("bank", bank.labels, {"train": [e for e in bank.split("train") if e not in balance[50:]]}),
        "cards": Tenant("cards", cards.labels, {"train": cards.split("train")}),
        "kitchen": Tenant(
            "kitchen",
            kitchen.labels + ("balance_copy",),
            {"train": kitchen.split("train") + [Example(e.text, "balance_copy") for e in balance[50:]]},
        ),
    }
    trunk = TinyTrunk(dim=128, freeze=True)
    texts = sorted({e.text for t in tenants.values() for e in t.split("train")} | {e.text for e in bank.split("train")})
    index = dict(zip(texts, trunk.encode(texts), strict=True))
    return tenants, trunk, lambda batch: torch.stack([index[text] for text in batch]), bank


def statistics_of(tenant: Tenant, encode) -> ExpertStatistics:
    examples = tenant.split("train")
    labels = torch.tensor([tenant.labels.index(e.label) for e in examples])
    return ExpertStatistics(
        tenant.name, tenant.labels, class_statistics(encode([e.text for e in examples]), labels, len(tenant.labels))
    )


def test_an_intent_split_between_two_tenants_is_the_closest_pair_by_far(clinc_tenants):
    tenants, _, encode, _ = clinc_tenants
    experts = [statistics_of(tenants[name], encode) for name in ("bank", "cards", "kitchen")]
    overlap = intent_overlap(experts, min_confusion=OVERLAP_WARN, top=5)
    first, *rest = overlap.pairs
    assert first[:4] == ("bank", "balance", "kitchen", "balance_copy")
    assert first.adjusted > 0.2 and first.distance < 1.5 * first.noise  # about what sampling alone gives
    assert len(rest) == 4 and all(p.adjusted < OVERLAP_WARN / 5 and p.distance > 2 * first.distance for p in rest)
    t = overlap.tenants.index
    assert overlap.min_distance[t("bank"), t("kitchen")] == first.distance
    assert overlap.max_adjusted[t("bank"), t("cards")] < OVERLAP_WARN / 5


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "overlap" in r.getMessage()]


def test_grow_warns_of_an_intent_that_overlaps_another_tenants_and_not_of_distinct_ones(
    clinc_tenants, tmp_path, caplog
):
    tenants, trunk, encode, bank = clinc_tenants
    growth = fast_growth(epochs=1, batch_size=1024)  # the experts' training is not under test
    lifecycle = Lifecycle(ExpertStore(tmp_path / "store"), trunk, encode, growth)
    caplog.set_level(logging.WARNING, logger="moe.lifecycle.operations")
    lifecycle.grow(tenants["bank"])
    lifecycle.grow(tenants["cards"])
    assert warnings_of(caplog) == []  # CLINC's distinct intents
    lifecycle.grow(tenants["kitchen"])
    [warning] = warnings_of(caplog)
    assert "kitchen: 1 of its intents" in warning and "balance_copy ~ bank/balance (confusion" in warning, warning
    caplog.clear()
    lifecycle.hibernate("bank")  # it still counts: it will wake up
    transfer = [Example(e.text, "send_money") for e in bank.split("train") if e.label == "transfer"]
    lifecycle.update(Tenant("cards", ("send_money",), {"train": transfer}))  # a new intent: bank's transfer again
    [warning] = warnings_of(caplog)
    assert "cards: 1 of its intents" in warning and "send_money ~ bank (hibernating)/transfer" in warning, warning


# -- the report of a store: shards written straight from statistics (no training) ---------------------------------


def save_statistics_shard(store: ExpertStore, expert: ExpertStatistics, fingerprint: str = "tiny", rank: int = 4):
    """A shard whose routing statistics are `expert`'s (its weights zeros: the report reads statistics only)."""
    d, c = expert.stats["stats.scatter"].shape[0], len(expert.labels)
    arch = {"dim": d, "rank": rank, "gate_rows": "labels", "input_scale": 8.0, "dtype": "float32"}
    weights = {"down.weight": (d, rank), "down.bias": (rank,), "up.weight": (rank, d), "head.weight": (d, c)}
    weights |= {"head.bias": (c,), "gate.weight": (c, d), "gate.bias": (c,)}
    tensors = {name: torch.zeros(shape) for name, shape in weights.items()} | expert.stats
    store.save(tensors, ExpertMeta(expert.tenant, expert.labels, fingerprint, arch), new_tenant=True)


@pytest.fixture(scope="module")
def report_store(clinc_tenants, tmp_path_factory) -> ExpertStore:
    """bank, cards and kitchen; a hibernating copy of kitchen (not compared), one of another trunk and one without
    statistics (both left out, with their reasons)."""
    tenants, _, encode, _ = clinc_tenants
    store = ExpertStore(tmp_path_factory.mktemp("overlap") / "store")
    experts = {name: statistics_of(tenant, encode) for name, tenant in tenants.items()}
    for expert in experts.values():
        save_statistics_shard(store, expert)
    save_statistics_shard(store, experts["kitchen"]._replace(tenant="sleepy"))
    store.hibernate("sleepy")
    save_statistics_shard(store, experts["cards"]._replace(tenant="foreign"), fingerprint="another trunk")
    empty = {k: torch.zeros_like(v) for k, v in experts["cards"].stats.items()}
    save_statistics_shard(store, ExpertStatistics("empty", experts["cards"].labels, empty))
    return store


def test_overlap_report_of_a_store_writes_pairs_heatmap_and_summary(report_store, clinc_tenants, tmp_path):
    cfg = compose_config("overlap", [f"store_dir={report_store.root}", "top=3"], tmp_path / "out")
    assert cfg.shrinkage == SHRINKAGE and cfg.min_confusion == OVERLAP_WARN
    report, paths = overlap.run(cfg)
    assert report.overlap.tenants == ("bank", "cards", "kitchen") and sorted(report.left_out) == ["empty", "foreign"]
    assert "trained on trunk anothe" in report.left_out["foreign"] and "no feature" in report.left_out["empty"]
    assert report.trunk_fingerprint == "tiny"
    assert {p.name for p in paths.values()} == {
        "overlap_pairs.csv",
        "overlap_within.csv",
        "overlap_tenants.png",
        "overlap.json",
    }
    with paths["pairs"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and (rows[0]["intent_a"], rows[0]["intent_b"]) == ("balance", "balance_copy")
    assert [float(r["distance"]) for r in rows] == sorted(float(r["distance"]) for r in rows)
    summary = json.loads(paths["summary"].read_text())
    assert summary["pairs_at_min_confusion"] == 1 and summary["closest_tenant"]["kitchen"]["tenant"] == "bank"
    assert summary["intents"] == 15 + 15 + 16 and summary["left_out"].keys() == {"empty", "foreign"}
    assert paths["tenants"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tenants, _, encode, _ = clinc_tenants  # the same figures as from the statistics themselves
    direct = intent_overlap([statistics_of(tenants[n], encode) for n in ("bank", "cards", "kitchen")], top=3)
    assert [p[:4] for p in direct.pairs] == [p[:4] for p in report.overlap.pairs]
    assert [p.distance for p in direct.pairs] == pytest.approx([p.distance for p in report.overlap.pairs])
    bare = overlap_report(report_store, min_confusion=0.5, top=0, within=False, progress=False)
    assert bare.overlap.pairs == [] and bare.overlap.within == []
    written = write_overlap_report(bare, tmp_path / "bare")
    assert "within" not in written and len(json.loads(written["summary"].read_text())["closest_pairs"]) == 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_overlap_script_writes_its_report(report_store, tmp_path):
    out = tmp_path / "report"
    done = run_python(
        "scripts/overlap.py",
        f"store_dir={report_store.root}",
        f"paths.output_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert "bank/balance ~ kitchen/balance_copy" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"overlap_pairs.csv", "overlap_tenants.png", "overlap.json"}
    assert json.loads((out / "overlap.json").read_text())["top"] == 20


# -- the project's own overlapping tenants (moe.data.overlap), as the continual scenario grows them ---------------


def test_the_built_overlapping_tenants_are_the_pairs_the_report_names(clinc_dir):
    from moe.data.overlap import DERIVED, KEPT_BY_DOMAIN

    domains = ["work", "travel", "kitchen_and_dining", "auto_and_commute", "utility", "home"]
    data = load_clinc150(clinc_dir, domains, list(DERIVED))
    tenants = {t.name: t for t in data.tenants}
    assert "payday" not in tenants["work"].labels and "weather" in tenants["utility"].labels  # moved; shared
    assert len(tenants["travel"].labels) == 13 and tenants["concierge"].split("test")  # every split comes along
    assert ("utility", "weather") in KEPT_BY_DOMAIN
    trunk = TinyTrunk(dim=128, freeze=True)
    experts = [statistics_of(tenant, trunk.encode) for tenant in tenants.values()]
    overlap = intent_overlap(experts, min_confusion=OVERLAP_WARN, top=0)
    first_two = {frozenset([(p.tenant_a, p.intent_a), (p.tenant_b, p.intent_b)]) for p in overlap.pairs[:2]}
    assert first_two == {  # the two intents built to be shared come first, at distance 0: one sample, two names
        frozenset([("hr_portal", "salary_day"), ("payroll", "payday_date")]),
        frozenset([("utility", "weather"), ("concierge", "forecast")]),
    }
    assert all(p.distance < 1e-3 for p in overlap.pairs[:2]) and overlap.pairs[2].distance > 1.0  # float32 means
