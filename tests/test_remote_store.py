"""Experts on object storage, against a real S3 API on localhost (the moto server, started here): a store written to a
bucket is served from it as the same store is served from disk, every check a local shard gets holds for an object
(and names its URL), the local cache keeps to its byte budget, and no write is ever visible half done."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import torch

from moe.inference import load_mixture
from moe.model import ExpertInfo, build_mixture
from moe.model.stats import class_statistics
from moe.store import ExpertStore, ShardError, expert_shards
from moe.store.bundle import read_bundle, write_manifest
from moe.store.remote import RemoteStore, mirror_bundle, open_store
from tests.moto_s3 import moto_s3

FP = "d" * 64
DIM, RANK = 16, 8
LABELS = [2, 3, 4, 2, 3, 5]
NAMES = [f"t{i:02d}" for i in range(len(LABELS))]
BUCKET = "experts"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free localhost port with one bucket; fsspec options that reach it."""
    with moto_s3(BUCKET) as options:
        yield options


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):
    """Six experts saved to a local store and to `s3://experts/base` alike, and query batches."""
    torch.manual_seed(0)
    infos = [ExpertInfo(name, tuple(f"{name}-l{j}" for j in range(c))) for name, c in zip(NAMES, LABELS, strict=True)]
    model = build_mixture(infos, dim=DIM, rank=RANK)
    with torch.no_grad():
        for tensor in (model.bank.up, model.bank.head, model.bank.head_bias, model.router.weight):
            tensor.normal_()
    stats = {
        info.tenant: class_statistics(torch.randn(30, DIM), torch.arange(30) % len(info.labels), len(info.labels))
        for info in infos
    }
    local = ExpertStore(tmp_path_factory.mktemp("local") / "experts")
    remote = RemoteStore(f"s3://{BUCKET}/base", tmp_path_factory.mktemp("writer-cache"), **s3)
    for tensors, meta in expert_shards(model.eval(), FP, stats):
        local.save(tensors, meta)
        remote.save(tensors, meta)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, DIM, generator=generator) for n in (1, 9, 32)]
    return local, remote, batches


def reader(s3, prefix: str, cache, budget: int = 1 << 30) -> RemoteStore:
    """A fresh reader of `s3://experts/<prefix>`, with its own cache folder (another machine)."""
    return RemoteStore(f"s3://{BUCKET}/{prefix}", cache, budget, **s3)


def copy_store(store: RemoteStore, prefix: str) -> str:
    """Copy every object of `store` to `s3://experts/<prefix>` (a store of its own to damage)."""
    for key in store.fs.find(store.prefix):
        store.fs.copy(key, f"{BUCKET}/{prefix}/" + key.removeprefix(store.prefix + "/"))
    return prefix


def keys(store: RemoteStore) -> set[str]:
    """The store's keys but its generation's (every write changes those)."""
    store.fs.invalidate_cache()
    found = {key.removeprefix(store.prefix + "/") for key in store.fs.find(store.prefix)}
    return {key for key in found if not key.startswith((".generation.json", ".generations/"))}


