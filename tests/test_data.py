"""Tenant files (CSV / JSONL), CLINC150 loading and download checks, and the tenant data module."""

from __future__ import annotations

import io
import json
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


def refused(name, files, row, *fragments, read=None, blamed=None, **options):
    """A case of `test_a_bad_tenant_file_is_refused_naming_file_row_and_problem`: `files` (name -> text or bytes)
    are written, `read` (a file name or split -> file name; default: the only file) is read with `options`, and the
    error names `blamed` (default: the file read), `row` (None: the whole file) and every fragment."""
    return pytest.param(files, read, options, blamed, row, fragments, id=name)


BAD_TENANT_FILES = [
    refused(
        "csv-missing-column",
        {"t.csv": "utterance,category\nhello,greet\n"},
        2,
        "missing column 'intent'",
        text_column="utterance",
        label_column="intent",
    ),
    refused(
        "jsonl-missing-column-names-its-line",
        {"t.jsonl": '{"text": "a", "label": "x"}\n\n{"text": "b"}\n'},
        3,
        "missing column 'label'",
    ),
    refused("missing-split-column", {"t.csv": "text,label\na,x\n"}, 2, "missing column 'part'", split_column="part"),
    refused("csv-empty-file-has-no-header", {"t.csv": ""}, None, "empty file", "no header"),
    refused("csv-header-only-has-no-rows", {"t.csv": "text,label\n"}, None, "empty file (no rows)"),
    refused("jsonl-zero-bytes", {"t.jsonl": ""}, None, "empty file (no rows)"),
    refused("jsonl-blank-lines-only", {"t.jsonl": "\n  \n\n"}, None, "empty file (no rows)"),
    # the header is line 1; the blank line 3 is skipped but still counted: the bad row is line 4, as an editor says
    refused(
        "csv-blank-text-row-is-its-editor-line",
        {"t.csv": "text,label\nfine,x\n\n   ,y\n"},
        4,
        "blank text in column 'text'",
    ),
    refused(
        "csv-first-data-row-is-line-2-with-crlf",
        {"t.csv": b"text,label\r\nhello,\r\n"},
        2,
        "blank label in column 'label'",
    ),
    *(
        refused(
            f"jsonl-blank-label-{label_id}",
            {"t.jsonl": '{"q": "a", "y": "x"}\n{"q": "b", "y": LABEL}\n'.replace("LABEL", label)},
            2,
            "blank label in column 'y'",
            text_column="q",
            label_column="y",
        )
        for label_id, label in [("empty", '""'), ("spaces", '"   "'), ("null", "null")]
    ),
    *(
        refused(
            f"jsonl-label-that-names-no-class-{label_id}",
            {"t.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": LABEL}\n'.replace("LABEL", label)},
            2,
            "not a class name",
        )
        for label_id, label in [("list", '["billing"]'), ("bool", "true"), ("object", '{"a": 1}')]
    ),
    refused("jsonl-text-that-is-not-a-string", {"t.jsonl": '{"text": 12, "label": "x"}\n'}, 1, "blank text"),
    refused(
        "jsonl-bad-json-names-its-line",
        {"t.jsonl": '{"text": "a", "label": "x"}\n\n{"text": "b", "label": }\n'},
        3,
        "bad JSON",
    ),
    refused(
        "jsonl-line-not-an-object",
        {"t.jsonl": '{"text": "a", "label": "x"}\n["b", "y"]\n'},
        2,
        "expected a JSON object",
        "list",
    ),
    refused(
        "csv-row-with-more-fields-than-the-header",
        {"t.csv": "text,label\na,x\nb,y,surplus\n"},
        3,
        "more fields than the header",
    ),
    refused(
        "unknown-split-value",
        {"t.csv": "text,label,split\na,x,train\nb,x,dev\n"},
        3,
        "unknown split 'dev'",
        split_column="split",
    ),
    refused(
        "unknown-split-key-in-a-mapping",
        {"t.csv": "text,label\na,x\n"},
        None,
        "unknown split 'dev'",
        read={"train": "t.csv", "dev": "t.csv"},
        blamed="t.csv",
    ),
    refused(
        "val-label-absent-from-train-by-split-column",
        {"t.csv": "text,label,split\na,x,train\nb,x,val\nc,zzz,val\nd,zzz,test\ne,zzz,val\n"},
        4,
        "label 'zzz'",
        "split 'val'",
        "train split",
        split_column="split",
    ),
    refused(
        "test-label-absent-from-train-names-the-test-file",
        {
            "train.jsonl": '{"text": "a", "label": "x"}\n',
            "test.jsonl": '{"text": "b", "label": "x"}\n\n{"text": "c", "label": "new"}\n',
        },
        3,
        "label 'new'",
        "split 'test'",
        read={"train": "train.jsonl", "test": "test.jsonl"},
        blamed="test.jsonl",
    ),
    refused(
        "no-train-rows",
        {"val.csv": "text,label\na,x\n"},
        None,
        "tenant 't' has no train rows",
        read={"val": "val.csv"},
        blamed="val.csv",
    ),
    refused("unsupported-suffix", {"t.txt": "text,label\na,x\n"}, None, "unsupported file type '.txt'"),
    refused("file-not-found", {}, None, "file not found", read="missing.csv"),
]


