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

`--batch-waits MS [MS ...]`: instead, one replica at each batch wait, one query a request, no header.

    python scripts/bench_load.py --store --batch-waits 5 15 30 50 100 --seconds 25 --replica-cpus 1 \
        --out scripts/results/load/batch_wait.json

`--compare-batching`: instead, one replica twice under the same load, its batches split by the multiplexing header
(as Serve splits them: one batch per tenant, the service before issue 27) and mixed (every tenant's queries in one
forward, `moe.serving.http.mixed_batches`), with throughput, p50, p99, mean queries per batch and the share of
batches holding several tenants; beside them `Server.predict` at batch 64 on the same bundle and mix, in-process.

    python scripts/bench_load.py --compare-batching --tenants 1000 --seconds 30 --out scripts/results/load/batching.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from moe.experiments.bench import LABELS, machine_info, write_pathway_store, write_store
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
    header: str = "multiplex",
    queries: int = 1,
    env_extra: dict[str, str] | None = None,
    during: Callable[[str], dict] | None = None,
) -> dict:
    """One service under locust; `extra`: the service's further options; `header`: the header naming each request's
    tenant (multiplex, hash: the service runs `--router hash`, none); `queries`: per request; `env_extra`: for the
    locustfile; `during(url)`: run while locust runs (its result under "during")."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moe.serving.http", str(bundle), "--port", str(port), "--verify", "lazy"]
    command += ["--replicas", str(replicas), "--budget-mb", str(budget_mb), "--num-cpus", str(os.cpu_count())]
    command += ["--replica-cpus", str(args.replica_cpus), "--metrics-port", str(free_port()), *extra]
    command += ["--router", "hash"] if header == "hash" else []
    name = f"{replicas}{''.join(e for e in extra if not e.startswith('{'))}-{header}-q{queries}"
    with open(work / f"service_{name}.log", "w") as log:
        service = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.perf_counter()
        try:
            wait_for(f"{url}/health", service)
        except RuntimeError:
            print((work / f"service_{name}.log").read_text()[-3000:], file=sys.stderr)
            raise
        startup = time.perf_counter() - started
        time.sleep(5)  # every replica up (the health route answers from the first)
        prefix = work / f"locust_{name}"
        locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
        locust += ["-u", str(args.users), "-r", str(args.users)]
        locust += ["-t", f"{args.seconds}s", "--host", url, "--csv", str(prefix), "--only-summary"]
        env = os.environ | {"MOE_LOAD_ZIPF": str(args.zipf), "MOE_LOAD_ROUTED": str(args.routed)}
        env |= {"MOE_LOAD_HEADER": header, "MOE_LOAD_QUERIES": str(queries)} | (env_extra or {})
        load = os.getloadavg()
        with open(work / f"locust_{name}.log", "w") as log:
            users = subprocess.Popen(locust, env=env, stdout=log, stderr=subprocess.STDOUT)
        found = during(url) if during is not None else None
        users.wait(timeout=args.seconds + 120)
        stats = replica_stats(url, replicas)
    finally:
        with contextlib.suppress(ProcessLookupError):  # exited already
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
    answered = list(stats.values())
    device = [s["pager"]["device"] for s in answered]
    hits, misses = sum(d["hits"] for d in device), sum(d["misses"] for d in device)
    totals = aggregated(prefix)
    return {
        "replicas": replicas,
        "queries_per_request": queries,
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "startup_s": startup,
        **totals,
        "queries_per_s": totals["requests_per_s"] * queries,
        "device_hit_rate": hits / (hits + misses) if hits + misses else None,
        "device_hits": hits,
        "device_misses": misses,
        "replicas_seen": len(stats),
        "tenant_loads": sum(s["multiplexing"]["tenant_loads"] for s in stats.values()),
        "mean_batch": [s["batching"]["mean_batch"] for s in stats.values()],
        "mixed_batch_share": [s["batching"]["mixed_batches"] / max(1, s["batching"]["batches"]) for s in answered],
        "generation_served": [s["generation"] for s in answered],
    } | ({"during": found} if during is not None else {})


def offline(
    bundle: Path | str, budget_mb: float, args: argparse.Namespace, batch: int = 64, batches: int = 20, **options
) -> dict:
    """`Server.predict` in this process at batch `batch`, on the locust users' texts and Zipf mix of tenants, under the
    replica's device budget."""
    import random
    from itertools import accumulate

    from moe.serving import Server

    texts = locust_texts()
    server = Server(bundle, int(budget_mb * 2**20), verify="lazy", **options)
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