def assert_same_output(a, b) -> None:
    for name in ("log_probs", "weights", "experts", "label_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def cache_files(store: RemoteStore) -> dict[str, int]:
    """Every file in the cache folder but its lock, and its size."""
    files = (p for p in store.root.rglob("*") if p.is_file() and p.name != ".cache.lock")
    return {p.relative_to(store.root).as_posix(): p.stat().st_size for p in files}


# -- served from S3 as from disk -------------------------------------------------------------------------------


def test_a_store_written_to_s3_is_served_as_the_same_store_on_disk(s3, world, tmp_path):
    local, writer, batches = world
    assert keys(writer) == {f"{t}/v0001.safetensors" for t in NAMES}  # nothing but the shards: no temporary key
    store = reader(s3, "base", tmp_path)
    assert store.tenants() == local.tenants() == NAMES
    assert [store.latest(t) for t in NAMES] == [1] * len(NAMES)
    assert store.meta("t03") == local.meta("t03")
    served = load_mixture(store, trunk_fingerprint=FP, skip_failed=True)
    on_disk = load_mixture(local, trunk_fingerprint=FP)
    assert served.left_out == {} and [e.tenant for e in served.experts] == NAMES
    with torch.no_grad():
        for x in batches:
            assert_same_output(served(x), on_disk(x))
    assert sorted(cache_files(store)) == [f"{t}/v0001.safetensors" for t in NAMES]
    assert isinstance(open_store(f"s3://{BUCKET}/base", tmp_path, **s3), RemoteStore)
    assert type(open_store(local.root)) is ExpertStore


def test_lazy_registration_from_s3_downloads_no_shard_and_serves_the_same_answers(s3, world, tmp_path):
    """`verify="lazy"` registers each expert from ranged reads of its header and gate rows: no shard enters the
    cache until a query pages its expert in; the answers are those of the store on disk."""
    local, _, batches = world
    store = reader(s3, "base", tmp_path)
    served = load_mixture(store, trunk_fingerprint=FP, verify="lazy")
    assert served.left_out == {} and not list(store.cached())  # registered: nothing downloaded
    on_disk = load_mixture(local, trunk_fingerprint=FP)
    with torch.no_grad():
        for x in batches:
            assert_same_output(served(x), on_disk(x))
    assert list(store.cached())  # the experts the queries chose, fetched and verified at their first page-in


def test_a_tampered_object_is_refused_by_name_and_the_others_are_served(s3, world, tmp_path):
    local, writer, batches = world
    prefix = copy_store(writer, "damaged")
    fs = writer.fs
    tampered, truncated = f"{BUCKET}/{prefix}/t02/v0001.safetensors", f"{BUCKET}/{prefix}/t04/v0001.safetensors"
    data = bytearray(fs.cat_file(tampered))
    data[-3] ^= 0x01  # one bit of the last tensor's data
    fs.pipe_file(tampered, bytes(data))
    fs.pipe_file(truncated, fs.cat_file(truncated)[:-100])
    fs.copy(f"{BUCKET}/{prefix}/t01/v0001.safetensors", f"{BUCKET}/{prefix}/t09/v0001.safetensors")  # misplaced

    reader(s3, prefix, Path(tempfile.mkdtemp())).rescan()  # t09 copied in around the store: published (issue 30)
    store = reader(s3, prefix, tmp_path)
    model = load_mixture(store, trunk_fingerprint=FP, skip_failed=True)
    assert sorted(model.left_out) == ["t02", "t04", "t09"]
    assert f"s3://{BUCKET}/{prefix}/t02/v0001.safetensors" in str(model.left_out["t02"])
    assert "checksum mismatch" in str(model.left_out["t02"])
    assert f"s3://{BUCKET}/{prefix}/t04/v0001.safetensors" in str(model.left_out["t04"])
    assert "truncated" in str(model.left_out["t04"])
    assert "holds a shard of tenant 't01'" in str(model.left_out["t09"])
    served = [t for t in NAMES if t not in ("t02", "t04")]
    assert [e.tenant for e in model.experts] == served
    reference = load_mixture(local, tenants=served, trunk_fingerprint=FP)
    with torch.no_grad():
        for x in batches:
            assert_same_output(model(x), reference(x))
    # nothing unverified reached the cache, and no download was left half done
    assert sorted(cache_files(store)) == [f"{t}/v0001.safetensors" for t in served]
    with pytest.raises(ValueError, match=f"s3://{BUCKET}/{prefix}/t02/v0001.safetensors: checksum mismatch"):
        load_mixture(store, trunk_fingerprint=FP)


def test_a_remote_shard_of_another_trunk_is_refused(s3, world, tmp_path):
    with pytest.raises(ValueError, match="not on this model's trunk"):
        load_mixture(reader(s3, "base", tmp_path), trunk_fingerprint="e" * 64, skip_failed=True)


# -- the cache tier ------------------------------------------------------------------------------------------


def test_the_cache_keeps_to_its_byte_budget_and_downloads_again_what_it_evicted(s3, world, tmp_path):
    sizes = sorted(r.size for r in world[1].records())
    budget = sizes[-1] + sizes[-2]  # any two shards fit, never three
    assert budget < sum(sizes[:3])
    store = reader(s3, "base", tmp_path, budget)
    model = load_mixture(store, trunk_fingerprint=FP, skip_failed=True)
    assert model.left_out == {} and len(model.experts) == len(NAMES)
    assert sum(cache_files(store).values()) <= budget == store.cache_budget_bytes
    assert len(list(store.cached())) == 2
    evicted = store.root / "t00" / "v0001.safetensors"
    assert not evicted.exists()
    assert store.path("t00", 1) == evicted and evicted.is_file()  # downloaded again on demand
    assert sum(cache_files(store).values()) <= budget
    on_disk = load_mixture(world[0], trunk_fingerprint=FP)
    with torch.no_grad():  # serving through a cache smaller than the experts: the pager fetches evicted shards again
        for x in world[2]:
            assert_same_output(model(x), on_disk(x))
    assert sum(cache_files(store).values()) <= budget
    assert store.load("t00", trunk_fingerprint=FP)[1] == world[0].meta("t00")
    with pytest.raises(ShardError, match=f"s3://{BUCKET}/base/t05/v0001.safetensors: .* cache budget"):
        reader(s3, "base", tmp_path / "small", sizes[0]).path("t05", 1)
    with pytest.raises(ShardError, match=f"s3://{BUCKET}/base/t00/v0007.safetensors: no such object"):
        store.path("t00", 7)


# -- writes --------------------------------------------------------------------------------------------------


def test_listing_ignores_temporary_and_foreign_keys(s3, world, tmp_path):
    prefix = copy_store(world[1], "litter")
    fs = world[1].fs
    for key in ("t00/.v0002.safetensors.4242.tmp", "t00/.v0002.safetensors.17.part", "t00/v2.safetensors"):
        fs.pipe_file(f"{BUCKET}/{prefix}/{key}", b"half a shard")
    for key in (".leaving/t00.99/v0003.safetensors", "tmp copy/v0001.safetensors", "t01/sub/v0004.safetensors"):
        fs.copy(f"{BUCKET}/{prefix}/t01/v0001.safetensors", f"{BUCKET}/{prefix}/{key}")
    store = reader(s3, prefix, tmp_path)
    assert store.tenants() == NAMES
    assert store.versions("t00") == [1] and store.versions("t01") == [1]
    assert load_mixture(store, trunk_fingerprint=FP).left_out == {}


def test_a_failed_upload_leaves_no_object(s3, world, tmp_path, monkeypatch):
    """The connection dies half way through the upload (a multipart upload of half the shard was sent): the key
    never appears, and the version is still free."""
    prefix = copy_store(world[1], "failing")
    store = reader(s3, prefix, tmp_path)
    before = keys(store)
    tensors, meta = store.load("t03", trunk_fingerprint=FP)

    def dying_upload(lpath, rpath, **kwargs):
        bucket, key, _ = store.fs.split_path(rpath)
        data = Path(lpath).read_bytes()
        upload = store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        store.fs.call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=data[:100]
        )
        raise ConnectionResetError("connection lost during the upload")

    monkeypatch.setattr(store.fs, "put_file", dying_upload)
    with pytest.raises(ConnectionResetError):
        store.save(tensors, meta)
    monkeypatch.undo()
    assert keys(store) == before and store.versions("t03") == [1]
    assert not (store.root / "t03" / "v0002.safetensors").exists() and not list((store.root / ".uploads").rglob("*.*"))
    assert store.save(tensors, meta) == store.root / "t03" / "v0002.safetensors"
    assert reader(s3, prefix, tmp_path / "other").load("t03", trunk_fingerprint=FP)[1] == meta.with_version(2)


