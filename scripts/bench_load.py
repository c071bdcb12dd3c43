"""Benchmark: a load test of the HTTP service (`python -m moe.serving.http`) on localhost, one replica against two,
side by side in one run: locust users sending tenant-given queries, tenants drawn from a Zipf law over 10,000
tenants, each replica's expert budget 1 % of them.

    python scripts/bench_load.py --out scripts/results/load/load.json
    python scripts/bench_load.py --tenants 1000 --seconds 20 --out outputs/benchmarks/load_1k.json

The bundle is built once into the user cache: `--tenants` synthetic experts (a CLINC150 domain's shape, adapter
rank `--rank`) on the real trunk (all-MiniLM-L6-v2), exported by `scripts/export.py` with nothing measured. Each run
starts the service (`--verify lazy`: thousands of tenants), waits for it, runs locust headless for `--seconds` with
`--users` users (bounded in time; its own first `--warmup` seconds left out of nothing: the figures are the whole
run's), then reads every replica's `/stats` (device-tier hits and misses) and stops the service. Throughput, p50 and
p99 latency and the error count are locust's; the device-tier hit rate pools the replicas' pagers.

`--compare-batching`: instead, one replica twice under the same load, its batches split by the multiplexing header
(as Serve splits them: one batch per tenant, the service before issue 27) and mixed (every tenant's queries in one
forward, `moe.serving.http.mixed_batches`), with throughput, p50, p99, mean queries per batch and the share of
batches holding several tenants; beside them `Server.predict` at batch 64 on the same bundle and mix, in-process.

    python scripts/bench_load.py --compare-batching --tenants 1000 --seconds 30 --out scripts/results/load/batching.json
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from moe.experiments.bench import LABELS, machine_info, write_store
from moe.paths import cache_dir
from moe.store import ExpertStore, TrunkVersions, tensor_bytes
from moe.trunk import HFEncoderTrunk

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "scripts" / "loadtest" / "locustfile.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_bundle(tenants: int, rank: int) -> Path:
    """A bundle of `tenants` synthetic experts on the MiniLM trunk, built once into the user cache."""
    root = cache_dir() / "bench" / f"load_{tenants}_r{rank}"
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    trunk = HFEncoderTrunk()
    store = root / "experts"
    if len(ExpertStore(store).tenants()) != tenants:
        subprocess.run(["rm", "-rf", str(root)], check=True)
        write_store(store, tenants, rank, trunk_fingerprint=trunk.fingerprint)
    command = [sys.executable, str(ROOT / "scripts" / "export.py"), f"store_dir={store}", "trunk=minilm"]
    command += ["export.measure=false", f"paths.output_dir={bundle}", f"hydra.run.dir={root / 'hydra'}"]
    subprocess.run(command, check=True)
    return bundle


def prepare_store(tenants: int, rank: int) -> Path:
    """An expert store of `tenants` synthetic experts on the MiniLM trunk (recorded in it, so a replica rebuilds it),
    with its first generation published, built once into the user cache. A service follows it."""
    root = cache_dir() / "bench" / f"store_{tenants}_r{rank}"
    store = ExpertStore(root)
    if store.generation() and (root / ".ready").is_file():
        return root
    subprocess.run(["rm", "-rf", str(root)], check=True)
    trunk = HFEncoderTrunk()
    write_store(root, tenants, rank, trunk_fingerprint=trunk.fingerprint)
    TrunkVersions(root).record(trunk)
    store.rescan()
    (root / ".ready").write_text("")
    return root


def get(url: str) -> tuple[dict, str]:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return json.load(answer), answer.headers.get("x-moe-replica", "")


def wait_for(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode} before it answered")
        try:
            get(url)
            return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def replica_stats(url: str, replicas: int, tries: int = 200) -> dict[str, dict]:
    """`/stats` of every replica (each request lands on one; asked until all have answered)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        stats, replica = get(f"{url}/stats")
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            break
    return seen


def aggregated(csv_prefix: Path) -> dict:
    """Locust's aggregated row: requests, failures, throughput, p50 and p99 (ms)."""
    with open(f"{csv_prefix}_stats.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "requests_per_s": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]),
        "p99_ms": float(row["99%"]),
        "mean_ms": float(row["Average Response Time"]),
    }


