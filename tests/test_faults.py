"""Faults stay with their tenant (issue 30): non-finite or damaged tensors of every kind of every expert kind are
refused by name, at write and at read; one odd expert is the one refused, not the many; a vanished object and a
stopped S3 endpoint are a ShardError naming the URL, bounded in time, and leave only that tenant out; a reader never
sees half an upgrade; an export that fails leaves no half bundle; a repeated header row is refused by line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fsspec
import pytest
import torch

from moe.data import TenantDataError, read_tenant_file
from moe.inference import load_mixture
from moe.model import ExpertInfo, build_mixture
from moe.model.kinds import Architecture
from moe.model.pathway import PathwayLayout, PathwaySpec
from moe.model.stats import class_statistics
from moe.store import ExpertMeta, ExpertStore, ShardError, expert_shards
from moe.store.remote import RemoteStore
from moe.store.shard import read_shard, save_atomically, tensors_sha256, write_shard
from tests.moto_s3 import moto_s3
from tests.service import free_port

FP = "e" * 64
DIM = 16
PATHWAY = PathwayLayout(PathwaySpec(layers=1, rank=2, alpha=4.0), trunk_layers=2, intermediate_size=32)
KINDS = {"adapter": Architecture(DIM, 8), "pathway": Architecture(DIM, 0, kind="pathway", pathway=PATHWAY)}


def random_shard(arch: Architecture, labels: int = 3) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
    generator = torch.Generator().manual_seed(0)
    shapes = arch.shapes(labels)
    tensors = {name: torch.randn(shape, generator=generator).to(arch.torch_dtype) for name, shape in shapes.items()}
    return tensors, ExpertMeta("t", tuple(f"l{i}" for i in range(labels)), FP, arch)


def written_around_the_check(path: Path, tensors: dict[str, torch.Tensor], meta: ExpertMeta) -> Path:
    """A shard as a training bug or a bad conversion writes it: its checksums recomputed over what it holds."""
    return save_atomically(path, tensors, meta.to_strings(tensors_sha256(tensors)))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_in_any_tensor_of_any_kind_is_refused_at_write_and_at_read_by_name(tmp_path, kind, bad):
    tensors, meta = random_shard(KINDS[kind])
    read_shard(write_shard(tmp_path / "good.safetensors", tensors, meta))  # the clean shard reads back
    for name in [n for n, t in tensors.items() if t.numel()]:  # every tensor kind the expert kind holds
        poisoned = {k: v.clone() for k, v in tensors.items()}
        poisoned[name].view(-1)[0] = bad
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(ShardError, match=f"{path.name}: tensor {name} holds 1 non-finite"):
            write_shard(path, poisoned, meta)
        assert not path.exists()
        written_around_the_check(path, poisoned, meta)
        with pytest.raises(ShardError, match=f"{path.name}: tensor {name} holds 1 non-finite"):
            read_shard(path)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_damaged_byte_in_any_tensor_of_any_kind_is_refused_by_name(tmp_path, kind):
    tensors, meta = random_shard(KINDS[kind])
    path = write_shard(tmp_path / "v0001.safetensors", tensors, meta)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    entries = json.loads(path.read_bytes()[8:header])
    for name in [n for n, t in tensors.items() if t.numel()]:
        data = bytearray(path.read_bytes())
        start, _ = entries[name]["data_offsets"]
        data[header + start] ^= 0x10  # a low mantissa bit of the tensor's first value: finite, but not the one saved
        damaged = tmp_path / f"damaged-{name}.safetensors"
        damaged.write_bytes(bytes(data))
        with pytest.raises(ShardError, match=f"{damaged.name}: (checksum mismatch|tensor {name})"):
            read_shard(damaged)


def mixture_shards(names: list[str], rank: int, seed: int = 0):
    torch.manual_seed(seed)
    infos = [ExpertInfo(name, (f"{name}-a", f"{name}-b", f"{name}-c")) for name in names]
    model = build_mixture(infos, dim=DIM, rank=rank)
    with torch.no_grad():
        for tensor in (model.bank.up, model.bank.head, model.bank.head_bias, model.router.weight):
            tensor.normal_()
    stats = {n: class_statistics(torch.randn(30, DIM), torch.arange(30) % 3, 3) for n in names}
    return list(expert_shards(model.eval(), FP, stats))


@pytest.fixture
def store(tmp_path) -> ExpertStore:
    store = ExpertStore(tmp_path / "experts")
    for tensors, meta in mixture_shards(["bank", "music", "weather"], rank=8):
        store.save(tensors, meta)
    return store


def test_a_nan_shard_in_a_store_is_left_out_by_name_and_changes_no_other_answer(store):
    features = torch.randn(12, DIM, generator=torch.Generator().manual_seed(3))
    before = load_mixture(store, trunk_fingerprint=FP)
    tensors, meta = store.load("music")
    tensors["gate.weight"][0, 0] = float("nan")  # a NaN gate row would draw every routed query to it
    written_around_the_check(store.path("music", 1), tensors, meta)
    with pytest.raises(ValueError, match="music/v0001.safetensors: tensor gate.weight holds 1 non-finite"):
        load_mixture(store, trunk_fingerprint=FP)
    model = load_mixture(store, trunk_fingerprint=FP, skip_failed=True)
    assert model.tenants == ["bank", "weather"] and list(model.left_out) == ["music"]
    for name in ("bank", "weather"):
        given = torch.full((12,), before.tenant_index(name))
        mine = torch.full((12,), model.tenant_index(name))
        assert torch.equal(model(features, mine).scores, before(features, given).scores)
    stats, _ = store.load("bank")
    stats["stats.mean"][0, 0] = float("nan")  # the statistics gate's message names the tensor, not an overflow
    written_around_the_check(store.path("bank", 1), stats, store.meta("bank"))
    with pytest.raises(ShardError, match="tensor stats.mean holds 1 non-finite"):
        store.load("bank")


def test_one_odd_expert_is_the_one_refused_and_growth_picks_the_common_architecture(store, tmp_path):
    odd_tensors, odd_meta = mixture_shards(["aaa"], rank=4)[0]  # sorts first, another architecture
    store.save(odd_tensors, odd_meta)
    model = load_mixture(store, trunk_fingerprint=FP, skip_failed=True)
    assert model.tenants == ["bank", "music", "weather"], f"served {model.tenants}, left out {list(model.left_out)}"
    assert list(model.left_out) == ["aaa"]
    assert "architecture" in str(model.left_out["aaa"]) and "aaa" in str(model.left_out["aaa"])
    assert store.architecture() == store.meta("bank").architecture != store.meta("aaa").architecture
    from moe.lifecycle import Lifecycle
    from moe.trunk import TinyTrunk

    trunk = TinyTrunk(dim=DIM, freeze=True)
    lifecycle = Lifecycle(store, trunk, trunk.encode, None)  # type: ignore[arg-type]
    assert lifecycle.architecture() == store.meta("bank").architecture.on(DIM)


def test_a_reader_sees_the_published_generation_not_a_version_written_since(store):
    before = load_mixture(store, trunk_fingerprint=FP)
    tensors, meta = mixture_shards(["music"], rank=8, seed=5)[0]
    with store.changes("upgrade"):  # a many-write operation in flight: nothing published yet
        store.save(tensors, meta)
        inside = load_mixture(ExpertStore(store.root), trunk_fingerprint=FP)
        assert inside.keys == before.keys, f"a reader mid-upgrade loaded {inside.keys}, not the published {before.keys}"
    assert load_mixture(store, trunk_fingerprint=FP).keys == [("bank", 1), ("music", 2), ("weather", 1)]


def test_a_repeated_header_row_is_refused_with_its_line(tmp_path):
    path = tmp_path / "bank.csv"
    path.write_text("text,label\nwhat is my balance,balance\ntext,label\nblock my card,card\n")
    with pytest.raises(TenantDataError, match="header row repeated") as caught:
        read_tenant_file("bank", path)
    assert "3" in str(caught.value)


def test_the_s3_timeouts_and_retries_are_bounded():
    from botocore.config import Config
    from botocore.session import get_session

    from moe.store.remote import ATTEMPTS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S, bounded_options

    options = bounded_options("s3://b/p", {"endpoint_url": "http://x"})
    config = options["config_kwargs"]
    assert config["connect_timeout"] == CONNECT_TIMEOUT_S and config["read_timeout"] == READ_TIMEOUT_S
    for _ in range(2):  # a client as s3fs makes one: ATTEMPTS tries in all, and the next client's options the same
        config = bounded_options("s3://b/p", {"endpoint_url": "http://x"})["config_kwargs"]
        assert config["retries"] == {"total_max_attempts": ATTEMPTS, "mode": "standard"}
        keys = {"aws_access_key_id": "k", "aws_secret_access_key": "s", "region_name": "us-east-1"}
        client = get_session().create_client("s3", endpoint_url="http://x", config=Config(**config), **keys)
        assert client.meta.config.retries["total_max_attempts"] == ATTEMPTS
    assert bounded_options("s3://b/p", {"config_kwargs": {"read_timeout": 1}})["config_kwargs"]["read_timeout"] == 1


BUCKETS = iter(range(1000))  # moto's servers in one process share their buckets: a new one per test


@pytest.fixture
def s3_store(tmp_path):
    bucket = f"faults{next(BUCKETS)}"
    with moto_s3(bucket) as options:
        writer = RemoteStore(f"s3://{bucket}/store", tmp_path / "writer", **options)
        for tensors, meta in mixture_shards(["bank", "music", "weather"], rank=8):
            writer.save(tensors, meta)
        yield options, bucket


def test_an_object_removed_between_listing_and_fetch_leaves_that_tenant_out_naming_its_url(s3_store, tmp_path):
    options, bucket = s3_store
    reader = RemoteStore(f"s3://{bucket}/store", tmp_path / "reader", **options)
    fs = fsspec.filesystem("s3", **options)
    get_file = reader.fs.get_file

    def vanish_then_get(remote, local, **kwargs):  # another machine retires music's version just before the fetch
        if "music/" in remote:
            fs.rm_file(f"{bucket}/store/music/v0001.safetensors")
        return get_file(remote, local, **kwargs)

    reader.fs.get_file = vanish_then_get
    model = load_mixture(reader, trunk_fingerprint=FP, skip_failed=True)
    assert model.tenants == ["bank", "weather"]
    error = model.left_out["music"]
    assert isinstance(error, ShardError) and f"s3://{bucket}/store/music/v0001.safetensors" in str(error)


def test_a_stopped_endpoint_is_a_shard_error_naming_the_url_within_the_stated_bound(tmp_path):
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}
    store = RemoteStore("s3://gone/store", tmp_path / "cache", **options)
    started = time.perf_counter()
    with pytest.raises(ShardError, match="s3://gone/store") as caught:
        load_mixture(store, trunk_fingerprint=FP, skip_failed=True)
    assert "unreachable" in str(caught.value) and time.perf_counter() - started < 30


def test_a_refused_connection_after_listing_leaves_every_tenant_out_by_url(s3_store, tmp_path):
    options, bucket = s3_store
    reader = RemoteStore(f"s3://{bucket}/store", tmp_path / "reader", **options)
    state = reader.state()
    reader.fs.get_file = lambda *a, **k: (_ for _ in ()).throw(ConnectionRefusedError("connection refused"))
    with pytest.raises(ValueError, match=f"s3://{bucket}/store/bank/v0001.safetensors: unreachable"):
        load_mixture(reader.at(state), trunk_fingerprint=FP, skip_failed=True)