def prepare_pathway_store(tenants: int) -> Path:
    """A local store of `tenants` synthetic pathway experts of the CLINC150 shape on the MiniLM trunk (recorded),
    its first generation published, built once into the user cache: uploaded to the S3 server for `--pathway`."""
    root = cache_dir() / "bench" / f"pathway_{tenants}"
    if (root / ".ready").is_file():
        return root
    subprocess.run(["rm", "-rf", str(root)], check=True)
    trunk = HFEncoderTrunk()
    write_pathway_store(root, tenants, trunk)
    TrunkVersions(root).record(trunk)
    ExpertStore(root).rescan()
    (root / ".ready").write_text("")
    return root


def pathway(args: argparse.Namespace, work: Path) -> dict:
    """The throughput runs on `--pathway` pathway experts in an S3 bucket (a moto server on localhost): each
    replica's local disk a cache of `--disk-budget-mb` and its device budget `--pathway-budget-mb`, both below the
    working set, so that paging moves real bytes (from the bucket to the disk, from the disk to memory)."""
    import fsspec

    from moe.store.remote import _default_cache

    sys.path.insert(0, str(ROOT))  # the tests' moto server (tests/moto_s3.py), from the repository's root
    from tests.moto_s3 import moto_s3

    local = prepare_pathway_store(args.pathway)
    url = "s3://bench/pathway"
    with moto_s3("bench") as options:
        start = time.perf_counter()
        fsspec.filesystem("s3", **options).put(str(local), "bench/pathway", recursive=True)
        uploaded = time.perf_counter() - start
        shutil.rmtree(_default_cache(url, "stores"), ignore_errors=True)  # every run starts with a cold disk cache
        store_options = options | {"cache_budget_bytes": int(args.disk_budget_mb * 2**20)}
        found = throughput(url, args.pathway_budget_mb, args, work, store_options)
        shutil.rmtree(_default_cache(url, "stores"), ignore_errors=True)
    shard = next(local.glob("p*/v0001.safetensors")).stat().st_size
    sizes = {"shard_bytes": shard, "working_set_bytes": shard * args.pathway, "upload_s": uploaded}
    return found | {"store": sizes | {"url": url, "local_copy": str(local)}}


GROWN = "live_grown"  # the tenant grown during the load


