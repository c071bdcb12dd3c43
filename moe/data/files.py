"""A user's own tenant from CSV or JSONL files with a text and a label column (names configurable)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from moe.data.tenant import SPLITS, Example, Tenant, TenantDataError

Row = tuple[int, dict]  # (1-based row number as an editor shows it, record)


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: skip a BOM
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise TenantDataError(path, "empty file (no header row)")
        for record in reader:
            if None in record:
                raise TenantDataError(path, "more fields than the header names", row=reader.line_num)
            yield reader.line_num, record


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig") as handle:  # -sig: skip a BOM
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TenantDataError(path, f"bad JSON: {error.msg} (column {error.colno})", row=number) from None
            if not isinstance(record, dict):
                raise TenantDataError(path, f"expected a JSON object, got {type(record).__name__}", row=number)
            yield number, record


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
        if label is None or not str(label).strip():
            raise TenantDataError(path, f"blank label in column {label_column!r}", row=number)
        split = str(record[split_column]).strip() if split_column else "train"
        if split not in SPLITS:
            raise TenantDataError(path, f"unknown split {split!r} (expected one of {SPLITS})", row=number)
        yield number, split, Example(text.strip(), str(label).strip())
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
