"""The HTTP service over an expert store, tested against it running on localhost while the store learns: each
lifecycle write (grow, hibernate, wake, update, rollback, retire) is served within the poll's delay, and then every
answer over HTTP equals a fresh `Server`'s over the same store to the bit; the answers of the tenants a change did
not touch, with their tenant given, never change."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moe.data import read_tenant_file
from moe.lifecycle import Lifecycle
from moe.serving import Server
from moe.serving.http import GENERATION_HEADER, build_app
from moe.store import ExpertStore, RemoteStore
from moe.trunk import TinyTrunk
from tests.helpers import SYNTHETIC, fast_growth, write_tenant_csv
from tests.moto_s3 import moto_s3
from tests.service import call, free_port

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

FOLLOW_S = 0.5  # the replica's poll
FIRST = ["music", "weather"]  # grown before the service starts
EVERYONE = [None, "bank", "music", "weather"]  # the tenants asked for (None: routed)
URL = "s3://follow-http/store"
DELAY_S = 5.0  # a write is served within this


def generation_of(service: str, text: str, tenant: str | None) -> str | None:
    """The generation an answer (or a refusal) of /predict names in its header."""
    data = json.dumps({"text": text, "tenant": tenant}).encode()
    request = urllib.request.Request(f"{service}/predict", data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.headers.get(GENERATION_HEADER)
    except urllib.error.HTTPError as error:
        return error.headers.get(GENERATION_HEADER)


@pytest.fixture(scope="module")
def trunk():
    return TinyTrunk(dim=16, freeze=True)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("follow_http_data")
    files = {
        name: write_tenant_csv(folder / f"{name}.csv", intents, seed=i)
        for i, (name, intents) in enumerate(SYNTHETIC.items())
    }
    found = {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}
    more = write_tenant_csv(folder / "more.csv", SYNTHETIC["bank"], seed=7)
    return found | {"bank_more": read_tenant_file("bank", more, split_column="split")}


@pytest.fixture(scope="module")
def texts(tenants) -> list[str]:
    return [e.text for name in SYNTHETIC for e in tenants[name].split("test")[:2]]


def grown(store: ExpertStore, trunk, tenants) -> Lifecycle:
    lifecycle = Lifecycle(store, trunk, trunk.encode, fast_growth())
    for name in FIRST:
        lifecycle.grow(tenants[name])
    return lifecycle


@pytest.fixture(scope="module")
def s3():
    with moto_s3("follow-http") as options:
        yield options


@pytest.fixture(scope="module")
def serve_instance():
    """Ray and Serve on a free port, shared by this module's applications."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def run_app(base: str, name: str, settings: dict) -> str:
    from ray import serve

    serve.run(build_app(settings | {"follow_s": FOLLOW_S, "batch_wait_ms": 2}), name=name, route_prefix=f"/{name}")
    return f"{base}/{name}"


@pytest.fixture(scope="module")
def local(serve_instance, tmp_path_factory, trunk, tenants):
    """A store on disk with FIRST grown, its lifecycle, and the service over it."""
    lifecycle = grown(ExpertStore(tmp_path_factory.mktemp("follow_http") / "store"), trunk, tenants)
    return lifecycle, run_app(serve_instance, "local", {"bundle": str(lifecycle.store.root)})


@pytest.fixture(scope="module")
def remote(serve_instance, s3, tmp_path_factory, trunk, tenants):
    """The same on S3: a writer on this machine, the service a reader of its own (its own cache)."""
    lifecycle = grown(RemoteStore(URL, tmp_path_factory.mktemp("writer"), **s3), trunk, tenants)
    store = lifecycle.store
    store.fs.put(str(store.root / ".trunks"), f"{store.prefix}/.trunks", recursive=True)  # the trunk travels along
    return lifecycle, run_app(serve_instance, "s3", {"bundle": URL, "store_options": s3})


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


def offline(store: ExpertStore, texts: list[str], tenants: list[str | None], cache: Path) -> dict:
    """A fresh server's answers (another machine's: a cache of its own), as `over_http` gives them; None for a
    tenant it does not serve."""
    if isinstance(store, RemoteStore):
        store = RemoteStore(store.url, cache / str(store.generation()), **store.fs.storage_options)
    fresh = Server(store)
    return {
        tenant: [(200, fresh.predict([text], tenant)[0].to_dict()) for text in texts]
        if tenant in [None, *fresh.tenants]
        else None
        for tenant in tenants
    }