def learning(root: Path, budget_mb: float, args: argparse.Namespace, work: Path) -> dict:
    """The load test while the store learns: one replica and two (`--replicas`), each following the store (poll
    1 s) under the Zipf mix; a quarter, half and three quarters into the load a tenant is grown, another hibernated
    and a third rolled back (to the version before the one it had when the load began). Every answer to these three
    and a sample of the others is recorded with the generation that gave it and checked against the offline answer
    of that generation (`Server` in this process, following the same store); 404s are expected only of the grown
    tenant before its generation and of the hibernated one from its generation on."""
    from moe.experiments.bench import synthetic_expert
    from moe.serving import Server

    store = ExpertStore(root)
    fingerprint = store.meta(store.tenants()[0]).trunk_fingerprint
    tenants = store.tenants()
    sleeper, rolled = tenants[3], tenants[5]  # not among the Zipf mix (watched apart)
    if GROWN in tenants:
        store.delete(GROWN)
    if store.is_dormant(sleeper):
        store.wake(sleeper)
    first = store.latest(rolled)
    store.save(*synthetic_expert(rolled, args.rank, int(time.time()), fingerprint), allow_dormant=False)
    reference = Server(root, int(budget_mb * 2**20), verify="lazy")  # the untouched tenants' offline answers
    texts = locust_texts()
    results = []
    for replicas in args.replicas:

        def writes(url: str) -> dict:
            """The three writes on schedule (nothing else done meanwhile: the offline answers come after the load)."""
            done = []
            steps = [
                ("grow", GROWN, lambda: store.save(*synthetic_expert(GROWN, args.rank, 11, fingerprint), True)),
                ("hibernate", sleeper, lambda: store.hibernate(sleeper)),
                ("rollback", rolled, lambda: store.rollback(rolled, first)),
            ]
            begun = time.time()
            for i, (op, tenant, write) in enumerate(steps, 1):
                time.sleep(max(0.0, begun + i * args.seconds / 4 - time.time()))
                write()
                done.append({"op": op, "tenant": tenant, "time": time.time(), "generation": store.generation()})
            return {"writes": done}

        records = work / f"records_{replicas}"
        records.mkdir()
        env = {"MOE_LOAD_WATCH": ",".join([GROWN, sleeper, rolled]), "MOE_LOAD_RECORD": str(records)}
        env |= {"MOE_LOAD_SAMPLE": str(args.sample)}
        result = run(root, replicas, budget_mb, args, work, ("--follow-s", "1"), env_extra=env, during=writes)
        own = OwnAnswers(store, reference.trunk, texts, work / f"own_{replicas}")
        result["checks"] = check_records(records, result["during"]["writes"], own, reference)
        print(json.dumps(result), flush=True)
        results.append(result)
        store.delete(GROWN)  # the store as it was, but for the rolled-back tenant's retired version
        store.wake(sleeper)
        store.save(*synthetic_expert(rolled, args.rank, int(time.time()), fingerprint), allow_dormant=False)
    return {"results": results, "watched": {"grown": GROWN, "hibernated": sleeper, "rolled_back": rolled}}


class OwnAnswers:
    """The offline answer of a tenant at the version a generation names: a `Server` over that one version alone (a
    tenant-given answer depends on the tenant's own expert only: tests/test_exactness.py), copied from the store
    (live or retired) into a folder of its own, on the reference's trunk."""

    def __init__(self, store: ExpertStore, trunk, texts: list[str], folder: Path):
        self.store, self.trunk, self.texts, self.folder = store, trunk, texts, folder
        self.found: dict[tuple[str, int], dict | None] = {}

    def at(self, generation: int, tenant: str) -> dict | None:
        """Each text's answer at `generation` (None: the tenant is not served then)."""
        entry = self.store.generations.state(generation).tenants.get(tenant)
        if entry is None or entry.dormant:
            return None
        key = (tenant, entry.version)
        if key not in self.found:
            from moe.serving import Server

            live, retired = self.store.path(*key), self.store.path(*key, retired=True)
            target = self.folder / f"{tenant}_v{entry.version}" / tenant / live.name  # its own version's name
            target.parent.mkdir(parents=True)
            shutil.copy(live if live.is_file() else retired, target)
            server = Server(target.parent.parent, trunk=self.trunk)
            answers = [a.to_dict() for a in server.predict(self.texts, tenant)]
            self.found[key] = dict(zip(self.texts, answers, strict=True))
        return self.found[key]


