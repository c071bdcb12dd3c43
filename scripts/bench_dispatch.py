"""Benchmark: routed top-k dispatch against dense all-expert compute and a per-sample loop.

    python scripts/bench_dispatch.py --out outputs/benchmarks/dispatch.json

Times the expert side of one forward pass (plan, gather, expert compute, combine) on trunk-sized features;
the gate is the same for all three and is left out. The three run side by side in one process, so their
ratios hold on this machine whatever its speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from einops import rearrange

from moe.experiments.bench import machine_info
from moe.model import ExpertBank, combine, dispatch, plan_dispatch


def routed(bank: ExpertBank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    plan = plan_dispatch(experts, weights)
    return combine(bank(dispatch(x, plan), plan.experts).softmax(-1), plan) * weights[..., None]


def dense(bank: ExpertBank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, chunk: int = 32):
    """Every expert on every input (in chunks of experts to bound memory), then keep the chosen ones."""
    outputs = []
    for start in range(0, bank.num_experts, chunk):
        ids = torch.arange(start, min(start + chunk, bank.num_experts))
        outputs.append(bank(x.expand(len(ids), -1, -1), ids).softmax(-1))  # (e, b, c)
    everything = rearrange(torch.cat(outputs), "e b c -> b e c")
    return everything.gather(1, experts[..., None].expand(-1, -1, everything.shape[-1])) * weights[..., None]


def per_sample_loop(bank: ExpertBank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
    out = torch.zeros(*experts.shape, bank.head.shape[-1])
    for i in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[i, j : j + 1]
            out[i, j] = bank(x[i].view(1, 1, -1), e)[0, 0].softmax(-1) * weights[i, j]
    return out


def median_seconds(fn, inputs: tuple, repeats: int) -> float:
    fn(*inputs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/dispatch.json"))
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=384, help="trunk feature size (all-MiniLM-L6-v2: 384)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--labels", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-samples", type=int, default=512, help="the loop is timed on this many inputs, scaled")
    args = parser.parse_args()

    torch.manual_seed(0)
    results = []
    x = torch.randn(args.batch, args.dim)
    with torch.inference_mode():
        for num_experts in args.experts:
            bank = ExpertBank(args.dim, [args.labels] * num_experts, args.rank)
            logits = torch.randn(args.batch, num_experts)
            for k in args.top_k:
                weights, experts = logits.softmax(-1).topk(k, dim=-1)
                assert torch.allclose(routed(bank, x, experts, weights), dense(bank, x, experts, weights), atol=1e-5)
                n = args.loop_samples
                row = {
                    "experts": num_experts,
                    "top_k": k,
                    "batch": args.batch,
                    "routed_s": median_seconds(routed, (bank, x, experts, weights), args.repeats),
                    "dense_s": median_seconds(dense, (bank, x, experts, weights), args.repeats),
                    "loop_s": median_seconds(per_sample_loop, (bank, x[:n], experts[:n], weights[:n]), 1)
                    * args.batch
                    / n,
                }
                row["dense_over_routed"] = row["dense_s"] / row["routed_s"]
                row["loop_over_routed"] = row["loop_s"] / row["routed_s"]
                results.append(row)
                print(
                    f"experts={num_experts:4d} k={k}  routed {row['routed_s'] * 1e3:8.2f} ms  "
                    f"dense {row['dense_s'] * 1e3:9.2f} ms ({row['dense_over_routed']:6.1f}x)  "
                    f"loop {row['loop_s'] * 1e3:9.1f} ms ({row['loop_over_routed']:6.1f}x)",
                    flush=True,
                )
    machine = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine, "config": vars(args) | {"out": str(args.out)}, "results": results}, indent=2)
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
