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
from moe.model import MixtureOutput, combine, plan_dispatch
from moe.model.evidence import EVIDENCE_TENSORS
from moe.store import ExpertStore
from moe.tasks.train import build_data, with_evidence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "scripts" / "results" / "routing_evidence"
WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
SHRINKAGES = {"mahalanobis": (0.1, 0.3, 0.6), "energy": (0.1,)}  # energy has no covariance
TOP_K = (2, 3)
ALTERNATIONS = 7  # latency: today's and the chosen rule's timings alternate, the best median of each kept


def config(seed: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=clinc150", f"seed={seed}", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    return cfg


@torch.no_grad()
def passes(model, features: torch.Tensor, batch: int = 512) -> list[tuple]:
    """The routed forward of a split, up to the decision: per batch, the gate's output, the chosen experts'
    log-probabilities (b, k, c) and their evidence (b, k), so that every weight is then decided without running the
    experts again (the decision and the decoding are the mixture's own: `Mixture.decide`, `decode`)."""
    model.evidence_weight = 1.0  # any non-zero weight: the experts compute their evidence
    out = []
    for start in range(0, len(features), batch):
        x = features[start : start + batch] * model.input_scale
        routed = model.route(x, None)
        plan = plan_dispatch(routed.experts, routed.weights)
        group_log_probs, group_evidence = model.group_outputs(x, plan)
        log_probs = combine(group_log_probs, plan, fill=float("-inf"))
        evidence = combine(group_evidence[..., None], plan, float("nan"))[..., 0]
        out.append((routed, log_probs, evidence))
    return out


@torch.no_grad()
def figures(model, computed: list[tuple], split, targets, weight: float, batch: int = 512) -> dict[str, float]:
    """Routing and routed accuracy (percent) and the gate's top-2 recall on a split's in-scope queries, the
    candidates decided with evidence weight `weight`."""
    _, tenant, label = split
    model.evidence_weight = weight
    hits = {"routing_acc": 0, "acc_routed": 0, "gate_top2_recall": 0}
    for i, (routed, log_probs, evidence) in enumerate(computed):
        t, y = tenant[i * batch : (i + 1) * batch], label[i * batch : (i + 1) * batch]
        weights, order = model.decide(routed, evidence, None)
        experts = routed.experts
        if order is not None:
            log_probs = log_probs.gather(1, order[..., None].expand_as(log_probs))
            experts = experts.gather(1, order)
        decoded = decode(model, MixtureOutput(log_probs, weights, experts, model.label_ids[experts], routed))
        hits["routing_acc"] += (decoded.top_tenant == t).sum().item()
        hits["acc_routed"] += (decoded.label == targets[t, y]).sum().item()
        top2 = model.expert_tenant[routed.probs.topk(2, dim=-1).indices]
        hits["gate_top2_recall"] += (top2 == t[:, None]).any(-1).sum().item()
    return {k: 100.0 * v / len(tenant) for k, v in hits.items()}


@torch.no_grad()
def checked(model, split, targets, weight: float, batch: int = 512) -> dict[str, float]:
    """`figures` through the mixture's own forward pass (`model(features)`), for the chosen rule."""
    features, tenant, label = split
    model.evidence_weight = weight
    hits = {"routing_acc": 0, "acc_routed": 0}
    for start in range(0, len(features), batch):
        decoded = decode(model, model(features[start : start + batch]))
        t, y = tenant[start : start + batch], label[start : start + batch]
        hits["routing_acc"] += (decoded.top_tenant == t).sum().item()
        hits["acc_routed"] += (decoded.label == targets[t, y]).sum().item()
    return {k: 100.0 * v / len(tenant) for k, v in hits.items()}


@torch.no_grad()
def agreement(model, computed: list[tuple], split) -> dict[str, int]:
    """Where the gate's top-2 hold the query's tenant: how often the evidence prefers the gate's second candidate,
    when the gate's first is right (a decision would err) and when only its second is (it could fix the answer)."""
    _, tenant, _ = split
    ev = torch.cat([evidence for _, _, evidence in computed])
    candidates = model.expert_tenant[torch.cat([routed.experts for routed, _, _ in computed])]
    first, second, prefers = candidates[:, 0] == tenant, candidates[:, 1] == tenant, ev[:, 1] > ev[:, 0]
    return {
        "gate_first_right": int(first.sum()),
        "evidence_prefers_second_where_first_right": int((first & prefers).sum()),
        "gate_second_right": int((~first & second).sum()),
        "evidence_prefers_second_where_second_right": int((~first & second & prefers).sum()),
    }


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
    parser.add_argument("--reps", type=int, default=20)
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
    order = torch.tensor([base.tenant_index(name) for name in names])  # data's tenant index -> the model's
    splits = {s: (x, order[t], y) for s, (x, t, y) in splits.items()}
    for t, tenant in enumerate(data.tenants):
        for c, label in enumerate(tenant.labels):
            targets[order[t], c] = base.label_id(tenant.name, label)  # by the model's tenant index
    today = {split: checked(base, value, targets, 0.0) for split, value in splits.items()}
    result = {"seed": args.seed, "run": str(run), "today": today, "today_bytes": shard_bytes(store), "candidates": {}}
    print("today", json.dumps(today))

    for kind, shrinkages in SHRINKAGES.items():
        rows, diagnosis = [], {}
        for shrinkage in shrinkages:
            folder = run / f"experts-{kind}-{shrinkage}"
            shutil.rmtree(folder, ignore_errors=True)
            evidence_store = ExpertStore(folder)
            for tensors, meta in with_evidence(shards, data, trunk, kind, shrinkage):
                evidence_store.save(tensors, meta, new_tenant=True)
            for k in TOP_K:
                model = load_mixture(evidence_store, names, GateSettings(k, gate.normalize_weights), trunk.fingerprint)
                computed = {split: passes(model, value[0]) for split, value in splits.items()}
                if k == 2:
                    diagnosis[shrinkage] = {s: agreement(model, computed[s], v) for s, v in splits.items()}
                for weight in WEIGHTS:
                    row = {"shrinkage": shrinkage, "top_k": k, "weight": weight}
                    row |= {s: figures(model, computed[s], v, targets, weight) for s, v in splits.items()}
                    rows.append(row)
        # chosen on val only: routed accuracy, then routing accuracy, then the simplest (smallest k, weight)
        chosen = max(rows, key=lambda r: (r["val"]["acc_routed"], r["val"]["routing_acc"], -r["top_k"], -r["weight"]))
        folder = run / f"experts-{kind}-{chosen['shrinkage']}"
        evidence_store = ExpertStore(folder)
        tensors, meta = evidence_store.load(names[0])
        evidence_bytes = sum(tensors[n].nbytes for n in EVIDENCE_TENSORS if n in tensors)
        model = load_mixture(evidence_store, names, GateSettings(chosen["top_k"], gate.normalize_weights), None)
        for split, value in splits.items():  # the chosen rule through the mixture's own forward: the same figures
            again = checked(model, value, targets, chosen["weight"])
            if any(abs(again[k] - chosen[split][k]) > 1e-9 for k in again):
                raise AssertionError(f"{kind} {split}: forward gives {again}, the grid gave {chosen[split]}")
        plain = load_mixture(store, names, gate, trunk.fingerprint)
        x = splits["test"][0]
        timing = {}
        for b in (1, 64):  # side by side: today's store and rule, then the chosen one, alternating
            today_s, chosen_s = [], []
            for _ in range(ALTERNATIONS):
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
            "agreement": diagnosis[chosen["shrinkage"]],
        }
        print(kind, "chosen", json.dumps(chosen), json.dumps(timing))
    out = Path(args.out) if args.out else OUT / f"seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
