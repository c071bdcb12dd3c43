"""Benchmark: routed top-k through an index over the gate's rows (`moe.inference.index`) against the exact scan.

    python scripts/bench_routing_index.py --out scripts/results/routing_index/routing_index.json

Synthetic statistics gates at 1,000 and 10,000 tenants (15 labels each, d=384): class means clustered by domain
(tenants are drawn from shared domain archetypes, so the runners-up of a query are other tenants of its domain),
rows their linear discriminants under one shared covariance (`discriminant_rows`, as the statistics gate makes
them), queries drawn from a class mean plus that covariance's noise. Per library (hnswlib, faiss, usearch), the
search settings (ef, rows) are chosen on a val set of queries as the fastest reaching the recall goal there; recall
and time are reported on a separate test set. The library is chosen as the fastest at the goal on val at the
largest gate. Exact scan and indexes are timed side by side in one process, interleaved round by round, with the
same threads; the exact top-k is the router's own (`TopKRouter.forward`, its logits' top k). It runs with
OMP_WAIT_POLICY=PASSIVE unless told otherwise (re-executing itself to set it): on a shared 2-core machine, OpenMP
threads that spin while waiting make torch's chunked scan up to 60x slower, which would flatter the index.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

from moe.experiments.bench import machine_info, memory_now
from moe.inference.index import IndexSettings, RowIndex
from moe.model import TopKRouter
from moe.model.stats import discriminant_rows

LIBRARIES = ("hnswlib", "faiss", "usearch")
PACKAGES = {"hnswlib": "hnswlib", "faiss": "faiss-cpu", "usearch": "usearch"}
GRID = [(ef, rows) for ef in (16, 24, 32, 48, 64, 96, 128, 192, 256) for rows in (8, 32) if rows <= ef]


class Gate:
    """A synthetic statistics gate and a sampler of queries near its class means."""

    def __init__(self, tenants: int, labels: int, dim: int, per_domain: int, seed: int):
        # t: tenants, a: domains, c: labels, d: features, r: rank of the shared within-class noise
        g = torch.Generator().manual_seed(seed)
        domains, rank = max(1, tenants // per_domain), 32
        centre = torch.randn(dim, generator=g)
        centre = 0.5 * centre / centre.norm()
        intents = (  # a domain's intents: its centre plus an offset per intent
            centre + 0.6 * dim**-0.5 * torch.randn(domains, 1, dim, generator=g)
        ) + 0.5 * dim**-0.5 * torch.randn(domains, labels, dim, generator=g)
        domain = torch.randint(domains, (tenants,), generator=g)
        self.means = intents[domain] + 0.25 * dim**-0.5 * torch.randn(tenants, labels, dim, generator=g)  # (t, c, d)
        self.factor = 0.3 * rank**-0.5 * torch.randn(dim, rank, generator=g)  # within-class noise: low rank + iso
        self.iso = 0.2 * dim**-0.5
        covariance = self.factor.double() @ self.factor.double().T + self.iso**2 * torch.eye(dim, dtype=torch.float64)
        weight, bias = discriminant_rows(self.means, torch.linalg.inv(covariance))
        self.router = TopKRouter(dim, [labels] * tenants, top_k=2, random_init=False)
        with torch.no_grad():
            self.router.weight.copy_(weight)
            self.router.bias.copy_(bias)
        self.router.requires_grad_(False)

    def queries(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        tenants, labels, dim = self.means.shape
        chosen = self.means[torch.randint(tenants, (n,), generator=g), torch.randint(labels, (n,), generator=g)]
        noise = torch.randn(n, self.factor.shape[1], generator=g) @ self.factor.T
        return chosen + noise + self.iso * torch.randn(n, dim, generator=g)


def lean_scan(router: TopKRouter, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact scan at its leanest: one matrix product over every row, logsumexp per expert, top k."""
    # b: batch, e: experts, m: rows, d: features
    rows = x @ rearrange(router.weight, "e m d -> d (e m)") + router.bias.flatten()
    rows = rearrange(rows, "b (e m) -> b e m", m=router.weight.shape[1]).masked_fill(~router.row_mask, float("-inf"))
    return rows.logsumexp(dim=-1).topk(k, dim=-1)


