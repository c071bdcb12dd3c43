"""Routing that asks the experts (issue 28): each candidate evidence on a trained CLINC150 store, its weight (and k,
and the covariance's shrinkage) chosen on val only, reported on val and test beside today's routing, with its cost.

For a store trained by `scripts/train.py experiment=clinc150 seed=S` (evidence=none), the evidence each expert would
have recorded with `evidence=<kind>` is computed here by the training run's own function (`moe.tasks.train.
with_evidence`: each tenant's own train features, calibrated on its own val split) and written to a copy of the store;
the expert weights are the run's, untouched. Features come from the feature cache (MOE_CACHE_DIR).

    python scripts/bench_routing_evidence.py --run /tmp/routing-runs/seed0 --seed 0
    # -> scripts/results/routing_evidence/seed0.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from moe.inference import GateSettings, load_mixture, read_gate_settings
from moe.inference.answers import decode
from moe.model.evidence import EVIDENCE_TENSORS
from moe.store import ExpertStore
from moe.tasks.train import build_data, with_evidence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "scripts" / "results" / "routing_evidence"
WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
SHRINKAGES = {"mahalanobis": (0.1, 0.3, 0.6), "energy": (0.1,)}  # energy has no covariance
TOP_K = (2, 3)


def config(seed: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=clinc150", f"seed={seed}", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    return cfg


@torch.no_grad()
def figures(model, split, targets, batch: int = 512) -> dict[str, float]:
    """Routing and routed accuracy (percent) and the gate's top-2 recall on a split's in-scope queries."""
    features, tenant, label = split
    hits = {"routing_acc": 0, "acc_routed": 0, "gate_top2_recall": 0}
    for start in range(0, len(features), batch):
        x, t, y = (v[start : start + batch] for v in (features, tenant, label))
        output = model(x)
        decoded = decode(model, output)
        hits["routing_acc"] += (decoded.top_tenant == t).sum().item()
        hits["acc_routed"] += (decoded.label == targets[t, y]).sum().item()
        top2 = model.expert_tenant[output.router.probs.topk(2, dim=-1).indices]
        hits["gate_top2_recall"] += (top2 == t[:, None]).any(-1).sum().item()
    return {k: 100.0 * v / len(features) for k, v in hits.items()}


def latency(model, features: torch.Tensor, weight: float, batch: int, reps: int) -> float:
    """Median seconds of one routed forward pass (features given) of `batch` queries."""
    model.evidence_weight = weight
    x = features[:batch]
    times = []
    with torch.no_grad():
        model(x)  # warm (pages the chosen experts in)
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def shard_bytes(store: ExpertStore) -> dict[str, float]:
    files = [store.path(t, store.latest(t)) for t in store.tenants()]
    return {"mean_file_bytes": sum(f.stat().st_size for f in files) / len(files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a training run's output folder (experts/, gate.safetensors)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = config(args.seed)
    trunk = instantiate(cfg.trunk)
    data = build_data(cfg, trunk)
    data.setup()
    names = [t.name for t in data.tenants]
    store = ExpertStore(run / "experts")
    gate = read_gate_settings(run / "gate.safetensors")
    shards = [store.load(name) for name in names]
    splits = {s: (data.datasets[s].features, data.datasets[s].tenant, data.datasets[s].label) for s in ("val", "test")}

    base = load_mixture(store, names, gate, trunk.fingerprint)
    width = max(len(t.labels) for t in data.tenants)
    targets = torch.full((len(names), width), -1, dtype=torch.long)
    for t, tenant in enumerate(data.tenants):
        for c, label in enumerate(tenant.labels):
            targets[t, c] = base.label_id(tenant.name, label)
    today = {split: figures(base, value, targets) for split, value in splits.items()}
    result = {"seed": args.seed, "run": str(run), "today": today, "today_bytes": shard_bytes(store), "candidates": {}}
    print("today", json.dumps(today))

    for kind, shrinkages in SHRINKAGES.items():
        rows = []
        for shrinkage in shrinkages:
            folder = run / f"experts-{kind}-{shrinkage}"
            shutil.rmtree(folder, ignore_errors=True)
            evidence_store = ExpertStore(folder)
            for tensors, meta in with_evidence(shards, data, trunk, kind, shrinkage):
                evidence_store.save(tensors, meta, new_tenant=True)
            for k in TOP_K:
                model = load_mixture(evidence_store, names, GateSettings(k, gate.normalize_weights), trunk.fingerprint)
                for weight in WEIGHTS:
                    model.evidence_weight = weight
                    row = {"shrinkage": shrinkage, "top_k": k, "weight": weight}
                    row |= {split: figures(model, value, targets) for split, value in splits.items()}
                    rows.append(row)
        # chosen on val only: routed accuracy, then routing accuracy, then the simplest (smallest k, weight)
        chosen = max(rows, key=lambda r: (r["val"]["acc_routed"], r["val"]["routing_acc"], -r["top_k"], -r["weight"]))
        folder = run / f"experts-{kind}-{chosen['shrinkage']}"
        evidence_store = ExpertStore(folder)
        tensors, meta = evidence_store.load(names[0])
        evidence_bytes = sum(tensors[n].nbytes for n in EVIDENCE_TENSORS if n in tensors)
        model = load_mixture(evidence_store, names, GateSettings(chosen["top_k"], gate.normalize_weights), None)
        plain = load_mixture(store, names, gate, trunk.fingerprint)
        x = splits["test"][0]
        timing = {}
        for b in (1, 64):  # side by side: today's store and rule, then the chosen one, alternating
            today_s, chosen_s = [], []
            for _ in range(3):
                today_s.append(latency(plain, x, 0.0, b, args.reps))
                chosen_s.append(latency(model, x, chosen["weight"], b, args.reps))
            timing[f"batch{b}"] = {
                "today_ms": 1e3 * min(today_s),
                "evidence_ms": 1e3 * min(chosen_s),
                "ratio": min(chosen_s) / min(today_s),
            }
        result["candidates"][kind] = {
            "chosen": chosen,
            "grid": rows,
            "bytes": shard_bytes(evidence_store) | {"evidence_bytes_per_shard": evidence_bytes},
            "latency": timing,
        }
        print(kind, "chosen", json.dumps(chosen), json.dumps(timing))
    out = Path(args.out) if args.out else OUT / f"seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
