"""The entry points (scripts/*.py over conf/) check what they are given before any work starts: tenant names, the
store to grow into, the run folder to train into, the folder to export to; grow and update stream the tenant's
file instead of holding it (issue #13, cases 4, 6 and 8).

The scripts run in this process (`script(...)` calls a script's `main` with a composed config, as Hydra would),
with the trunk made to refuse loading where a check must come first: loading the trunk is the first piece of work
every entry point does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import moe.store.trunks
import moe.trunk
from moe.data import TenantDataError, read_tenant_file
from moe.data.files import TenantFile
from moe.lifecycle import Lifecycle
from moe.lifecycle.stream import stream_tenant_file
from moe.store import ExpertStore, read_tensors
from moe.tasks import train
from moe.trunk import FeatureCache, TinyTrunk
from tests.helpers import (
    SYNTHETIC,
    TINY_TRAIN,
    compose_config,
    digests,
    fast_growth,
    run_python,
    script,
    synthetic_data,
    tenant_files_override,
    write_synthetic_tenants,
    write_tenant_csv,
)

TINY_LIFECYCLE = ["trunk=tiny", "trunk.dim=16", "growth.epochs=1", "growth.rank=8", "growth.batch_size=32"]
TINY_LIFECYCLE += ["growth.rehearsal_per_class=10", "tenant.split_column=split"]
TRUNK_LOADED = "the trunk was loaded before the check"

# The names of the issue: path traversal, absolute, spaced, unicode, 300 characters; numbers and booleans.
BAD_NAMES = ["'../../x'", "'/tmp/abs'", "'a b'", "'ünï'", "x" * 300, "123", "true"]
NAME_IDS = ["traversal", "absolute", "spaced", "unicode", "300", "int", "bool"]


def lifecycle_config(tmp_path: Path, store: Path, *overrides: str):
    common = [f"store_dir={store}", *TINY_LIFECYCLE, f"paths.cache_dir={tmp_path / 'cache'}"]
    return compose_config("lifecycle", [*common, *overrides], tmp_path / "out")


@pytest.fixture
def no_trunk(monkeypatch):
    """Any trunk the configs name (`moe.trunk.TinyTrunk`) or a store records refuses to load."""

    def refuse(*args, **kwargs):
        raise AssertionError(TRUNK_LOADED)

    monkeypatch.setattr(moe.trunk, "TinyTrunk", refuse)
    monkeypatch.setattr(moe.store.trunks, "_rebuilt", refuse)  # and the store's own, rebuilt from its registry


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_tenants(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, data) -> Path:
    """A store holding `weather` (tiny trunk, dim 16), grown by scripts/grow.py; tests must leave it as it is."""
    tmp = tmp_path_factory.mktemp("store")
    (tmp / "experts").mkdir()
    script("grow")(lifecycle_config(tmp, tmp / "experts", "tenant.name=weather", f"tenant.files={data['weather']}"))
    return tmp / "experts"


# -- case 4: names checked before any work ---------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["grow", "update", "hibernate", "wake", "retire"])
@pytest.mark.parametrize("name", BAD_NAMES, ids=NAME_IDS)
def test_lifecycle_scripts_refuse_a_bad_tenant_name_before_any_work(operation, name, store, data, tmp_path, no_trunk):
    before = digests(store.parent)
    cfg = lifecycle_config(tmp_path, store, f"tenant.name={name}", f"tenant.files={data['bank']}", "archive_dir=null")
    with pytest.raises(ValueError, match="tenant name"):
        script(operation)(cfg)
    assert digests(store.parent) == before


@pytest.mark.slow
@pytest.mark.subprocess
def test_grow_script_says_a_number_is_no_tenant_name(store, data, tmp_path):
    done = run_python(
        "scripts/grow.py",
        f"store_dir={store}",
        "trunk=tiny",
        "tenant.name=123",
        f"tenant.files={data['bank']}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        check=False,
    )
    assert done.returncode != 0 and "AttributeError" not in done.stderr
    assert "tenant name must be a string, got int 123" in done.stderr


@pytest.mark.parametrize("name", ["WEATHER", "Weather"])
def test_grow_refuses_a_name_that_differs_from_a_tenant_only_in_case(name, store, data, tmp_path, no_trunk):
    cfg = lifecycle_config(tmp_path, store, f"tenant.name={name}", f"tenant.files={data['bank']}")
    with pytest.raises(ValueError, match="'weather'"):
        script("grow")(cfg)
    assert ExpertStore(store).tenants() == ["weather"]


@pytest.mark.parametrize("name", [*BAD_NAMES, "ACME"], ids=[*NAME_IDS, "case-clash"])
def test_train_refuses_bad_tenant_names_before_the_trunk_loads(name, data, tmp_path, no_trunk):
    entries = ", ".join(
        [
            f"{{_target_: moe.data.read_tenant_file, name: acme, files: '{data['weather']}', split_column: split}}",
            f"{{_target_: moe.data.read_tenant_file, name: {name}, files: '{data['bank']}', split_column: split}}",
        ]
    )
    cfg = compose_config("train", ["data=tenant_files", f"data.tenants=[{entries}]", *TINY_TRAIN], tmp_path / "run")
    with pytest.raises(ValueError, match="tenant name"):
        train.run(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


# -- case 6: grow and update stream the tenant's file ---------------------------------------------------------


def test_streamed_grow_and_update_make_the_experts_the_in_memory_ones_make(tmp_path):
    trunk = TinyTrunk(dim=16, freeze=True)
    encode = FeatureCache(tmp_path / "cache", trunk).encode  # the same features for both: the cache's
    path = write_tenant_csv(tmp_path / "music.csv", SYNTHETIC["music"], per_split=(40, 9, 7), seed=3)
    more = write_tenant_csv(tmp_path / "more.csv", {"shuffle": ["shuffle", "mix"], "stop": ["stop", "halt"]}, seed=4)
    in_memory = Lifecycle(ExpertStore(tmp_path / "in_memory"), trunk, encode, fast_growth(dropout=0.0, epochs=2))
    streamed = Lifecycle(ExpertStore(tmp_path / "streamed"), trunk, encode, fast_growth(dropout=0.0, epochs=2))
    in_memory.grow(read_tenant_file("music", path, split_column="split"))
    in_memory.update(read_tenant_file("music", more, split_column="split"))

    batches = []

    def spy(texts):
        batches.append(len(texts))
        return encode(texts)

    tenant, rows = stream_tenant_file(TenantFile("music", str(path), split_column="split"), spy, batch_size=7)
    assert tenant.labels == ("play", "stop") and not tenant.splits  # no rows held, only the label set
    assert rows.features.dtype == torch.float32 and rows.features.shape == (80, 16)
    assert max(batches) == 7 and sum(batches) == 80  # encoded as read, train rows only
    streamed.grow(tenant, encoded=rows)
    more_tenant, more_rows = stream_tenant_file(TenantFile("music", str(more), split_column="split"), encode)
    streamed.update(more_tenant, encoded=more_rows)

    for version in (1, 2):
        ours = read_tensors(streamed.store.path("music", version))
        theirs = read_tensors(in_memory.store.path("music", version))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (version, key)
        assert streamed.store.meta("music", version).labels == in_memory.store.meta("music", version).labels
    assert streamed.store.meta("music").labels == ("play", "stop", "shuffle")


def test_streamed_file_is_refused_as_read_tenant_file_refuses_it(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label,split\nplay a song,play,train\nstop it,stop,val\nhalt,halt,test\n")
    encoded = []
    with pytest.raises(TenantDataError) as expected:
        read_tenant_file("acme", path, split_column="split")
    with pytest.raises(TenantDataError) as streamed:
        stream_tenant_file(TenantFile("acme", str(path), split_column="split"), encoded.append)
    assert str(streamed.value) == str(expected.value) and "does not occur in the train split" in str(expected.value)
    assert encoded == []  # every row is checked before the first is encoded


# -- case 8: quiet surprises are errors, or asked for ----------------------------------------------------------


def test_grow_into_a_missing_store_dir_is_refused_unless_create_store(data, tmp_path, no_trunk, monkeypatch):
    missing = tmp_path / "typo" / "experts"
    grow = lifecycle_config(tmp_path, missing, "tenant.name=bank", f"tenant.files={data['bank']}")
    with pytest.raises(FileNotFoundError, match="create_store=true"):
        script("grow")(grow)
    update = lifecycle_config(tmp_path, missing, "tenant.name=bank", f"tenant.files={data['bank']}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        script("update")(update)
    assert not (tmp_path / "typo").exists()
    monkeypatch.undo()  # the trunk may load now
    created = lifecycle_config(
        tmp_path, missing, "tenant.name=bank", f"tenant.files={data['bank']}", "create_store=true"
    )
    script("grow")(created)
    assert ExpertStore(missing).tenants() == ["bank"]


def test_train_refuses_a_run_folder_whose_experts_folder_holds_shards(tmp_path, no_trunk):
    run = tmp_path / "run"
    shard = run / "experts" / "bank" / "v0001.safetensors"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"an earlier run's expert")
    (run / "config.yaml").write_text("earlier: run\n")
    cfg = compose_config("train", [*synthetic_data(tmp_path / "data"), *TINY_TRAIN], run)
    with pytest.raises(FileExistsError, match=str(run / "experts")):
        train.run(cfg)
    assert (run / "config.yaml").read_text() == "earlier: run\n"


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_export_refuses_to_write_a_bundle_into_the_store(where, store, tmp_path):
    store = Path(shutil.copytree(store, tmp_path / "experts"))
    out = {"inside": store / "bundle", "same": store, "parent": store.parent}[where]
    before = digests(store.parent)
    overrides = [f"store_dir={store}", "trunk=tiny", "trunk.dim=16", "export.measure=false", "export.overwrite=true"]
    cfg = compose_config("export", overrides, out)
    with pytest.raises(ValueError, match="store"):
        script("export")(cfg)
    assert digests(store.parent) == before


def test_export_checks_its_out_of_scope_rule_before_it_clears_an_earlier_bundle(store, tmp_path):
    common = [f"store_dir={store}", "trunk=tiny", "trunk.dim=16", "export.measure=false"]
    script("export")(compose_config("export", common, tmp_path / "bundle"))
    before = digests(tmp_path / "bundle")
    cfg = compose_config("export", [*common, "export.overwrite=true", "oos.threshold=0.5"], tmp_path / "bundle")
    with pytest.raises(ValueError, match="threshold"):  # a threshold needs a named score, not `auto`
        script("export")(cfg)
    assert digests(tmp_path / "bundle") == before


# -- issue 30: exports written whole or not at all --------------------------------------------------------------

EXPORT = ["trunk=tiny", "trunk.dim=16", "export.measure=false"]
BUNDLE_PARTS = ["experts", "gate.safetensors", "manifest.json"]


@pytest.mark.parametrize("failure", ["unknown_tenant", "injected"])
def test_an_export_that_fails_midway_leaves_no_partial_bundle_and_an_earlier_one_whole(
    failure, store, data, tmp_path, monkeypatch
):
    """The failure comes after the experts are written (in staging): an overwrite keeps the earlier bundle byte for
    byte, a fresh folder gets nothing (no experts/, no gate, no staging left), and the next export takes that folder."""
    import moe.tasks.export

    common = [f"store_dir={store}", *EXPORT]
    earlier, fresh = tmp_path / "earlier", tmp_path / "fresh"
    script("export")(compose_config("export", common, earlier))
    before = digests(earlier)
    written = []
    write_files = moe.tasks.export.write_files
    monkeypatch.setattr(moe.tasks.export, "write_files", lambda *a, **k: written.append(a[0]) or write_files(*a, **k))
    if failure == "unknown_tenant":  # the data knows bank only; the store's weather fails in the evaluation
        failing = ["data=tenant_files", tenant_files_override({"bank": data["bank"]}), "export.measure=true"]
        expected = KeyError
    else:  # the disk fills as the manifest is written

        def disk_full(*args, **kwargs):
            raise OSError("No space left on device (injected)")

        monkeypatch.setattr(moe.tasks.export, "write_bundle_manifest", disk_full)
        failing, expected = [], OSError
    for out, overwrite in ((earlier, ["export.overwrite=true"]), (fresh, [])):
        with pytest.raises(expected):
            script("export")(compose_config("export", [*common, *failing, *overwrite], out))
    assert len(written) == 2  # both failed after the experts were written
    assert digests(earlier) == before, "the failed export changed the earlier bundle"
    left = sorted(p.name for p in fresh.iterdir()) if fresh.exists() else []
    assert left == [], f"the failed export left {left} in a fresh folder"
    monkeypatch.undo()
    script("export")(compose_config("export", common, fresh))
    assert sorted(p.name for p in fresh.iterdir()) == BUNDLE_PARTS


def test_a_successful_export_leaves_no_staging_folder(store, tmp_path):
    out = tmp_path / "bundle"
    for overwrite in ([], ["export.overwrite=true"]):  # into a fresh folder, then over its own bundle
        script("export")(compose_config("export", [f"store_dir={store}", *EXPORT, *overwrite], out))
        assert sorted(p.name for p in out.iterdir()) == BUNDLE_PARTS
