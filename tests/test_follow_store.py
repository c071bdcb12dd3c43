"""A server follows its store: every lifecycle write publishes the store's next generation, a server swaps to it
whole, and then answers exactly as a fresh server over the same store does; a request is answered by the
generation it started with; generations are never handed out twice; a write of many steps (an upgrade) is seen
whole or not at all. On disk and on the moto S3 server."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe.data import read_tenant_file
from moe.lifecycle import Lifecycle
from moe.model import ExpertInfo, build_mixture
from moe.model.stats import class_statistics
from moe.serving import Server
from moe.store import ExpertStore, RemoteStore, ShardError, expert_shards
from moe.store.generation import KEEP, POINTER, TenantState
from moe.trunk import TinyTrunk
from tests.helpers import SYNTHETIC, fast_growth, write_tenant_csv
from tests.moto_s3 import moto_s3

INTENTS = SYNTHETIC | {"travel": {"book": ["flight", "hotel", "ticket"], "cancel": ["cancel", "refund", "drop"]}}
FIRST = ["music", "weather"]  # grown before any server starts


@pytest.fixture(scope="module")
def trunk():
    return TinyTrunk(dim=16, freeze=True)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    files = {
        name: write_tenant_csv(folder / f"{name}.csv", intents, seed=i)
        for i, (name, intents) in enumerate(INTENTS.items())
    }
    more = write_tenant_csv(folder / "bank_more.csv", INTENTS["bank"], seed=7)
    found = {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}
    return found | {"bank_more": read_tenant_file("bank", more, split_column="split")}


@pytest.fixture(scope="module")
def base(tmp_path_factory, trunk, tenants) -> Path:
    """A store with FIRST grown (the trunk recorded by the grow); each test works on a copy."""
    root = tmp_path_factory.mktemp("base") / "store"
    lifecycle = Lifecycle(ExpertStore(root), trunk, trunk.encode, fast_growth())
    for name in FIRST:
        lifecycle.grow(tenants[name])
    return root


@pytest.fixture
def lifecycle(base, tmp_path, trunk) -> Lifecycle:
    root = tmp_path / "store"
    shutil.copytree(base, root)
    return Lifecycle(ExpertStore(root), trunk, trunk.encode, fast_growth())


def queries(tenants) -> list[str]:
    return [e.text for name in INTENTS for e in tenants[name].split("test")[:3]]


def answers(server: Server, texts: list[str], state=None) -> dict[str | None, list[dict]]:
    """Every served tenant's answers to `texts` with its name given, and the routed answers (key None)."""
    state = state or server.state
    return {
        tenant: [a.to_dict() for a in server.predict(texts, tenant, state=state)]
        for tenant in [None, *state.model.tenants]
    }


def assert_follows(server: Server, store: ExpertStore, texts: list[str]) -> dict:
    """The server swaps to the store's latest generation and then answers as a fresh server over it, to the bit."""
    assert server.refresh()
    assert server.generation == store.generation()
    fresh = Server(store.root)
    assert fresh.generation == server.generation
    got = answers(server, texts)
    assert got == answers(fresh, texts)
    return got


