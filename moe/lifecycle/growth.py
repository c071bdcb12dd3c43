"""Training one tenant's expert and its routing entry, with the trunk and every other expert frozen.

Nothing here reads another tenant's data: what it knows of the others is what their shards keep (class
means, counts and scatter of their trunk features).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from moe.data import Tenant
from moe.data.datamodule import TenantExamples
from moe.model import TENSOR_NAMES, ExpertInfo, RowSource, build_mixture, check_choice
from moe.model.pathway import PathwaySpec
from moe.model.stats import SHRINKAGE, PooledScatter, discriminant_rows
from moe.training.module import MixtureClassifier, quiet_trainer
from moe.training.pathway import PathwayConfig


@dataclass
class GrowthConfig:
    """How a tenant's expert is trained. The expert and optimiser settings have no defaults here: they come from
    the run's config (`conf/growth/default.yaml` interpolates `conf/expert/` and `conf/optim/`)."""

    rank: int
    dropout: float
    input_scale: float
    lr: float
    weight_decay: float
    epochs: int = 120  # as conf/growth/default.yaml, chosen on val
    batch_size: int = 256
    source: RowSource = "statistics"  # the new rows: discriminants of class means, or trained against samples
    shrinkage: float = SHRINKAGE
    negatives_per_class: int = 50  # trained rows: samples drawn from each other class's statistics
    routing_epochs: int = 20
    rehearsal_per_class: int = 100  # update: samples drawn from the tenant's own earlier classes (chosen on val)
    transport_per_class: int = 100  # trunk upgrade, transport: samples per class drawn from the moved statistics
    accelerator: str = "cpu"
    seed: int = 0
    pathway: dict | None = None  # pathway experts (conf/expert/pathway.yaml): `PathwayConfig`'s own settings

    def __post_init__(self):
        check_choice(self.source, RowSource, "source")

    def pathway_config(self, arch: dict) -> PathwayConfig:
        """How a pathway expert of architecture `arch` is trained: the pathway's own settings, the store's
        architecture (its layers, LoRA rank and head) winning over the configured one."""
        spec = PathwaySpec.from_architecture(arch)
        settings = dict(self.pathway or {}) | {"layers": spec.layers, "lora_rank": spec.rank, "lora_alpha": spec.alpha}
        return PathwayConfig(
            **settings,
            rank=arch["rank"],
            dropout=self.dropout,
            input_scale=arch["input_scale"],
            accelerator=self.accelerator,
            seed=self.seed,
        )


def _trainer(cfg: GrowthConfig, epochs: int) -> L.Trainer:
    return quiet_trainer(epochs, cfg.accelerator)


def gaussian_samples(means: torch.Tensor, precision: torch.Tensor, per_class: int, generator: torch.Generator):
    """`per_class` draws from N(mean_c, shared covariance) for each row of `means` (c, d) -> (x, class)."""
    covariance = torch.linalg.inv(precision)
    cholesky = torch.linalg.cholesky(covariance + 1e-8 * torch.eye(covariance.shape[0], dtype=covariance.dtype))
    classes = torch.arange(means.shape[0]).repeat_interleave(per_class)
    noise = torch.randn(len(classes), means.shape[1], generator=generator, dtype=torch.float64)
    return (means.double()[classes] + noise @ cholesky.T).float(), classes


def train_expert(
    tenant: Tenant,
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: GrowthConfig,
    initial: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit an expert over `tenant.labels` on (features, labels); `initial` (an earlier version with fewer
    labels) seeds the adapter and the columns of the labels it knew."""
    L.seed_everything(cfg.seed, workers=True)
    info = ExpertInfo(tenant.name, tenant.labels)
    model = build_mixture([info], features.shape[1], rank=cfg.rank, dropout=cfg.dropout, input_scale=cfg.input_scale)
    if initial is not None:
        model.bank.load_expert(0, initial)
    module = MixtureClassifier(
        model, [tenant], lr=cfg.lr, weight_decay=cfg.weight_decay, gate_weight=0.0, z_loss_weight=0.0
    )
    examples = TenantExamples([""] * len(labels), torch.zeros_like(labels), labels, features)
    loader = DataLoader(examples, batch_size=cfg.batch_size, shuffle=True)
    _trainer(cfg, cfg.epochs).fit(module, train_dataloaders=loader)
    return model.bank.expert_tensors(0, len(tenant.labels))


class RoutingEntry(L.LightningModule):
    """New gate rows for one expert, trained against the frozen rows of every other expert: the new
    tenant's real features target its rows, samples from the others' statistics target theirs."""

    def __init__(self, frozen_weight: torch.Tensor, frozen_bias: torch.Tensor, init_weight, init_bias, lr: float):
        super().__init__()
        self.register_buffer("frozen_weight", frozen_weight)  # (r, d)
        self.register_buffer("frozen_bias", frozen_bias)  # (r,)
        self.weight = torch.nn.Parameter(init_weight.clone())  # (c, d)
        self.bias = torch.nn.Parameter(init_bias.clone())
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, target = batch
        weight = torch.cat([self.frozen_weight, self.weight])
        bias = torch.cat([self.frozen_bias, self.bias])
        return F.cross_entropy(x @ weight.T + bias, target)

    def configure_optimizers(self):
        return torch.optim.Adam([self.weight, self.bias], lr=self.lr)


def routing_entry(
    features: torch.Tensor,
    labels: torch.Tensor,
    stats: dict[str, torch.Tensor],
    others: list[dict[str, torch.Tensor]],
    cfg: GrowthConfig,
) -> dict[str, torch.Tensor]:
    """The new expert's gate rows. Both sources start from the class-mean discriminants under the covariance
    pooled over every expert (the new tenant's stored scatter and the others'); "trained" then trains the rows
    against the others' rows, which stay exactly as they are."""
    dim = stats["stats.scatter"].shape[0]
    precision = (PooledScatter.of([stats]) + PooledScatter.of(others, dim)).precision(cfg.shrinkage)
    weight, bias = discriminant_rows(stats["stats.mean"], precision, cfg.input_scale)
    if cfg.source == "statistics" or not others:
        return {"gate.weight": weight.contiguous(), "gate.bias": bias.contiguous()}
    generator = torch.Generator().manual_seed(cfg.seed)
    other_means = torch.cat([o["stats.mean"] for o in others])
    sampled, sampled_class = gaussian_samples(other_means, precision, cfg.negatives_per_class, generator)
    frozen_weight = torch.cat([o["gate.weight"] for o in others])
    frozen_bias = torch.cat([o["gate.bias"] for o in others])
    x = torch.cat([features, sampled]) * cfg.input_scale
    target = torch.cat([labels + len(frozen_bias), sampled_class])
    module = RoutingEntry(frozen_weight, frozen_bias, weight, bias, cfg.lr)
    loader = DataLoader(TensorDataset(x, target), batch_size=cfg.batch_size, shuffle=True)
    _trainer(cfg, cfg.routing_epochs).fit(module, train_dataloaders=loader)
    return {"gate.weight": module.weight.detach().contiguous(), "gate.bias": module.bias.detach().contiguous()}


def expert_tensors(expert: dict[str, torch.Tensor], routing: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]):
    """Everything a shard holds, in one dict."""
    return {name: expert[name] for name in TENSOR_NAMES} | routing | stats
