"""Benchmark: registering thousands of tenants, from their headers alone (`verify="lazy"`) beside a full
verification of every shard (`verify="full"`), each in a fresh process, side by side in one run.

    python scripts/bench_registration.py --out scripts/results/registration/registration.json
    python scripts/bench_registration.py --tenants 1000 --out outputs/benchmarks/registration_1k.json

Per mode: seconds to build the mixture (`load_mixture`), bytes the process read while doing it (`rchar` of
/proc/self/io: page-cache hits included, so the figure is what registration asks for, not what the disk served),
resident memory it added (VmRSS after minus before, per tenant), and then, with an expert budget of `--budget`
of the tenants, the median batch-1 latency of a tenant-given query (its expert paged in) and of a routed one (the
gate's exact scan over every row; in lazy mode also through the gate-row index, `RowIndex`, with its build time).
`--follow`: instead, a replica following a store of `--tenants` experts (`scripts/bench_load.py`'s, on the MiniLM trunk,
lazily registered, routed through the gate-row index): the seconds of a fresh build of its generation (what every
generation cost when replicas rebuilt the whole mixture) beside the seconds each lifecycle write takes and then the
replica's move to the generation it published (`Server.refresh`: the mixture carried over). The writes undo
themselves (a tenant grown then deleted, one hibernated then woken, one updated then rolled back). The same writes
into a store of `--small` tenants follow, in the same run: each write's seconds in the large store over the small.

    python scripts/bench_registration.py --follow --out scripts/results/registration/follow.json

`--pathway N`: instead, N pathway experts (`scripts/bench_load.py`'s: the CLINC150 shape, about 2.7 MB each, on the
MiniLM trunk) in an S3 bucket (a moto server on localhost, in this process), registered from the bucket by a fresh
process per mode with a cold disk cache: seconds, and the bytes that crossed the loopback interface meanwhile (the S3
server is the only thing talking on it: requests and answers, per tenant), beside the shard's size; then one
tenant-given query's latency at its first page-in (fetched from the bucket) and once cached.

    python scripts/bench_registration.py --pathway 1000 --out scripts/results/registration/pathway_s3.json

The store is written once (synthetic experts of a CLINC150 domain's shape:
384 features, 15 labels, adapter rank `--rank`) into the user cache and reused; the page cache is warm for both
modes alike (the store was just written or read).
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
import time
from pathlib import Path

import torch

from moe.experiments.bench import DIM, LABELS, SYNTHETIC_FINGERPRINT, machine_info, rss_bytes, write_store
from moe.inference import RowIndex, load_mixture
from moe.paths import cache_dir
from moe.store import ExpertStore, TrunkVersions

ROOT = Path(__file__).resolve().parents[1]


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def measure(store_dir: Path, verify: str, budget: float, queries: int) -> dict:
    """One mode, in this (fresh) process."""
    torch.set_num_threads(1)
    x = torch.randn(queries, DIM, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=-1, keepdim=True)  # trunk features are unit-norm
    store = ExpertStore(store_dir)
    tenants = store.tenants()
    rss, read, start = rss_bytes(), bytes_read(), time.perf_counter()
    sizes = 0
    model = load_mixture(store, trunk_fingerprint=SYNTHETIC_FINGERPRINT, verify=verify, budget_bytes=1 << 40)
    seconds = time.perf_counter() - start
    read, rss = bytes_read() - read, rss_bytes() - rss
    sizes = sum(model.pager.sizes.values())
    model.pager.device_budget = int(budget * sizes)  # an expert budget of a share of the tenants
    picks = torch.randint(len(tenants), (queries,), generator=torch.Generator().manual_seed(1))
    given, routed = [], []
    with torch.no_grad():
        for i in range(queries):
            start = time.perf_counter()
            model(x[i : i + 1], picks[i : i + 1])
            given.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(x[i : i + 1])
            routed.append(time.perf_counter() - start)
    indexed = {}
    if verify == "lazy":  # then routed through the gate-row index (moe.inference.index), built once here
        start = time.perf_counter()
        model.index = RowIndex.build(model.router)
        indexed["index_build_s"] = time.perf_counter() - start
        routed_index = []
        with torch.no_grad():
            for i in range(queries):
                start = time.perf_counter()
                model(x[i : i + 1])
                routed_index.append(time.perf_counter() - start)
        indexed["routed_index_ms"] = 1000 * statistics.median(routed_index)
    n = len(tenants)
    return indexed | {
        "verify": verify,
        "tenants": n,
        "registration_s": seconds,
        "bytes_read": read,
        "bytes_read_per_tenant": read / n,
        "resident_bytes": rss,
        "resident_bytes_per_tenant": rss / n,
        "gate_bytes_per_tenant": (model.router.weight.nbytes + model.router.bias.nbytes) / n,
        "expert_bytes": sizes / n,
        "tenant_given_ms": 1000 * statistics.median(given),
        "routed_ms": 1000 * statistics.median(routed),
        "queries": queries,
    }


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (/proc/net/dev)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def measure_remote(url: str, options: dict, verify: str) -> dict:
    """One mode of `--pathway`, in this (fresh) process: the store at `url` registered with a cold disk cache."""
    from moe.store import open_store
    from moe.trunk import HFEncoderTrunk

    torch.set_num_threads(1)
    trunk = HFEncoderTrunk()
    cache = Path(options.pop("cache_dir"))
    shutil.rmtree(cache, ignore_errors=True)
    rss, wire, start = rss_bytes(), loopback_bytes(), time.perf_counter()
    store = open_store(url, cache, **options)
    model = load_mixture(store, trunk=trunk, verify=verify, budget_bytes=64 << 20)
    seconds, wire, rss = time.perf_counter() - start, loopback_bytes() - wire, rss_bytes() - rss
    n = len(model.tenants)
    texts, tenant = ["what is my balance"], model.tenant_ids([model.tenants[n // 2]])
    timings = []
    with torch.no_grad():
        for _ in range(2):  # its first page-in (from the bucket in lazy mode), then resident
            begun = time.perf_counter()
            model(trunk.encode(texts), tenant, hidden=model.hidden_states(texts))
            timings.append(time.perf_counter() - begun)
    shard = store.path(model.tenants[0], store.latest(model.tenants[0]))
    return {
        "verify": verify,
        "tenants": n,
        "registration_s": seconds,
        "loopback_bytes": wire,
        "loopback_bytes_per_tenant": wire / n,
        "resident_bytes_per_tenant": rss / n,
        "expert_bytes": sum(model.pager.sizes.values()) / n,
        "disk_cache_bytes_after": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()),
        "first_query_ms": 1000 * timings[0],
        "resident_query_ms": 1000 * timings[1],
        "shard_file": str(shard),
    }


def pathway_registration(tenants: int) -> dict:
    """`--pathway`: lazy and full registration of `tenants` pathway experts on a moto S3 server, each in a fresh
    process with a cold disk cache, side by side."""
    import tempfile

    import fsspec
    from bench_load import prepare_pathway_store  # this script's folder is first on the path

    sys.path.insert(0, str(ROOT))  # the tests' moto server (tests/moto_s3.py), from the repository's root
    from tests.moto_s3 import moto_s3

    local = prepare_pathway_store(tenants)
    shard_bytes = next(local.glob("p*/v0001.safetensors")).stat().st_size
    results = {}
    with moto_s3("bench") as options, tempfile.TemporaryDirectory() as cache:
        fsspec.filesystem("s3", **options).put(str(local), "bench/pathway", recursive=True)
        for verify in ("lazy", "full"):
            child = options | {"cache_dir": cache, "cache_budget_bytes": 4 * shard_bytes * tenants}
            command = [sys.executable, __file__, "--child", verify, "--store", "s3://bench/pathway"]
            command += ["--store-options", json.dumps(child)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[verify] = json.loads(done.stdout.strip().splitlines()[-1])
            print(verify, results[verify], flush=True)
    lazy, full = results["lazy"], results["full"]
    return {
        "settings": {"tenants": tenants, "shard_bytes": shard_bytes, "store": "moto S3 on localhost"},
        "results": results,
        "lazy_speedup": full["registration_s"] / lazy["registration_s"],
        "lazy_wire_ratio": lazy["loopback_bytes"] / full["loopback_bytes"],
        "lazy_wire_share_of_shard": lazy["loopback_bytes_per_tenant"] / shard_bytes,
    }


class GarbageCollections:
    """Seconds this process has spent in garbage collections since it was made (`gc.callbacks`): a full collection
    in a process holding torch takes about 0.3 s, and a write's allocations may trigger one."""

    def __init__(self):
        self.seconds, self._started = 0.0, 0.0
        gc.callbacks.append(self._record)

    def _record(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


def follow(tenants: int, rank: int) -> dict:
    """A replica following a store of `tenants` experts through writes that undo themselves (see the docstring)."""
    from bench_load import prepare_store  # this script's folder is first on the path

    from moe.experiments.bench import synthetic_expert
    from moe.inference import IndexSettings
    from moe.serving import Server

    root = prepare_store(tenants, rank)
    store = ExpertStore(root)
    trunk = TrunkVersions(root).current() or store.meta(store.tenants()[0]).trunk_fingerprint
    start = time.perf_counter()
    server = Server(root, verify="lazy", index=IndexSettings())
    first = time.perf_counter() - start
    start = time.perf_counter()
    server.source.build()  # a fresh build of the same generation: what a whole rebuild costs
    rebuild = time.perf_counter() - start
    grown, sleeper, updated = "follow_grown", store.tenants()[1], store.tenants()[2]
    version = store.latest(updated)
    writes = [
        ("grow", lambda: store.save(*synthetic_expert(grown, rank, 7, trunk), new_tenant=True)),
        ("hibernate", lambda: store.hibernate(sleeper)),
        ("update", lambda: store.save(*synthetic_expert(updated, rank, 8, trunk), allow_dormant=False)),
        ("rollback", lambda: store.rollback(updated, version)),
        ("wake", lambda: store.wake(sleeper)),
        ("delete", lambda: store.delete(grown)),
    ]
    steps = []
    collecting = GarbageCollections()
    for op, write in writes:
        start, collected = time.perf_counter(), collecting.seconds
        write()
        written, collected = time.perf_counter(), collecting.seconds - collected
        assert server.refresh(), f"{op}: no new generation to move to"
        steps.append({"op": op, "write_s": written - start, "follow_s": time.perf_counter() - written})
        steps[-1]["write_gc_s"] = collected  # of write_s: the process's garbage collections during the write
        steps[-1] |= {"generation": server.generation, "index_masked_share": server.model.index.masked_share}
        print(json.dumps(steps[-1]), flush=True)
    return {
        "tenants": len(server.tenants),
        "first_build_s": first,
        "fresh_build_s": rebuild,
        "writes": steps,
        "worst_follow_s": max(s["follow_s"] for s in steps),
        "store": str(root),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.01, help="expert budget, as a share of all tenants' bytes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--store", default=None, help="default: the user cache")
    parser.add_argument("--pathway", type=int, default=0, help="this many pathway experts on a moto S3 server")
    parser.add_argument("--store-options", type=json.loads, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/registration.json"))
    parser.add_argument("--follow", action="store_true", help="a replica following a store through writes")
    parser.add_argument("--small", type=int, default=10, help="--follow: the same writes into a store this small")
    parser.add_argument("--child", choices=["full", "lazy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        report = {"benchmark": "follow", "machine": machine_info(), "settings": vars(args) | {"out": str(args.out)}}
        report |= follow(args.tenants, args.rank)
        small = follow(args.small, args.rank)  # the same writes into a small store, in the same run
        report["small_store"] = small
        report["write_s_over_small"] = {  # garbage collections left out: they follow the process, not the store
            big["op"]: (big["write_s"] - big["write_gc_s"]) / (little["write_s"] - little["write_gc_s"])
            for big, little in zip(report["writes"], small["writes"], strict=True)
        }
        report["machine_after"] = {"load_average": os.getloadavg()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        fresh, worst = report["fresh_build_s"], report["worst_follow_s"]
        print(f"wrote {args.out}: fresh build {fresh:.1f} s, worst follow {worst:.2f} s")
        return
    if args.child and args.store_options is not None:  # a --pathway mode's child
        print(json.dumps(measure_remote(args.store, args.store_options, args.child)))
        return
    if args.pathway:
        report = {"benchmark": "registration, pathway experts on S3", "machine": machine_info()}
        report |= pathway_registration(args.pathway)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        speedup, ratio = report["lazy_speedup"], report["lazy_wire_ratio"]
        print(f"wrote {args.out}: lazy {speedup:.1f}x faster, {ratio:.4f}x the bytes")
        return
    store_dir = Path(args.store) if args.store else cache_dir() / "bench" / f"registration_{args.tenants}_r{args.rank}"
    if args.child:
        print(json.dumps(measure(store_dir, args.child, args.budget, args.queries)))
        return
    if len(ExpertStore(store_dir).tenants()) != args.tenants:  # not written yet, or left half written
        shutil.rmtree(store_dir, ignore_errors=True)
        write_store(store_dir, args.tenants, args.rank)
    results = {}
    for verify in ("lazy", "full"):  # each in a fresh process: resident memory is its own
        command = [sys.executable, __file__, "--child", verify, "--store", str(store_dir)]
        command += ["--tenants", str(args.tenants), "--budget", str(args.budget), "--queries", str(args.queries)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[verify] = json.loads(done.stdout.strip().splitlines()[-1])
        print(verify, results[verify], flush=True)
    lazy, full = results["lazy"], results["full"]
    report = {
        "benchmark": "registration",
        "machine": machine_info(),
        "settings": {"tenants": args.tenants, "labels": LABELS, "dim": DIM, "rank": args.rank, "budget": args.budget},
        "results": results,
        "lazy_speedup": full["registration_s"] / lazy["registration_s"],
        "lazy_read_ratio": lazy["bytes_read"] / full["bytes_read"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    speedup, ratio = report["lazy_speedup"], report["lazy_read_ratio"]
    print(f"wrote {args.out}: lazy registration {speedup:.1f}x faster, reading {ratio:.3f}x the bytes")


if __name__ == "__main__":
    main()
