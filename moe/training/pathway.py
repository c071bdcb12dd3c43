"""Training one tenant's pathway expert in Lightning: its LoRA tensors inside the trunk's top layers and its expert
(adapter and head) over the pathway's features, with the trunk itself frozen.

Two ways: `train_pathway` fits the LoRA tensors and the expert together on cross-entropy; `train_contrastive`
(SetFit-style, for a few examples) first fits the LoRA tensors on pairs of texts, same label or not, then the expert
over the frozen pathway's features.

The shared lower layers are run once per training text, before the first epoch (`LowerStates`): only the top layers
run again each step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import get_linear_schedule_with_warmup

from moe.model import ExpertBank, check_choice
from moe.model.pathway import Hidden, Pathways, PathwaySpec, as_pathway_statistics
from moe.model.stats import class_statistics
from moe.progress import bar
from moe.training.module import quiet_trainer

Schedule = Literal["constant", "linear"]


@dataclass
class PathwayConfig:
    """A pathway expert and how it is trained (conf/expert/pathway.yaml; chosen on val)."""

    layers: int = 6  # the top N transformer layers adapted
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    rank: int = 0  # the expert's own adapter over the pathway's features (0: a linear head)
    dropout: float = 0.0
    input_scale: float = 8.0
    lr: float = 2.5e-4  # the LoRA tensors' (conf/expert/pathway.yaml: chosen on val)
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    epochs: int = 5
    batch_size: int = 32
    schedule: Schedule = "constant"  # the learning rates: "constant", or "linear" (warm up, then decay to zero)
    warmup: float = 0.1  # the share of the steps a "linear" schedule warms up for
    accelerator: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        check_choice(self.schedule, Schedule, "schedule")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is the share of the steps spent warming up, in [0, 1): got {self.warmup}")

    def spec(self) -> PathwaySpec:
        return PathwaySpec(self.layers, self.lora_rank, self.lora_alpha)


class LowerStates(Dataset):
    """Each text's token states after the frozen lower layers (unpadded), with its label."""

    def __init__(self, pathways: Pathways, texts: list[str], labels: torch.Tensor, batch_size: int = 64):
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        self.states: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for start in bar(range(0, len(order), batch_size), "encoding (lower layers)", "batch"):
            rows = order[start : start + batch_size]
            hidden = pathways.lower([texts[i] for i in rows])
            for j, i in enumerate(rows):
                self.states[i] = hidden.states[j, : int(hidden.mask[j].sum())].clone()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.states[i], self.labels[i]


class SimilarLengths(Sampler[list[int]]):
    """Batches of texts of similar length, in a new random order each epoch: each pool of `pool` batches' worth of
    shuffled texts is sorted by length and cut into batches, and the batches are shuffled (little padding, so the
    top layers run on about half the tokens of random batches of CLINC150 queries)."""

    def __init__(self, lengths: list[int], batch_size: int, pool: int = 50, seed: int = 0):
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist())


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Hidden, torch.Tensor]:
    states = [s for s, _ in batch]
    mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in states], batch_first=True)
    return Hidden(pad_sequence(states, batch_first=True), mask), torch.stack([y for _, y in batch])


def lora_parameters(
    pathways: Pathways, cfg: PathwayConfig, initial: Mapping[str, torch.Tensor] | None = None
) -> tuple[list[str], nn.ParameterList]:
    """A pathway's LoRA tensors to train, by name: new ones (`Pathways.init_tensors` seeded by `cfg.seed`: A random,
    B zero), or copies of `initial`'s (a shard's tensors: any other keys, its statistics, are left out)."""
    if initial is None:
        start = pathways.init_tensors(torch.Generator().manual_seed(cfg.seed))
    else:
        shapes = pathways.shapes()
        missing = sorted(name for name in shapes if name not in initial)
        wrong = sorted(name for name in shapes if name in initial and tuple(initial[name].shape) != shapes[name])
        if missing or wrong:
            raise ValueError(
                f"the initial pathway does not fit this trunk and spec: missing {missing[:3]} ({len(missing)} in "
                f"all), wrong shapes {[(n, tuple(initial[n].shape), shapes[n]) for n in wrong[:3]]} ({len(wrong)})"
            )
        start = {name: initial[name].detach().clone().float() for name in shapes}
    names = list(start)
    return names, nn.ParameterList([nn.Parameter(start[name]) for name in names])