def test_a_version_another_writer_took_is_refused_not_overwritten(s3, world, tmp_path, monkeypatch):
    """Two writers on two machines (their file locks do not reach each other): the second, whose listing predates
    the first's write, is refused by the bucket's If-None-Match instead of overwriting the first's version."""
    prefix = copy_store(world[1], "racing")
    first, second = reader(s3, prefix, tmp_path / "a"), reader(s3, prefix, tmp_path / "b")
    stale = second.records("t01")
    tensors, meta = first.load("t01", trunk_fingerprint=FP)
    first.save(tensors, meta)
    written = first.fs.cat_file(first.key(first.root / "t01" / "v0002.safetensors"))

    monkeypatch.setattr(second, "records", lambda tenant=None: stale)  # its view from before the first's write
    changed = {**tensors, "head.bias": tensors["head.bias"] + 1}
    with pytest.raises(ValueError, match=f"s3://{BUCKET}/{prefix}/t01/v0002.safetensors was written meanwhile"):
        second.save(changed, meta)
    monkeypatch.undo()
    assert first.fs.cat_file(first.key(first.root / "t01" / "v0002.safetensors")) == written
    assert second.save(changed, meta).name == "v0003.safetensors"
    assert second.versions("t01") == [1, 2, 3]


def test_hibernate_retire_and_restore_on_s3(s3, world, tmp_path):
    store = reader(s3, copy_store(world[1], "lifecycle"), tmp_path)
    store.hibernate("t00")
    assert store.dormant() == ["t00"] and "t00" not in store.tenants()
    store.wake("t00")
    assert store.retire("t01") == store.root / "t01" / "v0001.retired.safetensors"
    assert "t01" not in store.tenants() and {"t01/v0001.retired.safetensors"} <= keys(store)
    assert "t01/v0001.safetensors" not in keys(store)
    with pytest.raises(KeyError, match="no live version"):
        store.latest("t01")
    store.restore("t01", 1)
    assert store.tenants() == NAMES and load_mixture(store, trunk_fingerprint=FP).left_out == {}
    with pytest.raises(NotImplementedError, match="not supported on object storage"):
        store.delete("t02")


