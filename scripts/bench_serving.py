"""Benchmark: the serving runtime on an exported bundle, beside its own trunk, and its memory beside one separate
model per tenant.

    python scripts/export.py store_dir=outputs/clinc150/experts paths.output_dir=outputs/bundle_clinc150
    python scripts/bench_serving.py --bundle outputs/bundle_clinc150 --out outputs/benchmarks/serving.json

latency        batch 1, p50 and p99 over --queries queries: the trunk encoding one query alone, and the whole
               `Server.predict` (trunk + gate + experts + answer), measured interleaved, query by query
throughput     batch 64, queries per second: the trunk alone and `Server.predict`
paging         the same with a device budget of --budget-experts experts and a Zipf(--zipf-s) tenant mix (the
               tenant given with each query), with the pager's hit rate
memory         for 10, 100 and 1,000 tenants (synthetic experts of the bundle's shape, written to a temp dir):
               the resident memory (RSS) of one process holding the trunk and a mixture with every expert
               resident, measured in a fresh child process; beside it, one separate model per tenant (each its own
               copy of trunk + expert), computed from bytes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe.experiments.bench import machine_info, rss_bytes, write_store, zipf_probabilities
from moe.inference import load_mixture
from moe.serving import Server

FALLBACK_QUERIES = [
    "what is my checking account balance",
    "book a table for two at an italian place tonight",
    "how do i say thank you in french",
    "set an alarm for 6 am",
    "is my flight to boston delayed",
    "play some jazz",
    "what's the weather like tomorrow",
    "transfer 200 dollars from savings to checking",
]


def load_queries(n: int) -> list[str]:
    """CLINC150 test queries when $MOE_DATA_DIR holds them (read as plain JSON), else a short built-in list."""
    path = Path(os.environ.get("MOE_DATA_DIR", "")) / "clinc150" / "data_full.json"
    texts = [text for text, _ in json.loads(path.read_text())["test"]] if path.is_file() else FALLBACK_QUERIES
    return [texts[i % len(texts)] for i in range(n)]


def quantiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": 1e3 * statistics.median(ordered),
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": 1e3 * statistics.fmean(ordered),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency(server: Server, queries: list[str], tenants: list[str | None]) -> dict:
    """Batch 1, the trunk alone and the whole prediction, interleaved so that drift hits both alike."""
    for q in queries[:20]:  # warm-up
        server.trunk.encode([q])
        server.predict([q])
    trunk, served = [], []
    with torch.inference_mode():
        for q, t in zip(queries, tenants, strict=True):
            trunk.append(timed(lambda q=q: server.trunk.encode([q]).cpu()))  # .cpu(): waits for a GPU
            served.append(timed(lambda q=q, t=t: server.predict([q], t)))
    result = {"trunk": quantiles(trunk), "predict": quantiles(served)}
    result["p50_ratio"] = result["predict"]["p50_ms"] / result["trunk"]["p50_ms"]
    return result


def throughput(server: Server, queries: list[str], tenants: list[str | None], batch: int, batches: int) -> dict:
    chunks = [(queries[i : i + batch], tenants[i : i + batch]) for i in range(0, batch * batches, batch)]
    server.predict(*chunks[0])  # warm-up
    trunk_s = predict_s = 0.0
    with torch.inference_mode():  # interleaved, batch by batch, so that drift hits both alike
        for q, t in chunks:
            trunk_s += timed(lambda q=q: server.trunk.encode(q).cpu())
            predict_s += timed(lambda q=q, t=t: server.predict(q, list(t)))
    n = batch * len(chunks)
    return {"batch": batch, "queries": n, "trunk_qps": n / trunk_s, "predict_qps": n / predict_s}


def zipf_tenants(tenants: list[str], n: int, s: float, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tenants))  # which tenant is popular is arbitrary
    return [tenants[order[i]] for i in rng.choice(len(tenants), size=n, p=zipf_probabilities(len(tenants), s))]


def hit_rate(server: Server) -> float:
    device = server.stats()["device"]
    return device["hits"] / max(1, device["hits"] + device["misses"])


def memory_child(args) -> None:
    """In a fresh process: RSS after imports, after the trunk, after every expert is resident."""
    from moe.trunk import HFEncoderTrunk

    gc.collect()
    start = rss_bytes()
    trunk = HFEncoderTrunk().freeze()
    with torch.inference_mode():
        features = trunk(FALLBACK_QUERIES * 8)  # the trunk's working memory for one batch of 64
    after_trunk = rss_bytes()
    model = load_mixture(args.store, budget_bytes=1 << 40)  # raises on a shard that fails its checks
    x = features[:1].expand(64, -1)
    with torch.inference_mode():
        for i in range(0, len(model.keys), 64):  # make every expert resident: each batch goes to 64 experts
            tenant = torch.arange(i, min(i + 64, len(model.keys)))
            model(x[: len(tenant)], tenant)
    gc.collect()
    end = rss_bytes()
    expert_bytes = model.pager.resident_bytes()
    gate_bytes = sum(p.numel() * p.element_size() for p in model.router.parameters())
    print(
        json.dumps(
            {
                "rss_start": start,
                "rss_after_trunk": after_trunk,
                "rss_end": end,
                "resident_expert_bytes": expert_bytes,
                "resident_experts": len(model.pager.resident()),
                "gate_bytes": gate_bytes,
            }
        )
    )


def memory(args, trunk_bytes: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.tenants:
            root = Path(tmp) / f"store{n}"
            write_store(root, n, args.rank)
            child = [sys.executable, __file__, "--memory-child", "--store", str(root)]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            per_expert = measured["resident_expert_bytes"] / n
            rows.append(
                {
                    "tenants": n,
                    "mixture_rss_bytes": measured["rss_end"],
                    "mixture_rss_over_start_bytes": measured["rss_end"] - measured["rss_start"],
                    "trunk_rss_bytes": measured["rss_after_trunk"] - measured["rss_start"],
                    "experts_rss_bytes": measured["rss_end"] - measured["rss_after_trunk"],
                    "resident_expert_bytes": measured["resident_expert_bytes"],
                    "gate_bytes": measured["gate_bytes"],
                    "separate_models_bytes": n * (trunk_bytes + per_expert),
                    "separate_over_mixture": n
                    * (trunk_bytes + per_expert)
                    / (trunk_bytes + measured["resident_expert_bytes"] + measured["gate_bytes"]),
                }
            )
            shutil.rmtree(root, ignore_errors=True)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle folder (scripts/export.py), MiniLM trunk")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/serving.json"))
    parser.add_argument("--queries", type=int, default=300, help="batch-1 queries timed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--budget-experts", type=int, default=3, help="device budget of the paging runs, in experts")
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--tenants", type=int, nargs="*", default=[10, 100, 1000], help="memory: tenant counts")
    parser.add_argument("--rank", type=int, default=64, help="adapter rank of the synthetic experts")
    parser.add_argument("--workdir", type=Path, default=None, help="where synthetic shards go (default: temp)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the trunk and experts run (memory is always CPU)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    if args.bundle is None:
        parser.error("--bundle is required")
    if args.threads:
        torch.set_num_threads(args.threads)

    server = Server(args.bundle, budget_bytes=1 << 34, device=args.device)
    tenants = server.tenants
    size = max(server.model.pager.sizes.values())
    trunk_bytes = sum(t.numel() * t.element_size() for t in server.trunk.state_dict().values())
    queries = load_queries(max(args.queries, args.batch * args.batches))
    routed = [None] * len(queries)
    mix = zipf_tenants(tenants, len(queries), args.zipf_s)
    print(f"{len(tenants)} experts of {size / 2**20:.3f} MiB; trunk {trunk_bytes / 2**20:.1f} MiB", flush=True)

    result: dict = {"resident": {}, "paging": {}}
    result["resident"]["latency_batch1"] = latency(server, queries[: args.queries], routed[: args.queries])
    result["resident"]["latency_batch1_tenant_given"] = latency(server, queries[: args.queries], mix[: args.queries])
    result["resident"]["throughput"] = throughput(server, queries, routed, args.batch, args.batches)
    print(json.dumps(result["resident"], indent=2), flush=True)

    paged = Server(args.bundle, budget_bytes=args.budget_experts * size, device=args.device)
    result["paging"] = {
        "device_budget_bytes": args.budget_experts * size,
        "budget_experts": args.budget_experts,
        "zipf_s": args.zipf_s,
        "latency_batch1": latency(paged, queries[: args.queries], mix[: args.queries]),
        "throughput": throughput(paged, queries, mix, args.batch, args.batches),
        "device_hit_rate": hit_rate(paged),
        "pager": paged.stats(),
    }
    print(json.dumps({k: v for k, v in result["paging"].items() if k != "pager"}, indent=2), flush=True)
    del paged, server
    gc.collect()

    result["memory"] = memory(args, trunk_bytes) if args.tenants else []
    p50 = result["resident"]["latency_batch1"]
    result["target"] = {"batch1_p50_over_trunk": p50["p50_ratio"], "within_1.2x": p50["p50_ratio"] <= 1.2}
    result["machine"] = machine_info(args.device)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["trunk_bytes"], result["expert_bytes"] = trunk_bytes, size
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["target"]), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