def check_step(service: str, store: ExpertStore, texts: list[str], name: str, write, cache: Path) -> tuple[dict, float]:
    """Make a write; the seconds until the service serves it, and its answers then, each equal to a fresh server's
    (a tenant not served: 404 naming it)."""
    write()
    delay = served(service, store.generation())
    got = over_http(service, texts, EVERYONE)
    assert {generation_of(service, texts[0], t) for t in EVERYONE} == {str(store.generation())}  # 404s too
    expected = offline(store, texts, EVERYONE, cache)
    for tenant, replies in got.items():
        if expected[tenant] is not None:
            assert replies == expected[tenant], (name, tenant)
        else:
            assert all(code == 404 and repr(tenant) in body["detail"] for code, body in replies), (name, tenant)
    return got, delay


def test_the_service_follows_its_store_as_it_learns(local, tenants, texts, tmp_path):
    lifecycle, service = local
    store = lifecycle.store
    status, body = call(f"{service}/tenants")
    assert status == 200 and body == {"tenants": ["music", "weather"], "generation": store.generation()}
    start = over_http(service, texts, EVERYONE)
    assert start == offline(store, texts, EVERYONE, tmp_path) | {"bank": start["bank"]} and start["music"][0][0] == 200
    assert all(code == 404 and "unknown tenant 'bank'" in body["detail"] for code, body in start["bank"])

    delays = {}

    def step(name: str, write) -> dict:
        got, delays[name] = check_step(service, store, texts, name, write, tmp_path)
        return got

    after = step("grow", lambda: lifecycle.grow(tenants["bank"]))
    assert any(body["tenant"] == "bank" for _, body in after[None])  # routed to
    assert after["music"] == start["music"] and after["weather"] == start["weather"]

    asleep = step("hibernate", lambda: store.hibernate("music"))
    assert all("hibernating" in body["detail"] for _, body in asleep["music"])
    assert all(body["tenant"] != "music" for _, body in asleep[None])
    assert asleep["weather"] == start["weather"] and asleep["bank"] == after["bank"]

    woken = step("wake", lambda: store.wake("music"))
    assert woken["music"] == start["music"]

    updated = step("update", lambda: lifecycle.update(tenants["bank_more"]))
    assert updated["bank"] != after["bank"] and updated["weather"] == start["weather"]

    rolled = step("rollback", lambda: store.rollback("bank", 1))
    assert rolled["bank"] == after["bank"]

    retired = step("retire", lambda: store.delete("weather"))
    assert all("unknown tenant 'weather'" in body["detail"] for _, body in retired["weather"])
    assert retired["music"] == start["music"] and retired["bank"] == after["bank"]

    status, stats = call(f"{service}/stats")
    assert status == 200 and stats["generation"] == store.generation()
    assert stats["store"]["poll_s"] == FOLLOW_S and stats["store"]["poll_failures"] == 0
    assert call(f"{service}/health")[1]["generation"] == store.generation()
    print("seconds from write to served:", {k: round(v, 2) for k, v in delays.items()})
    assert all(delay < DELAY_S for delay in delays.values())


def test_the_service_follows_its_store_on_s3(remote, tenants, texts, tmp_path):
    lifecycle, service = remote
    store = lifecycle.store
    assert call(f"{service}/tenants")[1] == {"tenants": FIRST, "generation": store.generation()}
    start = over_http(service, texts, EVERYONE)
    after, grow_s = check_step(service, store, texts, "grow", lambda: lifecycle.grow(tenants["bank"]), tmp_path)
    assert after["music"] == start["music"] and after["weather"] == start["weather"]
    asleep, sleep_s = check_step(service, store, texts, "hibernate", lambda: store.hibernate("music"), tmp_path)
    assert all("hibernating" in body["detail"] for _, body in asleep["music"])
    assert asleep["weather"] == start["weather"] and asleep["bank"] == after["bank"]
    print(f"S3: seconds from write to served: grow {grow_s:.2f}, hibernate {sleep_s:.2f}")
