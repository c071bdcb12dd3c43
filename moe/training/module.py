"""The LightningModule that trains a mixture on tenant data: gate, experts and (optionally) the trunk."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange

from moe.data.tenant import Tenant
from moe.evaluation.metrics import accuracy
from moe.model import MixtureOfExperts, best_labels, mixture_nll
from moe.progress import lightning_bar
from moe.trunk import Trunk


class MixtureClassifier(L.LightningModule):
    """Loss = tenant-given NLL (each example through its own tenant's experts: trains the experts)
    + `gate_weight` * supervised gate CE (each example's own prototype row, or its tenant for one-row gates)
    + `routed_weight` * routed mixture NLL (top-k as the gate chooses; trains an unsupervised gate)
    + `load_balance_weight` * load balance + `z_loss_weight` * router z-loss.

    `tenants` are the data module's, in its order: batches index them, and their labels, locally. The validation
    loop only watches training (`fit/val_*`): a run's figures come from `moe.evaluation`, on the shards it writes.
    """

    def __init__(
        self,
        model: MixtureOfExperts,
        tenants: Sequence[Tenant],
        trunk: Trunk | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        gate_weight: float = 1.0,
        routed_weight: float = 0.0,
        load_balance_weight: float = 0.0,
        z_loss_weight: float = 1e-3,
    ):
        super().__init__()
        self.model, self.trunk = model, trunk
        self.lr, self.weight_decay = lr, weight_decay
        self.weights = {
            "gate": gate_weight,
            "routed": routed_weight,
            "load_balance": load_balance_weight,
            "z_loss": z_loss_weight,
        }
        width = max(len(t.labels) for t in tenants)
        rows = model.router.weight.shape[1]
        target, tenant_index, row_target = [], [], []
        for tenant in tenants:
            ids = [model.label_id(tenant.name, label) for label in tenant.labels]
            target.append(ids + [-1] * (width - len(ids)))
            tenant_index.append(model.tenant_index(tenant.name))
            owners = [e for e, info in enumerate(model.experts) if info.tenant == tenant.name]
            if len(owners) != 1:
                raise ValueError(f"supervised training needs exactly one expert for tenant {tenant.name!r}")
            per_label = model.gate_rows == "labels"
            row_target.append(
                [owners[0] * rows + (y if per_label else 0) for y in range(len(tenant.labels))]
                + [-1] * (width - len(tenant.labels))
            )
        self.register_buffer("target_table", torch.tensor(target), persistent=False)
        self.register_buffer("tenant_table", torch.tensor(tenant_index), persistent=False)
        self.register_buffer("row_table", torch.tensor(row_target), persistent=False)

    def features(self, batch: dict) -> torch.Tensor:
        return batch["features"] if "features" in batch else self.trunk(batch["text"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, t, y = self.features(batch), batch["tenant"], batch["label"]
        target = self.target_table[t, y]
        given = self.model(x, self.tenant_table[t])
        routed = self.model(x, keep_rows=True)
        losses = {
            "given": mixture_nll(given, target),
            "gate": F.cross_entropy(rearrange(routed.router.row_logits, "b e m -> b (e m)"), self.row_table[t, y]),
            "routed": mixture_nll(routed, target),
            "load_balance": routed.router.load_balance_loss,
            "z_loss": routed.router.z_loss,
        }
        loss = losses["given"] + sum(w * losses[name] for name, w in self.weights.items() if w)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_epoch=True, on_step=False, batch_size=len(t))
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(t))
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Watching training: `fit/val_*`, the in-memory mixture's accuracies on the validation split (synced across
        ranks). They are not the run's figures: those come from its evaluation, on the shards it writes."""
        x, t, y = self.features(batch), batch["tenant"], batch["label"]
        target, tenant = self.target_table[t, y], self.tenant_table[t]
        routed, given = self.model(x), self.model(x, tenant)
        metrics = {
            "acc_routed": accuracy(best_labels(routed)[0], target),
            "acc_tenant_given": accuracy(best_labels(given)[0], target),
            "routing_acc": accuracy(self.model.expert_tenant[routed.experts[:, 0]], tenant),
        }
        self.log_dict({f"fit/val_{k}": v for k, v in metrics.items()}, prog_bar=True, batch_size=len(t), sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def quiet_trainer(epochs: int, accelerator: str = "cpu", logger=False) -> L.Trainer:
    """A Trainer for a short fit inside a larger run (one expert, one pathway, one routing entry): one device, no
    checkpoints or model summary, a progress bar only on a terminal."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=lightning_bar(),  # epochs and steps on a terminal only (moe.progress)
        enable_model_summary=False,
    )
