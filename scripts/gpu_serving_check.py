"""The prepared GPU check of the serving runtime: one bundle of --tenants synthetic experts of MiniLM's shape (384
features, adapter rank 64, 15 labels) over the tiny trunk widened to 384, served on CUDA under a budget that forces
paging, against the same bundle served on the CPU with every expert resident: the same answers, and the timings.

    PYTHONPATH=. python scripts/gpu_serving_check.py --out outputs/gpu_serving.json

Needs torch with CUDA, transformers, safetensors, einops (no Lightning, Hydra or wandb: it writes the store with
`moe.experiments.bench`, the bundle with `moe.export.writer`, and serves it with `moe.serving`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe.experiments.bench import DIM, device_name, write_store, zipf_probabilities
from moe.export.writer import write_bundle_manifest, write_files
from moe.inference import UNSURE_MARGIN, GateSettings, load_mixture
from moe.serving import Server
from moe.trunk import TinyTrunk

WORDS = [
    "balance",
    "flight",
    "song",
    "rain",
    "alarm",
    "transfer",
    "pizza",
    "jazz",
    "hotel",
    "card",
    "weather",
    "timer",
    "play",
    "book",
    "cancel",
]


def write_bundle(root: Path, tenants: int, seed: int = 0) -> Path:
    trunk = TinyTrunk(dim=DIM, freeze=True)
    randomized = dict.fromkeys(("bank.up", "bank.head", "router.weight"), 0.05)
    store = write_store(
        root / "store", tenants, 64, seed=seed, trunk_fingerprint=trunk.fingerprint, init_std=randomized, progress=False
    )
    gate = GateSettings()
    model = load_mixture(store, gate=gate, trunk_fingerprint=trunk.fingerprint)
    files, entry = write_files(root / "bundle", store.root, model, trunk)
    oos = {"score": "gate_max_prob", "threshold": 0.05}
    write_bundle_manifest(root / "bundle", files, model, entry, "float32", oos, gate, UNSURE_MARGIN)
    return root / "bundle"


def queries(n: int, tenants: list[str], seed: int = 1) -> tuple[list[str], list[str | None]]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]
    picks = rng.choice(len(tenants), size=n, p=zipf_probabilities(len(tenants), 1.2))
    given = [tenants[i] if rng.random() < 0.5 else None for i in picks]  # half routed, half tenant given
    return texts, given


def timings(server: Server, texts: list[str], given: list[str | None]) -> dict:
    for i in range(20):
        server.predict(texts[i : i + 1], given[i : i + 1])
    one = []
    for i in range(200):
        start = time.perf_counter()
        server.predict(texts[i : i + 1], given[i : i + 1])
        one.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, 64 * 20, 64):
        server.predict(texts[i : i + 64], given[i : i + 64])
    return {
        "batch1_p50_ms": 1e3 * statistics.median(one),
        "batch1_p99_ms": 1e3 * sorted(one)[int(0.99 * len(one))],
        "batch64_qps": 64 * 20 / (time.perf_counter() - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_serving.json"))
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--budget-experts", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bundle = write_bundle(Path(tmp), args.tenants)
        written_s = time.perf_counter() - start
        cpu = Server(bundle, budget_bytes=1 << 34)
        size = max(cpu.model.pager.sizes.values())
        device = Server(bundle, budget_bytes=args.budget_experts * size, device=args.device)
        texts, given = queries(64 * 20, cpu.tenants)
        expected, got = [], []
        for i in range(0, len(texts), 64):
            expected += cpu.predict(texts[i : i + 64], given[i : i + 64])
            got += device.predict(texts[i : i + 64], given[i : i + 64])
        same = sum(
            (a.tenant, a.intent, a.experts, a.out_of_scope) == (b.tenant, b.intent, b.experts, b.out_of_scope)
            for a, b in zip(expected, got, strict=True)
        )
        score_diff = max(abs(a.score - b.score) for a, b in zip(expected, got, strict=True))
        result = {
            "device": device_name(args.device),
            "torch": torch.__version__,
            "tenants": args.tenants,
            "expert_bytes": size,
            "device_budget_experts": args.budget_experts,
            "bundle_written_s": written_s,
            "queries": len(texts),
            "same_answers": same,
            "max_score_difference": score_diff,
            "cpu_all_resident": timings(cpu, texts, given),
            "device_paged": timings(device, texts, given),
            "device_pager": device.stats(),
            "cpu_threads": torch.get_num_threads(),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "device_pager"}, indent=2))


if __name__ == "__main__":
    main()
