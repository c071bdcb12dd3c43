"""The expert store against faults: every damaged shard is refused with a ShardError naming the file and the
problem, and never harms another expert or an earlier version; a writer killed mid-write leaves the store as
it was; nothing on the load path unpickles."""

from __future__ import annotations

import json
import pickle
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe.inference import load_mixture, predict
from moe.model import UNKNOWN_TENANT, ExpertInfo, build_mixture
from moe.store import ExpertMeta, ExpertStore, ShardError, expert_shards, read_meta, read_shard, read_tensors
from moe.store.shard import metadata_sha256, tensors_sha256
from tests.helpers import child_env, digests, sha256_of

FP = "a" * 64  # this model's trunk
OTHER_FP = "b" * 64  # another trunk
TENANTS = {
    "alpha": ("a1", "a2", "a3"),
    "beta": ("b1", "b2"),
    "gamma": ("g1", "g2", "g3", "g4"),
    "delta": ("d1",),
}


def random_mixture(tenants: dict[str, tuple[str, ...]], dim: int = 16, rank: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = build_mixture([ExpertInfo(t, labels) for t, labels in tenants.items()], dim=dim, rank=rank)
    with torch.no_grad():  # non-trivial experts: a real adapter, a real head, a sharp gate
        model.bank.up.normal_()
        model.bank.head.normal_()
        model.bank.head_bias.normal_()
        model.router.weight.normal_()
    return model.eval()


def raw_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata())


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.fixture
def saved(tmp_path):
    """A store with four tenants at version 1, and alpha also at version 2 (other weights)."""
    model = random_mixture(TENANTS)
    store = ExpertStore(tmp_path / "experts")
    shards = {meta.tenant: (tensors, meta) for tensors, meta in expert_shards(model, FP)}
    for tensors, meta in shards.values():
        store.save(tensors, meta)
    tensors, meta = shards["alpha"]
    v2 = {k: v * 2 + 1 for k, v in tensors.items()}
    store.save(v2, meta)
    return store, model, shards, v2


# -- listing and versions ---------------------------------------------------------------------------------


def test_records_tenants_versions_latest(saved):
    store, _, shards, _ = saved
    records = store.records()
    assert [(r.tenant, r.version, r.retired) for r in records] == [
        ("alpha", 1, False),
        ("alpha", 2, False),
        ("beta", 1, False),
        ("delta", 1, False),
        ("gamma", 1, False),
    ]
    for r in records:
        assert r.path == store.path(r.tenant, r.version) and r.path.is_file() and r.size == r.path.stat().st_size
    assert [r.version for r in store.records("alpha")] == [1, 2]
    assert store.tenants() == ["alpha", "beta", "delta", "gamma"]
    assert store.versions("alpha") == [1, 2] and store.latest("alpha") == 2 and store.latest("beta") == 1


def test_loaded_shards_are_what_was_saved(saved):
    store, _, shards, v2 = saved
    for tenant, (tensors, meta) in shards.items():
        loaded, loaded_meta = store.load(tenant, version=1, trunk_fingerprint=FP)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        assert loaded_meta == meta.with_version(1)
    latest, meta = store.load("alpha")
    assert meta.version == 2 and all(torch.equal(latest[k], v2[k]) for k in v2)
    assert store.meta("alpha") == meta and read_meta(store.path("alpha", 2)) == (meta, tensors_sha256(v2))


def test_read_tensors_reads_what_safetensors_reads_into_one_buffer(saved):
    store, _, _, _ = saved
    path = store.path("alpha", 2)
    reference = load_file(path)
    everything = read_tensors(path)
    assert everything.keys() == reference.keys()
    assert all(
        torch.equal(everything[k], reference[k]) and everything[k].dtype == reference[k].dtype for k in reference
    )
    weights = read_tensors(path, ("down.weight", "head.bias"))
    assert list(weights) == ["down.weight", "head.bias"]
    assert weights["down.weight"].untyped_storage().data_ptr() == weights["head.bias"].untyped_storage().data_ptr()
    with pytest.raises(ShardError, match=r"no tensor \['nope'\] in the header"):
        read_tensors(path, ("nope",))
    data = path.read_bytes()
    size = header_length(path)
    header = json.loads(data[8 : 8 + size])
    for change, reason in (
        ({"data_offsets": [-8, header["head.bias"]["data_offsets"][1]]}, "outside the data section"),
        ({"shape": [-1, 3]}, "is not a list of sizes"),
        ({"dtype": "F8_E4M3"}, "no dtype this reader knows"),
    ):
        edited = json.dumps(header | {"head.bias": header["head.bias"] | change}).encode()
        path.write_bytes(len(edited).to_bytes(8, "little") + edited + data[8 + size :])
        with pytest.raises(ShardError, match=reason):
            read_tensors(path)
    path.write_bytes(data)
    path.write_bytes(path.read_bytes()[:-10])  # the last tensor's bytes cut short
    with pytest.raises(ShardError, match="outside the data section"):
        read_tensors(path)


