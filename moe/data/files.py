"""A user's own tenant from CSV or JSONL files with a text and a label column (names configurable)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping
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
    sources = dict(files) if isinstance(files, Mapping) else {None: files}
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    where: dict[tuple[str, str], tuple[Path, int]] = {}
    for fixed_split, path in sources.items():
        if fixed_split is not None and fixed_split not in SPLITS:
            raise TenantDataError(path, f"unknown split {fixed_split!r} (expected one of {SPLITS})")
        for number, split, example in read_examples(path, text_column, label_column, split_column):
            split = fixed_split or split
            splits[split].append(example)
            where.setdefault((split, example.label), (Path(path), number))
    labels = tuple(sorted({example.label for example in splits["train"]}))
    if not labels:
        raise TenantDataError(", ".join(str(p) for p in sources.values()), f"tenant {name!r} has no train rows")
    for (split, label), (path, number) in where.items():
        if label not in labels:
            raise TenantDataError(
                path, f"label {label!r} in split {split!r} does not occur in the train split", row=number
            )
    source = ", ".join(str(p) for p in sources.values())
    return Tenant(name=name, labels=labels, splits={k: v for k, v in splits.items() if v}, source=source)