def test_every_lifecycle_write_is_followed_and_answered_as_a_fresh_server_would(lifecycle, tenants):
    store, texts = lifecycle.store, queries(tenants)
    server = Server(store.root)
    assert server.tenants == FIRST and not server.refresh()
    before = answers(server, texts)

    lifecycle.grow(tenants["bank"])  # grown after start-up: answerable and routable
    grown = assert_follows(server, store, texts)
    assert server.tenants == ["bank", "music", "weather"]
    assert any(a["tenant"] == "bank" for a in grown[None])  # routed to
    assert all(grown[t] == before[t] for t in FIRST)  # untouched tenants, their name given: the very same answers

    store.hibernate("music")
    asleep = assert_follows(server, store, texts)
    assert "music" not in server.tenants and all(a["tenant"] != "music" for a in asleep[None])
    with pytest.raises(KeyError):
        server.predict(texts[:1], "music")
    assert "hibernating" in server.state.not_served("music")
    assert asleep["weather"] == before["weather"] and asleep["bank"] == grown["bank"]

    store.wake("music")
    woken = assert_follows(server, store, texts)
    assert woken["music"] == before["music"]

    lifecycle.update(tenants["bank_more"])  # version 2
    updated = assert_follows(server, store, texts)
    assert updated["bank"] != grown["bank"] and updated["music"] == before["music"]

    store.rollback("bank", 1)  # the old version served again
    rolled = assert_follows(server, store, texts)
    assert rolled["bank"] == grown["bank"]

    store.delete("weather")  # retired
    gone = assert_follows(server, store, texts)
    assert "weather" not in server.tenants and all(a["tenant"] != "weather" for a in gone[None])
    assert server.state.not_served("weather").startswith("unknown tenant 'weather'")
    assert gone["music"] == before["music"] and gone["bank"] == grown["bank"]
    ops = [c["op"] for entry in store.generations.log() for c in [entry]]
    assert ops[-6:] == ["grow", "hibernate", "wake", "update", "rollback", "delete"]


def test_a_request_started_before_a_swap_is_answered_by_its_generation_alone(lifecycle, tenants):
    store, texts = lifecycle.store, queries(tenants)
    server = Server(store.root, max_batch=2)  # several chunks per request: a swap can fall between them
    old = server.state
    expected = [a.to_dict() for a in server.predict(texts, "music")]
    inner, swapped = server.predict_features, []

    def swap_after_first_chunk(*args, **kwargs):
        result = inner(*args, **kwargs)
        if not swapped:
            store.hibernate("music")  # the tenant this request asks for leaves the store's next generation
            swapped.append(server.refresh())
        return result

    server.predict_features = swap_after_first_chunk
    got = [a.to_dict() for a in server.predict(texts, "music")]
    assert swapped == [True] and server.state is not old and "music" not in server.tenants
    assert got == expected  # every chunk answered by the generation the request started with


def test_a_follower_polls_the_store_in_the_background(lifecycle, tenants):
    store = lifecycle.store
    server = Server(store.root, follow_s=0.2)
    try:
        store.hibernate("music")
        for _ in range(100):
            if server.generation == store.generation():
                break
            threading.Event().wait(0.1)
        assert "music" not in server.tenants and server.following()["generation"] == store.generation()
    finally:
        server.close()


def test_many_writes_in_changes_publish_one_generation_or_none(lifecycle):
    store = lifecycle.store
    start = store.generation()
    server = Server(store.root)
    with store.changes("upgrade", trunk=True):
        store.hibernate("music")
        store.hibernate("weather")
        assert store.generation() == start and not server.refresh()  # nothing seen half done
    assert store.generation() == start + 1 and store.state().dormant == ["music", "weather"]
    with pytest.raises(RuntimeError, match="killed"), store.changes("upgrade"):
        store.wake("music")
        raise RuntimeError("killed midway")
    assert store.generation() == start + 1  # the failed one published nothing: readers keep the state before
    assert store.state().dormant == ["music", "weather"]


def test_concurrent_writers_never_hand_out_one_generation_twice(lifecycle):
    root, start = lifecycle.store.root, lifecycle.store.generation()
    errors = []

    def flip(tenant: str) -> None:
        store = ExpertStore(root)  # a writer of its own, as another process would be
        try:
            for _ in range(5):
                store.hibernate(tenant)
                store.wake(tenant)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=flip, args=(t,)) for t in FIRST]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = ExpertStore(root)
    assert not errors and store.generation() == start + 20
    log = store.generations.log()
    assert [e["generation"] for e in log] == list(range(start + 20 - KEEP, start + 21))[-len(log) :]
    assert store.state().dormant == []


def test_a_pointer_left_behind_by_a_killed_writer_is_overtaken(lifecycle):
    store = lifecycle.store
    store.hibernate("music")
    latest = store.generation()
    (store.root / POINTER).write_text(json.dumps({"generation": latest - 1}))  # killed before the pointer moved
    assert store.generation() == latest and store.state().dormant == ["music"]  # the state files decide
    store.wake("music")
    assert store.generation() == latest + 1 and store.state().dormant == []


