"""A damaged expert harms only its own tenant over HTTP (issue 30, cases 1 and 6): a replica starts over a bundle with
one damaged expert (verified in full) and serves every other tenant, saying "degraded" in /health and naming the
damaged one in /stats; an expert damaged after the replica started fails, under 16 concurrent clients, only the
requests for its own tenant (a 503 naming that tenant alone), while every other tenant's request in the same batches is
answered 200 as offline."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from moe.serving import Server
from tests.helpers import flip_last_byte
from tests.service import call, same, serving

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

BROKEN_AT_START, BROKEN_LATER, HEALTHY = "weather", "music", "bank"


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    copy = shutil.copytree(tiny_run.bundle, tmp_path_factory.mktemp("faults_http") / "bundle")
    flip_last_byte(next((copy / "experts" / BROKEN_AT_START).glob("*.safetensors")))
    return copy


@pytest.fixture(scope="module")
def service(bundle):
    """One replica over the damaged bundle (verified in full when it starts), a small device budget, batches that wait
    20 ms for concurrent requests."""
    settings = {"bundle": str(bundle), "batch_wait_ms": 20, "max_batch_size": 32}
    with serving(settings) as url:
        yield url


@pytest.fixture(scope="module")
def texts(tiny_run) -> list[str]:
    lines = (tiny_run.evaluation / "predictions_test.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines][:24]


def test_a_replica_starts_over_a_damaged_expert_and_says_degraded(service, tiny_run, texts):
    status, health = call(f"{service}/health")
    assert status == 200 and health["status"] == "degraded" and health["damaged_tenants"] == 1
    status, stats = call(f"{service}/stats")
    assert status == 200 and list(stats["damaged"]) == [BROKEN_AT_START]
    assert "sha256 mismatch" in stats["damaged"][BROKEN_AT_START]
    status, refused = call(f"{service}/predict", {"text": texts[0], "tenant": BROKEN_AT_START})
    assert status == 503 and BROKEN_AT_START in json.dumps(refused)
    offline = Server(tiny_run.bundle)
    status, answer = call(f"{service}/predict", {"text": texts[0], "tenant": HEALTHY})
    assert status == 200 and same(answer, offline.predict([texts[0]], tenant=HEALTHY)[0].to_dict())


def test_an_expert_damaged_later_fails_only_its_own_tenants_requests_under_16_clients(service, bundle, tiny_run, texts):
    flip_last_byte(next((bundle / "experts" / BROKEN_LATER).glob("*.safetensors")))  # found at its first page-in
    offline = Server(tiny_run.bundle)
    expected = {text: offline.predict([text], tenant=HEALTHY)[0].to_dict() for text in texts}
    queries = [(text, tenant) for text in texts for tenant in (HEALTHY, BROKEN_LATER, None)]

    def ask(query):
        text, tenant = query
        return query, *call(f"{service}/predict", {"text": text} | ({"tenant": tenant} if tenant else {}))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, queries))
    for (text, tenant), status, body in results:
        if tenant == HEALTHY:
            assert status == 200 and same(body, expected[text]), body
        elif tenant == BROKEN_LATER:
            detail = json.dumps(body)
            assert status == 503 and BROKEN_LATER in detail, body
            assert HEALTHY not in detail and BROKEN_AT_START not in detail  # only the caller's own tenant
        else:  # routed: answered by the remaining candidates
            assert status == 200 and body["tenant"] not in (BROKEN_LATER, BROKEN_AT_START), body
    status, stats = call(f"{service}/stats")
    assert sorted(stats["damaged"]) == [BROKEN_LATER, BROKEN_AT_START]
