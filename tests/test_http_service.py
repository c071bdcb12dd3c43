"""The HTTP service on Ray Serve, tested against it running on localhost: answers equal `Server.predict`'s for the
same queries; bad bodies, wrong types, unknown tenants and oversized texts get a 4xx naming the problem, never a
500, from one client or fifty at once; health, statistics and the OpenAPI schema are served; the Serve config
file is a valid Serve config of this application."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from moe.serving import Server
from moe.serving.http import ServiceSettings, build_app, main
from tests.helpers import ROOT
from tests.service import call, same, serving

# The session's tiny run (trained, evaluated and exported in a child process) gives the bundle.
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

TENANTS = [None, "bank", "music", "weather"]
LIMIT = 1000  # characters per text, as the service is started here


@pytest.fixture(scope="module")
def service(tiny_run):
    """The service's base URL, one replica on a free port; batches wait 20 ms for concurrent requests."""
    settings = {"bundle": str(tiny_run.bundle), "max_text_chars": LIMIT, "max_queries": 200, "batch_wait_ms": 20}
    with serving(settings) as url:
        yield url


@pytest.fixture(scope="module")
def offline(tiny_run) -> Server:
    return Server(tiny_run.bundle)


@pytest.fixture(scope="module")
def texts(tiny_run) -> list[str]:
    lines = (tiny_run.evaluation / "predictions_test.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_one_query_at_a_time_is_answered_as_server_predict_to_the_bit(service, offline, texts):
    for text in texts[:12]:
        for tenant in TENANTS:
            assert call(f"{service}/predict", {"text": text, "tenant": tenant}) == (
                200,
                offline.predict([text], tenant=[tenant])[0].to_dict(),
            )
    assert call(f"{service}/predict", {"text": texts[0]}) == (200, offline.predict([texts[0]])[0].to_dict())


def test_batches_and_lists_are_answered_in_order(service, offline, texts):
    tenants = [TENANTS[i % 4] for i in range(len(texts))]
    expected = [a.to_dict() for a in offline.predict(texts, tenant=tenants)]
    status, body = call(
        f"{service}/predict", {"queries": [{"text": t, "tenant": n} for t, n in zip(texts, tenants, strict=True)]}
    )
    assert status == 200 and list(body) == ["answers"] and len(body["answers"]) == len(texts)
    assert all(same(a, e) for a, e in zip(body["answers"], expected, strict=True))
    status, listed = call(f"{service}/predict", [{"text": t} for t in texts[:5]])
    assert status == 200 and all(same(a, e.to_dict()) for a, e in zip(listed, offline.predict(texts[:5]), strict=True))
    assert call(f"{service}/predict", []) == (200, []) and call(f"{service}/predict", {"queries": []}) == (
        200,
        {"answers": []},
    )


UNKNOWN = "unknown tenant 'acme'; known tenants: ['bank', 'music', 'weather']"
BAD = [  # body, extra headers, status, what `detail` must say
    (b'{"text": ', {}, 400, "body is not JSON"),
    (b'{"text": "\xff"}', {}, 400, "error parsing the body"),  # not UTF-8
    (b"", {}, 422, "no body"),
    (b'"play some jazz"', {}, 422, "body: expected a query"),
    (b"42", {}, 422, "got int"),
    (b'{"text": "play"}', {"content-type": "text/plain"}, 422, "content-type: application/json"),
    ({"tenant": "bank"}, {}, 422, "text: Field required"),
    ({"text": 3, "tenant": ["bank"]}, {}, 422, "text: Input should be a valid string; tenant: Input should be"),
    ({"text": "play", "tenat": "bank"}, {}, 422, "tenat: Extra inputs are not permitted"),
    ({"queries": "play"}, {}, 422, "queries: Input should be a valid list"),
    ({"queries": [{"text": "play"}, {"text": None}]}, {}, 422, "queries[1].text: Input should be a valid string"),
    ([{"text": "play"}, 5], {}, 422, "[1]: Input should be a valid dictionary"),
    ({"text": "   "}, {}, 422, "text: blank text"),
    ({"text": "\ud800 balance"}, {}, 422, "text: not encodable as UTF-8 (lone surrogate U+D800 at position 0)"),
    ({"text": "play", "tenant": "acme"}, {}, 404, f"tenant: {UNKNOWN}"),
    ({"queries": [{"text": "play"}, {"text": "x", "tenant": "acme"}]}, {}, 404, f"queries[1].tenant: {UNKNOWN}"),
    ({"text": "play"}, {"serve_multiplexed_model_id": "acme"}, 404, f"serve_multiplexed_model_id header: {UNKNOWN}"),
    ({"text": "x" * (LIMIT + 1)}, {}, 413, f"text: {LIMIT + 1} characters, more than the limit of {LIMIT}"),
    ({"queries": [{"text": "play"}] * 201}, {}, 413, "201 queries, more than the limit of 200"),
    ({"queries": [{"text": ""}, {"text": "y" * 2000}]}, {}, 413, "queries[1].text: 2000 characters"),
]


@pytest.mark.parametrize(("body", "headers", "status", "detail"), BAD, ids=[b[3][:40] for b in BAD])
def test_a_bad_request_gets_a_4xx_naming_the_problem(service, body, headers, status, detail):
    got, answer = call(f"{service}/predict", body, headers)
    assert (got, list(answer)) == (status, ["detail"]) and detail in answer["detail"], answer


def test_a_1_mb_text_is_refused_without_being_echoed(service):
    status, answer = call(f"{service}/predict", {"text": "balance " * 131_072, "tenant": "bank"})
    assert status == 413 and answer == {"detail": f"text: 1048576 characters, more than the limit of {LIMIT}"}


def test_50_concurrent_clients_get_the_offline_answers_and_no_500(service, offline, texts):
    good = [{"text": t, "tenant": TENANTS[i % 4]} for i, t in enumerate(texts)]
    bad = [{"text": "play", "tenant": "acme"}, {"text": ""}, {"text": 7}, {"text": "x" * 1_000_000}]
    workload = [(q, 200) for q in good * 2] + [(q, 4) for q in bad * 10]  # 4: any 4xx
    workload += [({"queries": good[i : i + 7]}, 200) for i in range(0, len(good), 7)]
    expected = {json.dumps(q): offline.predict([q["text"]], tenant=[q["tenant"]])[0].to_dict() for q in good}
    before = call(f"{service}/stats")[1]["batching"]

    def client(k: int) -> list[tuple[int, object, object, int]]:  # every 50th request, from the k-th
        headers = {"serve_multiplexed_model_id": "music"} if k % 5 == 0 else {}
        return [(*call(f"{service}/predict", q, headers), q, want) for q, want in workload[k::50]]

    with ThreadPoolExecutor(50) as pool:
        results = [r for rs in pool.map(client, range(50)) for r in rs]
    assert len(results) == len(workload)
    for status, answer, query, want in results:
        if want == 4:
            assert 400 <= status < 500 and "detail" in answer, (status, query)
        elif "queries" in query:
            assert status == 200 and all(
                same(a, expected[json.dumps(q)]) for a, q in zip(answer["answers"], query["queries"], strict=True)
            )
        else:
            assert status == 200 and same(answer, expected[json.dumps(query)]), (answer, query)
    after = call(f"{service}/stats")[1]["batching"]
    queries, batches = after["queries"] - before["queries"], after["batches"] - before["batches"]
    assert queries == 3 * len(good) and batches < queries  # concurrent requests were answered together


def test_health_stats_and_the_openapi_schema(service):
    status, health = call(f"{service}/health")
    assert status == 200 and health["status"] == "ok" and health["tenants"] == 3
    assert call(f"{service}/predict", {"text": "rain umbrella"}, {"serve_multiplexed_model_id": "weather"})[0] == 200
    status, stats = call(f"{service}/stats")
    assert status == 200 and stats["replica"] == health["replica"]
    assert "weather" in stats["resident_experts"]["device"] and stats["multiplexing"]["tenant_loads"] >= 1
    assert 0 < stats["hit_rate"]["device"] <= 1 and stats["bytes"]["device_resident"] > 0
    assert stats["pager"]["device"]["hits"] > 0 and stats["batching"]["requests"] > 0
    status, schema = call(f"{service}/openapi.json")
    predict = schema["paths"]["/predict"]["post"]
    shapes = predict["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert len(shapes) == 3 and {"400", "404", "413", "422"} <= set(predict["responses"])
    assert predict["parameters"][0]["name"] == "serve_multiplexed_model_id"
    assert {"/predict", "/health", "/stats", "/tenants"} <= set(schema["paths"])
    status, listed = call(f"{service}/tenants")
    assert (
        status == 200
        and len(listed["tenants"]) == health["tenants"] == 3
        and listed["tenants"] == sorted(listed["tenants"])
    )
    with urllib.request.urlopen(f"{service}/docs", timeout=30) as docs:
        assert docs.status == 200


def test_with_two_replicas_a_tenants_requests_stay_where_its_expert_is(service, tiny_run, offline):
    """Multiplexing keyed by tenant: once a replica has loaded a tenant, that tenant's requests go to it."""
    from ray import serve

    two = {"bundle": str(tiny_run.bundle), "replicas": 2, "replica_cpus": 0.5}  # beside the first app's one CPU
    serve.run(build_app(two), name="moe_two", route_prefix="/two")
    try:
        answered_by: dict[str, set[str]] = {}
        for round_ in range(4):
            for tenant in ("bank", "music", "weather"):
                request = urllib.request.Request(
                    f"{service}/two/predict",
                    json.dumps({"text": "rain umbrella", "tenant": tenant}).encode(),
                    {"content-type": "application/json", "serve_multiplexed_model_id": tenant},
                )
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert json.loads(response.read()) == offline.predict(["rain umbrella"], tenant)[0].to_dict()
                    if round_:  # the first round loads each tenant somewhere
                        answered_by.setdefault(tenant, set()).add(response.headers["x-moe-replica"])
                    else:
                        time.sleep(1)  # while the replica tells Serve's routers what it now holds
        assert all(len(replicas) == 1 for replicas in answered_by.values()), answered_by
        assert len(set().union(*answered_by.values())) == 2  # the tenants went to both replicas
    finally:
        serve.delete("moe_two")


def test_the_hash_router_keeps_each_session_header_on_one_replica(service, tiny_run, offline):
    """`router: hash`: Serve's consistent-hash router sends every request with one `x-session-id` to one replica (a
    tenant's requests stay together with nothing loaded per request), and different ids across both replicas."""
    from ray import serve

    from moe.serving.http import HASH_HEADER

    two = {"bundle": str(tiny_run.bundle), "replicas": 2, "replica_cpus": 0.5, "router": "hash"}
    serve.run(build_app(two), name="moe_hash", route_prefix="/hash")
    expected = offline.predict(["rain umbrella"], "bank")[0].to_dict()
    try:
        answered_by: dict[str, set[str]] = {}
        for session in [f"s{i}" for i in range(16)] * 3:
            request = urllib.request.Request(
                f"{service}/hash/predict",
                json.dumps({"text": "rain umbrella", "tenant": "bank"}).encode(),
                {"content-type": "application/json", HASH_HEADER: session},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.loads(response.read()) == expected
                answered_by.setdefault(session, set()).add(response.headers["x-moe-replica"])
        assert all(len(replicas) == 1 for replicas in answered_by.values()), answered_by
        assert len(set().union(*answered_by.values())) == 2  # 16 ids all on one replica: chance 2**-15
    finally:
        serve.delete("moe_hash")


def test_the_serve_config_is_a_serve_config_of_this_application():
    from ray.serve.schema import ServeDeploySchema

    path = ROOT / "conf/serve/moe_http.yaml"
    head = path.read_text().splitlines()[:3]
    assert "serve deploy conf/serve/moe_http.yaml" in "\n".join(head)
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "moe.serving.http:build_app"
    assert ServiceSettings.model_validate(app.args).replicas == 2


def test_the_command_refuses_a_bad_bundle_before_starting_ray(tmp_path: Path):
    from moe.serving import BundleError

    with pytest.raises(SystemExit):  # neither a bundle (no manifest) nor a store with a tenant
        main([str(tmp_path)])
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError):
        main([str(tmp_path)])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--max-text-chars", "0"])
