"""`run(cfg)`: the few-example growth experiment (learning curves) from a composed `conf/few_shot.yaml`.

Two phases. On the development domains' val split every method's every setting (`methods.<name>.grid`) is grown
at every k and draw; each method's setting is the one with the best mean tenant-given accuracy there, and the chosen
method at each k the best of them. Then every method, at its chosen setting, and the probe, at its chosen weight
decay, run on the report domains' test split. No choice reads a report domain. Rows are appended to `rows.jsonl` as
they are measured, and a rerun into the same folder skips the rows already there.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
from collections import defaultdict
from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe.experiments.few_shot import PROBE, LearningCurves, Row
from moe.experiments.plots import learning_curves
from moe.inference import GateSettings
from moe.paths import cache_dir
from moe.progress import bar
from moe.store import ExpertStore
from moe.tasks.base import start_run, task
from moe.tasks.lifecycle import growth_config
from moe.trunk import FeatureCache

log = logging.getLogger(__name__)


def settings(method: DictConfig) -> list[tuple[str, dict]]:
    """Every (name, GrowthConfig overrides) of a method's grid (one, its own, without a grid)."""
    plain = OmegaConf.to_container(method, resolve=True)
    fixed, grid = plain.get("growth") or {}, plain.get("grid") or {}
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] or [{}]
    return [(",".join(f"{k}={v}" for k, v in point.items()) or "default", fixed | point) for point in points]


def runs_at(method: DictConfig, k: int | None) -> bool:
    """Whether a method runs at `k` examples per intent (`max_k`: not above it, nor on all of a tenant's data)."""
    limit = method.get("max_k")
    return limit is None or (k is not None and k <= limit)


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


