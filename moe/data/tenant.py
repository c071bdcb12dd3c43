"""A tenant: a named data set with its own label set, split into train / val / test."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

SPLITS = ("train", "val", "test")


class TenantDataError(ValueError):
    """Malformed tenant data; the message names the file, the row (1-based, as an editor shows it) and the problem."""

    def __init__(self, source: str | Path, problem: str, row: int | None = None):
        where = f"{source}, row {row}" if row is not None else f"{source}"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.problem = str(source), row, problem


class Example(NamedTuple):
    text: str
    label: str


@dataclass(frozen=True)
class Tenant:
    """`labels` is the tenant's own label set, in a fixed order (the order of its expert's outputs)."""

    name: str
    labels: tuple[str, ...]
    splits: dict[str, list[Example]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise TenantDataError(self.source or "<tenant>", "tenant name is empty")
        if len(set(self.labels)) != len(self.labels):
            raise TenantDataError(self.source or self.name, "duplicate label names")
        known = set(self.labels)
        for split, examples in self.splits.items():
            for example in examples:
                if example.label not in known:
                    raise TenantDataError(
                        self.source or self.name,
                        f"label {example.label!r} of split {split!r} is not a label of the tenant",
                    )

    def split(self, name: str) -> list[Example]:
        return self.splits.get(name, [])

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    def restricted(self, labels: Iterable[str]) -> Tenant:
        """This tenant with only `labels` (in that order; each one of its own) and their examples in every split, under
        the same name and source. Itself when `labels` are its labels in its order."""
        kept = tuple(labels)
        if kept == self.labels:
            return self
        if unknown := [label for label in kept if label not in self.labels]:
            raise KeyError(f"labels {unknown} are not labels of tenant {self.name!r}: {list(self.labels)}")
        keep = set(kept)
        splits = {split: [e for e in examples if e.label in keep] for split, examples in self.splits.items()}
        return Tenant(self.name, kept, splits, self.source)
