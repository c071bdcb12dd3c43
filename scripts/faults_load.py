"""Load test: one damaged expert among `--tenants` (10,000 by default); every request for another tenant is answered,
each answer equal to the offline one, in mixed batches as the HTTP service forms them (`Server.predict_each`, what a
replica's `@serve.batch` calls), and the damaged tenant's requests alone are refused.

    PYTHONPATH=. python scripts/faults_load.py --tenants 10000 --out scripts/results/faults/load.json

A synthetic store (`moe.experiments.bench.write_store`, adapter rank 1 in bfloat16) on a tiny trunk of the bench's
width; served with `verify="lazy"` (thousands of tenants) under a small device budget, so that experts are paged in
and out, and the damaged one (its last tensor byte flipped after the server started) is found at its first page-in.
The offline answers come from a server over the same store before the damage, one query at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def close(answer: dict, expected: dict) -> bool:
    """Equal, the scores to float32 rounding (batch composition changes the order of a sum)."""
    if {k: v for k, v in answer.items() if k not in ("score", "runners_up")} != {
        k: v for k, v in expected.items() if k not in ("score", "runners_up")
    }:
        return False
    return abs(answer["score"] - expected["score"]) <= 1e-5 + 1e-5 * abs(expected["score"])


def run(folder: Path, tenants: int, requests: int, batch: int, seed: int) -> dict:
    from moe.experiments.bench import DIM, write_store
    from moe.serving import Server
    from moe.serving.runtime import ExpertUnavailable
    from moe.trunk import TinyTrunk

    trunk = TinyTrunk(dim=DIM, freeze=True)
    started = time.perf_counter()
    fsync, os.fsync = os.fsync, lambda fd: None  # a scratch store: its writes need not survive a power cut
    try:
        store = write_store(folder / "store", tenants, rank=1, dtype="bfloat16", trunk_fingerprint=trunk.fingerprint)
    finally:
        os.fsync = fsync
    store.rescan("written")  # written around the store's own writers: one generation for all
    written = time.perf_counter() - started
    rng = random.Random(seed)
    names = store.tenants()
    damaged = names[rng.randrange(len(names))]
    words = ["balance", "transfer", "jazz", "rain", "alarm", "flight", "card", "pizza", "timer", "weather"]
    queries = [(" ".join(rng.choices(words, k=4)), rng.choice(names)) for _ in range(requests)]
    queries[:: max(1, requests // 50)] = [(text, damaged) for text, _ in queries[:: max(1, requests // 50)]]
    budget = 64 << 20
    offline = Server(store.root, budget, verify="lazy", trunk=trunk)
    expected = {i: offline.predict([t], tenant=n)[0].to_dict() for i, (t, n) in enumerate(queries) if n != damaged}
    del offline
    path = store.path(damaged, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/faults/load.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        result = run(Path(scratch), args.tenants, args.requests, args.batch, args.seed)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["other_answered"] == result["other_equal_to_offline"] == result["other_requests"]
    return 0 if ok and result["damaged_refused"] == result["damaged_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
