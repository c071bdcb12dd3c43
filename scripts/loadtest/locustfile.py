"""Locust users of the moe HTTP service: tenant-given queries, tenants drawn from a Zipf law over every tenant the
service holds (the seasonal many-tenant mix), each request sending the multiplexing header of its tenant.

    locust -f scripts/loadtest/locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8000
Environment: MOE_LOAD_ZIPF (exponent, default 1.1), MOE_LOAD_ROUTED (share of queries without a tenant, default 0),
MOE_LOAD_KEY (an admin API key, for a service started with --keys-file), MOE_LOAD_HEADER (0: no multiplexing
header, default 1).
`scripts/bench_load.py` runs it against one replica and two, and writes the figures.
"""

from __future__ import annotations

import os
import random
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
HEADER = os.environ.get("MOE_LOAD_HEADER", "1") != "0"


@events.test_start.add_listener
def tenants_of_the_service(environment, **_) -> None:
    """The service's tenants, from its health route, ranked by a fixed shuffle; their Zipf weights."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{environment.host}/tenants", headers=AUTH)
    with urllib.request.urlopen(request, timeout=60) as answer:
        tenants = json.load(answer)["tenants"]
    random.Random(0).shuffle(tenants)
    s = float(os.environ.get("MOE_LOAD_ZIPF", "1.1"))
    CHOICES["tenants"], CHOICES["cumulative"] = tenants, list(accumulate(1 / (i + 1) ** s for i in range(len(tenants))))


class TenantUser(FastHttpUser):
    routed = float(os.environ.get("MOE_LOAD_ROUTED", "0"))

    @task
    def predict(self) -> None:
        tenant = random.choices(CHOICES["tenants"], cum_weights=CHOICES["cumulative"])[0]
        if random.random() < self.routed:
            self.client.post("/predict", json={"text": random.choice(TEXTS)}, headers=AUTH, name="/predict routed")
            return
        body = {"text": random.choice(TEXTS), "tenant": tenant}
        headers = AUTH | ({"serve_multiplexed_model_id": tenant} if HEADER else {})
        self.client.post("/predict", json=body, headers=headers, name="/predict")
