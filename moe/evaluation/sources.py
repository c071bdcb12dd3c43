"""Labelled queries to evaluate on, streamed: in-memory tenants, out-of-scope texts, or a user's tenant files read
row by row (`read_examples`), so that a large file never has to fit in memory.

A split is a sequence of parts (e.g. in-scope queries, then out-of-scope ones); each part is cut into batches of
its own, so that the in-scope batches are the same whether or not out-of-scope queries follow them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

from moe.data import Tenant
from moe.data.clinc150 import load_clinc150
from moe.data.files import TenantFile, read_examples


class Query(NamedTuple):
    text: str
    tenant: str | None  # None: an out-of-scope query
    label: str | None
    source: str = ""  # where it came from (file and row), for error messages


@dataclass(frozen=True)
class SplitSource:
    """One split's queries: `parts` are called afresh for each pass; `size` (when known) sizes the progress bar."""

    name: str
    parts: tuple[Callable[[], Iterator[Query]], ...]
    size: int | None = None

    def batches(self, batch_size: int) -> Iterator[list[Query]]:
        return chain.from_iterable(batched(part(), batch_size) for part in self.parts)


def batched(queries: Iterable[Query], size: int) -> Iterator[list[Query]]:
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    iterator = iter(queries)
    while batch := list(islice(iterator, size)):
        yield batch


def tenant_queries(tenants: Sequence[Tenant], split: str) -> Iterator[Query]:
    """Tenant by tenant, examples in order (the order training's data module uses)."""
    for tenant in tenants:
        for i, example in enumerate(tenant.split(split), start=1):
            yield Query(example.text, tenant.name, example.label, f"{tenant.source or tenant.name}, {split} #{i}")


def out_of_scope_queries(texts: Sequence[str], origin: str = "out-of-scope") -> Iterator[Query]:
    for i, text in enumerate(texts, start=1):
        yield Query(text, None, None, f"{origin} #{i}")


def file_queries(entries: Sequence[TenantFile], split: str) -> Iterator[Query]:
    """Rows of `split`, tenant by tenant in config order, each file read lazily row by row."""
    for entry in entries:
        sources = dict(entry.files) if isinstance(entry.files, Mapping) else {None: entry.files}
        for fixed_split, path in sources.items():
            if fixed_split is not None and fixed_split != split:
                continue
            rows = read_examples(path, entry.text_column, entry.label_column, entry.split_column)
            for row, row_split, example in rows:
                if (fixed_split or row_split) == split:
                    yield Query(example.text, entry.name, example.label, f"{Path(path)}, row {row}")


def tenant_sources(
    tenants: Sequence[Tenant], splits: Sequence[str], out_of_scope: Mapping[str, Sequence[str]] | None = None
) -> dict[str, SplitSource]:
    """In-memory tenants (and, per split, out-of-scope texts after the in-scope queries)."""
    sources = {}
    for split in splits:
        oos = list((out_of_scope or {}).get(split, ()))
        parts: list[Callable[[], Iterator[Query]]] = [lambda split=split: tenant_queries(tenants, split)]
        if oos:
            parts.append(lambda split=split, oos=oos: out_of_scope_queries(oos, f"out-of-scope {split}"))
        size = sum(len(t.split(split)) for t in tenants) + len(oos)
        sources[split] = SplitSource(split, tuple(parts), size)
    return sources


def clinc150_sources(
    splits: Sequence[str],
    folder: str | Path | None = None,
    domains: Sequence[str] | None = None,
    overlapping: Sequence[str] = (),
) -> dict[str, SplitSource]:
    """CLINC150's domains (and `overlapping` tenants, `moe.data.overlap`) as tenants, each split followed by its
    out-of-scope queries (oos_val, oos_test)."""
    data = load_clinc150(folder, list(domains) if domains else None, list(overlapping or ()))
    return tenant_sources(data.tenants, splits, data.out_of_scope)


def file_sources(splits: Sequence[str], entries: Sequence[TenantFile | Mapping]) -> dict[str, SplitSource]:
    """Tenant files streamed row by row; `entries` may be the `read_tenant_file` nodes of `conf/data/tenant_files.yaml`
    (their `_target_` aside, the same fields as `TenantFile`)."""
    files = [entry if isinstance(entry, TenantFile) else TenantFile.from_entry(entry) for entry in entries]
    return {split: SplitSource(split, (lambda split=split: file_queries(files, split),)) for split in splits}