def test_save_rollback_retire_restore(saved):
    store, _, shards, _ = saved
    tensors, meta = shards["alpha"]
    path = store.save({k: v - 1 for k, v in tensors.items()}, meta.with_version(77))  # the version is the store's
    assert path == store.path("alpha", 3) and store.versions("alpha") == [1, 2, 3]
    assert store.load("alpha")[1].version == 3

    assert store.rollback("alpha", 1) == [2, 3]
    assert store.versions("alpha") == [1] and store.latest("alpha") == 1
    for v in (2, 3):  # retired, not gone
        assert store.path("alpha", v, retired=True).is_file() and not store.path("alpha", v).exists()
    assert [(r.version, r.retired) for r in store.records("alpha")] == [(1, False), (2, True), (3, True)]
    loaded, loaded_meta = store.load("alpha", trunk_fingerprint=FP)
    assert loaded_meta.version == 1 and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    for v in (2, 3):
        with pytest.raises(KeyError, match="alpha"):
            store.load("alpha", version=v)
    with pytest.raises(KeyError, match="alpha"):
        store.rollback("alpha", 3)  # retired: not a rollback target

    # a new version comes after the retired ones, never reusing their numbers
    assert store.save(tensors, meta) == store.path("alpha", 4)
    assert store.versions("alpha") == [1, 4]
    assert store.restore("alpha", 3) == store.path("alpha", 3)
    assert store.versions("alpha") == [1, 3, 4] and store.load("alpha", version=3)[1].version == 3
    with pytest.raises(KeyError, match="alpha"):
        store.restore("alpha", 3)  # not retired any more
    with pytest.raises(KeyError, match="alpha"):
        store.retire("alpha", 2)  # already retired

    # retiring a tenant's only version takes the tenant out of the store's live set
    assert store.retire("beta") == store.path("beta", 1, retired=True)
    assert "beta" not in store.tenants() and store.versions("beta") == []
    with pytest.raises(KeyError, match="beta"):
        store.load("beta")
    loaded, failed = store.load_latest(trunk_fingerprint=FP)
    assert sorted(loaded) == ["alpha", "delta", "gamma"] and failed == {}
    store.restore("beta", 1)
    assert store.tenants() == ["alpha", "beta", "delta", "gamma"]
    assert store.load("beta", trunk_fingerprint=FP)[1] == shards["beta"][1].with_version(1)


