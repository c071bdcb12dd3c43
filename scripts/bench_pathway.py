"""Benchmark: pathway experts (moe.model.pathway) served from a store, side by side in one process.

    python scripts/bench_pathway.py --out scripts/results/pathway_cpu.json
    python scripts/bench_pathway.py --layers 2 --lora-rank 16 --device cuda --out scripts/results/pathway_gpu.json

- throughput, tenant given: a batch of 256 queries spread over 16 tenants against the same batch all on one tenant
  (each pathway's rows gather its own LoRA tensors in one pass; vLLM's multi-LoRA serves at about 0.66x of its
  no-adapter rate)
- batch-1 latency, tenant given, as `Server.predict` runs it, against the trunk alone (its features of one query):
  the tenant's pathway alone, then its head (a store whose out-of-scope score does not read the gate, or none), and
  the gate's features and the pathway in one pass over the top layers (a gate score: energy, max row, max prob)
- bytes per pathway expert against a head-only expert and against the default adapter expert (conf/expert/adapter)

The pathways' weights are random (B drawn too): speed does not depend on what they learned. The queries are CLINC150
test queries ($MOE_DATA_DIR). Each comparison alternates its two sides, repeat by repeat, and reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe.data.clinc150 import load_clinc150
from moe.experiments.bench import machine_info
from moe.inference import load_mixture, predict
from moe.model.pathway import PathwayLayout, Pathways, PathwaySpec
from moe.store import ExpertMeta, ExpertStore, tensor_bytes, write_shard
from moe.store.shard import weight_names
from moe.trunk import HFEncoderTrunk

LABELS = 15  # a CLINC150 domain's intents


def write_pathway_store(root: Path, trunk: HFEncoderTrunk, spec: PathwaySpec, tenants: int) -> ExpertStore:
    """`tenants` pathway experts with random weights, gate rows and statistics, as a grow would write them."""
    generator = torch.Generator().manual_seed(0)
    d, pathways = trunk.dim, Pathways(trunk, spec)
    arch = {"dim": d, "rank": 0, "gate_rows": "labels", "input_scale": 8.0, "dtype": "float32"}
    arch |= PathwayLayout.of(spec, trunk).to_dict()
    store = ExpertStore(root)
    for i in range(tenants):
        tensors = {
            "down.weight": torch.zeros(d, 0),
            "down.bias": torch.zeros(0),
            "up.weight": torch.zeros(0, d),
            "head.weight": torch.randn(d, LABELS, generator=generator) * d**-0.5,
            "head.bias": torch.zeros(LABELS),
            "gate.weight": torch.randn(LABELS, d, generator=generator) * d**-0.5,
            "gate.bias": torch.zeros(LABELS),
            "stats.mean": torch.randn(LABELS, d, generator=generator),
            "stats.count": torch.full((LABELS,), 100.0),
            "stats.scatter": torch.eye(d) * 100.0 * LABELS,
            "pathway.mean": torch.randn(LABELS, d, generator=generator),
            "pathway.count": torch.full((LABELS,), 100.0),
            "pathway.scatter": torch.eye(d) * 100.0 * LABELS,
        }
        for name, t in pathways.init_tensors(generator).items():
            tensors[name] = torch.randn(t.shape, generator=generator) * 0.02 if name.endswith(".B") else t
        meta = ExpertMeta(f"t{i:02d}", tuple(f"intent{j}" for j in range(LABELS)), trunk.fingerprint, arch)
        write_shard(store.path(meta.tenant, 1), tensors, meta.with_version(1))
    return store


def alternate(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables, run alternately after one warm-up each."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="top N layers adapted")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--latency-queries", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/pathway.json"))
    args = parser.parse_args()

    trunk = HFEncoderTrunk().to(args.device)
    spec = PathwaySpec(args.layers, args.lora_rank)
    texts = [e.text for tenant in load_clinc150().tenants for e in tenant.split("test")]
    batch = texts[: args.batch]
    with tempfile.TemporaryDirectory(prefix="moe-bench-pathway-") as root:
        store = write_pathway_store(Path(root), trunk, spec, args.tenants)
        model = load_mixture(store, trunk=trunk, device=args.device)

        def served(queries: list[str], tenants: list[str], gate: bool = True):
            """As `Server.predict` serves queries whose tenant is given: the pathways' features, with the gate's in
            the same pass over the top layers where the out-of-scope score reads the gate."""
            ids = model.tenant_ids(tenants).to(args.device)
            features, hidden = model.given_pass(model.hidden_states(queries), ids, gate)
            return predict(model, features, ids, "gate_energy" if gate else "max_score", hidden=hidden)

        spread = [f"t{i % args.tenants:02d}" for i in range(len(batch))]
        one = ["t00"] * len(batch)
        mixed_s, single_s = alternate(lambda: served(batch, spread), lambda: served(batch, one), args.repeats)
        routed_s, _ = alternate(
            lambda: predict(model, trunk.encode(batch), hidden=model.hidden_states(batch)), lambda: None, args.repeats
        )
        latency: dict[str, list[float]] = {"trunk": [], "pathway": [], "trunk_again": [], "pathway_with_gate": []}
        for text in texts[1000 : 1000 + args.latency_queries]:
            for kind, gate in (("pathway", False), ("pathway_with_gate", True)):
                trunk_s, pathway_s = alternate(
                    lambda t=text: trunk.encode([t]), lambda t=text, g=gate: served([t], ["t03"], g), 3
                )
                latency["trunk" if not gate else "trunk_again"].append(trunk_s)
                latency[kind].append(pathway_s)
        meta = store.meta("t00")
        head_only = {"dim": trunk.dim, "rank": 0, "gate_rows": "labels", "input_scale": 8.0, "dtype": "float32"}
        adapter = head_only | {"rank": 64}  # conf/expert/adapter.yaml

        def expert_bytes(arch: dict) -> int:
            return tensor_bytes(ExpertMeta("x", meta.labels, meta.trunk_fingerprint, arch), weight_names(arch))

        shard_bytes = store.path("t00", 1).stat().st_size

    ms = {kind: 1e3 * statistics.median(times) for kind, times in latency.items()}
    pathway_bytes = expert_bytes(meta.architecture)
    head_bytes = expert_bytes(head_only)
    results = {
        "machine": machine_info(args.device),
        "settings": vars(args) | {"out": str(args.out), "lora_alpha": spec.alpha, "targets": list(spec.targets)},
        "throughput/mixed_queries_per_s": len(batch) / mixed_s,
        "throughput/one_tenant_queries_per_s": len(batch) / single_s,
        "throughput/mixed_over_one_tenant": single_s / mixed_s,
        "throughput/routed_top2_queries_per_s": len(batch) / routed_s,
        "latency/trunk_ms": ms["trunk"],
        "latency/pathway_tenant_given_ms": ms["pathway"],
        "latency/pathway_over_trunk": ms["pathway"] / ms["trunk"],
        "latency/trunk_again_ms": ms["trunk_again"],
        "latency/pathway_with_gate_tenant_given_ms": ms["pathway_with_gate"],
        "latency/pathway_with_gate_over_trunk": ms["pathway_with_gate"] / ms["trunk_again"],
        "bytes/pathway_expert_weights": pathway_bytes,
        "bytes/head_only_expert_weights": head_bytes,
        "bytes/adapter_expert_weights": expert_bytes(adapter),
        "bytes/pathway_over_head_only": pathway_bytes / head_bytes,
        "bytes/pathway_shard_file": shard_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
