"""A trunk that has learned more: the current trunk fine-tuned, in Lightning, on the data of the tenants that are
awake, with one linear head over all their intents (discarded afterwards: only the trunk is kept).

The result is a new trunk version. Nothing here touches a store: `scripts/adapt_trunk.py` records the version in
one, and `moe.lifecycle.upgrade` moves the store's experts onto it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from moe.data import Tenant
from moe.progress import lightning_bar
from moe.trunk import Trunk


@dataclass
class AdaptConfig:
    """How the trunk is fine-tuned (conf/adapt_trunk.yaml; chosen on val, see RESULTS.md, Trunk versions)."""

    epochs: int = 1
    lr: float = 3e-5  # the trunk's
    head_lr: float = 1e-2  # the throw-away head's
    batch_size: int = 32
    layers: int | None = None  # the top N transformer layers are trained (None: every weight of the trunk)
    input_scale: float = 8.0  # the head sees unit-norm features times this (as experts do)
    compatibility: float = 0.0  # weight of |f_new(x) - f_old(x)|^2: keeps the features near the old trunk's (BCT-like)
    accelerator: str = "cpu"
    seed: int = 0


def trainable_parameters(trunk: Trunk, layers: int | None) -> list[torch.nn.Parameter]:
    """The weights to train: the top `layers` transformer layers of a Hugging Face encoder, or all of them."""
    if layers is None:
        return list(trunk.parameters())
    stack = getattr(getattr(getattr(trunk, "encoder", None), "encoder", None), "layer", None)
    if stack is None:
        raise ValueError(f"trunk kind {trunk.kind!r} has no transformer layers: set layers=null to train all of it")
    if not 1 <= layers <= len(stack):
        raise ValueError(f"layers must lie in 1..{len(stack)} (the encoder's layers), got {layers}")
    return [p for layer in stack[-layers:] for p in layer.parameters()]


class TrunkAdaptation(L.LightningModule):
    """Trunk -> unit-norm features -> linear head over every (tenant, intent) of the awake tenants."""

    def __init__(
        self, trunk: Trunk, num_labels: int, cfg: AdaptConfig, reference: Callable[[list[str]], torch.Tensor] | None
    ):
        """`reference`: the old trunk's features of a batch of texts, which `cfg.compatibility` keeps the new ones
        near."""
        super().__init__()
        if cfg.compatibility and reference is None:
            raise ValueError("compatibility > 0 needs the old trunk's features (reference)")
        self.trunk, self.cfg, self.reference = trunk, cfg, reference
        self.trunk.requires_grad_(False)
        self.trained = trainable_parameters(trunk, cfg.layers)
        for parameter in self.trained:
            parameter.requires_grad_(True)
        self.head = torch.nn.Linear(trunk.dim, num_labels)

    def training_step(self, batch, batch_idx):
        texts, labels = batch
        features = self.trunk(texts)
        loss = F.cross_entropy(self.head(features * self.cfg.input_scale), labels)
        self.log("adapt/cross_entropy", loss, prog_bar=True, batch_size=len(labels))
        if self.cfg.compatibility:
            with torch.no_grad():
                old = self.reference(texts).to(features)
            drift = (features - old).square().sum(-1).mean()
            self.log("adapt/drift", drift, prog_bar=True, batch_size=len(labels))
            loss = loss + self.cfg.compatibility * drift
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(
            [{"params": self.trained, "lr": self.cfg.lr}, {"params": self.head.parameters(), "lr": self.cfg.head_lr}]
        )


def _collate(rows: list[tuple[str, int]]) -> tuple[list[str], torch.Tensor]:
    return [text for text, _ in rows], torch.tensor([label for _, label in rows])


def adapt_trunk(
    trunk: Trunk,
    tenants: list[Tenant],
    cfg: AdaptConfig,
    loggers: list[Logger] | None = None,
    reference: Callable[[list[str]], torch.Tensor] | None = None,
) -> tuple[Trunk, dict[str, float]]:
    """A fine-tuned copy of `trunk` (frozen, a new fingerprint) trained on `tenants`' train splits; `trunk` itself is
    left as it was. `reference`: `trunk`'s features of texts (default: `trunk.encode`; a feature cache saves the
    passes), for `cfg.compatibility`. Returns it with the run's figures (examples, labels, seconds)."""
    if not tenants:
        raise ValueError("adapting a trunk needs at least one awake tenant with data")
    L.seed_everything(cfg.seed, workers=True)
    label_id: dict[tuple[str, str], int] = {}
    rows = [
        (example.text, label_id.setdefault((tenant.name, example.label), len(label_id)))
        for tenant in tenants
        for example in tenant.split("train")
    ]
    if not rows:
        raise ValueError(f"tenants {[t.name for t in tenants]} have no train examples")
    adapted = copy.deepcopy(trunk)
    module = TrunkAdaptation(adapted, len(label_id), cfg, reference or trunk.encode)
    loader = DataLoader(rows, batch_size=cfg.batch_size, shuffle=True, collate_fn=_collate)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=1,
        logger=loggers or False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=lightning_bar(),
        log_every_n_steps=20,
    )
    start = time.perf_counter()
    adapted.train()
    trainer.fit(module, train_dataloaders=loader)
    adapted.freeze()
    seconds = time.perf_counter() - start
    return adapted, {"adapt/examples": len(rows), "adapt/labels": len(label_id), "adapt/seconds": seconds}
