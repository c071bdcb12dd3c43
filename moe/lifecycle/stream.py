"""A tenant's file streamed for grow and update, as evaluation streams it: rows read one by one (`read_examples`),
only the train rows kept, and those only as trunk features (float32) and label ids, encoded in batches as they are
read. No row or text is held, so a file far larger than memory grows in the memory its features take.

Two passes over the file(s): the first checks every row (as `read_tenant_file` does, with the same errors) and
finds the label set, so that a bad row at the end of a large file is an error before anything is encoded; the
second encodes the train rows into features allocated once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moe.data import Tenant, TenantDataError
from moe.data.files import LabelSet, TenantFile, source_of
from moe.progress import bar as progress_bar

Encoder = Callable[[list[str]], torch.Tensor]
ENCODE_BATCH = 1024  # texts read, then encoded, at a time


class EncodedRows(NamedTuple):
    """A tenant's train rows, in file order, as grow and update take them."""

    features: torch.Tensor  # (n, d) float32 trunk features
    labels: torch.Tensor  # (n,) int64 indices into the tenant's labels


@dataclass(frozen=True)
class ScannedFile:
    """What the first pass learns: the tenant (its name, sorted train labels and source; no examples) and its
    number of train rows."""

    tenant: Tenant
    train_rows: int


def scan_tenant_file(entry: TenantFile) -> ScannedFile:
    """Every row of every file read and checked, keeping only the label set; the errors are `read_tenant_file`'s
    (the same rules, `tenant_rows` and `LabelSet`): a malformed row, an unknown split, no train rows, a val/test
    label that train does not have."""
    label_set, train_rows = LabelSet(), 0
    for path, number, split, example in entry.rows():
        label_set.add(path, number, split, example.label)
        train_rows += split == "train"
    source = source_of(entry.files)
    return ScannedFile(Tenant(name=entry.name, labels=label_set.labels(entry.name, source), source=source), train_rows)


@torch.no_grad()
def encode_train_rows(
    entry: TenantFile,
    scanned: ScannedFile,
    encode: Encoder,
    batch_size: int = ENCODE_BATCH,
    progress: bool = True,
) -> EncodedRows:
    """The train rows of `entry` (checked by `scan_tenant_file`), encoded `batch_size` texts at a time as they are
    read, into features allocated once for `scanned.train_rows` rows."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    index = {label: i for i, label in enumerate(scanned.tenant.labels)}
    labels = torch.empty(scanned.train_rows, dtype=torch.long)
    features: torch.Tensor | None = None
    filled = 0
    texts: list[str] = []
    ids: list[int] = []

    def flush() -> None:
        nonlocal features, filled
        encoded = encode(texts).detach().to("cpu", torch.float32)
        if features is None:
            features = torch.empty(scanned.train_rows, encoded.shape[1], dtype=torch.float32)
        features[filled : filled + len(texts)] = encoded
        labels[filled : filled + len(ids)] = torch.tensor(ids, dtype=torch.long)
        filled += len(texts)
        bar.update(len(texts))
        texts.clear()
        ids.clear()

    with progress_bar(desc=f"encoding {entry.name}", unit="row", total=scanned.train_rows, enabled=progress) as bar:
        for path, number, _, example in entry.rows(splits=("train",)):  # val/test files: scanned, never encoded
            if example.label not in index or filled + len(texts) >= scanned.train_rows:
                raise TenantDataError(path, "the file changed while it was being read", row=number)
            texts.append(example.text)
            ids.append(index[example.label])
            if len(texts) == batch_size:
                flush()
        if texts:
            flush()
    if filled != scanned.train_rows or features is None:
        raise TenantDataError(scanned.tenant.source, "the file changed while it was being read")
    return EncodedRows(features, labels)


def stream_tenant_file(
    entry: TenantFile, encode: Encoder, batch_size: int = ENCODE_BATCH, progress: bool = False
) -> tuple[Tenant, EncodedRows]:
    """`scan_tenant_file` then `encode_train_rows`: the tenant (no examples held) and its train rows' features."""
    scanned = scan_tenant_file(entry)
    return scanned.tenant, encode_train_rows(entry, scanned, encode, batch_size, progress)
