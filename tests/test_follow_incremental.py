"""A server carries its mixture over from one generation to the next (`StoreSource.carry_over`): only the changed
tenants are read, the pager is shared, the routing index has added rows inserted and removed ones masked (rebuilt
past `MAX_MASKED`), and after every write the server answers exactly as a fresh server over the same store does,
tenant given and routed, to the bit (through an index: where its candidates hold the exact top-k)."""

from __future__ import annotations

import pytest
import torch

from moe.experiments.bench import synthetic_expert, write_store
from moe.inference import IndexSettings, RowIndex
from moe.inference.index import MAX_MASKED
from moe.model import TopKRouter
from moe.serving import Server
from moe.serving.http import GENERATION_HEADER, generation_header
from moe.store import ExpertStore
from moe.trunk import TinyTrunk

TEXTS = ["what is my balance", "play some jazz", "will it rain", "wake me at seven", "book a table"]
RANK = 2


@pytest.fixture(scope="module")
def trunk():
    return TinyTrunk(dim=384, freeze=True)


@pytest.fixture
def store(tmp_path, trunk) -> ExpertStore:
    store = write_store(tmp_path / "store", 24, RANK, trunk_fingerprint=trunk.fingerprint, progress=False)
    store.rescan()  # generation 1
    return store


def answers(server: Server) -> dict:
    state = server.state
    return {t: [a.to_dict() for a in server.predict(TEXTS, t, state=state)] for t in [None, *state.model.tenants]}


def save(store: ExpertStore, tenant: str, seed: int, trunk, new: bool = False) -> None:
    store.save(*synthetic_expert(tenant, RANK, seed, trunk.fingerprint), new_tenant=new)


# an index's candidates depend on its graph (built in another order when carried over): with candidates from the 128
# nearest rows both graphs hold the exact top-k here, so their routed answers must agree to the bit
@pytest.mark.parametrize("index", [None, IndexSettings(rows=128)], ids=["exact", "index"])
def test_a_carried_over_mixture_answers_as_a_fresh_server_after_every_write(store, trunk, index):
    server = Server(store.root, trunk=trunk, index=index, verify="lazy")
    pager = server.model.pager
    writes = [
        lambda: save(store, "grown", 100, trunk, new=True),  # a tenant grown
        lambda: store.hibernate("t00003"),
        lambda: save(store, "t00005", 101, trunk),  # version 2
        lambda: store.rollback("t00005", 1),
        lambda: store.wake("t00003"),
        lambda: store.delete("t00007"),
    ]
    for write in writes:
        write()
        assert server.refresh()
        assert server.model.pager is pager  # carried over, not built afresh
        assert set(pager.resident()) <= set(server.model.keys)  # a dropped expert's memory freed
        fresh = Server(store.root, trunk=trunk, index=index, verify="lazy")
        assert server.tenants == fresh.tenants
        assert torch.equal(server.model.router.weight, fresh.model.router.weight)
        assert torch.equal(server.model.router.bias, fresh.model.router.bias)
        assert answers(server) == answers(fresh)
    assert "t00007" not in server.tenants and "grown" in server.tenants


def test_removed_experts_are_masked_in_the_index_until_a_rebuild(store, trunk):
    server = Server(store.root, trunk=trunk, index=IndexSettings(), verify="lazy")
    graph = server.model.index.graph
    asleep = []
    for tenant in [f"t{i:05d}" for i in range(0, 24, 3)]:
        store.hibernate(tenant)
        asleep.append(tenant)
        server.refresh()
        index = server.model.index
        routed = server.predict(TEXTS * 4, None)
        assert not {a.tenant for a in routed} & set(asleep)  # a masked row never routes
        if index.graph is graph:
            assert index.masked_share == pytest.approx(len(asleep) / 24) and index.masked_share <= MAX_MASKED
        else:  # rebuilt once the masked share passed the threshold: only live rows in it
            assert len(asleep) / 24 > MAX_MASKED and index.masked_share == 0.0
            break
    else:
        pytest.fail("the index was never rebuilt")


def test_an_index_carried_over_finds_the_rows_of_added_experts():
    torch.manual_seed(0)
    router = TopKRouter(8, [1] * 6, top_k=2)
    index = RowIndex.build(router)
    longest = router.weight.norm(dim=-1).max()
    grown = TopKRouter(8, [1] * 7, top_k=2, random_init=False)  # old experts 0, 1, 3, 4, 5 kept; 5, 6 added
    with torch.no_grad():
        grown.weight[:5] = router.weight[[0, 1, 3, 4, 5]] * 0.1
        grown.bias[:5] = router.bias[[0, 1, 3, 4, 5]]
        grown.weight[5, 0, 0] = grown.weight[6, 0, 1] = 0.9 * longest  # within the graph's l2 lift
    followed = index.follow(grown, torch.tensor([0, 1, -1, 2, 3, 4]), [5, 6])
    assert followed.graph is index.graph and followed.num_rows == 7 and len(followed.ids) == 8
    assert index.num_rows == 6 and index.router is router  # the old index answers as before
    x = torch.eye(8)[:2] * 10  # each query's best row: the added expert 5's, then 6's
    assert followed.top_k(x, k=1)[1].flatten().tolist() == [5, 6]
    found = followed.nearest_rows(torch.randn(64, 8), rows=7).flatten().tolist()
    assert set(found) <= set(range(7)) | {-1}  # -1: a masked row (the removed expert's) found, and dropped
    assert followed.nearest_rows(torch.randn(4, 8), rows=3).shape == (4, 4)  # one more asked for, to cover it
    assert followed.top_k(torch.randn(64, 8))[1].max() < 7
    longer = TopKRouter(8, [1] * 7, top_k=2, random_init=False)
    with torch.no_grad():
        longer.weight.copy_(grown.weight)
        longer.weight[6, 0, 1] = 2 * longest  # longer than the lift: rebuilt
    assert index.follow(longer, torch.tensor([0, 1, -1, 2, 3, 4]), [5, 6]).graph is not index.graph


def test_an_answer_names_the_generation_it_was_read_from(store, trunk):
    server = Server(store.root, trunk=trunk, verify="lazy")
    assert generation_header(server.state) == {GENERATION_HEADER: "1"}
    store.hibernate("t00001")
    server.refresh()
    assert generation_header(server.state) == {GENERATION_HEADER: "2"}


def test_a_generation_still_served_answers_from_a_version_retired_since(store, trunk):
    """A rollback retires the newer version at once; requests still read by the generation before it (until the
    replica moves on) page it in from its retired copy instead of failing."""
    save(store, "t00005", 101, trunk)  # version 2
    server = Server(store.root, trunk=trunk, verify="lazy")  # nothing paged in yet
    expected = [a.to_dict() for a in Server(store.root, trunk=trunk).predict(TEXTS, "t00005")]
    store.rollback("t00005", 1)
    assert not store.path("t00005", 2).exists()
    assert [a.to_dict() for a in server.predict(TEXTS, "t00005")] == expected
    assert server.refresh() and server.predict(TEXTS, "t00005") != expected  # version 1 once moved on
