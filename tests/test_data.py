"""Tenant files (CSV / JSONL), CLINC150 loading and download checks, and the tenant data module."""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from moe.data import clinc150
from moe.data.clinc150 import SHA256, clinc150_files, load_clinc150
from moe.data.datamodule import TenantDataModule
from moe.data.files import read_tenant_file
from moe.data.tenant import Example, Tenant, TenantDataError
from tests.helpers import sha256_of


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_data_error(error: TenantDataError, path: Path | str, row: int | None, *fragments: str) -> None:
    """The message names the file, the row (or none) and the problem."""
    message = str(error)
    assert error.source == str(path)
    assert message.startswith(f"{path}, row {row}: " if row is not None else f"{path}: "), message
    assert error.row == row
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- read_tenant_file: happy paths -------------------------------------------------------------------


def test_csv_with_custom_columns_and_split_column(tmp_path):
    path = write(
        tmp_path / "bank.csv",
        "utterance,intent,part\n"
        "  hello there  ,greet,train\n"
        "bye now, leave ,train\n"
        '"hi, you",greet,val\n'
        "see ya,leave,test\n"
        "good morning,greet,train\n",
    )
    tenant = read_tenant_file("bank", path, text_column="utterance", label_column="intent", split_column="part")
    assert tenant.name == "bank"
    assert tenant.labels == ("greet", "leave")
    assert tenant.split("train") == [
        Example("hello there", "greet"),
        Example("bye now", "leave"),
        Example("good morning", "greet"),
    ]
    assert tenant.split("val") == [Example("hi, you", "greet")]
    assert tenant.split("test") == [Example("see ya", "leave")]
    assert tenant.source == str(path)


def test_jsonl_with_custom_columns_all_rows_train(tmp_path):
    rows = [
        {"utterance": "play a song", "intent": "music"},
        {"utterance": "stop it", "intent": "stop", "x": 1},
    ]
    path = write(
        tmp_path / "media.jsonl",
        json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps({"utterance": "louder", "intent": 7}),
    )
    tenant = read_tenant_file("media", path, text_column="utterance", label_column="intent")
    assert tenant.labels == ("7", "music", "stop")
    assert set(tenant.splits) == {"train"}
    assert tenant.split("train") == [
        Example("play a song", "music"),
        Example("stop it", "stop"),
        Example("louder", "7"),
    ]
    assert tenant.split("val") == [] and tenant.split("test") == []


def test_mapping_split_to_file_mixes_formats(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\nturn on the light,on\nlights off,off\n")
    val = write(tmp_path / "val.jsonl", '{"text": "switch it on", "label": "on"}\n')
    test = write(tmp_path / "test.csv", "text,label\nkill the lights,off\ndark please,off\n")
    tenant = read_tenant_file("home", {"train": train, "val": str(val), "test": test})
    assert tenant.labels == ("off", "on")
    assert [len(tenant.split(s)) for s in ("train", "val", "test")] == [2, 1, 2]
    assert tenant.split("val") == [Example("switch it on", "on")]
    assert tenant.label_index("on") == 1
    assert all(str(p) in tenant.source for p in (train, val, test))


def test_mapping_overrides_split_column(tmp_path):
    path = write(tmp_path / "all.csv", "text,label,split\na,x,test\nb,y,val\n")
    tenant = read_tenant_file("t", {"train": path}, split_column="split")
    assert tenant.split("train") == [Example("a", "x"), Example("b", "y")]
    assert set(tenant.splits) == {"train"}


@pytest.mark.parametrize(
    "name, content",
    [
        ("excel.csv", "text,label\r\ncafé au lait,order\r\n"),
        ("export.jsonl", '{"text": "café au lait", "label": "order"}\n'),
    ],
    ids=["csv", "jsonl"],
)
def test_utf8_byte_order_mark_is_ignored(tmp_path, name, content):
    # Spreadsheet programs ("CSV UTF-8") and some Windows tools start the file with a byte-order mark.
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8-sig"))
    tenant = read_tenant_file("cafe", path)
    assert tenant.split("train") == [Example("café au lait", "order")]


# --- read_tenant_file: malformed inputs --------------------------------------------------------------


def test_csv_missing_column(tmp_path):
    path = write(tmp_path / "t.csv", "utterance,category\nhello,greet\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path, text_column="utterance", label_column="intent")
    assert_data_error(info.value, path, 2, "missing column 'intent'")


def test_jsonl_missing_column_names_its_line(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 3, "missing column 'label'")


def test_missing_split_column(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\na,x\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path, split_column="part")
    assert_data_error(info.value, path, 2, "missing column 'part'")


def test_csv_empty_file_has_no_header(tmp_path):
    path = write(tmp_path / "t.csv", "")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, None, "empty file", "no header")


def test_csv_header_only_has_no_rows(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, None, "empty file (no rows)")


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["zero-bytes", "blank-lines"])
def test_jsonl_without_rows(tmp_path, content):
    path = write(tmp_path / "t.jsonl", content)
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, None, "empty file (no rows)")


