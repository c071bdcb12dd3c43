"""Paging experts under a byte budget: predictions never depend on the budget, the pager's bookkeeping is
exact, and concurrent predictions stay correct while other threads evict and prefetch."""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from moe.inference import ExpertPager, GateSettings, load_mixture, predict
from moe.model import UNKNOWN_TENANT, ExpertInfo, build_mixture
from moe.model.stats import class_statistics
from moe.store import ExpertStore, expert_shards

FP = "c" * 64
DIM, RANK = 16, 16  # the adapter dominates an expert's size: any two fit where no three do
LABELS = [1, 2, 3, 4, 5, 6, 2, 3, 1, 6, 4, 5]  # labels per expert: 12 experts of differing sizes
NAMES = [f"t{i:02d}" for i in range(len(LABELS))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A stored mixture of 12 experts, the in-memory model it came from, and query batches."""
    torch.manual_seed(0)
    infos = [ExpertInfo(name, tuple(f"{name}-l{j}" for j in range(c))) for name, c in zip(NAMES, LABELS, strict=True)]
    model = build_mixture(infos, dim=DIM, rank=RANK)
    with torch.no_grad():
        model.bank.up.normal_()
        model.bank.head.normal_()
        model.bank.head_bias.normal_()
        model.router.weight.normal_()
    model.eval()
    store = ExpertStore(tmp_path_factory.mktemp("paging") / "experts")
    stats = {
        info.tenant: class_statistics(torch.randn(40, DIM), torch.arange(40) % len(info.labels), len(info.labels))
        for info in infos
    }
    for tensors, meta in expert_shards(model, FP, stats):
        store.save(tensors, meta)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in (1, 7, 32, 64, 5):
        x = torch.randn(size, DIM, generator=generator)
        tenant = torch.randint(-1, len(NAMES), (size,), generator=generator)  # -1 is UNKNOWN_TENANT
        batches.append((x, tenant))
    assert UNKNOWN_TENANT == -1 and any((t == UNKNOWN_TENANT).any() for _, t in batches)
    return store, model, batches


def expert_sizes(store: ExpertStore) -> dict[tuple[str, int], int]:
    paged = load_mixture(store, trunk_fingerprint=FP, budget_bytes=1 << 30)
    return dict(paged.pager.sizes)


def two_expert_budget(store: ExpertStore) -> int:
    sizes = sorted(expert_sizes(store).values())
    budget = sizes[-1] + sizes[-2]
    assert budget < sum(sizes[:3]), "the budget must hold any two experts and never three"
    return budget


def assert_same_output(a, b) -> None:
    for name in ("log_probs", "weights", "experts", "label_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# -- the paged mixture -----------------------------------------------------------------------------------


def test_a_tiny_budget_gives_bit_identical_outputs(world):
    store, _, batches = world
    budget = two_expert_budget(store)
    tiny = load_mixture(store, trunk_fingerprint=FP, budget_bytes=budget, skip_failed=True)
    failed = tiny.left_out
    roomy = load_mixture(store, trunk_fingerprint=FP, budget_bytes=1 << 30)
    assert failed == {} and len(tiny.keys) == len(NAMES)
    for _ in range(2):  # a second pass runs over whatever the first left resident
        for x, tenant in batches:
            with torch.no_grad():
                assert_same_output(tiny(x), roomy(x))
                assert_same_output(tiny(x, tenant), roomy(x, tenant))
                assert_same_output(tiny(x, torch.full_like(tenant, UNKNOWN_TENANT)), roomy(x))

    summary = tiny.pager.summary()
    assert summary["device"]["evictions"] > 0 and summary["device"]["misses"] > len(NAMES)
    assert 0 < summary["resident"]["peak_device_bytes"] <= budget == tiny.pager.device_budget
    assert summary["resident"]["device_experts"] <= 2
    roomy_summary = roomy.pager.summary()
    assert roomy_summary["device"]["evictions"] == 0 and roomy_summary["device"]["misses"] <= len(NAMES)
    assert summary["disk"]["page_ins"] == summary["device"]["misses"]  # no host tier: every miss read the disk


def test_no_wave_keeps_weights_alive_past_the_budget(world):
    """Evicted weights are freed before the next page-in: live expert memory never exceeds the budget."""
    store, _, batches = world
    budget = two_expert_budget(store)
    paged = load_mixture(store, trunk_fingerprint=FP, budget_bytes=budget)
    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> one of its tensors, while alive
    read, over = paged.pager.load, []

    def tracking_read(key):
        live = sum(paged.pager.sizes[k] for k in list(alive.keys()))
        if live + paged.pager.sizes[key] > budget:
            over.append((key, live))
        tensors = read(key)
        alive[key] = tensors["down.weight"]
        return tensors

    paged.pager.load = tracking_read
    with torch.no_grad():
        for x, _ in batches:
            paged(x)
    assert paged.pager.summary()["device"]["evictions"] > 0 and over == []


def test_paged_predictions_agree_with_the_in_memory_mixture(world):
    store, model, batches = world
    paged = load_mixture(store, trunk_fingerprint=FP, budget_bytes=two_expert_budget(store))
    assert paged.tenants == model.tenants and paged.labels == model.labels
    for x, tenant in batches:
        for given in (None, tenant):
            with torch.no_grad():
                ours, theirs = paged(x, given), model(x, given)
            assert torch.equal(ours.experts, theirs.experts)
            torch.testing.assert_close(ours.weights, theirs.weights, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=1e-4, rtol=0)
            predicted, expected = predict(paged, x, given), predict(model, x, given)
            assert [(p.tenant, p.intent, p.experts) for p in predicted] == [
                (p.tenant, p.intent, p.experts) for p in expected
            ]
            assert [p.score for p in predicted] == pytest.approx([p.score for p in expected], abs=1e-5)
    # tenant given: the answer is always that tenant's
    x, tenant = batches[3]
    names = [None if t < 0 else paged.tenants[t] for t in tenant.tolist()]
    for name, prediction in zip(names, predict(paged, x, paged.tenant_ids(names)), strict=True):
        assert name is None or prediction.tenant == name


@pytest.mark.parametrize("routing", ["trained", "statistics"])
def test_a_float16_store_keeps_its_gate_in_float16_and_scores_it_exactly(world, tmp_path, routing):
    from moe.store.precision import convert_shard

    store, _, batches = world
    half = ExpertStore(tmp_path / "half")
    for tenant in store.tenants():
        version = store.latest(tenant)
        convert_shard(store.path(tenant, version), half.path(tenant, version), "float16")
    paged = load_mixture(half, trunk_fingerprint=FP, gate=GateSettings(source=routing), skip_failed=True)
    failed = paged.left_out
    assert failed == {} and paged.router.weight.dtype == torch.float16  # half the resident routing memory
    widened = paged.router.subset(list(range(len(NAMES))))  # the same rows, held in float32
    with torch.no_grad():
        widened.weight.data = widened.weight.data.float()
        for x, _ in batches:
            ours, theirs = paged.router(x, None, keep_rows=True), widened(x, None, keep_rows=True)
            for name in ("row_logits", "logits", "energy", "max_row", "probs", "experts", "weights"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


# -- the pager on its own, with a fake disk ---------------------------------------------------------------


class FakeDisk:
    """Experts of `sizes[key]` bytes (float32 zeros), counting every read."""

    def __init__(self):
        self.reads: Counter = Counter()
        self.broken: set[str] = set()

    def __call__(self, key):
        if key in self.broken:
            raise OSError(f"expert {key} unreadable")
        self.reads[key] += 1
        return {"w": torch.full((SIZES[key] // 4,), float(ord(key)))}


SIZES = {"a": 100, "b": 100, "c": 100, "d": 40, "e": 200}


def make_pager(device_budget: int = 200, host_budget: int = 0, keys: str = "abcd") -> tuple[ExpertPager, FakeDisk]:
    disk = FakeDisk()
    pager = ExpertPager(disk, "cpu", device_budget=device_budget, host_budget=host_budget)
    for key in keys:
        pager.register(key, SIZES[key])
    return pager, disk


def use(pager: ExpertPager, *keys: str) -> None:
    with pager.acquire(list(keys)) as resident:
        assert list(resident) == list(dict.fromkeys(keys))
        for key, tensors in resident.items():
            assert tensors["w"].numel() * 4 == SIZES[key] and bool((tensors["w"] == ord(key)).all())


def test_lru_order_evictions_and_exact_counters():
    pager, disk = make_pager(device_budget=200)
    use(pager, "a")
    use(pager, "b")
    assert pager.resident() == ["a", "b"]
    use(pager, "a")  # hit: a becomes most recent
    assert pager.resident() == ["b", "a"]
    use(pager, "c")  # evicts b, the least recently used
    assert pager.resident() == ["a", "c"]
    use(pager, "b")  # evicts a
    assert pager.resident() == ["c", "b"]
    use(pager, "c", "b")  # both hits
    assert pager.resident() == ["c", "b"]
    use(pager, "d", "a")  # needs 140 bytes: evicts c and then b (only c would leave 100 free, too little)
    assert pager.resident() == ["d", "a"] and pager.resident_bytes() == 140
    use(pager, "b")  # 60 free: one eviction (d, the least recent) frees enough
    assert pager.resident() == ["a", "b"]

    assert disk.reads == Counter({"a": 2, "b": 3, "c": 1, "d": 1})
    s = pager.summary()
    assert (s["device"]["hits"], s["device"]["misses"], s["device"]["evictions"]) == (3, 7, 5)
    assert (s["device"]["page_ins"], s["device"]["bytes_in"]) == (7, 640)
    assert (s["disk"]["page_ins"], s["disk"]["bytes_in"]) == (7, 640)
    assert (s["host"]["hits"], s["host"]["misses"], s["host"]["page_ins"], s["host"]["evictions"]) == (0, 7, 0, 0)
    assert s["resident"] == {"device_bytes": 200, "host_bytes": 0, "device_experts": 2, "peak_device_bytes": 200}
    assert s["disk"]["page_in_s_mean"] >= 0 and s["device"]["page_in_s_p99"] >= s["device"]["page_in_s_p50"] >= 0


def test_waves_fit_the_budget_in_order():
    pager, _ = make_pager(device_budget=200, keys="abcde")
    assert pager.waves([]) == []
    assert pager.waves(["a", "b", "c", "d", "e"]) == [["a", "b"], ["c", "d"], ["e"]]
    assert pager.waves(["d", "a", "b", "e", "d"]) == [["d", "a"], ["b"], ["e"], ["d"]]
    assert pager.waves(["e"]) == [["e"]]
    for wave in pager.waves(list("abcdedcba")):
        assert sum(SIZES[k] for k in wave) <= 200


def test_a_wave_or_an_expert_larger_than_the_budget_is_refused():
    pager, disk = make_pager(device_budget=200)
    with pytest.raises(ValueError, match="device budget"), pager.acquire(["a", "b", "c"]):
        pass
    with pytest.raises(ValueError, match="device budget"):
        pager.register("huge", 201)
    assert "huge" not in pager.sizes and disk.reads == Counter() and pager.resident() == []
    pager.register("e", SIZES["e"])  # exactly the budget is fine
    use(pager, "e")
    use(pager, "a", "a", "b")  # a repeated key counts once
    assert pager.resident() == ["a", "b"]


def test_the_host_tier_serves_evicted_experts_without_reading_the_disk():
    pager, disk = make_pager(device_budget=100, host_budget=100)
    use(pager, "a")
    use(pager, "b")  # a goes to the host tier
    assert pager.resident() == ["b"] and pager.resident("host") == ["a"]
    use(pager, "a")  # from the host: no disk read; b goes to the host
    assert disk.reads == Counter({"a": 1, "b": 1})
    assert pager.resident() == ["a"] and pager.resident("host") == ["b"]
    use(pager, "c")  # a to the host, pushing b out of it (host budget: one expert)
    assert pager.resident("host") == ["a"] and pager.resident_bytes("host") == 100
    use(pager, "b")  # b was pushed out of the host: read again
    assert disk.reads == Counter({"a": 1, "b": 2, "c": 1})
    s = pager.summary()
    assert (s["host"]["hits"], s["host"]["misses"], s["host"]["evictions"], s["host"]["page_ins"]) == (1, 4, 2, 4)
    assert (s["device"]["misses"], s["device"]["evictions"], s["disk"]["page_ins"]) == (5, 4, 4)
    assert s["resident"]["peak_device_bytes"] <= 100


def test_prefetch_fills_free_space_then_the_host_never_exceeding_budgets():
    pager, disk = make_pager(device_budget=200, host_budget=100)
    pager.prefetch(["a", "b", "c"])  # a and b fit; c would evict a prefetched expert: it goes to the host
    assert pager.resident() == ["a", "b"] and pager.resident("host") == ["c"]
    assert pager.summary()["resident"]["peak_device_bytes"] <= 200
    use(pager, "a", "b")
    assert pager.summary()["device"]["hits"] == 2 and pager.summary()["device"]["misses"] == 0
    use(pager, "c")  # from the host
    assert disk.reads == Counter({"a": 1, "b": 1, "c": 1}) and pager.summary()["host"]["hits"] == 1
    pager.prefetch(["a"])  # already resident: nothing read
    assert disk.reads["a"] == 1

    # a pinned expert is never evicted for a prefetch
    pager, disk = make_pager(device_budget=200, host_budget=0)
    with pager.acquire(["a"]):
        pager.prefetch(["b", "c"])  # b fits; c would need a (pinned) or b (prefetched): skipped, no host tier
        assert pager.resident() == ["a", "b"]
    assert disk.reads == Counter({"a": 1, "b": 1})
    pager.prefetch(["c"])  # nothing pinned now: the least recently used makes room
    assert pager.resident() == ["b", "c"] and pager.summary()["resident"]["peak_device_bytes"] <= 200


def test_evict_removes_an_expert_from_both_tiers():
    pager, disk = make_pager(device_budget=100, host_budget=100)
    use(pager, "a")
    use(pager, "b")
    assert pager.resident() == ["b"] and pager.resident("host") == ["a"]
    pager.evict("a")
    pager.evict("b")
    assert pager.resident() == [] and pager.resident("host") == []
    pager.evict("c")  # never loaded: nothing to do
    use(pager, "a")
    assert disk.reads == Counter({"a": 2, "b": 1})  # gone from the host too: read again
    s = pager.summary()
    assert s["device"]["evictions"] == 2 and s["host"]["evictions"] == 1
    pager.forget("a")
    assert pager.resident() == [] and "a" not in pager.sizes


def test_evict_waits_for_a_computation_that_pins_the_expert():
    pager, _ = make_pager(device_budget=200)
    released = threading.Event()
    with pager.acquire(["a"]):
        evicting = threading.Thread(target=lambda: (pager.evict("a"), released.set()))
        evicting.start()
        assert not released.wait(0.2) and pager.resident() == ["a"]
    evicting.join(10)
    assert released.is_set() and pager.resident() == []


def test_a_failed_read_leaves_no_pin_behind():
    """A wave whose second expert can not be read: the error reaches the caller, and the first expert (paged in
    before the failure) is not left pinned, so that it can still be evicted and its space reused."""
    pager, disk = make_pager(device_budget=200)
    disk.broken = {"b"}
    with pytest.raises(OSError, match="expert b unreadable"):
        use(pager, "a", "b")
    assert pager.resident() == ["a"] and pager.sizes.keys() == set("abcd")
    evicting = threading.Thread(target=pager.evict, args=("a",), daemon=True)
    evicting.start()
    evicting.join(5)
    assert not evicting.is_alive(), "evict blocked on a pin that nobody holds"
    assert pager.resident() == []
    disk.broken = set()
    use(pager, "c")
    use(pager, "b", "a")  # evicts c: nothing is stuck
    assert pager.resident() == ["b", "a"] and disk.reads == Counter({"a": 2, "b": 1, "c": 1})


# -- concurrency ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host_experts", [0, 3])
def test_concurrent_predictions_while_experts_are_evicted_and_prefetched(world, monkeypatch, host_experts):
    store, _, _ = world
    sizes = expert_sizes(store)
    budget = two_expert_budget(store) + min(sizes.values())  # two or three experts
    paged = load_mixture(
        store, trunk_fingerprint=FP, budget_bytes=budget, host_budget_bytes=host_experts * max(sizes.values())
    )
    reference = load_mixture(store, trunk_fingerprint=FP, budget_bytes=1 << 30)
    pager = paged.pager

    # Every wave in use, across threads: a pinned expert must stay resident (the pager's copy, not another)
    # until released, and what is in use at once must fit the budget (on a GPU, that is what occupies it).
    in_use: Counter = Counter()
    watch, problems, peak_in_use = threading.Lock(), [], [0]
    real_acquire = pager.acquire

    @contextmanager
    def checked_acquire(keys):
        with real_acquire(keys) as resident:
            with watch:
                in_use.update(list(resident))
                peak_in_use[0] = max(peak_in_use[0], sum(sizes[k] for k, n in in_use.items() if n > 0))
            time.sleep(0.0005)  # widen the window for the disturbing threads
            yield resident
            with pager._lock:
                gone = [k for k, t in resident.items() if pager._device.get(k) is not t]
            with watch:
                in_use.subtract(list(resident))
                if gone:
                    problems.append(f"pinned experts {gone} left the device while in use")

    monkeypatch.setattr(pager, "acquire", checked_acquire)
    generator = torch.Generator().manual_seed(7)
    work = []
    for i in range(6):
        x = torch.randn(12 + 4 * i, DIM, generator=generator)
        tenant = torch.randint(-1, len(NAMES), (x.shape[0],), generator=generator) if i % 2 else None
        with torch.no_grad():
            work.append((x, tenant, reference(x, tenant)))
    start = threading.Barrier(8)

    def predict(i: int) -> int:
        x, tenant, expected = work[i]
        start.wait(timeout=30)
        for _ in range(30):
            with torch.no_grad():
                assert_same_output(paged(x, tenant), expected)
        return i

    def disturb(seed: int) -> int:
        rng = random.Random(seed)
        start.wait(timeout=30)
        for _ in range(30):
            pager.evict(rng.choice(paged.keys))
            pager.prefetch(rng.sample(paged.keys, 3))
            time.sleep(0.0005)
        return seed

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(predict, i) for i in range(6)] + [pool.submit(disturb, s) for s in (1, 2)]
        assert [f.result(timeout=120) for f in futures] == [0, 1, 2, 3, 4, 5, 1, 2]  # re-raises any failure

    assert problems == []
    summary = pager.summary()
    assert 0 < summary["resident"]["peak_device_bytes"] <= pager.device_budget == budget
    assert 0 < peak_in_use[0] <= budget
    assert summary["device"]["evictions"] > 0 and summary["resident"]["device_bytes"] <= budget
    assert summary["resident"]["host_bytes"] <= pager.host_budget
    assert sum(pager._pins.values()) == 0 and not +in_use  # every pin released
    if host_experts:
        assert summary["host"]["hits"] > 0


def test_the_statistics_gate_leaves_out_an_expert_without_statistics(world, tmp_path):
    store, model, _ = world
    widest = [name for name, c in zip(NAMES, LABELS, strict=True) if c == max(LABELS)]
    mixed = ExpertStore(tmp_path / "mixed")
    for tenant in store.tenants():
        tensors, meta = store.load(tenant)
        if tenant in widest:  # recorded without statistics
            tensors |= {"stats.count": torch.zeros_like(tensors["stats.count"])}
            tensors |= {"stats.mean": torch.zeros_like(tensors["stats.mean"])}
        mixed.save(tensors, meta)
    paged = load_mixture(mixed, trunk_fingerprint=FP, gate=GateSettings(source="statistics"), skip_failed=True)
    failed = paged.left_out
    assert sorted(failed) == widest and all("holds no feature statistics" in str(e) for e in failed.values())
    assert len(paged.keys) == len(NAMES) - len(widest)
    assert paged.router.weight.shape[1] == max(c for c in LABELS if c != max(LABELS))  # the gate narrowed
    with torch.no_grad():
        assert paged(torch.randn(8, DIM)).experts.shape == (8, 2)
    every = load_mixture(mixed, trunk_fingerprint=FP)  # its stored gate rows still serve
    assert len(every.keys) == len(NAMES)


def test_a_shard_reverified_after_a_change_holds_only_its_weights(world):
    store, _, _ = world
    paged = load_mixture(store, trunk_fingerprint=FP)
    key = paged.keys[-1]
    path = store.path(*key)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same bytes, new identity: checked in full again
    tensors = paged.pager.load(key)
    assert sum(t.untyped_storage().nbytes() for t in tensors.values()) == paged.pager.sizes[key]
