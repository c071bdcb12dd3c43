"""Issue 30's case 1 alone, for `scripts/faults_old_code.py`: tests/test_faults_http.py starts its service over a
bundle damaged before the start (case 6), which the code before the fix could not start at all, so that its case-1
test never reached its own check there. Here the service starts over an intact bundle (`--verify lazy`'s page-in
check, as the issue ran it), one expert is damaged after the start, and 16 concurrent clients ask it, its healthy
neighbour and routed queries: every request for the healthy tenant is answered 200 as offline, routed ones by
another tenant, the damaged tenant's refused with a 503 naming it alone.

Run with tests/conftest.py as a plugin (its `tiny_run` fixture): `pytest -p tests.conftest <this file>`."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from moe.serving import Server
from tests.helpers import flip_last_byte
from tests.service import call, same, serving

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

BROKEN, HEALTHY = "music", "bank"


@pytest.fixture(scope="module")
def service(tiny_run, tmp_path_factory):
    bundle = shutil.copytree(tiny_run.bundle, tmp_path_factory.mktemp("case1") / "bundle")
    with serving({"bundle": str(bundle), "batch_wait_ms": 20, "max_batch_size": 32, "verify": "lazy"}) as url:
        yield url, bundle


def test_an_expert_damaged_after_the_start_fails_only_its_own_tenants_requests_under_16_clients(service, tiny_run):
    url, bundle = service
    lines = (tiny_run.evaluation / "predictions_test.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines][:24]
    offline = Server(tiny_run.bundle)
    expected = {text: offline.predict([text], tenant=HEALTHY)[0].to_dict() for text in texts}
    flip_last_byte(next((bundle / "experts" / BROKEN).glob("*.safetensors")))
    queries = [(text, tenant) for text in texts for tenant in (HEALTHY, BROKEN, None)]

    def ask(query):
        text, tenant = query
        return query, *call(f"{url}/predict", {"text": text} | ({"tenant": tenant} if tenant else {}))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, queries))
    healthy = [(status, body) for (text, tenant), status, body in results if tenant == HEALTHY]
    wrong = [(s, b) for (text, t), s, b in results if t == HEALTHY and not (s == 200 and same(b, expected[text]))]
    assert not wrong, f"{len(wrong)} of {len(healthy)} requests for {HEALTHY} not answered 200 as offline: {wrong[0]}"
    routed = [(s, b) for (_, t), s, b in results if t is None]
    astray = [(s, b) for s, b in routed if s != 200 or b["tenant"] == BROKEN]
    assert not astray, f"{len(astray)} of {len(routed)} routed requests not answered by another tenant: {astray[0]}"
    for (_, tenant), status, body in results:
        if tenant == BROKEN:
            detail = json.dumps(body)
            assert status == 503 and BROKEN in detail and HEALTHY not in detail, (status, body)
