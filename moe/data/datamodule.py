"""A LightningDataModule over any set of tenants, yielding trunk features (or raw texts) with their targets."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from moe.data.tenant import SPLITS, Tenant

Encoder = Callable[[list[str]], torch.Tensor]


class TenantExamples(Dataset):
    """Examples of several tenants: `tenant` indexes the tenant list, `label` the tenant's own label set."""

    def __init__(self, texts: list[str], tenant: torch.Tensor, label: torch.Tensor, features: torch.Tensor | None):
        self.texts, self.tenant, self.label, self.features = texts, tenant, label, features

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        item = {"tenant": self.tenant[i], "label": self.label[i]}
        if self.features is not None:
            item["features"] = self.features[i]
        else:
            item["text"] = self.texts[i]
        return item


def tenant_examples(tenants: Sequence[Tenant], split: str, encoder: Encoder | None) -> TenantExamples:
    rows = [
        (t, tenant.label_index(ex.label), ex.text) for t, tenant in enumerate(tenants) for ex in tenant.split(split)
    ]
    texts = [text for _, _, text in rows]
    return TenantExamples(
        texts,
        torch.tensor([t for t, _, _ in rows], dtype=torch.long),
        torch.tensor([y for _, y, _ in rows], dtype=torch.long),
        encoder(texts) if encoder is not None else None,
    )


class TenantDataModule(L.LightningDataModule):
    """`encoder` (e.g. a FeatureCache's `encode`) turns texts into features once; None yields raw texts,
    for a trunk that trains with the experts."""

    def __init__(
        self,
        tenants: Sequence[Tenant],
        encoder: Encoder | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
    ):
        super().__init__()
        if not tenants:
            raise ValueError("a data module needs at least one tenant")
        names = [tenant.name for tenant in tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique, got {names}")
        self.tenants, self.encoder = list(tenants), encoder
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.datasets: dict[str, TenantExamples] = {}
        self.encode_seconds = 0.0

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                start = time.perf_counter()
                self.datasets[split] = tenant_examples(self.tenants, split, self.encoder)
                self.encode_seconds += time.perf_counter() - start

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if len(self.datasets.get(split, ())) == 0:
            raise ValueError(f"no tenant has examples in split {split!r}")
        size = self.batch_size if shuffle else self.eval_batch_size
        return DataLoader(self.datasets[split], batch_size=size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """For watching training (`fit/val_*`); a run's reported figures come from `moe.evaluation`."""
        return self._loader("val", shuffle=False)
