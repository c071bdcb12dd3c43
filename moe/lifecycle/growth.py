"""Training one tenant's expert and its routing entry, with the trunk and every other expert frozen.

Nothing here reads another tenant's data: what it knows of the others is what their shards keep (class
means, counts and scatter of their trunk features).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from moe.data import Tenant
from moe.data.datamodule import TenantExamples
from moe.lifecycle.few_shot import Neighbours, check_method, nearest_tenant, statistics_expert
from moe.model import TENSOR_NAMES, ExpertInfo, RowSource, build_mixture, check_choice
from moe.model.evidence import EVIDENCE_SHRINKAGE, check_evidence, fit_evidence
from moe.model.kinds import Architecture
from moe.model.pathway import PathwayLayout, Pathways, as_pathway_statistics, pathway_statistics
from moe.model.router import ROUTING
from moe.model.stats import (
    COUNT,
    MEAN,
    SCATTER,
    SHRINKAGE,
    PooledScatter,
    class_statistics,
    discriminant_rows,
    merge_statistics,
    pooled_precision,
)
from moe.training.module import MixtureClassifier, quiet_trainer
from moe.training.pathway import PathwayConfig, train_contrastive, train_pathway
from moe.trunk import Trunk


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
    kind: str = "adapter"  # of the experts a new store grows (`moe.model.kinds.KINDS`); a store's own experts' wins
    pathway: dict | None = None  # pathway experts (conf/expert/pathway.yaml): `PathwayConfig`'s own settings
    evidence: str = "none"  # what a new store's experts keep for routing (`moe.model.evidence`); a store's own wins
    evidence_shrinkage: float = EVIDENCE_SHRINKAGE
    method: str = "full"  # how a new tenant's expert is made (`moe.lifecycle.few_shot.METHODS`); not "full": always
    # A tenant whose smallest intent has fewer train rows than `few_shot_below` is grown by `few_shot_method`
    # (`few_shot.method_for`); None: as the learning curves chose for the store's kind (`Grower.FEW_SHOT`); 0: never.
    few_shot_below: int | None = None
    few_shot_method: str | None = None
    method_shrinkage: float = (
        0.9  # statistics: of the covariance its head's discriminants use (chosen: learning curves)
    )
    nearest_epochs: int = 3  # nearest: epochs of training from the nearest tenant's pathway (chosen: learning curves)
    contrastive_pairs: int = 4  # contrastive: pairs per example (half same intent, half another)
    contrastive_epochs: int = 1  # contrastive: epochs over the pairs, before the head is fitted
    select: list[dict] | None = None  # candidates compared on the tenant's held-out share (`moe.lifecycle.selection`)
    select_held_out: float = 0.2  # select: the share of each intent's train rows held out to compare them on
    select_retrain: bool = True  # select: the winner grown again on all the rows (else: the one grown on the rest)

    def __post_init__(self):
        check_choice(self.source, RowSource, "source")
        check_method(self.method)
        if self.few_shot_method is not None:
            check_method(self.few_shot_method)
        if self.few_shot_below is not None and self.few_shot_below < 0:
            raise ValueError(f"few_shot_below counts examples per intent (>= 0, or None): got {self.few_shot_below}")
        check_evidence(self.evidence)
        if self.kind not in GROWERS:
            raise ValueError(f"unknown expert kind {self.kind!r}: choose among {sorted(GROWERS)}")


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
    head: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit an expert over `tenant.labels` on (features, labels); `initial` (an earlier version with fewer
    labels) seeds the adapter and the columns of the labels it knew; `head` (`head.weight`, `head.bias`) seeds the head
    alone, the adapter starting as a new one does."""
    L.seed_everything(cfg.seed, workers=True)
    info = ExpertInfo(tenant.name, tenant.labels)
    model = build_mixture([info], features.shape[1], rank=cfg.rank, dropout=cfg.dropout, input_scale=cfg.input_scale)
    if initial is not None:
        model.bank.load_expert(0, initial)
    if head is not None:
        model.bank.load_expert(0, model.bank.expert_tensors(0, len(tenant.labels)) | head)
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
    dim = stats[SCATTER].shape[0]
    precision = (PooledScatter.of([stats]) + PooledScatter.of(others, dim)).precision(cfg.shrinkage)
    weight, bias = discriminant_rows(stats[MEAN], precision, cfg.input_scale)
    if cfg.source == "statistics" or not others:
        return dict(zip(ROUTING, (weight.contiguous(), bias.contiguous()), strict=True))
    generator = torch.Generator().manual_seed(cfg.seed)
    other_means = torch.cat([o[MEAN] for o in others])
    sampled, sampled_class = gaussian_samples(other_means, precision, cfg.negatives_per_class, generator)
    frozen_weight, frozen_bias = (torch.cat([o[name] for o in others]) for name in ROUTING)
    x = torch.cat([features, sampled]) * cfg.input_scale
    target = torch.cat([labels + len(frozen_bias), sampled_class])
    module = RoutingEntry(frozen_weight, frozen_bias, weight, bias, cfg.lr)
    loader = DataLoader(TensorDataset(x, target), batch_size=cfg.batch_size, shuffle=True)
    _trainer(cfg, cfg.routing_epochs).fit(module, train_dataloaders=loader)
    return dict(zip(ROUTING, (module.weight.detach().contiguous(), module.bias.detach().contiguous()), strict=True))


