"""The HTTP service over an expert store, tested against it running on localhost while the store learns: each
lifecycle write (grow, hibernate, wake, update, rollback, retire) is served within the poll's delay, and then every
answer over HTTP equals a fresh `Server`'s over the same store to the bit; the answers of the tenants a change did
not touch, with their tenant given, never change."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from moe.data import read_tenant_file
from moe.lifecycle import Lifecycle
from moe.serving import Server
from moe.serving.http import build_app
from moe.store import ExpertStore
from moe.trunk import TinyTrunk
from tests.helpers import SYNTHETIC, fast_growth, write_tenant_csv

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

FOLLOW_S = 0.5  # the replica's poll
DELAY_S = 5.0  # a write is served within this


def call(url: str, body: object = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with two tenants grown, its lifecycle, and the data of the tenants to come."""
    folder = tmp_path_factory.mktemp("follow_http")
    trunk = TinyTrunk(dim=16, freeze=True)
    files = {
        name: write_tenant_csv(folder / f"{name}.csv", intents, seed=i)
        for i, (name, intents) in enumerate(SYNTHETIC.items())
    }
    tenants = {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}
    tenants["bank_more"] = read_tenant_file(
        "bank", write_tenant_csv(folder / "more.csv", SYNTHETIC["bank"], seed=7), split_column="split"
    )
    lifecycle = Lifecycle(ExpertStore(folder / "store"), trunk, trunk.encode, fast_growth())
    for name in ("music", "weather"):
        lifecycle.grow(tenants[name])
    texts = [e.text for name in SYNTHETIC for e in tenants[name].split("test")[:2]]
    return lifecycle, tenants, texts


@pytest.fixture(scope="module")
def service(world):
    import ray
    from ray import serve

    lifecycle = world[0]
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {"bundle": str(lifecycle.store.root), "follow_s": FOLLOW_S, "batch_wait_ms": 2}
        serve.run(build_app(settings), name="moe", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def served(service: str, generation: int) -> float:
    """Seconds until the replica serves `generation` (its /tenants says so); fails past DELAY_S."""
    start = time.perf_counter()
    while (waited := time.perf_counter() - start) < DELAY_S:
        if call(f"{service}/tenants")[1]["generation"] == generation:
            return waited
        time.sleep(0.05)
    pytest.fail(f"generation {generation} not served within {DELAY_S} s: {call(f'{service}/tenants')[1]}")


def over_http(service: str, texts: list[str], tenants: list[str | None]) -> dict:
    """Each query on its own request (a batch of one: the bit-exact comparison), by tenant (None: routed)."""
    found = {}
    for tenant in tenants:
        replies = [call(f"{service}/predict", {"text": text, "tenant": tenant}) for text in texts]
        found[tenant] = replies
    return found


def offline(store: ExpertStore, texts: list[str], tenants: list[str | None]) -> dict:
    """A fresh server's answers, as `over_http` gives them; None for a tenant it does not serve."""
    fresh = Server(store.root)
    return {
        tenant: [(200, fresh.predict([text], tenant)[0].to_dict()) for text in texts]
        if tenant in [None, *fresh.tenants]
        else None
        for tenant in tenants
    }


def test_the_service_follows_its_store_as_it_learns(service, world):
    lifecycle, tenants, texts = world
    store = lifecycle.store
    everyone = [None, "bank", "music", "weather"]
    status, body = call(f"{service}/tenants")
    assert status == 200 and body == {"tenants": ["music", "weather"], "generation": store.generation()}
    start = over_http(service, texts, everyone)
    assert start == offline(store, texts, everyone) | {"bank": start["bank"]} and start["music"][0][0] == 200
    assert all(code == 404 and "unknown tenant 'bank'" in body["detail"] for code, body in start["bank"])

    delays = {}

    def step(name: str, write) -> dict:
        write()
        delays[name] = served(service, store.generation())
        got = over_http(service, texts, everyone)
        expected = offline(store, texts, everyone)
        for tenant, replies in got.items():
            if expected[tenant] is not None:
                assert replies == expected[tenant], (name, tenant)
            else:
                assert all(code == 404 and repr(tenant) in body["detail"] for code, body in replies), (name, tenant)
        return got

    grown = step("grow", lambda: lifecycle.grow(tenants["bank"]))
    assert any(body["tenant"] == "bank" for _, body in grown[None])  # routed to
    assert grown["music"] == start["music"] and grown["weather"] == start["weather"]

    asleep = step("hibernate", lambda: store.hibernate("music"))
    assert all("hibernating" in body["detail"] for _, body in asleep["music"])
    assert all(body["tenant"] != "music" for _, body in asleep[None])
    assert asleep["weather"] == start["weather"] and asleep["bank"] == grown["bank"]

    woken = step("wake", lambda: store.wake("music"))
    assert woken["music"] == start["music"]

    updated = step("update", lambda: lifecycle.update(tenants["bank_more"]))
    assert updated["bank"] != grown["bank"] and updated["weather"] == start["weather"]

    rolled = step("rollback", lambda: store.rollback("bank", 1))
    assert rolled["bank"] == grown["bank"]

    retired = step("retire", lambda: store.delete("weather"))
    assert all("unknown tenant 'weather'" in body["detail"] for _, body in retired["weather"])
    assert retired["music"] == start["music"] and retired["bank"] == grown["bank"]

    status, stats = call(f"{service}/stats")
    assert status == 200 and stats["generation"] == store.generation()
    assert stats["store"]["poll_s"] == FOLLOW_S and stats["store"]["poll_failures"] == 0
    assert call(f"{service}/health")[1]["generation"] == store.generation()
    print("seconds from write to served:", {k: round(v, 2) for k, v in delays.items()})
    assert all(delay < DELAY_S for delay in delays.values())