def run(
    bundle: Path,
    replicas: int,
    budget_mb: float,
    args: argparse.Namespace,
    work: Path,
    extra: tuple[str, ...] = (),
    header: bool = True,
) -> dict:
    """One service under locust; `extra`: the service's further options; `header`: users send the multiplexing
    header."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moe.serving.http", str(bundle), "--port", str(port), "--verify", "lazy"]
    command += ["--replicas", str(replicas), "--budget-mb", str(budget_mb), "--num-cpus", str(os.cpu_count())]
    command += ["--replica-cpus", str(args.replica_cpus), "--metrics-port", str(free_port()), *extra]
    name = f"{replicas}{''.join(extra)}{'' if header else '-noheader'}"
    with open(work / f"service_{name}.log", "w") as log:
        service = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.perf_counter()
        wait_for(f"{url}/health", service)
        startup = time.perf_counter() - started
        time.sleep(5)  # every replica up (the health route answers from the first)
        prefix = work / f"locust_{name}"
        locust = ["locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users), "-r", str(args.users)]
        locust += ["-t", f"{args.seconds}s", "--host", url, "--csv", str(prefix), "--only-summary"]
        env = os.environ | {"MOE_LOAD_ZIPF": str(args.zipf), "MOE_LOAD_ROUTED": str(args.routed)}
        env |= {"MOE_LOAD_HEADER": "1" if header else "0"}
        subprocess.run(locust, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stats = replica_stats(url, replicas)
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
    answered = list(stats.values())
    device = [s["pager"]["device"] for s in answered]
    hits, misses = sum(d["hits"] for d in device), sum(d["misses"] for d in device)
    return {
        "replicas": replicas,
        "startup_s": startup,
        **aggregated(prefix),
        "device_hit_rate": hits / (hits + misses) if hits + misses else None,
        "device_hits": hits,
        "device_misses": misses,
        "replicas_seen": len(stats),
        "tenant_loads": sum(s["multiplexing"]["tenant_loads"] for s in stats.values()),
        "mean_batch": [s["batching"]["mean_batch"] for s in stats.values()],
        "mixed_batch_share": [s["batching"]["mixed_batches"] / max(1, s["batching"]["batches"]) for s in answered],
    }


def offline(bundle: Path, budget_mb: float, args: argparse.Namespace, batch: int = 64, batches: int = 20) -> dict:
    """`Server.predict` in this process at batch `batch`, on the locust users' texts and Zipf mix of tenants, under the
    replica's device budget."""
    import random
    from itertools import accumulate

    from moe.serving import Server

    module = ast.parse(LOCUSTFILE.read_text())  # the users' own texts, without importing locust (gevent's patches)
    texts = next(
        ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign) and n.targets[0].id == "TEXTS"
    )
    server = Server(bundle, int(budget_mb * 2**20), verify="lazy")
    tenants = server.tenants
    random.Random(0).shuffle(tenants)
    weights = list(accumulate(1 / (i + 1) ** args.zipf for i in range(len(tenants))))
    rng = random.Random(1)
    chunks = [
        ([rng.choice(texts) for _ in range(batch)], rng.choices(tenants, cum_weights=weights, k=batch))
        for _ in range(batches + 1)
    ]
    for i in range(0, len(tenants), batch):  # warm-up: every shard verified at its first page-in, as in the service
        server.predict([texts[0]] * len(tenants[i : i + batch]), tenants[i : i + batch])
    server.predict(*chunks[0])
    started = time.perf_counter()
    for queries, names in chunks[1:]:
        server.predict(queries, names)
    return {"batch": batch, "queries_per_s": batch * batches / (time.perf_counter() - started)}


def compare_batching(bundle: Path, budget_mb: float, args: argparse.Namespace, work: Path) -> dict:
    """One replica, the same load: batches split by tenant (before), mixed, and mixed without the multiplexing
    header (no tenant loaded per request: what affinity costs where there is nothing to route)."""
    split = run(bundle, 1, budget_mb, args, work, ("--split-batches",))
    print(json.dumps({"split": split}), flush=True)
    mixed = run(bundle, 1, budget_mb, args, work)
    print(json.dumps({"mixed": mixed}), flush=True)
    plain = run(bundle, 1, budget_mb, args, work, header=False)
    print(json.dumps({"mixed_no_header": plain}), flush=True)
    server = offline(bundle, budget_mb, args)
    return {
        "split_by_tenant": split,
        "mixed": mixed,
        "mixed_no_header": plain,
        "server_predict_batch64": server,
        "mixed_over_split_throughput": mixed["requests_per_s"] / split["requests_per_s"],
        "no_header_over_split_throughput": plain["requests_per_s"] / split["requests_per_s"],
        "best_over_server_predict": max(mixed["requests_per_s"], plain["requests_per_s"]) / server["queries_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.01, help="each replica's expert budget, share of tenants")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--routed", type=float, default=0.0, help="share of queries sent without a tenant")
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--compare-batching", action="store_true", help="one replica: split batches against mixed")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/load.json"))
    args = parser.parse_args()
    bundle = prepare_bundle(args.tenants, args.rank)
    meta = ExpertStore(bundle / "experts").meta(ExpertStore(bundle / "experts").tenants()[0])
    expert_bytes = tensor_bytes(meta, ("down.weight", "down.bias", "up.weight", "head.weight", "head.bias"))
    budget_mb = args.budget * args.tenants * expert_bytes / 2**20
    settings = vars(args) | {"out": str(args.out), "labels": LABELS, "expert_bytes": expert_bytes}
    settings |= {"budget_mb": budget_mb, "bundle": str(bundle)}
    with tempfile.TemporaryDirectory() as work:
        if args.compare_batching:
            compared = compare_batching(bundle, budget_mb, args, Path(work))
            report = {"benchmark": "batching", "machine": machine_info(), "settings": settings} | compared
        else:
            results = []
            for replicas in (1, 2):
                results.append(run(bundle, replicas, budget_mb, args, Path(work)))
                print(json.dumps(results[-1]), flush=True)
            report = {"benchmark": "load", "machine": machine_info(), "settings": settings, "results": results}
            report["two_over_one_throughput"] = results[1]["requests_per_s"] / results[0]["requests_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