def test_a_store_write_costs_no_scan_of_every_tenant(lifecycle, monkeypatch):
    store = lifecycle.store
    tensors, meta = store.load("music")

    def scan(*args, **kwargs):
        raise AssertionError("scanned every tenant")

    monkeypatch.setattr(ExpertStore, "_tenant_folders", scan)  # the case check lists names only
    monkeypatch.setattr(ExpertStore, "_scan", scan)  # the generation: the previous one and this tenant's folder
    store.save(tensors, replace(meta, tenant="Copy"), new_tenant=True)
    store.hibernate("Copy")
    assert store.state().tenants["Copy"] == TenantState(1, True)
    with pytest.raises(ValueError, match="differs only in case"):
        store.save(tensors, replace(meta, tenant="copy"), new_tenant=True)


def test_a_store_without_generations_gets_one_and_a_view_is_read_only(lifecycle):
    store = lifecycle.store
    for name in (".generation.json", ".generations"):
        path = store.root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert store.generation() == 0
    server = Server(store.root)  # generation 0, from a scan: a reader writes nothing
    assert server.generation == 0 and server.tenants == FIRST and store.generation() == 0
    store.hibernate("music")  # the first write publishes generation 1, from a scan of the whole store
    assert server.refresh() and server.generation == 1 and server.tenants == ["weather"]
    with pytest.raises(ValueError, match="read-only view"):
        store.at(store.state()).hibernate("music")


# -- on S3 (the moto server on localhost) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    with moto_s3("follow-unit") as options:
        yield options


def test_a_server_follows_a_store_on_s3(s3, trunk, tenants, tmp_path):
    url = "s3://follow-unit/follow"
    writer = RemoteStore(url, tmp_path / "writer", **s3)
    lifecycle = Lifecycle(writer, trunk, trunk.encode, fast_growth())
    for name in FIRST:
        lifecycle.grow(tenants[name])
    # the trunk's record travels with the shards: a reader on another machine rebuilds it from the bucket
    writer.fs.put(str(writer.root / ".trunks"), f"{writer.prefix}/.trunks", recursive=True)
    texts = queries(tenants)

    def fresh() -> Server:  # another machine: a cache of its own
        return Server(RemoteStore(url, tmp_path / f"fresh{writer.generation()}", **s3))

    server = Server(RemoteStore(url, tmp_path / "reader", **s3))
    assert server.tenants == FIRST and server.generation == writer.generation() == 2
    before = answers(server, texts)

    lifecycle.grow(tenants["bank"])
    assert server.refresh() and server.generation == 3 and server.tenants == ["bank", *FIRST]
    grown = answers(server, texts)
    assert grown == answers(fresh(), texts) and all(grown[t] == before[t] for t in FIRST)

    writer.hibernate("music")
    assert server.refresh() and server.tenants == ["bank", "weather"]
    asleep = answers(server, texts)
    assert asleep == answers(fresh(), texts) and asleep["weather"] == before["weather"]
    assert "hibernating" in server.state.not_served("music")


def test_remote_meta_reads_the_header_alone(s3, tmp_path):
    url = "s3://follow-unit/meta"
    writer = RemoteStore(url, tmp_path / "writer", **s3)
    model = build_mixture([ExpertInfo("alpha", ("a", "b"))], dim=8, rank=4)
    stats = {"alpha": class_statistics(torch.randn(10, 8), torch.arange(10) % 2, 2)}
    for tensors, meta in expert_shards(model.eval(), "f" * 64, stats):
        writer.save(tensors, meta)
    reader = RemoteStore(url, tmp_path / "reader", **s3)
    assert reader.meta("alpha") == writer.meta("alpha") and not list(reader.cached())  # nothing downloaded
    with pytest.raises(ShardError, match=f"{url}/alpha/v0009.safetensors: no such object"):
        reader.meta("alpha", 9)