def exact_top_k(router: TopKRouter, x: torch.Tensor, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's logits' top k (its probabilities underflow to ties at 0 for far runners-up), batch by batch."""
    logits, experts = [], []
    for start in range(0, len(x), batch):
        top = router(x[start : start + batch]).logits.topk(k, dim=-1)
        logits.append(top.values)
        experts.append(top.indices)
    return torch.cat(logits), torch.cat(experts)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean share of each input's exact top-k experts that were found."""
    hits = (found[:, :, None] == exact[:, None, :]).any(dim=1)
    return hits.float().mean().item()


def search_all(index: RowIndex, x: torch.Tensor, k: int, batch: int, ef: int, rows: int):
    results = [index.top_k(x[s : s + batch], k, rows=rows, ef=ef) for s in range(0, len(x), batch)]
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def choose(index: RowIndex, val: torch.Tensor, exact: torch.Tensor, k: int, batch: int, goal: float) -> dict:
    """The grid on val: recall and time per batch of each (ef, rows); the fastest reaching `goal` (else the best)."""
    grid = []
    for ef, rows in GRID:
        search_all(index, val[:batch], k, batch, ef, rows)  # warm-up
        start = time.perf_counter()
        found = search_all(index, val, k, batch, ef, rows)[1]
        per_batch = (time.perf_counter() - start) / -(-len(val) // batch)
        grid.append({"ef": ef, "rows": rows, "recall": recall(found, exact), "ms_per_batch": 1e3 * per_batch})
    reaching = [point for point in grid if point["recall"] >= goal]
    best = min(reaching, key=lambda p: p["ms_per_batch"]) if reaching else max(grid, key=lambda p: p["recall"])
    return {"grid": grid, "chosen": {**best, "reaches_goal": bool(reaching)}}


def run(tenants: int, args, libraries: list[str]) -> dict:
    k, batch = 2, args.batch
    start = time.perf_counter()
    gate = Gate(tenants, args.labels, args.dim, args.per_domain, seed=tenants)
    router = gate.router
    val, test = gate.queries(args.val, seed=1), gate.queries(args.test, seed=2)
    print(f"{tenants} tenants: gate built in {time.perf_counter() - start:.1f} s", flush=True)
    exact_val = exact_top_k(router, val, k, batch)[1]
    exact_logits, exact_test = exact_top_k(router, test, k, batch)
    lean = lean_scan(router, test, k)[1]
    result = {
        "tenants": tenants,
        "rows": int(router.row_mask.sum()),
        "gate_bytes": router.weight.numel() * router.weight.element_size() + router.bias.numel() * 4,
        "lean_scan_agrees": recall(lean, exact_test),
        "libraries": {},
    }
    indexes = {}
    for library in tqdm(libraries, desc=f"indexes at {tenants} tenants", unit="library"):
        settings = IndexSettings(library, "l2", args.M, args.ef_construction, threads=torch.get_num_threads())
        before = memory_now()["RssAnon"]
        start = time.perf_counter()
        index = indexes[library] = RowIndex.build(router, settings)
        build = time.perf_counter() - start
        chosen = choose(index, val, exact_val, k, batch, args.goal)
        ef, rows = chosen["chosen"]["ef"], chosen["chosen"]["rows"]
        logits, found = search_all(index, test, k, batch, ef, rows)
        same = found == exact_test
        result["libraries"][library] = {
            "settings": {"M": args.M, "ef_construction": args.ef_construction, "ef": ef, "rows": rows, "metric": "l2"},
            "build_s": build,
            "index_bytes": index.nbytes(),
            "rss_growth_bytes": memory_now()["RssAnon"] - before,
            "val": chosen,
            "test_recall": recall(found, exact_test),
            "test_top1_recall": (found[:, 0] == exact_test[:, 0]).float().mean().item(),
            "test_exact_sets": (found.sort(dim=1).values == exact_test.sort(dim=1).values).all(1).float().mean().item(),
            "max_logit_error_where_same": (logits - exact_logits)[same].abs().max().item() if same.any() else None,
        }
    names = ["router", "lean_scan", *libraries]
    timings = {(split, name): [] for split in ("val", "test") for name in names}
    for round_ in tqdm(range(args.repeats), desc=f"timing at {tenants} tenants", unit="round"):
        for split, queries in (("val", val), ("test", test)):
            start = (round_ * batch) % (len(queries) - batch + 1)
            x = queries[start : start + batch]
            timings[split, "router"].append(seconds(lambda x=x: router(x)))
            timings[split, "lean_scan"].append(seconds(lambda x=x: lean_scan(router, x, k)))
            for library, index in indexes.items():
                s = result["libraries"][library]["settings"]
                timings[split, library].append(seconds(lambda x=x, i=index, s=s: i.top_k(x, k, s["rows"], s["ef"])))
    median = {key: 1e3 * statistics.median(times[1:]) for key, times in timings.items()}  # round 1 warms up
    result["ms_per_batch"] = {name: median["test", name] for name in names}
    result["val_ms_per_batch"] = {name: median["val", name] for name in names}  # what the library is chosen by
    for library in libraries:
        result["libraries"][library]["speedup_over_router"] = median["test", "router"] / median["test", library]
        result["libraries"][library]["speedup_over_lean_scan"] = median["test", "lean_scan"] / median["test", library]
    return result


def plot(results: list[dict], goal: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for library, figures in result["libraries"].items():
            grid = sorted(figures["val"]["grid"], key=lambda p: p["ms_per_batch"])
            ax.plot([p["ms_per_batch"] for p in grid], [p["recall"] for p in grid], "o", label=library, alpha=0.7)
        ax.axvline(result["ms_per_batch"]["router"], color="k", linestyle="--", label="exact scan (router)")
        ax.axhline(goal, color="grey", linestyle=":")
        ax.set(xscale="log", xlabel="ms per batch", ylabel="recall of exact top-k (val)")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{result['tenants']} tenants")
        ax.set_ylim(max(0.0, min(p["recall"] for f in result["libraries"].values() for p in f["val"]["grid"]) - 0.01))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:  # read by OpenMP once, when it starts: set it for a fresh process
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("scripts/results/routing_index/routing_index.json"))
    parser.add_argument("--tenants", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--labels", type=int, default=15)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--per-domain", type=int, default=20, help="tenants per domain archetype")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--val", type=int, default=2048)
    parser.add_argument("--test", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--M", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--goal", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for the scan and the indexes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        results = [run(tenants, args, args.libraries) for tenants in args.tenants]
    largest = max(results, key=lambda r: r["tenants"])
    at_goal = [lib for lib, f in largest["libraries"].items() if f["val"]["chosen"]["reaches_goal"]]
    val_ms = largest["val_ms_per_batch"]
    chosen = min(at_goal or largest["libraries"], key=lambda lib: val_ms[lib])
    speeds = ", ".join(f"{lib} {val_ms[lib]:.2f} ms" for lib in largest["libraries"])
    report = {
        "machine": machine_info(),
        "versions": {lib: importlib.metadata.version(PACKAGES[lib]) for lib in args.libraries}
        | {"numpy": np.__version__, "torch": torch.__version__},
        "config": {k: v for k, v in vars(args).items() if k != "out"}
        | {"top_k": 2, "grid": GRID, "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]},
        "choice": {
            "library": chosen,
            "why": f"fastest per batch of {args.batch} on val at {largest['tenants']} tenants (median of the "
            f"interleaved rounds) among the libraries reaching recall {args.goal} on val ({speeds}; "
            f"at goal: {at_goal or 'none'})",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.goal, args.out.with_suffix(".png"))
    for r in results:
        for lib, f in r["libraries"].items():
            ms = r["ms_per_batch"]
            print(
                f"{r['tenants']:>6} tenants {lib:>8}: recall {f['test_recall']:.4f}, router {ms['router']:.1f} ms,"
                f" lean {ms['lean_scan']:.1f} ms, index {ms[lib]:.2f} ms"
                f" ({f['speedup_over_router']:.1f}x / {f['speedup_over_lean_scan']:.1f}x), build {f['build_s']:.1f} s"
            )
    print(f"chosen: {chosen}; wrote {args.out}")


if __name__ == "__main__":
    main()