def test_csv_blank_text_row_is_editor_line(tmp_path):
    # Header is line 1, the blank line 3 is skipped but still counted: the bad row is on line 4.
    path = write(tmp_path / "t.csv", "text,label\nfine,x\n\n   ,y\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 4, "blank text in column 'text'")


def test_csv_first_data_row_is_line_2_with_crlf(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\r\nhello,\r\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 2, "blank label in column 'label'")


@pytest.mark.parametrize("label", ['""', '"   "', "null"])
def test_jsonl_blank_label(tmp_path, label):
    path = write(tmp_path / "t.jsonl", '{"q": "a", "y": "x"}\n{"q": "b", "y": LABEL}\n'.replace("LABEL", label))
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path, text_column="q", label_column="y")
    assert_data_error(info.value, path, 2, "blank label in column 'y'")


@pytest.mark.parametrize("label", ['["billing"]', "true", '{"a": 1}'])
def test_jsonl_label_that_names_no_class(tmp_path, label):
    path = write(
        tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": LABEL}\n'.replace("LABEL", label)
    )
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 2, "not a class name")


def test_jsonl_non_string_text_is_rejected(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": 12, "label": "x"}\n')
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 1, "blank text")


def test_jsonl_bad_json_row_is_line_number(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": }\n')
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 3, "bad JSON")


def test_jsonl_line_not_an_object(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n')
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 2, "expected a JSON object", "list")


def test_csv_row_with_extra_fields(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\na,x\nb,y,surplus\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, 3, "more fields than the header")