def optimizers(module: L.LightningModule, groups: list[dict], cfg: PathwayConfig):
    """AdamW over parameter `groups` (each with its learning rate), stepped as `cfg.schedule` says."""
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if cfg.schedule == "constant":
        return optimizer
    steps = int(module.trainer.estimated_stepping_batches)
    schedule = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup * steps), steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class PathwayClassifier(L.LightningModule):
    """One pathway and its expert; the loss is cross-entropy over the tenant's own labels. The pathway starts new, or
    from `initial` (another pathway's tensors, copied)."""

    def __init__(
        self,
        pathways: Pathways,
        num_labels: int,
        cfg: PathwayConfig,
        initial: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.pathways, self.cfg = pathways, cfg
        self.names, self.lora = lora_parameters(pathways, cfg, initial)
        self.bank = ExpertBank(pathways.trunk.dim, [num_labels], rank=cfg.rank, dropout=cfg.dropout)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pathway's tensors, as a shard holds them."""
        return {name: p.detach().clone().contiguous() for name, p in zip(self.names, self.lora, strict=True)}

    def logits(self, hidden: Hidden) -> torch.Tensor:
        pathway = dict(zip(self.names, self.lora, strict=True))
        features = self.pathways.upper(hidden, [pathway], dropout=self.lora_dropout)  # an identity in eval mode
        return self.bank(features[None] * self.cfg.input_scale)[0]

    def training_step(self, batch, batch_idx):
        hidden, target = batch
        loss = F.cross_entropy(self.logits(hidden), target)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    def configure_optimizers(self):
        groups = [
            {"params": list(self.lora), "lr": self.cfg.lr},
            {"params": list(self.bank.parameters()), "lr": self.cfg.head_lr},
        ]
        return optimizers(self, groups, self.cfg)


def train_pathway(
    pathways: Pathways,
    texts: list[str],
    labels: torch.Tensor,
    num_labels: int,
    cfg: PathwayConfig,
    logger=False,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fit one pathway and its expert on (texts, labels in [0, num_labels)), the pathway new or starting from
    `initial`'s tensors; -> (pathway tensors with the statistics of its own features, as its shard keeps them; expert
    tensors)."""
    L.seed_everything(cfg.seed, workers=True)
    module = PathwayClassifier(pathways, num_labels, cfg, initial)
    examples = LowerStates(pathways, texts, labels)
    batches = SimilarLengths([len(s) for s in examples.states], cfg.batch_size, seed=cfg.seed)
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=collate)
    quiet_trainer(cfg.epochs, cfg.accelerator, logger).fit(module, train_dataloaders=loader)
    module.eval()
    lora = module.tensors()
    own = as_pathway_statistics(class_statistics(pathways.encode(texts, lora), labels, num_labels))
    return lora | own, module.bank.expert_tensors(0, num_labels)


def draw_pairs(labels: torch.Tensor, pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SetFit's pairs: for each text, `pairs` partners, the first half (rounded up) of its own label (itself when it is
    its label's only text), the rest of another label, each drawn uniformly; -> (first (n * pairs,), second (n *
    pairs,)) text indices, text by text."""
    if pairs < 1:
        raise ValueError(f"contrastive training needs at least one pair per text, got pairs={pairs}")
    if len(labels.unique()) < 2:
        raise ValueError("contrastive training needs texts of at least two labels (no different-label pairs)")
    positives, negatives = pairs - pairs // 2, pairs // 2
    partners = torch.empty(len(labels), pairs, dtype=torch.long)
    for label in labels.unique().tolist():
        same, other = (labels == label).nonzero()[:, 0], (labels != label).nonzero()[:, 0]
        m = len(same)
        if m == 1:
            partners[same, :positives] = same
        else:  # one of the other m - 1 texts: skip the text's own place in `same`
            draw = torch.randint(m - 1, (m, positives), generator=generator)
            draw += draw >= torch.arange(m)[:, None]
            partners[same, :positives] = same[draw]
        partners[same, positives:] = other[torch.randint(len(other), (m, negatives), generator=generator)]
    return torch.arange(len(labels)).repeat_interleave(pairs), partners.flatten()


class Pairs(Dataset):
    """Pairs of training texts (their `LowerStates`) with their target cosine: 1 for the same label, else 0."""

    def __init__(self, examples: LowerStates, first: torch.Tensor, second: torch.Tensor):
        self.examples, self.first, self.second = examples, first.tolist(), second.tolist()
        self.target = (examples.labels[first] == examples.labels[second]).float()

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, k: int) -> tuple[int, int, torch.Tensor]:
        return self.first[k], self.second[k], self.target[k]

    def lengths(self) -> list[int]:
        """Each pair's longer text, in tokens (`SimilarLengths` batches pairs that pad alike)."""
        states = self.examples.states
        return [max(len(states[i]), len(states[j])) for i, j in zip(self.first, self.second, strict=True)]

    def collate(self, batch: list[tuple[int, int, torch.Tensor]]) -> tuple[Hidden, torch.Tensor]:
        """b pairs -> both sides' token states in one padded batch (first sides, then second: 2b rows), targets (b,)."""
        rows = [self.examples[i] for i, _, _ in batch] + [self.examples[j] for _, j, _ in batch]
        hidden, _ = collate(rows)
        return hidden, torch.stack([t for _, _, t in batch])


