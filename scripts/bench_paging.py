"""Benchmark: expert page-in latency beside the plain cost of moving the same bytes, and a Zipf-skewed
stream over 1,000 registered experts with a device budget of 32 experts.

    python scripts/bench_paging.py --out outputs/benchmarks/paging.json
    python scripts/bench_paging.py --device cuda --out outputs/benchmarks/paging_cuda.json   # on a GPU

Page-in figures (median of --repeats):
  disk -> device   the pager loading a shard it verified at registration (unchanged file: no rehash); it
                   reads the expert's weights only, one read per tensor into one buffer
  host -> device   the pager promoting an expert from its host tier (pinned on CUDA; on a CPU-only machine
                   host and device are the same memory and promotion moves a reference)
beside the physical bound for the same number of bytes: `readinto` of the file into a buffer plus one tensor
copy (disk), or one tensor copy (host; a pinned host-to-device copy on CUDA). Disk figures are cold where
`posix_fadvise(DONTNEED)` can drop the file from the page cache, warm otherwise; the JSON says which.
On CPU the pager's disk page-in needs no copy after the read, so it can beat this bound.

Each Zipf stream (one per `--stream-dtypes`: a store in float32, and as a float16 bundle stores it) runs in a
fresh process that did not write the store, `--stream-runs` times; its peak resident memory (VmHWM, reset
before the trunk loads) is compared with the device budget plus the trunk plus 15 %. The trunk counts as the
process pays for it: importing transformers, its weights and one batch's working memory. Resident memory after
each stage (anonymous and file-backed) is recorded, to show where the rest sits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe.experiments.bench import (
    DIM,
    machine_info,
    memory_now,
    rank_for,
    reset_peak_rss,
    rss_bytes,
    write_store,
    zipf_probabilities,
)
from moe.export.precision import DTYPES
from moe.inference import load_mixture
from moe.store import ExpertStore


def drop_from_page_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def plain_disk_copy(path: Path, size: int, device: torch.device) -> None:
    """`size` bytes of the file (as many as the pager reads: the expert's weights) into a buffer, then one copy."""
    buffer = torch.empty(size, dtype=torch.uint8)
    with path.open("rb", buffering=0) as handle:
        handle.readinto(memoryview(buffer.numpy()))
    buffer.to(device, copy=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_host_copy(host: torch.Tensor, device: torch.device) -> None:
    host.to(device, copy=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_s(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats + 1):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first is a warm-up


def page_in_sizes(args, device: torch.device, work: Path) -> list[dict]:
    rows = []
    for megabytes in args.sizes:
        store = write_store(work / f"size{megabytes}", 1, rank_for(megabytes))
        model = load_mixture(store, device=device, budget_bytes=1 << 34, host_budget_bytes=1 << 34)
        pager, key = model.pager, model.keys[0]
        path, size = store.path(*key), pager.sizes[key]
        cold = drop_from_page_cache(path) and args.cold

        def disk_page_in(pager=pager, key=key):
            with pager.acquire([key]):
                pass

        def evict_all(pager=pager, key=key, path=path, cold=cold):
            pager.evict(key)
            if cold:
                drop_from_page_cache(path)

        def host_page_in(pager=pager, key=key):
            with pager.acquire([key]):
                pass

        def to_host_only(pager=pager, key=key):
            pager.demote(key)  # to the host tier, as an eviction under pressure would

        disk = median_s(disk_page_in, args.repeats, evict_all)
        disk_plain = median_s(
            lambda path=path, size=size: plain_disk_copy(path, size, device),
            args.repeats,
            (lambda path=path: drop_from_page_cache(path)) if cold else None,
        )
        host_page_in()
        host = median_s(host_page_in, args.repeats, to_host_only)
        host_tensor = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        host_plain = median_s(lambda t=host_tensor: plain_host_copy(t, device), args.repeats)
        row = {
            "expert_mb": size / 2**20,
            "disk_cache": "cold" if cold else "warm",
            "disk_page_in_s": disk,
            "disk_plain_copy_s": disk_plain,
            "disk_ratio": disk / disk_plain,
            "host_page_in_s": host,
            "host_plain_copy_s": host_plain,
            "host_ratio": host / host_plain,
            "host_promotion": "reference move (same memory)" if device.type == "cpu" else "pinned host-to-device copy",
        }
        rows.append(row)
        print(
            f"{row['expert_mb']:6.2f} MB  disk ({row['disk_cache']}) {disk * 1e3:8.3f} ms,"
            f" plain {disk_plain * 1e3:8.3f} ms ({row['disk_ratio']:.2f}x);"
            f"  host {host * 1e3:8.3f} ms, plain {host_plain * 1e3:8.3f} ms ({row['host_ratio']:.2f}x)",
            flush=True,
        )
    return rows


def zipf_stream(args, root: Path) -> dict:
    """The store at `root` (1,000 experts), a device budget of 32 of them, batches over a Zipf tenant mix.
    Run in a fresh process (`spawned`) that did not write the store: its peak covers this run alone."""
    device, store = torch.device(args.device), ExpertStore(root)
    peak_reset = reset_peak_rss()
    rss_start = rss_bytes()
    stages = {"start": memory_now()}
    trunk_bytes = 0
    if args.with_trunk:
        from moe.trunk import HFEncoderTrunk  # importing transformers is part of what the trunk costs

        trunk = HFEncoderTrunk().to(device)
        with torch.inference_mode():  # its footprint: the import, its weights and the working memory of a batch
            features = trunk(["what is my balance", "book a flight to paris", "play some jazz"] * 22)[: args.batch]
        trunk_bytes = rss_bytes() - rss_start
    else:
        features = torch.nn.functional.normalize(torch.randn(args.batch, DIM), dim=-1).to(device)
    probe = load_mixture(store, tenants=store.tenants()[:1])
    budget = args.budget_experts * probe.pager.sizes[probe.keys[0]]
    del probe
    stages["trunk"] = memory_now()
    start = time.perf_counter()
    model = load_mixture(store, device=device, budget_bytes=budget, host_budget_bytes=0, skip_failed=True)
    register_s = time.perf_counter() - start
    stages["registered"] = memory_now()
    routing_bytes = sum(t.numel() * t.element_size() for t in (model.router.weight, model.router.bias))
    rng = np.random.default_rng(0)
    popularity = zipf_probabilities(args.tenants, args.zipf_s)
    queries, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(args.batches), desc=f"zipf stream ({root.name})", unit="batch"):
            tenants = rng.choice(args.tenants, size=features.shape[0], p=popularity)
            model(features, torch.as_tensor(tenants, device=device))
            queries += features.shape[0]
            if i == 0:
                stages["first_batch"] = memory_now()
    elapsed = time.perf_counter() - start
    stages["end"] = memory_now()
    summary = model.pager.summary()
    device_stats = summary["device"]
    peak = rss_bytes("VmHWM") - rss_start
    bound = (budget + trunk_bytes) * 1.15
    return {
        "dtype": str(model.router.weight.dtype).removeprefix("torch."),
        "tenants": args.tenants,
        "expert_mb": budget / args.budget_experts / 2**20,
        "device_budget_bytes": budget,
        "budget_experts": args.budget_experts,
        "zipf_s": args.zipf_s,
        "top_budget_share": float(popularity[: args.budget_experts].sum()),
        "batch": features.shape[0],
        "batches": args.batches,
        "register_s": register_s,
        "queries_per_s": queries / elapsed,
        "device_hit_rate": device_stats["hits"] / max(1, device_stats["hits"] + device_stats["misses"]),
        "pager": summary,
        "trunk_bytes": trunk_bytes,
        "routing_bytes_resident": routing_bytes,
        "peak_resident_bytes_over_start": peak,
        "overhead_bytes": peak - budget - trunk_bytes,  # routing, bookkeeping and transients
        "bound_bytes": bound,
        "peak_over_bound": peak / bound,
        # where the overhead sits: resident memory after each stage, over the start
        "stages_over_start": {
            stage: {k: v - stages["start"][k] for k, v in fields.items()} for stage, fields in stages.items()
        },
        "transient_bytes": rss_bytes("VmHWM") - stages["end"]["VmRSS"],  # the peak above where the stream ended
        "peak_measured_from": "reset before the trunk loads" if peak_reset else "process start (could not reset)",
        "failed": {k: str(v) for k, v in model.left_out.items()},
    }


def spawned(fn, *args):
    """`fn(*args)` in a fresh interpreter: no memory of an earlier run lingers in its peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/paging.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="where the shards are written (default: a temp dir)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 4, 16], help="expert sizes in MB")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--budget-experts", type=int, default=32)
    parser.add_argument("--stream-expert-mb", type=float, default=1.0)
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--with-trunk", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--stream-dtypes",
        nargs="*",
        default=["float32", "float16"],
        choices=sorted(DTYPES),
        help="a Zipf stream over a store in each dtype (none: skip the stream)",
    )
    parser.add_argument("--stream-runs", type=int, default=3, help="fresh-process runs of each stream")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        streams = []
        for dtype in args.stream_dtypes:
            rank = rank_for(args.stream_expert_mb, dtype)
            store = write_store(work / f"many_{dtype}", args.tenants, rank, dtype)
            for run in range(args.stream_runs):
                streams.append(spawned(zipf_stream, args, store.root) | {"run": run})
                print(json.dumps({k: v for k, v in streams[-1].items() if k != "pager"}, indent=2), flush=True)
            shutil.rmtree(store.root)
        for dtype in args.stream_dtypes:
            ratios = [f"{s['peak_over_bound']:.3f}" for s in streams if s["dtype"] == dtype]
            print(f"{dtype}: peak / bound {', '.join(ratios)}")
        sizes = page_in_sizes(args, device, work)
    machine = machine_info(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps({"machine": machine, "config": config, "page_in": sizes, "zipf_streams": streams}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
