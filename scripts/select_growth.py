"""Settings chosen per tenant, measured on tenants of other shapes than CLINC150's domains (`moe.data.shapes`), grown as
scripts/grow.py grows them (conf/lifecycle.yaml composed with the same overrides), each into a fresh store that holds
one other CLINC150-derived tenant (`payroll` of `moe.data.overlap`, 3 intents). For each shape, tenant-given accuracy
on its test split of:

    adapter            an adapter expert (expert=adapter, growth=default)
    probe              the frozen linear probe (`fit_joint_linear` on the tenant's train, its val choosing the decay)
    pathway            a pathway expert as today (expert=pathway, growth=default)
    select             a pathway expert, settings chosen on its held-out share (expert=pathway, growth=select)
    select_no_retrain  the same, the winner kept as grown on the rest (growth.select_retrain=false)
    select_short_no_retrain  as select_no_retrain, three candidates only (full, head, statistics)
    pathway_3_epochs   a diagnostic judged on test after the fact, not a choice: `pathway` with 3 epochs

Each part is written to scripts/results/select/<shape>.json as soon as it is measured (parts there already are
skipped: rerun to resume).

    python scripts/select_growth.py near_duplicates --parts adapter probe pathway select --work /tmp/select-work
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from moe.data import load_clinc150
from moe.data.overlap import with_overlapping
from moe.data.shapes import all_intents, closest_pairs, near_duplicates
from moe.evaluation.accuracies import Accuracies
from moe.evaluation.reference import fit_joint_linear
from moe.experiments.scenario import split_outcome
from moe.inference import GateSettings, load_mixture
from moe.lifecycle import Lifecycle
from moe.paths import cache_dir
from moe.store import ExpertStore
from moe.tasks.lifecycle import growth_config
from moe.trunk import FeatureCache, HFEncoderTrunk

ROOT = Path(__file__).resolve().parents[1]
PARTS = {  # part -> conf/lifecycle.yaml overrides (None: the probe)
    "adapter": ["expert=adapter", "growth=default"],
    "probe": None,
    "pathway": ["expert=pathway", "growth=default"],
    "select": ["expert=pathway", "growth=select"],
    "select_no_retrain": ["expert=pathway", "growth=select", "growth.select_retrain=false"],
    # a diagnostic, not a choice (judged on test after the fact): today's pathway growth with 3 epochs instead of 5
    "pathway_3_epochs": ["expert=pathway", "growth=default", "expert.pathway.epochs=3"],
    # where time is short (15,000 rows): three candidates (not full_lr_x2), the winner not grown again
    "select_short_no_retrain": [
        "expert=pathway",
        "growth=select",
        "growth.select_retrain=false",
        "growth.select=[{name:full},{name:head,method:head},{name:statistics,method:statistics}]",
    ],
}
OTHER = "payroll"  # the store's other tenant


def growth(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("lifecycle", overrides=[*overrides, "store_dir=unused", "tenant.name=unused"])
    return growth_config(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["near_duplicates", "all_intents"])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--work", type=Path, default=Path("outputs/select_growth"))
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/select")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    trunk = HFEncoderTrunk()
    encode = FeatureCache(cache_dir() / "features", trunk).encode
    domains = load_clinc150().tenants
    other = with_overlapping(domains, [OTHER])[-1]
    if args.shape == "all_intents":
        tenant, rule = all_intents(domains), "every CLINC150 intent as one tenant"
    else:
        tenant = near_duplicates(domains, encode, pairs=15)
        rule = {
            "rule": "the 15 closest cross-domain pairs of intents by the cosine of their MiniLM train class means,"
            " greedy, each intent in one pair",
            "pairs": closest_pairs(domains, encode, 15),
        }
    out = args.out / f"{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.exists() else {}
    report |= {
        "shape": args.shape,
        "rule": rule,
        "intents": len(tenant.labels),
        "rows": {split: len(tenant.split(split)) for split in ("train", "val", "test")},
        "store": f"a fresh store holding {OTHER} ({len(other.labels)} intents, moe.data.overlap), then the tenant",
        "parts": report.get("parts", {}),
    }

    def save():  # parts another run of this shape wrote meanwhile are kept
        written = json.loads(out.read_text()).get("parts", {}) if out.exists() else {}
        report["parts"] = written | report["parts"]
        out.write_text(json.dumps(report, indent=1) + "\n")

    save()
    for part in args.parts:
        if part in report["parts"]:
            continue
        start = time.perf_counter()
        if PARTS[part] is None:
            probe = fit_joint_linear([tenant], encode)
            given = probe.evaluate([tenant], encode, "test").overall.acc_tenant_given
            report["parts"][part] = {
                "given": given,
                "seconds": time.perf_counter() - start,
                "weight_decay": probe.chosen.weight_decay,
                "steps": probe.chosen.steps,
            }
        else:
            cfg = growth(PARTS[part])
            base = args.work / f"base_{cfg.kind}"
            if not base.exists():  # the store of the other tenant, grown once per kind
                partial = base.with_suffix(".partial")
                shutil.rmtree(partial, ignore_errors=True)
                Lifecycle(ExpertStore(partial), trunk, encode, growth(PARTS[part][:1])).grow(other)
                partial.rename(base)
            folder = args.work / f"{args.shape}_{part}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder)
            store = ExpertStore(folder)
            Lifecycle(store, trunk, encode, cfg, overlap_warn=math.inf).grow(tenant)
            model = load_mixture(store, gate=GateSettings(2), trunk_fingerprint=trunk.fingerprint, trunk=trunk)
            own = Accuracies.of(split_outcome(model, [tenant], encode, "test", batch_size=1024))
            report["parts"][part] = {
                "given": own.acc_tenant_given,
                "routed": own.acc_routed,
                "seconds": time.perf_counter() - start,
                "shard": store.meta(tenant.name).metrics,
            }
        logging.info("%s %s: %s", args.shape, part, report["parts"][part])
        save()


if __name__ == "__main__":
    main()