def test_unknown_split_value(tmp_path):
    path = write(tmp_path / "t.csv", "text,label,split\na,x,train\nb,x,dev\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path, split_column="split")
    assert_data_error(info.value, path, 3, "unknown split 'dev'")


def test_unknown_split_key_in_mapping(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\na,x\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", {"train": path, "dev": path})
    assert_data_error(info.value, path, None, "unknown split 'dev'")


def test_val_label_absent_from_train_split_column(tmp_path):
    path = write(tmp_path / "t.csv", "text,label,split\na,x,train\nb,x,val\nc,zzz,val\nd,zzz,test\ne,zzz,val\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path, split_column="split")
    assert_data_error(info.value, path, 4, "label 'zzz'", "split 'val'", "train split")


def test_test_label_absent_from_train_names_test_file(tmp_path):
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n')
    test = write(tmp_path / "test.jsonl", '{"text": "b", "label": "x"}\n\n{"text": "c", "label": "new"}\n')
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", {"train": train, "test": test})
    assert_data_error(info.value, test, 3, "label 'new'", "split 'test'")


def test_no_train_rows(tmp_path):
    val = write(tmp_path / "val.csv", "text,label\na,x\n")
    with pytest.raises(TenantDataError, match="no train rows") as info:
        read_tenant_file("t", {"val": val})
    assert str(val) in str(info.value)


def test_unsupported_suffix(tmp_path):
    path = write(tmp_path / "t.txt", "text,label\na,x\n")
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, None, "unsupported file type '.txt'")


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.csv"
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", path)
    assert_data_error(info.value, path, None, "file not found")


# --- CLINC150 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clinc(clinc_dir):
    return load_clinc150(clinc_dir)


def test_clinc150_ten_tenants(clinc, clinc_dir):
    assert len(clinc.tenants) == 10
    all_labels = [label for tenant in clinc.tenants for label in tenant.labels]
    assert len(all_labels) == len(set(all_labels)) == 150
    for tenant in clinc.tenants:
        assert len(tenant.labels) == 15 and list(tenant.labels) == sorted(tenant.labels)
        assert [len(tenant.split(s)) for s in ("train", "val", "test")] == [1500, 300, 450], tenant.name
        assert tenant.source == str(clinc_dir / "data_full.json")
    assert {s: len(v) for s, v in clinc.out_of_scope.items()} == {"train": 100, "val": 100, "test": 1000}
    assert clinc.tenant("banking").name == "banking"
    with pytest.raises(KeyError, match="no_such_domain"):
        clinc.tenant("no_such_domain")


def test_clinc150_domain_subset_and_env_folder(monkeypatch, clinc_dir):
    monkeypatch.setenv("MOE_DATA_DIR", str(clinc_dir.parent))
    subset = load_clinc150(domains=["travel", "banking"])
    assert [t.name for t in subset.tenants] == ["travel", "banking"]
    with pytest.raises(KeyError, match="nowhere"):
        load_clinc150(domains=["nowhere"])


def test_clinc150_folder_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_full.json"):
        load_clinc150(tmp_path)


def _corrupt_copy(tmp_path: Path, data: str, clinc_dir: Path) -> Path:
    folder = tmp_path / "clinc150"
    folder.mkdir()
    shutil.copy(clinc_dir / "domains.json", folder / "domains.json")
    write(folder / "data_full.json", data)
    return folder


def _splits(**rows) -> str:
    data = {"train": [["what is my balance", "balance"]], "val": [], "test": []}
    data.update(rows)
    return json.dumps(data)


def test_clinc150_corrupt_json(tmp_path, clinc_dir):
    text = (clinc_dir / "data_full.json").read_text(encoding="utf-8")
    folder = _corrupt_copy(tmp_path, text[: len(text) // 2], clinc_dir)
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / "data_full.json", None, "bad JSON")


@pytest.mark.parametrize("item", [["only text"], ["text", "balance", "extra"], ["text", 3], "text"])
def test_clinc150_row_not_a_pair(tmp_path, item, clinc_dir):
    folder = _corrupt_copy(tmp_path, _splits(val=[["how much money do i have", "balance"], item]), clinc_dir)
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / "data_full.json", 2, "val", "not a [text, intent] pair")


@pytest.mark.parametrize("item", ["hi", ["how are you"], [None, "oos"]])
def test_clinc150_out_of_scope_entry_not_a_pair(tmp_path, item, clinc_dir):
    folder = _corrupt_copy(tmp_path, _splits(oos_val=[["book me a spaceship", "oos"], item]), clinc_dir)
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / "data_full.json", 2, "oos_val", "not a [text, intent] pair")


def test_clinc150_file_not_utf8(tmp_path, clinc_dir):
    folder = _corrupt_copy(tmp_path, _splits(), clinc_dir)
    (folder / "domains.json").write_bytes((clinc_dir / "domains.json").read_text().encode("utf-16"))
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / "domains.json", None, "not UTF-8")


def test_clinc150_intent_in_no_domain(tmp_path, clinc_dir):
    folder = _corrupt_copy(tmp_path, _splits(test=[["teleport me", "teleport"]]), clinc_dir)
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / "data_full.json", 1, "test", "'teleport'", "no domain")


def test_clinc150_missing_split(tmp_path, clinc_dir):
    folder = _corrupt_copy(tmp_path, json.dumps({"train": [], "val": []}), clinc_dir)
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / "data_full.json", None, "split 'test' is missing")


class FakeUrlopen:
    """Stands in for `urllib.request.urlopen`: serves `payload(name)` and records each requested URL."""

    def __init__(self, payload):
        self.payload, self.urls = payload, []

    def __call__(self, url, timeout=None):
        self.urls.append(url)
        return io.BytesIO(self.payload(url.rsplit("/", 1)[-1]))


@pytest.fixture
def download_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_DATA_DIR", raising=False)
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_download_rejects_wrong_sha256(download_env, monkeypatch):
    fake = FakeUrlopen(lambda name: b'{"not": "the pinned file"}')
    monkeypatch.setattr(clinc150.urllib.request, "urlopen", fake)
    with pytest.raises(TenantDataError, match="sha256 .* does not match the pinned") as info:
        clinc150_files()
    assert len(fake.urls) == 1 and info.value.source == fake.urls[0]
    assert fake.urls[0].endswith("/data_full.json") and clinc150._COMMIT in fake.urls[0]
    assert SHA256["data_full.json"] in str(info.value)
    assert [p for p in download_env.rglob("*") if p.is_file()] == []


