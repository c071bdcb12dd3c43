"""The benchmarks' shared code: synthetic stores that `load_mixture` loads, the pager's `demote`, memory readers."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from moe.experiments.bench import (
    DIM,
    LABELS,
    SYNTHETIC_FINGERPRINT,
    machine_info,
    memory_now,
    rank_for,
    rss_bytes,
    write_store,
)
from moe.inference import load_mixture
from moe.model import TENSOR_NAMES


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("bench") / "store", tenants=5, rank=2, progress=False)


def test_written_store_loads(store):
    model = load_mixture(store, trunk_fingerprint=SYNTHETIC_FINGERPRINT)
    assert model.tenants == [f"t{i:05d}" for i in range(5)]
    assert not model.left_out
    assert all(len(info.labels) == LABELS for info in model.experts)
    assert model.router.weight.dtype == torch.float32
    with torch.inference_mode():
        out = model(torch.nn.functional.normalize(torch.randn(8, DIM), dim=-1))
    assert out.experts.shape == (8, 2) and torch.isfinite(out.weights).all()
    with pytest.raises(ValueError, match="trunk"):
        load_mixture(store, trunk_fingerprint="f" * 64)


def test_written_store_dtype_and_size(tmp_path):
    rank = rank_for(0.25, "float16")
    model = load_mixture(write_store(tmp_path / "half", 2, rank, dtype="float16", progress=False))
    assert model.router.weight.dtype == torch.float16
    size = model.pager.sizes[model.keys[0]]
    assert abs(size / 2**20 - 0.25) < 0.01, size


def test_init_std_draws_the_named_parameters(tmp_path):
    plain = load_mixture(write_store(tmp_path / "a", 2, 2, progress=False))
    drawn = load_mixture(write_store(tmp_path / "b", 2, 2, init_std={"router.weight": 0.05}, progress=False))
    assert not torch.equal(plain.router.weight, drawn.router.weight)


def _host_and_device(pager, key):
    return key in pager.resident("host"), key in pager.resident("device")


def test_demote_moves_to_host_and_back(store):
    model = load_mixture(store, budget_bytes=1 << 30, host_budget_bytes=1 << 30)
    pager, key = model.pager, model.keys[0]
    with pager.acquire([key]) as resident:
        before = {name: resident[key][name].clone() for name in TENSOR_NAMES}
    assert _host_and_device(pager, key) == (False, True)
    disk_reads = pager.stats["disk"].page_ins

    assert pager.demote(key) is True
    assert _host_and_device(pager, key) == (True, False)
    assert pager.stats["device"].evictions == 1
    assert pager.demote(key) is True  # already on the host: nothing moves
    assert pager.stats["device"].evictions == 1

    with pager.acquire([key]) as resident:
        for name in TENSOR_NAMES:
            assert torch.equal(resident[key][name], before[name]), name
    assert _host_and_device(pager, key) == (False, True)
    assert pager.stats["host"].hits == 1
    assert pager.stats["disk"].page_ins == disk_reads  # promoted from the host tier, not read again


def test_demote_without_host_budget_pages_out(store):
    model = load_mixture(store, budget_bytes=1 << 30, host_budget_bytes=0)
    pager, key = model.pager, model.keys[1]
    with pager.acquire([key]) as resident:
        before = {name: resident[key][name].clone() for name in TENSOR_NAMES}
    assert pager.demote(key) is False
    assert _host_and_device(pager, key) == (False, False)
    with pager.acquire([key]) as resident:
        assert all(torch.equal(resident[key][n], before[n]) for n in TENSOR_NAMES)
    assert pager.stats["disk"].page_ins == 2


def test_demote_waits_while_pinned(store):
    model = load_mixture(store, budget_bytes=1 << 30, host_budget_bytes=1 << 30)
    pager, key = model.pager, model.keys[2]
    with pager.acquire([key]):
        worker = threading.Thread(target=pager.demote, args=(key,))
        worker.start()
        worker.join(timeout=0.2)
        assert worker.is_alive()  # blocked on the pin
        assert _host_and_device(pager, key) == (False, True)
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert _host_and_device(pager, key) == (True, False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_and_machine():
    now = memory_now()
    assert now["VmRSS"] > 0 and now["RssAnon"] + now["RssFile"] <= now["VmRSS"] + (1 << 20)
    assert rss_bytes("VmHWM") >= rss_bytes("VmRSS") > 0
    info = machine_info()
    assert info["device"] == "cpu" and info["cpus"] >= 1 and info["torch"] == torch.__version__


@pytest.mark.slow  # MiniLM
def test_written_pathway_store_loads_and_answers(tmp_path):
    """`write_pathway_store` (the load benchmark's pathway experts) writes shards that a mixture over the trunk loads,
    each pathway its own, answering a batch of texts."""
    from moe.experiments.bench import write_pathway_store
    from moe.trunk import HFEncoderTrunk

    trunk = HFEncoderTrunk()
    write_pathway_store(tmp_path, tenants=2, trunk=trunk, layers=1, lora_rank=2, progress=False)
    model = load_mixture(tmp_path, trunk=trunk)
    assert model.tenants == ["p00000", "p00001"] and not model.left_out
    texts = ["what is my balance", "play some jazz"]
    with torch.inference_mode():
        out = model(trunk.encode(texts), model.tenant_ids(["p00000", "p00001"]), hidden=model.hidden_states(texts))
    assert out.log_probs.shape[0] == 2 and torch.isfinite(out.weights).all()