# -- bundles ---------------------------------------------------------------------------------------------------


def test_a_remote_bundle_is_mirrored_verified_and_a_tampered_file_refused(s3, world, tmp_path):
    local = world[0]
    folder = tmp_path / "bundle"
    (folder / "experts" / "t00").mkdir(parents=True)
    (folder / "experts" / "t00" / "v0001.safetensors").write_bytes(local.path("t00", 1).read_bytes())
    (folder / "gate.safetensors").write_bytes(b"gate bytes")
    sha = hashlib.sha256(local.path("t00", 1).read_bytes()).hexdigest()
    entry = {"tenant": "t00", "file": "experts/t00/v0001.safetensors", "sha256": sha}
    write_manifest(folder, {"experts": [entry], "trunk": {}, "gate": {}}, [entry["file"], "gate.safetensors"])
    url = f"s3://{BUCKET}/bundles/one"
    fs = world[1].fs
    fs.put(str(folder) + "/", f"{BUCKET}/bundles/one", recursive=True)

    mirrored = mirror_bundle(url, tmp_path / "cache", **s3)
    assert read_bundle(mirrored).tenants == ["t00"]
    assert json.loads((mirrored / "manifest.json").read_text()) == json.loads((folder / "manifest.json").read_text())

    fs.pipe_file(f"{BUCKET}/bundles/one/gate.safetensors", b"gate bytez")
    with pytest.raises(ValueError, match=f"bundle file {url}/gate.safetensors: sha256 mismatch"):
        mirror_bundle(url, tmp_path / "fresh", **s3)
    assert list((tmp_path / "fresh").iterdir()) == []  # no mirror, not even a half one


@pytest.mark.slow  # builds the session's tiny run
def test_a_bundle_on_s3_serves_what_the_same_bundle_on_disk_serves(s3, world, tiny_run, monkeypatch):
    from moe.serving import Server

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint_url"])  # how a user points boto at another endpoint
    world[1].fs.put(str(tiny_run.bundle) + "/", f"{BUCKET}/bundles/tiny", recursive=True)
    texts = ["what is my balance", "play some jazz", "will it rain tomorrow", "wake me at seven"]
    remote, local = Server(f"s3://{BUCKET}/bundles/tiny"), Server(tiny_run.bundle)
    assert remote.predict(texts) == local.predict(texts)
    assert remote.predict(texts, tenant=local.tenants[0]) == local.predict(texts, tenant=local.tenants[0])
