"""Training one tenant's pathway expert in Lightning: its LoRA tensors inside the trunk's top layers and its expert
(adapter and head) over the pathway's features, with the trunk itself frozen.

The shared lower layers are run once per training text, before the first epoch (`LowerStates`): only the top layers
run again each step.
"""

from __future__ import annotations

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


class PathwayClassifier(L.LightningModule):
    """One pathway and its expert; the loss is cross-entropy over the tenant's own labels."""

    def __init__(self, pathways: Pathways, num_labels: int, cfg: PathwayConfig):
        super().__init__()
        self.pathways, self.cfg = pathways, cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        initial = pathways.init_tensors(generator)
        self.names = list(initial)
        self.lora = nn.ParameterList([nn.Parameter(initial[name]) for name in self.names])
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
        optimizer = torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)
        if self.cfg.schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        schedule = get_linear_schedule_with_warmup(optimizer, round(self.cfg.warmup * steps), steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_pathway(
    pathways: Pathways, texts: list[str], labels: torch.Tensor, num_labels: int, cfg: PathwayConfig, logger=False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fit one pathway and its expert on (texts, labels in [0, num_labels)); -> (pathway tensors with the statistics
    of its own features, as its shard keeps them; expert tensors)."""
    L.seed_everything(cfg.seed, workers=True)
    module = PathwayClassifier(pathways, num_labels, cfg)
    examples = LowerStates(pathways, texts, labels)
    batches = SimilarLengths([len(s) for s in examples.states], cfg.batch_size, seed=cfg.seed)
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=collate)
    quiet_trainer(cfg.epochs, cfg.accelerator, logger).fit(module, train_dataloaders=loader)
    module.eval()
    lora = module.tensors()
    own = as_pathway_statistics(class_statistics(pathways.encode(texts, lora), labels, num_labels))
    return lora | own, module.bank.expert_tensors(0, num_labels)