class Rows:
    """The rows measured so far (`rows.jsonl`), keyed by what they measured."""

    def __init__(self, path: Path):
        self.path, self.rows = path, {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = Row(**json.loads(line))
                self.rows[self.key(row.tenant, row.split, row.k, row.draw, row.method, row.setting)] = row

    @staticmethod
    def key(*parts) -> str:
        return json.dumps(parts)

    def get_or_measure(self, measure, *key) -> Row:
        if (found := self.rows.get(self.key(*key))) is not None:
            return found
        row = measure()
        self.rows[self.key(*key)] = row
        with self.path.open("a") as out:
            out.write(json.dumps(row.__dict__) + "\n")
        return row


def summary(rows: list[Row], field: str) -> tuple[float, float, float]:
    """Mean over draws of the mean over tenants of `field`, with the smallest and largest draw's."""
    by_draw: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        by_draw[row.draw].append(getattr(row, field))
    means = [mean(v) for v in by_draw.values()]
    return mean(means), min(means, default=math.nan), max(means, default=math.nan)


def draws_at(cfg: DictConfig, k: int | None) -> range:
    """The draws at `k`: one with all of a tenant's examples (every draw would be the same rows)."""
    return range(1 if k is None else cfg.draws)


def k_name(k: int | None) -> str:
    return "all" if k is None else str(k)


@task
def run(cfg: DictConfig) -> dict[str, float]:
    out = start_run(cfg)
    trunk = instantiate(cfg.trunk)
    tenants = {t.name: t for t in instantiate(cfg.data.tenants, _convert_="all")}
    dev = [str(name) for name in cfg.dev_domains]
    report = [name for name in tenants if name not in dev]
    if unknown := [name for name in dev if name not in tenants]:
        raise KeyError(f"dev_domains names unknown tenants {unknown}; known: {sorted(tenants)}")
    ks = [None if k is None else int(k) for k in cfg.ks]
    root = Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else cache_dir()
    encode = FeatureCache(root / "features", trunk).encode
    gate = GateSettings(cfg.top_k).with_routing(cfg.routing)
    base = ExpertStore(cfg.store_dir)
    curves = LearningCurves(base, trunk, encode, growth_config(cfg), tenants, gate, out / "work")
    rows = Rows(out / "rows.jsonl")

    progress = bar(desc="base store", unit="tenant", total=len(tenants))
    curves.grow_base(progress=lambda name: progress.update())
    progress.close()
    reference, reference_file = math.nan, out / "reference.json"  # the base store's routed accuracy, measured once
    if cfg.whole_store_ks and not reference_file.exists():
        reference = curves.measure(base, next(iter(tenants.values())), "test", whole=True)[1]
        reference_file.write_text(json.dumps({"store_routed_all_data": reference}) + "\n")
    if cfg.whole_store_ks:
        reference = json.loads(reference_file.read_text())["store_routed_all_data"]

    # Development domains, val split: every setting of every method, and the probe's weight decays.
    methods = cfg.methods
    dev_jobs = [
        (name, k, j, method, setting, overrides)
        for method in methods
        for setting, overrides in settings(methods[method])
        for k in ks
        if runs_at(methods[method], k)
        for name in dev
        for j in draws_at(cfg, k)
    ]
    probe_jobs = [
        (name, k, j, decay) for decay in cfg.probe.weight_decays for k in ks for name in dev for j in draws_at(cfg, k)
    ]
    progress = bar(desc="development domains (val)", unit="grow", total=len(dev_jobs) + len(probe_jobs))
    dev_rows: list[Row] = []
    for name, k, j, method, setting, overrides in dev_jobs:
        grow = partial(curves.grow, name, k, j, method, setting, overrides, "val", whole=False)
        dev_rows.append(rows.get_or_measure(grow, name, "val", k, j, method, setting))
        progress.update()
    for name, k, j, decay in probe_jobs:
        fit = partial(curves.probe, name, k, j, float(decay), "val")
        dev_rows.append(rows.get_or_measure(fit, name, "val", k, j, PROBE, f"weight_decay={float(decay):g}"))
        progress.update()
    progress.close()

    def dev_score(method: str, setting: str, k=...) -> float:
        return mean(r.given for r in dev_rows if r.method == method and r.setting == setting and (k is ... or r.k == k))

    chosen_setting = {
        method: max((s for s, _ in settings(methods[method])), key=lambda s, m=method: dev_score(m, s))
        for method in methods
    }
    decays = {f"weight_decay={float(d):g}": float(d) for d in cfg.probe.weight_decays}
    chosen_setting[PROBE] = max(decays, key=lambda s: dev_score(PROBE, s))
    chosen_method = {
        k_name(k): max(
            (m for m in methods if runs_at(methods[m], k)), key=lambda m, k=k: dev_score(m, chosen_setting[m], k)
        )
        for k in ks
    }
    choice = {
        "settings": chosen_setting,
        "method_per_k": chosen_method,
        "dev_domains": dev,
        "dev_val_tenant_given": {
            m: {k_name(k): dev_score(m, chosen_setting[m], k) for k in ks} for m in [*methods, PROBE]
        },
    }
    (out / "chosen.json").write_text(json.dumps(choice, indent=1) + "\n")
    log.info("chosen on the development domains' val split: %s", json.dumps(choice))

    # Report domains, test split: each method at its chosen setting, and the probe at its chosen decay.
    whole_at = {None if k is None else int(k) for k in cfg.whole_store_ks}
    overrides_of = {m: dict(settings(methods[m]))[chosen_setting[m]] for m in methods}
    reported = [m for m in methods if cfg.report_methods == "all" or m == "full" or m in chosen_method.values()]
    jobs = [
        (name, k, j, m)
        for m in [*reported, PROBE]
        for k in ks
        if m == PROBE or runs_at(methods[m], k)
        for name in report
        for j in draws_at(cfg, k)
    ]
    progress = bar(desc="report domains (test)", unit="grow", total=len(jobs))
    test_rows: list[Row] = []
    for name, k, j, m in jobs:
        if m == PROBE:
            measure = partial(curves.probe, name, k, j, decays[chosen_setting[PROBE]], "test")
        else:
            whole = k in whole_at and (cfg.whole_store_methods == "all" or m in ("full", chosen_method[k_name(k)]))
            measure = partial(curves.grow, name, k, j, m, chosen_setting[m], overrides_of[m], "test", whole=whole)
        test_rows.append(rows.get_or_measure(measure, name, "test", k, j, m, chosen_setting[m]))
        progress.update()
    progress.close()

    metrics: dict[str, float] = {"reference/store_routed_all_data": reference}
    table = []
    for m in [*methods, PROBE]:
        for k in ks:
            chosen_rows = [r for r in test_rows if r.method == m and r.k == k]
            if not chosen_rows:
                continue
            entry = {"method": m, "setting": chosen_setting[m], "k": k_name(k)}
            for field in ("given", "routed", "routing", "store_routed", "seconds"):
                average, low, high = summary(chosen_rows, field)
                entry |= {field: average, f"{field}_min": low, f"{field}_max": high}
                metrics[f"{m}/k{k_name(k)}/{field}"] = average
            table.append(entry)
    for k in ks:
        m = chosen_method[k_name(k)]
        for field in ("given", "routed", "store_routed", "seconds"):
            metrics[f"chosen/k{k_name(k)}/{field}"] = metrics.get(f"{m}/k{k_name(k)}/{field}", math.nan)
    (out / "curves.json").write_text(
        json.dumps(
            {"report_domains": report, "draws": cfg.draws, "table": table, "chosen": choice, "reference": metrics},
            indent=1,
        )
        + "\n"
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    learning_curves(table, out / "learning_curves.png")
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics
