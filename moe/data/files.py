"""A user's own tenant from CSV or JSONL files with a text and a label column (names configurable)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from moe.data.tenant import SPLITS, Example, Tenant, TenantDataError

Row = tuple[int, dict]  # (1-based row number as an editor shows it, record)

_SURROGATE = re.compile("[\ud800-\udfff]")  # what surrogateescape makes of a byte that is not UTF-8


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, newlines kept (for csv); a byte that is not UTF-8 names its line, byte and column."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:  # -sig: skip a BOM
        for number, line in enumerate(handle, start=1):
            if bad := _SURROGATE.search(line):
                byte, column = ord(bad.group()) - 0xDC00, bad.start() + 1
                raise TenantDataError(path, f"not UTF-8 text: byte 0x{byte:02x} at column {column}", row=number)
            yield line


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = csv.DictReader(_lines(path))
    try:
        if not reader.fieldnames:
            raise TenantDataError(path, "empty file (no header row)")
        for record in reader:
            if None in record:
                raise TenantDataError(path, "more fields than the header names", row=reader.line_num)
            if all(record[name] == name for name in reader.fieldnames):  # e.g. two files concatenated
                raise TenantDataError(path, "the header row repeated inside the file", row=reader.line_num)
            yield reader.line_num, record
    except csv.Error as error:  # e.g. a field over csv.field_size_limit()
        raise TenantDataError(path, f"bad CSV: {error}", row=reader.line_num) from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TenantDataError(path, f"bad JSON: {error.msg} (column {error.colno})", row=number) from None
        except (ValueError, RecursionError) as error:  # an integer over 4300 digits; nesting too deep
            raise TenantDataError(path, f"bad JSON: {error}", row=number) from None
        if not isinstance(record, dict):
            raise TenantDataError(path, f"expected a JSON object, got {type(record).__name__}", row=number)
        yield number, record


def _unencodable(value: str) -> str | None:
    """Why `value` cannot be encoded as UTF-8 (a lone surrogate, e.g. from a JSON escape), or None."""
    if bad := _SURROGATE.search(value):
        return f"not encodable as UTF-8: lone surrogate U+{ord(bad.group()):04X} at position {bad.start()}"
    return None


@dataclass(frozen=True)
class TenantFile:
    """A tenant's CSV/JSONL file(s), as in `conf/data/tenant_files.yaml` (one file, or split -> file), not read yet:
    evaluation, grow and update stream it (`read_examples`); `read_tenant_file` reads it whole."""

    name: str
    files: str | Mapping[str, str]
    text_column: str = "text"
    label_column: str = "label"
    split_column: str | None = None

    @classmethod
    def from_entry(cls, entry: Mapping) -> TenantFile:
        """From a config entry with these fields (a `read_tenant_file` node's `_target_` aside); `files` one path or a
        mapping split -> path, else a ValueError."""
        fields = {k: v for k, v in entry.items() if k != "_target_"}
        files = fields.pop("files", None)
        if isinstance(files, Mapping):
            files = {str(split): str(path) for split, path in files.items()}
        elif isinstance(files, (str, Path)) and str(files):
            files = str(files)
        else:
            raise ValueError(
                f"tenant files must be one file or a mapping {{train: ..., val: ..., test: ...}}, got {files!r}"
            )
        return cls(files=files, **fields)

    def rows(self, splits: Collection[str] = SPLITS) -> Iterator[tuple[Path, int, str, Example]]:
        """`tenant_rows` of these files."""
        return tenant_rows(self.files, self.text_column, self.label_column, self.split_column, splits)


def read_examples(
    path: str | Path, text_column: str = "text", label_column: str = "label", split_column: str | None = None
) -> Iterator[tuple[int, str, Example]]:
    """Yield `(row, split, Example)` for each row of a `.csv` or `.jsonl` file, checking every row as it goes."""
    path = Path(path)
    if not path.is_file():
        raise TenantDataError(path, "file not found")
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        raise TenantDataError(path, f"unsupported file type {path.suffix!r} (use .csv or .jsonl)")
    columns = [text_column, label_column] + ([split_column] if split_column else [])
    seen_any = False
    for number, record in rows:
        seen_any = True
        for column in columns:
            if column not in record:
                raise TenantDataError(path, f"missing column {column!r} (has {sorted(record)})", row=number)
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str) or not text.strip():
            raise TenantDataError(path, f"blank text in column {text_column!r}", row=number)
        if isinstance(label, bool | list | dict):  # JSONL: a label names one class (a string, or a number)
            kind = type(label).__name__
            raise TenantDataError(path, f"label in column {label_column!r} is a {kind}, not a class name", row=number)
        label = "" if label is None else str(label)
        if not label.strip():
            raise TenantDataError(path, f"blank label in column {label_column!r}", row=number)
        for column, value in ((text_column, text), (label_column, label)):
            if problem := _unencodable(value):
                raise TenantDataError(path, f"column {column!r} is {problem}", row=number)
        split = str(record[split_column]).strip() if split_column else "train"
        if split not in SPLITS:
            raise TenantDataError(path, f"unknown split {split!r} (expected one of {SPLITS})", row=number)
        yield number, split, Example(text.strip(), label.strip())
    if not seen_any:
        raise TenantDataError(path, "empty file (no rows)")


def file_sources(files: str | Path | Mapping[str, str | Path]) -> dict[str | None, str | Path]:
    """A tenant's file(s) as split -> file (None: one file, its rows split by a column or all train)."""
    return dict(files) if isinstance(files, Mapping) else {None: files}


def source_of(files: str | Path | Mapping[str, str | Path]) -> str:
    """The files named in one string (a tenant's `source`)."""
    return ", ".join(str(p) for p in file_sources(files).values())


def tenant_rows(
    files: str | Path | Mapping[str, str | Path],
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = None,
    splits: Collection[str] = SPLITS,
) -> Iterator[tuple[Path, int, str, Example]]:
    """`(file, row, split, example)` of every row of a tenant's file(s) in `splits`, each checked as it is read
    (`read_examples`): one file (split by `split_column`, else all train) or a mapping split -> file, whose split
    wins; a file of a split not in `splits` is not opened. The one reading of the tenant-file rules that
    `read_tenant_file` and the lifecycle's streaming (`moe.lifecycle.stream`) share."""
    for fixed_split, path in file_sources(files).items():
        if fixed_split is not None and fixed_split not in SPLITS:
            raise TenantDataError(path, f"unknown split {fixed_split!r} (expected one of {SPLITS})")
        if fixed_split is not None and fixed_split not in splits:
            continue
        for number, split, example in read_examples(path, text_column, label_column, split_column):
            split = fixed_split or split
            if split in splits:
                yield Path(path), number, split, example


class LabelSet:
    """A tenant's label set from its rows (`add` each): the train split's labels in sorted order (`labels`), a
    tenant without train rows or a val/test label absent from train being an error naming the file and row."""

    def __init__(self) -> None:
        self.train: set[str] = set()
        self.first: dict[tuple[str, str], tuple[Path, int]] = {}  # the first row of each (val/test split, label)

    def add(self, path: Path, number: int, split: str, label: str) -> None:
        if split == "train":
            self.train.add(label)
        else:
            self.first.setdefault((split, label), (path, number))

    def labels(self, name: str, source: str) -> tuple[str, ...]:
        if not self.train:
            raise TenantDataError(source, f"tenant {name!r} has no train rows")
        for (split, label), (path, number) in self.first.items():
            if label not in self.train:
                raise TenantDataError(
                    path, f"label {label!r} in split {split!r} does not occur in the train split", row=number
                )
        return tuple(sorted(self.train))


def read_tenant_file(
    name: str,
    files: str | Path | Mapping[str, str | Path],
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = None,
) -> Tenant:
    """A tenant from one file (all rows train, or split by `split_column`) or a mapping split -> file.

    The label set is the train split's labels in sorted order; a val/test label absent from train is an error.
    """
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    label_set = LabelSet()
    for path, number, split, example in tenant_rows(files, text_column, label_column, split_column):
        splits[split].append(example)
        label_set.add(path, number, split, example.label)
    source = source_of(files)
    labels = label_set.labels(name, source)
    return Tenant(name=name, labels=labels, splits={k: v for k, v in splits.items() if v}, source=source)
