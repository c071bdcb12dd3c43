"""Locust users of the moe HTTP service: tenant-given queries, tenants drawn from a Zipf law over every tenant the
service holds (the seasonal many-tenant mix), each request sending the multiplexing header of its tenant.

    locust -f scripts/loadtest/locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8000
Environment: MOE_LOAD_ZIPF (exponent, default 1.1), MOE_LOAD_ROUTED (share of queries without a tenant, default 0),
MOE_LOAD_KEY (an admin API key, for a service started with --keys-file), MOE_LOAD_HEADER (the header naming a
request's tenant: 1 or multiplex, the multiplexing header, the default; hash: x-session-id, for a service started with
`--router hash`; 0 or none: no header), MOE_LOAD_QUERIES (queries per request, default 1: more are sent as
{"queries": [...]}, each with its own Zipf-drawn tenant, and without a header).
While the store learns: MOE_LOAD_WATCH (tenants, comma-separated, asked for besides the mix, in MOE_LOAD_WATCH_SHARE
of the requests, default 0.1, whether served yet or not: their 404s are recorded, not failed) and MOE_LOAD_RECORD (a
folder: every watched answer and a MOE_LOAD_SAMPLE share of the others, default 0.02, are written there as JSON
lines with the generation that answered them, the `x-moe-generation` header).
`scripts/bench_load.py` runs it against one replica and two, and writes the figures.
"""

from __future__ import annotations

import json
import os
import random
import time
from itertools import accumulate

from locust import FastHttpUser, events, task

TEXTS = [
    "what is my balance",
    "play some jazz",
    "will it rain tomorrow",
    "wake me at seven",
    "transfer fifty dollars to savings",
    "book a table for two tonight",
    "how long is the drive to the airport",
    "what is the exchange rate for euros",
]
CHOICES: dict[str, list] = {}
KEY = os.environ.get("MOE_LOAD_KEY")
AUTH = {"authorization": f"Bearer {KEY}"} if KEY else {}
HEADER = {"1": "serve_multiplexed_model_id", "multiplex": "serve_multiplexed_model_id", "hash": "x-session-id"}.get(
    os.environ.get("MOE_LOAD_HEADER", "1")
)
QUERIES = int(os.environ.get("MOE_LOAD_QUERIES", "1"))
WATCH = [t for t in os.environ.get("MOE_LOAD_WATCH", "").split(",") if t]
WATCH_SHARE = float(os.environ.get("MOE_LOAD_WATCH_SHARE", "0.1"))
SAMPLE = float(os.environ.get("MOE_LOAD_SAMPLE", "0.02"))
RECORD = os.environ.get("MOE_LOAD_RECORD")
_log = {}


def record(entry: dict) -> None:
    if "file" not in _log:
        _log["file"] = open(os.path.join(RECORD, f"answers_{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    _log["file"].write(json.dumps(entry) + "\n")


@events.test_start.add_listener
def tenants_of_the_service(environment, **_) -> None:
    """The service's tenants, from its health route, ranked by a fixed shuffle; their Zipf weights."""
    import urllib.request

    request = urllib.request.Request(f"{environment.host}/tenants", headers=AUTH)
    with urllib.request.urlopen(request, timeout=60) as answer:
        tenants = [t for t in json.load(answer)["tenants"] if t not in WATCH]
    random.Random(0).shuffle(tenants)
    s = float(os.environ.get("MOE_LOAD_ZIPF", "1.1"))
    CHOICES["tenants"], CHOICES["cumulative"] = tenants, list(accumulate(1 / (i + 1) ** s for i in range(len(tenants))))


class TenantUser(FastHttpUser):
    routed = float(os.environ.get("MOE_LOAD_ROUTED", "0"))

    def draw(self) -> str:
        return random.choices(CHOICES["tenants"], cum_weights=CHOICES["cumulative"])[0]

    @task
    def predict(self) -> None:
        if WATCH and random.random() < WATCH_SHARE:
            self.ask([(random.choice(TEXTS), random.choice(WATCH))], watched=True)
        elif random.random() < self.routed:
            self.client.post("/predict", json={"text": random.choice(TEXTS)}, headers=AUTH, name="/predict routed")
        else:
            self.ask([(random.choice(TEXTS), self.draw()) for _ in range(QUERIES)])

    def ask(self, queries: list[tuple[str, str]], watched: bool = False) -> None:
        """One request for `queries` (text, tenant); a watched tenant's 404 is recorded, not failed."""
        if len(queries) == 1:
            (text, tenant), name = queries[0], "/predict watched" if watched else "/predict"
            body: dict = {"text": text, "tenant": tenant}
            headers = AUTH | ({HEADER: tenant} if HEADER and not watched else {})
        else:
            body, headers = {"queries": [{"text": t, "tenant": n} for t, n in queries]}, AUTH
            name = f"/predict x{len(queries)}"
        sent = time.time()
        with self.client.post("/predict", json=body, headers=headers, name=name, catch_response=True) as response:
            if response.status_code == 404 and watched:
                response.success()
            if not RECORD or not (watched or random.random() < SAMPLE):
                return
            generation = response.headers.get("x-moe-generation")
            if response.status_code == 200:
                answers = [response.json()] if len(queries) == 1 else response.json()["answers"]
            else:
                answers = [None] * len(queries)
            for (text, tenant), answer in zip(queries, answers, strict=True):
                entry = {"sent": sent, "status": response.status_code, "generation": generation}
                record(entry | {"text": text, "tenant": tenant, "watched": watched, "answer": answer})