class ContrastivePathway(L.LightningModule):
    """One pathway alone, fitted so that its features' cosine similarity is 1 for a pair of the same label and 0
    otherwise (sentence-transformers' CosineSimilarityLoss, as SetFit uses it)."""

    def __init__(self, pathways: Pathways, cfg: PathwayConfig, initial: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.pathways, self.cfg = pathways, cfg
        self.names, self.lora = lora_parameters(pathways, cfg, initial)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pathway's tensors, as a shard holds them."""
        return {name: p.detach().clone().contiguous() for name, p in zip(self.names, self.lora, strict=True)}

    def training_step(self, batch, batch_idx):
        # b: pairs, d: features; hidden holds 2b rows, first sides then second sides
        hidden, target = batch
        pathway = dict(zip(self.names, self.lora, strict=True))
        features = self.pathways.upper(hidden, [pathway], dropout=self.lora_dropout)  # (2b d)
        first, second = features.chunk(2)  # (b d) each
        loss = F.mse_loss(F.cosine_similarity(first, second, dim=-1), target)  # (b) cosines against (b) targets
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    def configure_optimizers(self):
        return optimizers(self, [{"params": list(self.lora), "lr": self.cfg.lr}], self.cfg)


def fit_head(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, cfg: PathwayConfig, epochs: int
) -> ExpertBank:
    """An expert (adapter of `cfg.rank` and head, as `PathwayClassifier`'s) fitted on fixed features (n, d) by
    cross-entropy: AdamW at `cfg.head_lr`, `epochs` epochs of shuffled batches of `cfg.batch_size` (seeded by
    `cfg.seed`)."""
    # n: texts, b: a batch, d: features, c: labels
    bank = ExpertBank(features.shape[1], [num_labels], rank=cfg.rank, dropout=cfg.dropout)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    scaled = features * cfg.input_scale
    bank.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(labels), generator=generator).split(cfg.batch_size):
            loss = F.cross_entropy(bank(scaled[rows][None])[0], labels[rows])  # logits (b c)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return bank.eval()


def train_contrastive(
    pathways: Pathways,
    texts: list[str],
    labels: torch.Tensor,
    num_labels: int,
    cfg: PathwayConfig,
    pairs: int = 20,
    initial: Mapping[str, torch.Tensor] | None = None,
    logger=False,
    head_epochs: int = 50,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SetFit-style (Tunstall et al. 2022) growth from a few examples: the pathway (new, or from `initial`'s tensors)
    fitted on `pairs` pairs per text (`draw_pairs`, drawn once, seeded by `cfg.seed`) for `cfg.epochs` epochs at
    `cfg.lr`, then the expert on the frozen pathway's features for `head_epochs` at `cfg.head_lr`; -> as
    `train_pathway`: (pathway tensors with the statistics of its own features; expert tensors)."""
    L.seed_everything(cfg.seed, workers=True)
    module = ContrastivePathway(pathways, cfg, initial)
    first, second = draw_pairs(labels, pairs, torch.Generator().manual_seed(cfg.seed))
    examples = Pairs(LowerStates(pathways, texts, labels), first, second)
    batches = SimilarLengths(examples.lengths(), cfg.batch_size, seed=cfg.seed)
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=examples.collate)
    quiet_trainer(cfg.epochs, cfg.accelerator, logger).fit(module, train_dataloaders=loader)
    module.eval()
    lora = module.tensors()
    features = pathways.encode(texts, lora)
    bank = fit_head(features, labels, num_labels, cfg, head_epochs)
    own = as_pathway_statistics(class_statistics(features, labels, num_labels))
    return lora | own, bank.expert_tensors(0, num_labels)