def test_a_failed_download_names_the_address_and_the_offline_fix(download_env, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(clinc150.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match=r"could not download CLINC150's data_full.json from https://.*MOE_DATA_DIR"):
        clinc150_files()
    assert [p for p in download_env.rglob("*") if p.is_file()] == []


def test_download_with_correct_bytes_is_cached(download_env, monkeypatch, clinc_dir):
    fake = FakeUrlopen(lambda name: (clinc_dir / name).read_bytes())
    monkeypatch.setattr(clinc150.urllib.request, "urlopen", fake)
    files = clinc150_files()
    cached = download_env / "data" / "clinc150"
    assert files == {name: cached / name for name in SHA256}
    assert sorted(u.rsplit("/", 1)[-1] for u in fake.urls) == sorted(SHA256)
    assert all(sha256_of(path) == SHA256[name] for name, path in files.items())
    assert sorted(p.name for p in cached.iterdir()) == sorted(SHA256)  # no partial files left

    assert clinc150_files() == files
    assert len(load_clinc150().tenants) == 10
    assert len(fake.urls) == 2  # served from the cache: no new download

    # A cached file that no longer matches its pinned hash is fetched again (only that one).
    write(cached / "domains.json", "{}")
    assert clinc150_files() == files
    assert [u.rsplit("/", 1)[-1] for u in fake.urls[2:]] == ["domains.json"]
    assert sha256_of(cached / "domains.json") == SHA256["domains.json"]


# --- TenantDataModule --------------------------------------------------------------------------------


def _tenants() -> list[Tenant]:
    alarms = Tenant(
        "alarms",
        ("cancel", "set"),
        {
            "train": [
                Example("wake me at 7", "set"),
                Example("cancel my alarm", "cancel"),
                Example("alarm 6", "set"),
            ],
            "val": [Example("set an alarm", "set")],
            "test": [Example("no alarm", "cancel")],
        },
    )
    weather = Tenant(
        "weather",
        ("rain", "sun", "wind"),
        {
            "train": [Example("will it rain", "rain"), Example("is it windy", "wind")],
            "val": [Example("sunny today?", "sun")],
        },
    )
    return [alarms, weather]


class FakeEncoder:
    """Features that identify their text: (length, first character code, 1.0); counts the calls."""

    dim = 3

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.tensor([[float(len(t)), float(ord(t[0])), 1.0] for t in texts]).reshape(len(texts), self.dim)


def test_datamodule_with_encoder():
    encoder = FakeEncoder()
    module = TenantDataModule(_tenants(), encoder=encoder, batch_size=2, eval_batch_size=8)
    module.setup("fit")
    module.setup("test")  # already built: no second encoding
    assert len(encoder.calls) == 3
    assert {s: len(d) for s, d in module.datasets.items()} == {"train": 5, "val": 2, "test": 1}
    train = module.datasets["train"]
    assert train.tenant.tolist() == [0, 0, 0, 1, 1]
    assert train.label.tolist() == [1, 0, 1, 0, 2]
    assert module.datasets["val"].tenant.tolist() == [0, 1] and module.datasets["val"].label.tolist() == [
        1,
        1,
    ]
    item = train[4]
    assert set(item) == {"tenant", "label", "features"}
    assert torch.equal(item["features"], encoder(["is it windy"])[0])
    assert int(item["tenant"]) == 1 and int(item["label"]) == 2

    batch = next(iter(module.val_dataloader()))
    assert batch["features"].shape == (2, 3) and batch["tenant"].tolist() == [0, 1]
    assert sum(len(b["label"]) for b in module.train_dataloader()) == 5


def test_datamodule_without_encoder_yields_texts():
    module = TenantDataModule(_tenants(), encoder=None, eval_batch_size=8)
    module.setup()
    item = module.datasets["train"][3]
    assert set(item) == {"tenant", "label", "text"}
    assert item["text"] == "will it rain" and int(item["tenant"]) == 1 and int(item["label"]) == 0
    batch = next(iter(module.val_dataloader()))
    assert batch["text"] == ["set an alarm", "sunny today?"]


def test_datamodule_rejects_bad_tenant_lists():
    with pytest.raises(ValueError, match="at least one tenant"):
        TenantDataModule([])
    tenants = _tenants()
    with pytest.raises(ValueError, match="unique"):
        TenantDataModule([tenants[0], tenants[0]])
    with pytest.raises(ValueError, match="no tenant has examples in split 'val'"):
        TenantDataModule([Tenant("empty", ("a",), {"train": [Example("x", "a")]})]).val_dataloader()