@pytest.mark.parametrize("files, read, options, blamed, row, fragments", BAD_TENANT_FILES)
def test_a_bad_tenant_file_is_refused_naming_file_row_and_problem(
    tmp_path, files, read, options, blamed, row, fragments
):
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            write(tmp_path / name, content)
    read = read if read is not None else next(iter(files))
    source = {split: tmp_path / name for split, name in read.items()} if isinstance(read, dict) else tmp_path / read
    with pytest.raises(TenantDataError) as info:
        read_tenant_file("t", source, **options)
    assert_data_error(info.value, tmp_path / (blamed or read), row, *fragments)


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


def _splits(**rows) -> str:
    data = {"train": [["what is my balance", "balance"]], "val": [], "test": []}
    data.update(rows)
    return json.dumps(data)


def clinc_refused(name, files, blamed, row, *fragments):
    """A case of `test_a_bad_clinc150_copy_is_refused_naming_file_row_and_problem`: the real folder with `files`
    replaced (name -> text, or a function of the real file's text), and what the error names."""
    return pytest.param(files, blamed, row, fragments, id=name)


BAD_CLINC150 = [
    clinc_refused(
        "corrupt-json", {"data_full.json": lambda real: real[: len(real) // 2]}, "data_full.json", None, "bad JSON"
    ),
    *(
        clinc_refused(
            f"row-not-a-pair-{item_id}",
            {"data_full.json": _splits(val=[["how much money do i have", "balance"], item])},
            "data_full.json",
            2,
            "val",
            "not a [text, intent] pair",
        )
        for item_id, item in [
            ("one-item", ["only text"]),
            ("three-items", ["text", "balance", "extra"]),
            ("intent-not-a-string", ["text", 3]),
            ("a-string", "text"),
        ]
    ),
    *(
        clinc_refused(
            f"out-of-scope-entry-not-a-pair-{item_id}",
            {"data_full.json": _splits(oos_val=[["book me a spaceship", "oos"], item])},
            "data_full.json",
            2,
            "oos_val",
            "not a [text, intent] pair",
        )
        for item_id, item in [("a-string", "hi"), ("one-item", ["how are you"]), ("text-null", [None, "oos"])]
    ),
    clinc_refused(
        "file-not-utf8",
        {"data_full.json": _splits(), "domains.json": lambda real: real.encode("utf-16")},
        "domains.json",
        None,
        "not UTF-8",
    ),
    clinc_refused(
        "intent-in-no-domain",
        {"data_full.json": _splits(test=[["teleport me", "teleport"]])},
        "data_full.json",
        1,
        "test",
        "'teleport'",
        "no domain",
    ),
    clinc_refused(
        "missing-split",
        {"data_full.json": json.dumps({"train": [], "val": []})},
        "data_full.json",
        None,
        "split 'test' is missing",
    ),
]


@pytest.mark.parametrize("files, blamed, row, fragments", BAD_CLINC150)
def test_a_bad_clinc150_copy_is_refused_naming_file_row_and_problem(tmp_path, clinc_dir, files, blamed, row, fragments):
    folder = tmp_path / "clinc150"
    folder.mkdir()
    for name in ("domains.json", "data_full.json"):
        content = files.get(name, lambda real: real)  # default: the real file as it is
        content = content((clinc_dir / name).read_text(encoding="utf-8")) if callable(content) else content
        (folder / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    with pytest.raises(TenantDataError) as info:
        load_clinc150(folder)
    assert_data_error(info.value, folder / blamed, row, *fragments)


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