def test_an_archive_that_fails_midway_leaves_the_tenant_in_the_store_as_it_was(saved, tmp_path, monkeypatch):
    store = saved[0]
    before = digests(store.root)

    def disk_full(source, destination):
        Path(destination).mkdir()
        (Path(destination) / "v0001.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "move", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.archive("gamma", tmp_path / "archive")
    assert digests(store.root) == before and store.retired("gamma") is None
    assert not (tmp_path / "archive" / "gamma").exists() and "gamma" in store.tenants()


def test_archive_and_delete(saved, tmp_path):
    store, _, shards, _ = saved
    store.retire("gamma")
    store.save(*shards["gamma"])  # gamma: v1 retired, v2 live
    before = digests(store.root / "gamma")
    target = store.archive("gamma", tmp_path / "archive")
    assert target == tmp_path / "archive" / "gamma" and not (store.root / "gamma").exists()
    assert digests(target) == before  # moved intact, live and retired
    assert read_shard(target / "v0002.safetensors", FP)[1].tenant == "gamma"
    assert "gamma" not in store.tenants() and store.retired("gamma") == f"archived to {target}"  # a tombstone
    with pytest.raises(KeyError, match="gamma"):
        store.load("gamma")
    store.save(*shards["gamma"])  # the name holds a new expert: the tombstone goes
    assert store.retired("gamma") is None
    with pytest.raises(FileExistsError):
        store.archive("gamma", tmp_path / "archive")  # never overwrites an archive
    assert (store.root / "gamma" / "v0001.safetensors").is_file()

    others = {p: h for p, h in digests(store.root).items() if p.parts[0] != "delta"}
    store.delete("delta")
    assert not (store.root / "delta").exists() and "delta" not in store.tenants()
    after = digests(store.root)
    assert after.pop(Path(".retired", "delta")) and after == others and store.retired("delta") == "deleted"
    with pytest.raises(KeyError, match="delta"):
        store.load("delta")


def test_unknown_tenant_is_a_key_error_naming_it(saved):
    store, _, _, _ = saved
    for call in (store.load, store.latest, store.meta, store.retire):
        with pytest.raises(KeyError, match="nobody"):
            call("nobody")
    with pytest.raises(KeyError, match="nobody"):
        store.rollback("nobody", 1)
    with pytest.raises(KeyError, match="alpha"):
        store.load("alpha", version=9)
    loaded, failed = store.load_latest(["alpha", "nobody"])
    assert list(loaded) == ["alpha"] and isinstance(failed["nobody"], KeyError) and "nobody" in str(failed["nobody"])
    for bad in ("../alpha", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            store.path(bad, 1)
    with pytest.raises(ValueError, match=r"\['alpha'\] are listed more than once"):  # two copies would split its
        load_mixture(store, ["alpha", "delta", "alpha"], trunk_fingerprint=FP)  # groups and answer wrongly


# -- faults: each refused with a ShardError naming the file and the problem, harming nothing else ---------

Fault = Callable[[Path, dict[str, torch.Tensor], ExpertMeta], None]


def truncate_at(where: Callable[[Path], int]) -> Fault:
    def fault(path, tensors, meta):
        data = path.read_bytes()
        path.write_bytes(data[: where(path)])

    return fault


def flip_byte(where: Callable[[Path], int], mask: int = 0x01) -> Fault:
    """One bit (by default) of one byte: inside the header an ASCII letter stays an ASCII letter."""

    def fault(path, tensors, meta):
        data = bytearray(path.read_bytes())
        data[where(path)] ^= mask
        path.write_bytes(bytes(data))

    return fault


def rewrite(change_tensors=None, change_strings=None, change_meta=None) -> Fault:
    """Rewrite the shard with safetensors itself: tensors and/or metadata changed, the rest as it was
    (a changed `meta` is written with consistent checksums, as a writer with a wrong model would)."""

    def fault(path, tensors, meta):
        with safe_open(path, framework="pt") as handle:
            current = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            strings = dict(handle.metadata())
        current = change_tensors(current) if change_tensors else current
        if change_meta:
            strings = change_meta(meta).to_strings(tensors_sha256(current))
        strings = change_strings(strings) if change_strings else strings
        save_file(current, path, metadata=strings)

    return fault


def data_start(path: Path) -> int:
    return 8 + header_length(path)


def offset_of(text: str) -> Callable[[Path], int]:
    """Where `text` begins in the JSON header (a byte inside the metadata or a tensor's entry)."""

    def where(path):
        index = path.read_bytes()[: data_start(path)].find(text.encode())
        assert index > 0, text
        return index

    return where


def not_safetensors(content: Callable[[], bytes]) -> Fault:
    def fault(path, tensors, meta):
        path.write_bytes(content())

    return fault


def pickled(path, tensors, meta):
    torch.save(tensors, path)  # a pickle where a shard should be: refused, never unpickled


def _not_json(strings: dict[str, str]) -> dict[str, str]:
    """Hand-made metadata whose own checksum is right but whose architecture is not JSON."""
    strings = strings | {"architecture": "{dim: 16"}
    return strings | {"metadata_sha256": metadata_sha256(strings)}


def _bad_architecture(strings: dict[str, str]) -> dict[str, str]:
    """Consistent checksums, but an architecture that names no torch dtype and lacks its dimension."""
    strings = strings | {"architecture": '{"dtype": "gloat32", "gate_rows": "labels", "input_scale": 8.0}'}
    return strings | {"metadata_sha256": metadata_sha256(strings)}


FAULTS: dict[str, tuple[Fault, str]] = {
    "empty file": (truncate_at(lambda p: 0), "truncated or not a safetensors file"),
    "cut inside the header length": (truncate_at(lambda p: 5), "truncated or not a safetensors file"),
    "cut at the header start": (truncate_at(lambda p: 8), "truncated or not a safetensors file"),
    "cut inside the header": (truncate_at(lambda p: 8 + header_length(p) // 2), "truncated or not a safetensors"),
    "cut at the data start": (truncate_at(data_start), "truncated or not a safetensors file"),
    "last byte missing": (truncate_at(lambda p: p.stat().st_size - 1), "truncated or not a safetensors file"),
    "byte flipped in the first tensor": (flip_byte(lambda p: data_start(p) + 1, 0xFF), "checksum mismatch"),
    "byte flipped in the middle of the data": (
        flip_byte(lambda p: (data_start(p) + p.stat().st_size) // 2),
        "checksum mismatch",
    ),
    "byte flipped in the last tensor": (flip_byte(lambda p: p.stat().st_size - 1), "checksum mismatch"),
    "byte flipped in the header length": (flip_byte(lambda p: 0, 0xFF), "truncated or not a safetensors file"),
    # the label as the header escapes it: a bare "a2" is often first found inside a sha256 digest (the metadata's
    # order varies from one write to the next), which made this a second flipped-checksum case
    "byte flipped in a label": (flip_byte(offset_of('a2\\"')), "metadata checksum mismatch"),
    "byte flipped in the tenant": (flip_byte(offset_of('alpha"')), "metadata checksum mismatch"),
    "byte flipped in input_scale": (flip_byte(offset_of("8.0")), "metadata checksum mismatch"),
    "byte flipped in an architecture key": (flip_byte(offset_of('dim\\"')), "metadata checksum mismatch"),
    "byte flipped in the dtype name": (flip_byte(offset_of("float32")), "metadata checksum mismatch"),
    "byte flipped in the recorded checksum": (
        flip_byte(lambda p: offset_of("tensors_sha256")(p) + len('tensors_sha256":"') + 3),
        "metadata checksum mismatch",
    ),
    "byte flipped in a tensor dtype": (flip_byte(offset_of('F32"')), "truncated or not a safetensors file"),
    "byte flipped in a tensor name": (flip_byte(offset_of('head.bias"')), "missing tensors ['head.bias']"),
    "byte flipped in the JSON syntax": (flip_byte(lambda p: 8), "truncated or not a safetensors file"),
    "head with one column fewer": (
        rewrite(change_tensors=lambda t: t | {"head.weight": t["head.weight"][:, :-1].contiguous()}),
        "tensor head.weight has shape (16, 2), metadata implies (16, 3)",
    ),
    "labels list with an extra label": (
        rewrite(change_meta=lambda m: replace(m, labels=(*m.labels, "extra"))),
        "has shape (16, 3), metadata implies (16, 4)",
    ),
    "gate rows of another gate kind": (
        rewrite(change_meta=lambda m: replace(m, architecture=m.architecture | {"gate_rows": "one"})),
        "tensor gate.weight has shape (3, 16), metadata implies (1, 16)",
    ),
    "missing tensor": (
        rewrite(change_tensors=lambda t: {k: v for k, v in t.items() if k != "stats.scatter"}),
        "missing tensors ['stats.scatter']",
    ),
    "extra tensor": (rewrite(change_tensors=lambda t: t | {"bonus": torch.zeros(3)}), "unexpected tensors ['bonus']"),
    "float64 tensors": (
        rewrite(change_tensors=lambda t: {k: v.double() for k, v in t.items()}),
        "dtype torch.float64, metadata says torch.float32",
    ),
    "one float64 tensor": (
        rewrite(change_tensors=lambda t: t | {"up.weight": t["up.weight"].double()}),
        "tensor up.weight has dtype torch.float64",
    ),
    "tensors replaced, checksum kept": (
        rewrite(change_tensors=lambda t: t | {"down.bias": t["down.bias"] + 1}),
        "checksum mismatch: tensors hash to",
    ),
    "trained on another trunk": (
        rewrite(change_meta=lambda m: replace(m, trunk_fingerprint=OTHER_FP)),
        f"trained on trunk {OTHER_FP[:12]}",
    ),
    "wrong format": (rewrite(change_strings=lambda s: s | {"format": "moe.gate/1"}), "format 'moe.gate/1' is not"),
    "no metadata at all": (
        rewrite(change_strings=lambda s: {"other": "x"}),
        "format None is not 'moe.expert/1'",
    ),
    "metadata edited by hand": (
        rewrite(change_strings=lambda s: s | {"labels": '["a1", "a2", "zz"]'}),
        "metadata checksum mismatch",
    ),
    "metadata that is not JSON": (rewrite(change_strings=_not_json), "malformed metadata (JSONDecodeError"),
    "architecture without dim, unknown dtype": (rewrite(change_strings=_bad_architecture), "malformed metadata"),
    "text, not a shard": (not_safetensors(lambda: b"this is not a shard\n" * 50), "truncated or not a safetensors"),
    "random bytes": (
        not_safetensors(lambda: random.Random(1).randbytes(4096)),
        "truncated or not a safetensors file",
    ),
    "a pickle": (pickled, "truncated or not a safetensors file"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_is_refused_and_harms_nothing_else(saved, name):
    store, _, shards, v2 = saved
    fault, reason = FAULTS[name]
    bad = store.path("alpha", 2)
    before = digests(store.root)
    fault(bad, v2, shards["alpha"][1].with_version(2))
    assert sha256_of(bad) != before[bad.relative_to(store.root)]

    for load in (lambda: read_shard(bad, FP), lambda: store.load("alpha", trunk_fingerprint=FP)):
        with pytest.raises(ShardError) as caught:
            load()
        assert str(bad) in str(caught.value) and caught.value.path == str(bad)
        assert reason in caught.value.reason, caught.value.reason

    # nothing else was touched: other tenants and alpha's earlier version load, byte-identical
    after, bad_key = digests(store.root), bad.relative_to(store.root)
    assert {p: h for p, h in after.items() if p != bad_key} == {p: h for p, h in before.items() if p != bad_key}
    for tenant, (tensors, meta) in shards.items():
        loaded, loaded_meta = store.load(tenant, version=1, trunk_fingerprint=FP)
        assert loaded_meta == meta.with_version(1) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    loaded, failed = store.load_latest(trunk_fingerprint=FP)
    assert sorted(loaded) == ["beta", "delta", "gamma"] and list(failed) == ["alpha"]
    assert isinstance(failed["alpha"], ShardError) and str(bad) in str(failed["alpha"])

    # rolling back past the bad version makes the tenant whole again; the bad file stays, retired
    store.rollback("alpha", 1)
    loaded, failed = store.load_latest(trunk_fingerprint=FP)
    assert sorted(loaded) == ["alpha", "beta", "delta", "gamma"] and failed == {}
    assert store.path("alpha", 2, retired=True).is_file()


def test_a_good_shard_read_for_another_trunk_is_refused(saved):
    store, _, _, _ = saved
    path = store.path("beta", 1)
    with pytest.raises(ShardError, match=f"trained on trunk {FP[:12]}.*not on this model's trunk {OTHER_FP[:12]}") as e:
        read_shard(path, OTHER_FP)
    assert str(path) in str(e.value)
    loaded, failed = store.load_latest(trunk_fingerprint=OTHER_FP)
    assert loaded == {} and sorted(failed) == store.tenants()
    assert all(isinstance(error, ShardError) for error in failed.values())
    assert read_shard(path)[1].trunk_fingerprint == FP  # no fingerprint asked: not checked


def test_every_single_byte_flip_in_the_header_is_refused_with_a_shard_error(saved):
    """Whatever byte of the JSON header is damaged, the shard is refused with a ShardError, never another
    exception and never silently accepted with altered metadata (tenant, labels, input scale...)."""
    store, _, _, _ = saved
    good = store.path("beta", 1)
    data, n = good.read_bytes(), header_length(good)
    probe = store.root.parent / "probe.safetensors"
    reasons = set()
    for position in range(8, 8 + n):
        for mask in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= mask
            probe.write_bytes(bytes(damaged))
            try:
                read_shard(probe, FP)
            except ShardError as error:
                assert str(probe) in str(error)
                reasons.add(error.reason.split(" ")[0])
            else:
                pytest.fail(f"flipping byte {position} (^{mask:#x}) of the header went unnoticed")
    assert {"truncated", "metadata", "missing"} <= reasons


# -- a writer killed mid-write ---------------------------------------------------------------------------

CHILD = r"""
import os, sys, time
import moe.store.shard as shard
from safetensors.torch import save
from moe.store import ExpertStore

mode, root = sys.argv[1], sys.argv[2]
store = ExpertStore(root)
tensors, meta = store.load("big")
tensors = {k: v + 1 for k, v in tensors.items()}
real_save_file = shard.save_file

def pause():
    print("paused", flush=True)
    time.sleep(600)

def slow_save_file(tensors, filename, metadata=None):
    print("writing", flush=True)
    if mode == "partial":  # half the bytes on disk, then the kill
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        pause()
    real_save_file(tensors, filename, metadata=metadata)

if mode == "fsync":  # the whole temporary file written, killed while syncing it (before the rename)
    os.fsync = lambda fd: pause()
shard.save_file = slow_save_file
store.save(tensors, meta)
print("finished", flush=True)
"""


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line.strip())
    out.put(None)


def wait_for(lines: queue.Queue, word: str, stderr: Path, timeout: float = 120) -> None:
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line == word:
            return
        if line is None:
            pytest.fail(f"the writer never printed {word!r}; its stderr:\n{stderr.read_text()}")


@pytest.mark.parametrize("mode", ["partial", "fsync"])
def test_a_writer_killed_mid_write_leaves_the_store_as_it_was(tmp_path, mode):
    model = random_mixture({"big": tuple(f"l{i}" for i in range(64)), "small": ("s1", "s2")}, dim=512, rank=32)
    store = ExpertStore(tmp_path / "experts")
    for tensors, meta in expert_shards(model, FP):
        store.save(tensors, meta)
    big_v1 = store.path("big", 1)
    assert big_v1.stat().st_size > 1 << 20  # large enough that the write is real work
    before, records = digests(store.root), store.records()
    tensors_v1, meta_v1 = store.load("big", trunk_fingerprint=FP)

    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(store.root)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=child_env(),
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
    try:
        wait_for(lines, "writing", stderr)
        wait_for(lines, "paused", stderr)  # the write has begun and is stuck half way: kill it there
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    # the previous version is intact and still the latest; no new version is visible
    assert not store.path("big", 2).exists()
    assert store.versions("big") == [1] and store.latest("big") == 1 and store.records() == records
    assert sha256_of(big_v1) == before[big_v1.relative_to(store.root)]
    tensors, meta = store.load("big", trunk_fingerprint=FP)
    assert meta == meta_v1 and all(torch.equal(tensors[k], tensors_v1[k]) for k in tensors_v1)
    assert {p: h for p, h in digests(store.root).items() if p in before} == before
    leftovers = [store.root / p for p in digests(store.root) if p not in before]
    assert leftovers, "the kill should have left the writer's temporary file behind"
    for p in leftovers:
        assert p.name.startswith(".") and p.name.endswith(".tmp") and p.parent.name == "big"
        assert p not in {r.path for r in store.records()}
    loaded, failed = store.load_latest(trunk_fingerprint=FP)
    assert sorted(loaded) == ["big", "small"] and failed == {}

    # the next writer is not disturbed by the leftover
    assert store.save({k: v + 2 for k, v in tensors_v1.items()}, meta_v1) == store.path("big", 2)
    assert store.versions("big") == [1, 2] and store.load("big", trunk_fingerprint=FP)[1].version == 2
    assert all(p.is_file() for p in leftovers) and len(store.records("big")) == 2


# -- nothing on the load path unpickles -------------------------------------------------------------------


def test_nothing_on_the_load_path_unpickles(saved, monkeypatch):
    store, model, shards, _ = saved
    store.rollback("alpha", 1)  # every tenant's latest is what `model` holds
    x = torch.randn(24, 16)
    tenant = torch.tensor([UNKNOWN_TENANT, 0, 1, 2, 3, UNKNOWN_TENANT] * 4)
    expected = predict(model, x), predict(model, x, tenant)

    unpickled: list[str] = []  # recorded, not only raised: a loader that caught the error would still be seen

    def refuse(name: str):
        def call(*args, **kwargs):
            unpickled.append(name)
            raise AssertionError(f"{name} called on the load path")

        return call

    for target, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (pickle, "_Unpickler")):
        monkeypatch.setattr(target, name, refuse(f"pickle.{name}"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", refuse("torch.serialization.load"))

    for tenant_name, (tensors, _) in shards.items():
        loaded, loaded_meta = store.load(tenant_name, trunk_fingerprint=FP)
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        assert read_shard(store.path(tenant_name, 1), FP)[1] == loaded_meta
    loaded, failed = store.load_latest(trunk_fingerprint=FP)
    assert len(loaded) == 4 and failed == {}

    paged = load_mixture(store, trunk_fingerprint=FP, budget_bytes=1 << 20)
    assert len(paged.keys) == 4
    assert [(p.tenant, p.intent) for p in predict(paged, x)] == [(p.tenant, p.intent) for p in expected[0]]
    assert [(p.tenant, p.intent) for p in predict(paged, x, tenant)] == [(p.tenant, p.intent) for p in expected[1]]

    # a pickle in place of a shard is refused without being unpickled (torch.save pickles; it does not load)
    torch.save(shards["alpha"][0], store.path("alpha", 9))
    with pytest.raises(ShardError, match="not a safetensors file"):
        store.load("alpha", version=9, trunk_fingerprint=FP)
    assert unpickled == []