def check_records(folder: Path, writes: list[dict], own: OwnAnswers, reference) -> dict:
    """The recorded answers against the offline answers of the generation that gave each (`learning`)."""
    records = [json.loads(line) for path in folder.glob("*.jsonl") for line in path.read_text().splitlines()]
    watched = {w["tenant"]: w for w in writes}
    grown, slept = (next(w for w in writes if w["op"] == op) for op in ("grow", "hibernate"))
    others = sorted({(r["tenant"], r["text"]) for r in records if not r["watched"] and r["status"] == 200})
    found = reference.predict([t for _, t in others], [n for n, _ in others]) if others else []
    untouched = {pair: answer.to_dict() for pair, answer in zip(others, found, strict=True)}
    errors, wrong, expected_404, checked, exact = [], [], 0, 0, 0
    for r in records:
        g = int(r["generation"]) if r["generation"] is not None else None
        if (
            r["status"] == 404
            and g is not None
            and (
                (r["tenant"] == grown["tenant"] and g < grown["generation"])
                or (r["tenant"] == slept["tenant"] and g >= slept["generation"])
            )
        ):
            expected_404 += 1
            continue
        if r["status"] != 200 or g is None:
            errors.append(r)
            continue
        want = (own.at(g, r["tenant"]) or {}).get(r["text"]) if r["watched"] else untouched[r["tenant"], r["text"]]
        checked += 1
        exact += r["answer"] == want
        if not same_answer(r["answer"], want):
            wrong.append({"record": r, "offline": want})
    first_answer = {}
    for tenant, write in watched.items():
        after = [
            r["sent"]
            for r in records
            if r["tenant"] == tenant and r["generation"] is not None and int(r["generation"]) >= write["generation"]
        ]
        first_answer[write["op"]] = min(after) - write["time"] if after else None
    return {
        "records": len(records),
        "answers_checked": checked,
        "answers_bit_exact": exact,
        "answers_wrong": len(wrong),
        "wrong_examples": wrong[:3],
        "errors": len(errors),
        "error_examples": errors[:3],
        "expected_404s": expected_404,
        "generations_seen": sorted({int(r["generation"]) for r in records if r["generation"] is not None}),
        "seconds_from_write_to_first_answer": first_answer,
    }


SCORE_TOLERANCE = 1e-5


def same_answer(got: dict | None, want: dict | None) -> bool:
    """The same answer: tenant, intent, out-of-scope verdict, experts and runners-up alike, scores within
    `SCORE_TOLERANCE` (a batch of other queries computes the trunk's features at other shapes: the last bits of a
    score may differ from the offline batch's; `answers_bit_exact` counts those equal to the bit)."""
    if got is None or want is None:
        return got == want
    plain = ("score", "runners_up")
    if {k: v for k, v in got.items() if k not in plain} != {k: v for k, v in want.items() if k not in plain}:
        return False
    ups = zip(got["runners_up"], want["runners_up"], strict=False)
    return (
        abs(got["score"] - want["score"]) <= SCORE_TOLERANCE
        and len(got["runners_up"]) == len(want["runners_up"])
        and all(a["tenant"] == b["tenant"] and abs(a["gate_prob"] - b["gate_prob"]) <= SCORE_TOLERANCE for a, b in ups)
    )


def locust_texts() -> list[str]:
    """The locust users' texts, without importing locust (gevent's patches)."""
    module = ast.parse(LOCUSTFILE.read_text())
    return next(
        ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign) and n.targets[0].id == "TEXTS"
    )


def compare_batching(bundle: Path, budget_mb: float, args: argparse.Namespace, work: Path) -> dict:
    """One replica, the same load: batches split by tenant (before), mixed, and mixed without the multiplexing
    header (no tenant loaded per request: what affinity costs where there is nothing to route)."""
    split = run(bundle, 1, budget_mb, args, work, ("--split-batches",))
    print(json.dumps({"split": split}), flush=True)
    mixed = run(bundle, 1, budget_mb, args, work)
    print(json.dumps({"mixed": mixed}), flush=True)
    plain = run(bundle, 1, budget_mb, args, work, header="none")
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


def batch_waits(source: Path, budget_mb: float, args: argparse.Namespace, work: Path) -> dict:
    """One replica, one query a request and no header, at each `--batch-waits` (ms): how long a batch waits to fill
    against requests per second and latency, side by side in one run (the service's default was chosen on this)."""
    results = []
    for wait in args.batch_waits:
        results.append(run(source, 1, budget_mb, args, work, ("--batch-wait-ms", str(wait)), header="none"))
        results[-1]["batch_wait_ms"] = wait
        print(json.dumps(results[-1]), flush=True)
    return {"results": results}


