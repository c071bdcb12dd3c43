"""Which tenants' intents are confusable with which, from the store's statistics alone: no data, no trunk, no query.

`overlap_report` reads every awake tenant's latest shard (verified in full, as loading verifies it), pools their
scatter as the statistics gate does, and compares every pair of intents of different tenants (`moe.model.overlap`);
`write_overlap_report` writes it as `overlap_pairs.csv`, `overlap_within.csv` (pairs within one tenant, when asked),
`overlap_tenants.png` and `overlap.json`. `moe.tasks.overlap.run` is scripts/overlap.py.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe.evaluation.plots import tenant_matrix_plot
from moe.model.overlap import ExpertStatistics, Overlap, OverlapPair, intent_overlap
from moe.model.stats import COUNT, MEAN, SHRINKAGE, PooledScatter
from moe.progress import bar
from moe.store import ExpertStore, ShardError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverlapReport:
    store: str
    overlap: Overlap
    shrinkage: float
    min_confusion: float
    top: int | None
    trunk_fingerprint: str
    left_out: dict[str, str]  # tenant -> why it was not compared


def read_statistics(
    store: ExpertStore, trunk_fingerprint: str | None = None, progress: bool = True
) -> tuple[list[ExpertStatistics], PooledScatter, str, dict[str, str]]:
    """Every awake tenant's class means and counts (latest version, read with `ExpertStore.load`), with the scatter
    pooled over them, as `load_mixture`'s statistics gate pools it (only the aggregate stays in memory). Shards of
    another trunk than `trunk_fingerprint` (None: the one most shards' headers name), damaged ones and ones without
    statistics are left out, each with its reason, as the gate leaves them out."""
    tenants, left_out = store.tenants(), {}
    if trunk_fingerprint is None:
        named: Counter[str] = Counter()
        for tenant in tenants:
            with suppress(ShardError, KeyError, ValueError):  # said again, with its reason, when it is loaded
                named[store.meta(tenant).trunk_fingerprint] += 1
        if not named:
            raise ValueError(f"no awake expert with a readable shard in {store.root}")
        trunk_fingerprint = named.most_common(1)[0][0]
    experts, pooled = [], None
    for tenant in bar(tenants, "reading statistics", "shard", enabled=progress):
        try:
            tensors, meta = store.load(tenant, trunk_fingerprint=trunk_fingerprint)
            if not tensors[COUNT].sum() > 0:
                raise ShardError(store.path(tenant, meta.version), "holds no feature statistics")
        except (ShardError, KeyError, ValueError) as error:
            log.warning("expert %s left out of the overlap report: %s", tenant, error)
            left_out[tenant] = str(error)
            continue
        pooled = PooledScatter.of([], meta.architecture.dim) if pooled is None else pooled
        pooled.add(tensors)
        experts.append(ExpertStatistics(tenant, meta.labels, {k: tensors[k] for k in (MEAN, COUNT)}))
    if pooled is None:
        raise ValueError(f"no expert of {store.root} could be compared: {left_out}")
    return experts, pooled, trunk_fingerprint, left_out


def overlap_report(
    store: ExpertStore,
    shrinkage: float = SHRINKAGE,
    min_confusion: float = 0.01,
    top: int | None = 20,
    within: bool = True,
    progress: bool = True,
) -> OverlapReport:
    """The awake tenants' intents compared pairwise under the statistics gate's pooled precision: cross-tenant pairs
    whose adjusted confusion is at least `min_confusion`, and at least the `top` closest (`within`: pairs inside one
    tenant too, by the same rule)."""
    experts, pooled, fingerprint, left_out = read_statistics(store, progress=progress)
    overlap = intent_overlap(experts, shrinkage, pooled, min_confusion=min_confusion, top=top, within=within)
    return OverlapReport(str(store.root), overlap, shrinkage, min_confusion, top, fingerprint, left_out)


COLUMNS = ("rank", "tenant_a", "intent_a", "tenant_b", "intent_b", "distance", "noise", "confusion", "adjusted")


def _write_pairs(pairs: list[OverlapPair], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for rank, p in enumerate(pairs, start=1):
            numbers = (f"{p.distance:.4f}", f"{p.noise:.4f}", f"{p.confusion:.6g}", f"{p.adjusted:.6g}")
            writer.writerow([rank, p.tenant_a, p.intent_a, p.tenant_b, p.intent_b, *numbers])
    return path


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf


def overlap_summary(report: OverlapReport, shown: int = 10) -> dict:
    """What overlap.json holds: the settings, the closest pairs, and per tenant its closest other tenant."""
    o = report.overlap
    distance = o.min_distance.numpy()
    off = distance + np.diag(np.full(len(o.tenants), np.inf))  # the diagonal is each tenant's own business
    closest_tenant = {}
    for i, tenant in enumerate(o.tenants):
        j = int(off[i].argmin()) if len(o.tenants) > 1 else i
        if j != i:
            entry = {"distance": _finite(float(off[i, j])), "adjusted": float(o.max_adjusted[i, j])}
            closest_tenant[tenant] = {"tenant": o.tenants[j], **entry}
    return {
        "store": report.store,
        "trunk_fingerprint": report.trunk_fingerprint,
        "shrinkage": report.shrinkage,
        "min_confusion": report.min_confusion,
        "top": report.top,
        "tenants": list(o.tenants),
        "intents": o.intents,
        "cross_pairs_compared": o.compared,
        "effective_dimension": o.effective_dimension,
        "pairs_reported": len(o.pairs),
        "pairs_at_min_confusion": sum(p.adjusted >= report.min_confusion for p in o.pairs),
        "closest_pairs": [p._asdict() for p in o.pairs[:shown]],
        "closest_within": [p._asdict() for p in o.within[:shown]],
        "closest_tenant": closest_tenant,
        "within_min_distance": {t: _finite(float(distance[i, i])) for i, t in enumerate(o.tenants)},
        "min_distance": [[_finite(float(v)) for v in row] for row in distance],
        "left_out": report.left_out,
    }


def tenant_heatmap(overlap: Overlap, path: Path) -> Path:
    """The smallest Δ between two tenants' intents (lower: more confusable); the diagonal, a tenant's own business,
    is left blank. Annotated up to 30 tenants."""
    values = overlap.min_distance.numpy().copy()
    np.fill_diagonal(values, np.nan)
    values[~np.isfinite(values)] = np.nan
    middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
    return tenant_matrix_plot(
        values,
        list(overlap.tenants),
        path,
        "closest intents of two tenants: Mahalanobis Δ (lower: more confusable)",
        "min Δ (confusion Φ(-Δ/2): 2.3 % at 4, 0.13 % at 6)",
        "magma",
        ".1f",
        lambda value: value < middle,
    )


def write_overlap_report(report: OverlapReport, out_dir: str | Path) -> dict[str, Path]:
    """overlap_pairs.csv (the reported cross-tenant pairs, by Δ ascending), overlap_within.csv (within-tenant pairs,
    when the report has them), overlap_tenants.png and overlap.json, under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "pairs": _write_pairs(report.overlap.pairs, out / "overlap_pairs.csv"),
        "tenants": tenant_heatmap(report.overlap, out / "overlap_tenants.png"),
    }
    if report.overlap.within:
        paths["within"] = _write_pairs(report.overlap.within, out / "overlap_within.csv")
    paths["summary"] = out / "overlap.json"
    paths["summary"].write_text(json.dumps(overlap_summary(report), indent=2) + "\n")
    return paths


def describe(pairs: list[OverlapPair], limit: int = 10) -> list[str]:
    """One line per pair, for a terminal."""
    return [
        f"{p.tenant_a}/{p.intent_a} ~ {p.tenant_b}/{p.intent_b}: Δ {p.distance:.2f} (noise {p.noise:.2f}), "
        f"confusion {100 * p.confusion:.2g} %, adjusted {100 * p.adjusted:.2g} %"
        for p in pairs[:limit]
    ]
