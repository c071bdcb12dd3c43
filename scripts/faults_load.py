"""Load test: one damaged expert among `--tenants` (10,000 by default); every request for another tenant is answered,
each answer equal to the offline one, in mixed batches as the HTTP service forms them (`Server.predict_each`, what a
replica's `@serve.batch` calls), and the damaged tenant's requests alone are refused.

    PYTHONPATH=. python scripts/faults_load.py --tenants 10000 --out scripts/results/faults/load.json

A synthetic store (`moe.experiments.bench.write_store`, adapter rank 1 in bfloat16) on a tiny trunk of the bench's
width; served with `verify="lazy"` (thousands of tenants) under a small device budget, so that experts are paged in
and out, and the damaged one (its last tensor byte flipped after the server started) is found at its first page-in.
The offline answers come from a server over the same store before the damage, one query at a time.

`--http`: the same check over real HTTP. The store (its tiny trunk recorded in it) is served by the service
(`python -m moe.serving.http STORE --verify lazy`, Ray Serve, one replica), the shard is damaged once the service
answers `/health`, and `--clients` concurrent clients send the queries one per request (the tenant in the body, so
that `@serve.batch` mixes tenants in its batches); the offline answers come from a `Server` with the service's own
settings. Written: the answered-200 and equal-to-offline counts for the other tenants, the damaged tenant's status
codes (and whether its refusals name it alone), `/health` and `/stats` afterwards, and the sizes.

    PYTHONPATH=. python scripts/faults_load.py --http --out scripts/results/faults/load_http.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def close(answer: dict, expected: dict) -> bool:
    """Equal, the scores to float32 rounding (batch composition changes the order of a sum)."""
    if {k: v for k, v in answer.items() if k not in ("score", "runners_up")} != {
        k: v for k, v in expected.items() if k not in ("score", "runners_up")
    }:
        return False
    return abs(answer["score"] - expected["score"]) <= 1e-5 + 1e-5 * abs(expected["score"])


def build(folder: Path, tenants: int):
    """`folder/store`: `tenants` synthetic experts on the tiny trunk (recorded in the store, so that a service
    rebuilds it), one generation for all; the store, the trunk and the seconds it took."""
    from moe.experiments.bench import DIM, write_store
    from moe.store import TrunkVersions
    from moe.trunk import TinyTrunk

    trunk = TinyTrunk(dim=DIM, freeze=True)
    started = time.perf_counter()
    fsync, os.fsync = os.fsync, lambda fd: None  # a scratch store: its writes need not survive a power cut
    try:
        store = write_store(folder / "store", tenants, rank=1, dtype="bfloat16", trunk_fingerprint=trunk.fingerprint)
        TrunkVersions(store.root).record(trunk)
    finally:
        os.fsync = fsync
    store.rescan("written")  # written around the store's own writers: one generation for all
    return store, trunk, time.perf_counter() - started


def workload(names: list[str], requests: int, seed: int) -> tuple[str, list[tuple[str, str]]]:
    """The damaged tenant (drawn) and `requests` (text, tenant) queries, one in 40 for the damaged tenant."""
    rng = random.Random(seed)
    damaged = names[rng.randrange(len(names))]
    words = ["balance", "transfer", "jazz", "rain", "alarm", "flight", "card", "pizza", "timer", "weather"]
    queries = [(" ".join(rng.choices(words, k=4)), rng.choice(names)) for _ in range(requests)]
    queries[:: max(1, requests // 50)] = [(text, damaged) for text, _ in queries[:: max(1, requests // 50)]]
    return damaged, queries


def damage(path: Path) -> None:
    """Flip the last byte of the file (a tensor's last byte: finite, but not the one saved)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def run(folder: Path, tenants: int, requests: int, batch: int, seed: int) -> dict:
    from moe.serving import Server
    from moe.serving.runtime import ExpertUnavailable

    store, trunk, written = build(folder, tenants)
    damaged, queries = workload(store.tenants(), requests, seed)
    budget = 64 << 20
    offline = Server(store.root, budget, verify="lazy", trunk=trunk)
    expected = {i: offline.predict([t], tenant=n)[0].to_dict() for i, (t, n) in enumerate(queries) if n != damaged}
    del offline
    damage(store.path(damaged, 1))
    server = Server(store.root, budget, verify="lazy", trunk=trunk)  # opens: headers and routing rows only
    started = time.perf_counter()
    answered = equal = refused = other_failures = 0
    for start in range(0, len(queries), batch):
        chunk = [(t, n, None, server.state) for t, n in queries[start : start + batch]]
        for i, answer in enumerate(server.predict_each(chunk), start=start):
            if queries[i][1] == damaged:
                refused += isinstance(answer, ExpertUnavailable)
            elif isinstance(answer, ExpertUnavailable):
                other_failures += 1
            else:
                answered += 1
                equal += close(answer.to_dict(), expected[i])
    others = sum(1 for _, n in queries if n != damaged)
    return {
        "tenants": tenants,
        "requests": requests,
        "batch": batch,
        "damaged_tenant": damaged,
        "damaged_requests": requests - others,
        "damaged_refused": refused,
        "other_requests": others,
        "other_answered": answered,
        "other_equal_to_offline": equal,
        "other_failures": other_failures,
        "damaged_reported": sorted(server.damaged()),
        "seconds": {"write_store": round(written, 1), "serve": round(time.perf_counter() - started, 1)},
    }


def same(answer: dict, expected: dict) -> bool:
    """`close`, and the runners-up the same tenants with the same gate probabilities (to float32 rounding)."""
    runners = [(r["tenant"], r["gate_prob"]) for r in answer["runners_up"]]
    wanted = [(r["tenant"], r["gate_prob"]) for r in expected["runners_up"]]
    return (
        close(answer, expected)
        and [t for t, _ in runners] == [t for t, _ in wanted]
        and all(abs(p - q) <= 1e-6 + 1e-6 * abs(q) for (_, p), (_, q) in zip(runners, wanted, strict=True))
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, decoded JSON) of a GET (no body) or a JSON POST; a body that is no JSON (Serve's proxy while the app
    starts) as {"text": ...}."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def wait_for(url: str, service: subprocess.Popen, log: Path, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"the service exited with {service.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if call(url)[0] == 200:
                return
        time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


def run_http(folder: Path, tenants: int, requests: int, clients: int, seed: int, budget_mb: float) -> dict:
    from moe.experiments.bench import DIM
    from moe.serving import Server
    from moe.serving.http import ServiceSettings

    store, trunk, written = build(folder, tenants)
    damaged, queries = workload(store.tenants(), requests, seed)
    batching = {"max_batch_size": 64, "batch_wait_ms": 20.0}
    settings = ServiceSettings(bundle=str(store.root), budget_mb=budget_mb, verify="lazy", **batching)
    options = {k: v for k, v in settings.server_options().items() if k != "follow_s"}
    started = time.perf_counter()
    offline = Server(store.root, int(budget_mb * 2**20), verify="lazy", trunk=trunk, **options)
    expected = {i: offline.predict([t], tenant=n)[0].to_dict() for i, (t, n) in enumerate(queries) if n != damaged}
    del offline
    offline_s = time.perf_counter() - started
    port, log = free_port(), folder / "service.log"
    command = [sys.executable, "-m", "moe.serving.http", str(store.root), "--port", str(port), "--verify", "lazy"]
    command += ["--replicas", "1", "--num-cpus", "2", "--budget-mb", str(budget_mb), "--no-metrics"]
    command += ["--max-batch-size", str(batching["max_batch_size"]), "--batch-wait-ms", str(batching["batch_wait_ms"])]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as handle:
        service = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.perf_counter()
        wait_for(f"{url}/health", service, log)
        startup_s = time.perf_counter() - started
        damage(store.path(damaged, 1))  # after the start: found at its first page-in

        def ask(i: int) -> tuple[int, int, dict]:
            text, tenant = queries[i]
            return i, *call(f"{url}/predict", {"text": text, "tenant": tenant})

        load_before, started = os.getloadavg(), time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, range(len(queries))))
        load_s, load_after = time.perf_counter() - started, os.getloadavg()
        health, stats = call(f"{url}/health")[1], call(f"{url}/stats")[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
    other_status, damaged_status, answered, equal, names_own_only, unequal = Counter(), Counter(), 0, 0, 0, []
    for i, status, body in results:
        if queries[i][1] == damaged:
            damaged_status[status] += 1
            names_own_only += set(re.findall(r"t\d{5}", json.dumps(body))) == {damaged}
            continue
        other_status[status] += 1
        if status == 200:
            answered += 1
            if same(body, expected[i]):
                equal += 1
            elif len(unequal) < 3:
                unequal.append({"query": queries[i], "answer": body, "offline": expected[i]})
    others = sum(other_status.values())
    return {
        "mode": "http",
        "size": {
            "tenants": tenants,
            "expert": f"synthetic adapters of rank 1 on {DIM} features in bfloat16 (moe.experiments.bench.write_store)",
            "trunk": f"tiny (dim {DIM})",
            "requests": requests,
            "clients": clients,
            "queries_per_request": 1,
            "replicas": 1,
            "budget_mb": budget_mb,
            "verify": "lazy",
            **batching,
        },
        "damaged_tenant": damaged,
        "damaged_requests": requests - others,
        "damaged_status": {str(k): v for k, v in sorted(damaged_status.items())},
        "damaged_refusals_name_it_alone": names_own_only,
        "other_requests": others,
        "other_status": {str(k): v for k, v in sorted(other_status.items())},
        "other_answered_200": answered,
        "other_equal_to_offline": equal,
        "unequal_examples": unequal,
        "health_after": {k: health.get(k) for k in ("status", "damaged_tenants")},
        "stats_damaged": sorted(stats.get("damaged", {})),
        "batching": {k: stats.get("batching", {}).get(k) for k in ("batches", "mean_batch", "mixed_batches")},
        "seconds": {
            "write_store": round(written, 1),
            "offline_answers": round(offline_s, 1),
            "service_start": round(startup_s, 1),
            "load": round(load_s, 1),
        },
        "requests_per_s": round(len(queries) / load_s, 1),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http", action="store_true", help="over HTTP: the service over the store, concurrent clients")
    parser.add_argument("--clients", type=int, default=16, help="--http: concurrent clients")
    parser.add_argument("--budget-mb", type=float, default=64.0, help="--http: the replica's device budget")
    parser.add_argument("--out", type=Path, default=None, help="default: scripts/results/faults/load[_http].json")
    args = parser.parse_args(argv)
    out = args.out or ROOT / f"scripts/results/faults/load{'_http' if args.http else ''}.json"
    with tempfile.TemporaryDirectory() as scratch:
        if args.http:
            result = run_http(Path(scratch), args.tenants, args.requests, args.clients, args.seed, args.budget_mb)
        else:
            result = run(Path(scratch), args.tenants, args.requests, args.batch, args.seed)
    print(json.dumps(result, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.http:
        answered, refused = result["other_equal_to_offline"], result["damaged_status"].get("503", 0)
        return 0 if answered == result["other_requests"] and refused == result["damaged_requests"] else 1
    ok = result["other_answered"] == result["other_equal_to_offline"] == result["other_requests"]
    return 0 if ok and result["damaged_refused"] == result["damaged_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