def throughput(
    source: Path | str, budget_mb: float, args: argparse.Namespace, work: Path, store_options: dict | None = None
) -> dict:
    """One replica and two (`--replicas`), each at every `--queries` per request, and `Server.predict` at batch 64
    on the same source, budget, mix and machine, in this process after the services stopped."""
    results = []
    extra = ("--store-options", json.dumps(store_options)) if store_options else ()
    for replicas in args.replicas:
        for queries in args.queries:
            # one query a request: its tenant in the multiplexing header (affinity); with `--affinity` and several
            # replicas also hashed to a replica (`--router hash`) and with no header (Serve's default routing), side
            # by side; several queries a request: no header (their tenants differ)
            headers = ("multiplex",) if queries == 1 else ("none",)
            if args.affinity and replicas > 1 and queries == 1:
                headers = ("multiplex", "hash", "none")
            for header in headers:
                results.append(run(source, replicas, budget_mb, args, work, extra, header=header, queries=queries))
                results[-1]["tenant_header"] = header
                print(json.dumps(results[-1]), flush=True)
    load = os.getloadavg()
    options = {"store_options": store_options} if store_options else {}
    server = offline(source, budget_mb, args, **options)
    server |= {"load_average_before": load, "load_average_after": os.getloadavg()}
    for result in results:
        result["queries_over_server_predict"] = result["queries_per_s"] / server["queries_per_s"]
    return {"results": results, "server_predict_batch64": server}


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
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queries", type=int, nargs="+", default=[1], help="queries per request, each measured")
    parser.add_argument("--store", action="store_true", help="serve an expert store (followed), not a bundle")
    parser.add_argument("--learning", action="store_true", help="the store learns during the load (implies --store)")
    parser.add_argument("--sample", type=float, default=0.02, help="--learning: share of other answers checked")
    parser.add_argument("--pathway", type=int, default=0, help="this many pathway experts on a moto S3 server")
    parser.add_argument("--pathway-budget-mb", type=float, default=64.0, help="--pathway: device budget per replica")
    parser.add_argument("--disk-budget-mb", type=float, default=1024.0, help="--pathway: disk cache per replica")
    parser.add_argument("--affinity", action="store_true", help="several replicas: multiplex, hash, no header")
    parser.add_argument("--compare-batching", action="store_true", help="one replica: split batches against mixed")
    parser.add_argument("--batch-waits", type=float, nargs="+", help="one replica at each batch wait (ms), compared")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/load.json"))
    args = parser.parse_args()
    args.store = args.store or args.learning
    if args.pathway:
        settings = vars(args) | {"out": str(args.out)}  # a copy: args.out stays a path
        report = {"benchmark": "load, pathway experts on S3", "machine": machine_info(), "settings": settings}
        with tempfile.TemporaryDirectory() as work:
            report |= pathway(args, Path(work))
        report["load_average_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    source = prepare_store(args.tenants, args.rank) if args.store else prepare_bundle(args.tenants, args.rank)
    experts = ExpertStore(source if args.store else source / "experts")
    meta = experts.meta(experts.tenants()[0])
    expert_bytes = tensor_bytes(meta, ("down.weight", "down.bias", "up.weight", "head.weight", "head.bias"))
    budget_mb = args.budget * args.tenants * expert_bytes / 2**20
    settings = vars(args) | {"out": str(args.out), "labels": LABELS, "expert_bytes": expert_bytes}
    settings |= {"budget_mb": budget_mb, "source": str(source)}
    report = {"machine": machine_info(), "settings": settings}
    with tempfile.TemporaryDirectory() as work:
        if args.compare_batching:
            report |= {"benchmark": "batching"} | compare_batching(source, budget_mb, args, Path(work))
        elif args.batch_waits:
            report |= {"benchmark": "batch wait"} | batch_waits(source, budget_mb, args, Path(work))
        elif args.learning:
            report |= {"benchmark": "learning load"} | learning(source, budget_mb, args, Path(work))
        else:
            report |= {"benchmark": "load"} | throughput(source, budget_mb, args, Path(work))
    report["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