def expert_tensors(expert: dict[str, torch.Tensor], routing: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]):
    """Everything a shard holds, in one dict."""
    return {name: expert[name] for name in TENSOR_NAMES} | routing | stats


def statistics_samples(stats: dict[str, torch.Tensor], per_class: int, cfg: GrowthConfig, others=()):
    """`per_class` samples of each class the statistics know (count > 0), drawn from its mean under their pooled
    covariance (seeded by `cfg.seed`): what an update rehearses earlier intents on, and a transport retrains on.
    Statistics without within-class spread (one row per class: a few-example tenant's) have no covariance of their
    own: the covariance is then pooled with `others` (other experts' statistics in the same space), and without any a
    ValueError says so. -> (x (n, d), class ids (n,))."""
    known = [c for c in range(len(stats[COUNT])) if stats[COUNT][c] > 0]
    count = stats[COUNT].sum().item()
    if count - len(known) >= 1 and stats[SCATTER].any():
        precision = pooled_precision(stats[SCATTER], count, len(known), cfg.shrinkage)
    elif others:
        precision = (PooledScatter.of([stats]) + PooledScatter.of(others)).precision(cfg.shrinkage)
    else:
        raise ValueError(
            f"statistics of {int(count)} rows over {len(known)} classes have no within-class spread (one row per "
            "class): no covariance to sample them from, and no other expert's statistics to pool one with"
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    x, drawn = gaussian_samples(stats[MEAN][known], precision, per_class, generator)
    return x, torch.tensor(known)[drawn]


class Grower:
    """How experts of one kind are trained from a tenant's data, for a grow or an update (`GROWERS`, keyed as
    `moe.model.kinds.KINDS`): this one, adapters over the trunk's features. Chosen from the architecture
    (`Lifecycle.grower`)."""

    # (few_shot_below, few_shot_method) as the learning curves chose them on the development domains for this kind
    # (docs/RESULTS.md, Few-example growth): for adapters today's growth won at every k, so never.
    FEW_SHOT: tuple[int, str] = (0, "statistics")

    def __init__(self, trunk: Trunk, arch: Architecture, cfg: GrowthConfig):
        self.trunk, self.arch, self.cfg = trunk, arch, cfg

    @classmethod
    def architecture(cls, trunk: Trunk, cfg: GrowthConfig) -> Architecture:
        """The architecture of the first expert of a new store over `trunk`."""
        arch = Architecture(trunk.dim, cfg.rank, "labels", cfg.input_scale, "float32", kind=cfg.kind)
        return replace(arch, evidence=cfg.evidence)

    def held_out(self, tenant: Tenant, encoded, own: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The features the expert reads of the tenant's own val split, which calibrate its evidence (None: it has
        none, or came as encoded rows only). `own`: the kind's own tensors (a pathway's LoRA)."""
        texts = [e.text for e in tenant.split("val")] if encoded is None else []
        return self.trunk.encode(texts) if texts else None

    def evidence(self, tenant: Tenant, encoded, expert, features, labels, own=None) -> dict[str, torch.Tensor]:
        """The expert's evidence for routing (`moe.model.evidence`), from its own tenant's data only: its train rows
        as the expert reads them, calibrated on its val split."""
        if self.arch.evidence == "none":
            return {}
        held_out = self.held_out(tenant, encoded, own)
        return fit_evidence(
            self.arch.evidence, expert, features, labels, held_out, self.arch.input_scale, self.cfg.evidence_shrinkage
        )

    def grow(self, tenant: Tenant, encoded, features, labels, stats: dict[str, torch.Tensor], neighbours: Neighbours):
        """A new tenant's expert, made as `cfg.method` says (`moe.lifecycle.few_shot`) from its train rows (`features`,
        `labels`; `stats`: their class statistics) and what the store's other experts keep -> as `train`."""
        make = {
            "full": lambda: self.train(tenant, encoded, features, labels),
            "statistics": lambda: self.from_statistics(tenant, encoded, features, labels, stats, neighbours),
            "warm": lambda: self.warm(tenant, encoded, features, labels, stats, neighbours),
            "nearest": lambda: self.from_nearest(tenant, encoded, features, labels, neighbours),
            "contrastive": lambda: self.contrastive(tenant, encoded, labels),
        }
        return make[self.cfg.method]()

    def train(self, tenant: Tenant, encoded, features: torch.Tensor, labels: torch.Tensor):
        """A new expert on the tenant's train rows (`features`, `labels`; `encoded`: whether they came encoded) ->
        (expert tensors, the kind's own tensors with its evidence)."""
        expert = train_expert(tenant, features, labels, self.cfg)
        return expert, self.evidence(tenant, encoded, expert, features, labels)

    def from_statistics(self, tenant, encoded, features, labels, stats, neighbours: Neighbours):
        """An expert with no training (`statistics_expert`), over the trunk's features -> as `train`."""
        others = list(neighbours.entries.values())
        expert = statistics_expert(self.arch, stats, others, self.cfg.method_shrinkage)
        return expert, self.unchanged_trunk(stats) | self.evidence(tenant, encoded, expert, features, labels)

    def unchanged_trunk(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The kind's own tensors of an expert that reads the trunk's features as they are (adapters: none)."""
        return {}

    def warm(self, tenant, encoded, features, labels, stats, neighbours: Neighbours):
        """Today's training, its head started from the statistics expert's (a linear probe, then fine-tuning)."""
        start = statistics_expert(self.arch, stats, list(neighbours.entries.values()), self.cfg.method_shrinkage)
        head = {name: start[name] for name in ("head.weight", "head.bias")}
        expert = train_expert(tenant, features, labels, self.cfg, head=head)
        return expert, self.evidence(tenant, encoded, expert, features, labels)

    def from_nearest(self, tenant, encoded, features, labels, neighbours: Neighbours):
        raise ValueError(
            f"growth method 'nearest' reuses another tenant's pathway: it needs pathway experts, and "
            f"this store's are {self.arch.kind} experts"
        )

    def contrastive(self, tenant, encoded, labels):
        raise ValueError(
            f"growth method 'contrastive' fine-tunes a pathway: it needs pathway experts, and this "
            f"store's are {self.arch.kind} experts"
        )

    def next_version(
        self,
        old,
        merged: Tenant,
        tenant: Tenant,
        encoded,
        y,
        x,
        x_y,
        bridged: bool,
        before: str,
        stats,
        neighbours: Neighbours,
    ):
        """A new version of expert `old` (grown by method `before`) over `merged`'s labels, made as `cfg.method` says
        (`few_shot.next_method`): "statistics" recomputes it from `stats`, the merged statistics of every row seen so
        far (exemplar-free); any other method trains it (`update`) on the new rows and the rehearsal of the earlier
        intents, anew when `bridged` (`old` is of another trunk version) or when the tenant moves on from the
        few-example method it was grown by -> as `train`."""
        if self.cfg.method == "statistics":
            return self.from_statistics(tenant, encoded, x, x_y, stats, neighbours)
        return self.update(old, merged, tenant, encoded, y, x, x_y, bridged or before != self.cfg.method)

    def update(self, old, merged: Tenant, tenant: Tenant, encoded, y, x, x_y, anew: bool):
        """A new version of expert `old` over `merged`'s labels, on its new rows and the rehearsal of its earlier
        intents (`x`, `x_y`: both, in trunk features; `y`: the new rows' labels) -> as `train`. `anew`: trained from
        scratch, not from `old` (of another trunk version, or a few-example expert moving to the full method; the
        statistics expert's zero adapter is a point training does not leave)."""
        expert = train_expert(merged, x, x_y, self.cfg, initial=None if anew else old)
        return expert, self.evidence(tenant, encoded, expert, x, x_y)


class PathwayGrower(Grower):
    """Pathway experts: trained on the tenant's texts, through the trunk's top layers (`train_pathway`)."""

    FEW_SHOT = (10, "nearest")  # the nearest tenant's pathway won at k = 5, today's growth from k = 10 on

    def __init__(self, trunk: Trunk, arch: Architecture, cfg: GrowthConfig):
        super().__init__(trunk, arch, cfg)
        self.pathways = Pathways(trunk, arch.pathway.spec)

    @classmethod
    def architecture(cls, trunk: Trunk, cfg: GrowthConfig) -> Architecture:
        layout = PathwayLayout.of(PathwayConfig(**(cfg.pathway or {})).spec(), trunk)
        arch = Architecture(trunk.dim, cfg.rank, "labels", cfg.input_scale, "float32", kind=cfg.kind, pathway=layout)
        return replace(arch, evidence=cfg.evidence)

    def held_out(self, tenant: Tenant, encoded, own: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        texts = [e.text for e in tenant.split("val")]
        return self.pathways.encode(texts, own) if texts and own is not None else None

    def config(self) -> PathwayConfig:
        """How its pathways are trained: the configured settings, the store's architecture (its layers, LoRA rank and
        head) winning over the configured one."""
        spec = self.arch.pathway.spec
        settings = dict(self.cfg.pathway or {}) | {
            "layers": spec.layers,
            "lora_rank": spec.rank,
            "lora_alpha": spec.alpha,
        }
        return PathwayConfig(
            **settings,
            rank=self.arch.rank,
            dropout=self.cfg.dropout,
            input_scale=self.arch.input_scale,
            accelerator=self.cfg.accelerator,
            seed=self.cfg.seed,
        )

    @staticmethod
    def texts(tenant: Tenant, encoded, split: str = "train") -> list[str]:
        """A tenant's train texts, which a pathway expert trains on (through the trunk's layers)."""
        if encoded is not None:
            raise ValueError(f"tenant {tenant.name!r}: pathway experts train on texts, not on encoded rows")
        return [e.text for e in tenant.split(split)]

    def train(self, tenant: Tenant, encoded, features: torch.Tensor, labels: torch.Tensor):
        """A new pathway and its expert -> (expert, pathway tensors with the statistics of its own features)."""
        texts = self.texts(tenant, encoded)
        pathway, expert = train_pathway(self.pathways, texts, labels, len(tenant.labels), self.config())
        return expert, self.with_evidence(tenant, encoded, expert, pathway, texts, labels)

    def unchanged_trunk(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pathway that changes nothing (B = 0) and the statistics of its features, which are the trunk's."""
        return {name: torch.zeros(shape) for name, shape in self.pathways.shapes().items()} | as_pathway_statistics(
            stats
        )

    def warm(self, tenant, encoded, features, labels, stats, neighbours: Neighbours):
        raise ValueError(
            "growth method 'warm' trains an adapter expert from a statistics head: this store's experts are "
            "pathway experts (their few-example methods: statistics, nearest, contrastive)"
        )

    def from_nearest(self, tenant, encoded, features, labels, neighbours: Neighbours):
        """A pathway trained `nearest_epochs` on from the pathway of the tenant the gate sends most of these rows to."""
        texts = self.texts(tenant, encoded)
        start = neighbours.load(nearest_tenant(features, neighbours, self.arch.input_scale))
        lora = {name: start[name] for name in self.pathways.shapes()}
        cfg = replace(self.config(), epochs=self.cfg.nearest_epochs)
        pathway, expert = train_pathway(self.pathways, texts, labels, len(tenant.labels), cfg, initial=lora)
        return expert, self.with_evidence(tenant, encoded, expert, pathway, texts, labels)

    def contrastive(self, tenant, encoded, labels):
        """A new pathway fine-tuned on pairs of the tenant's texts (`train_contrastive`), then its head."""
        texts = self.texts(tenant, encoded)
        cfg = replace(self.config(), epochs=self.cfg.contrastive_epochs)
        pathway, expert = train_contrastive(
            self.pathways, texts, labels, len(tenant.labels), cfg, pairs=self.cfg.contrastive_pairs
        )
        return expert, self.with_evidence(tenant, encoded, expert, pathway, texts, labels)

    def with_evidence(self, tenant, encoded, expert, pathway, texts, labels) -> dict[str, torch.Tensor]:
        """The pathway's tensors and, when the store keeps evidence, its evidence over the pathway's own features."""
        if self.arch.evidence != "none":
            lora = {name: pathway[name] for name in self.arch.pathway.lora_shapes(self.arch.dim)}
            features = self.pathways.encode(texts, lora)
            pathway = pathway | self.evidence(tenant, encoded, expert, features, labels, lora)
        return pathway

    def update(self, old, merged: Tenant, tenant: Tenant, encoded, y, x, x_y, anew: bool):
        """Its pathway kept as it is; its expert learns the new intents on the pathway's features of the new texts,
        rehearsing the earlier intents from the statistics of those features its shard keeps (their data is gone).
        `anew` (a few-example expert moving to the full method; a pathway of another trunk is refused before): a new
        pathway trained on the new texts alone, as the full method trains one, which needs texts of every intent: the
        earlier rows are gone, and their statistics, in the old pathway's feature space, can not be rehearsed through
        a pathway that changes that space."""
        if anew:
            if missing := sorted(set(merged.labels) - set(tenant.labels)):
                raise ValueError(
                    f"tenant {tenant.name!r}, a pathway expert grown from few examples, moves to the full method with "
                    f"this update, which trains its pathway on the new texts alone: they lack intents {missing} (their "
                    "earlier rows are gone and can not be rehearsed through a new pathway). Give examples of every "
                    "intent, or keep it on its few-example method (raise growth.few_shot_below)"
                )
            texts = self.texts(tenant, encoded)
            pathway, expert = train_pathway(self.pathways, texts, y, len(merged.labels), self.config())
            return expert, self.with_evidence(tenant, encoded, expert, pathway, texts, y)
        lora = {name: old[name] for name in self.arch.pathway.lora_shapes(self.arch.dim)}
        features = self.pathways.encode(self.texts(tenant, encoded), lora)
        before = pathway_statistics(old)
        rehearsal, drawn = statistics_samples(before, self.cfg.rehearsal_per_class, self.cfg)
        x, x_y = torch.cat([features, rehearsal]), torch.cat([y, drawn])
        expert = train_expert(merged, x, x_y, self.cfg, initial=old)
        own = merge_statistics(before, class_statistics(features, y, len(merged.labels)))
        evidence = self.evidence(tenant, encoded, expert, x, x_y, lora)
        return expert, lora | as_pathway_statistics(own) | evidence


GROWERS: dict[str, type[Grower]] = {"adapter": Grower, "pathway": PathwayGrower}  # one per `KINDS` entry
