"""Baselines for the continual experiment, run on the same events and features as the mixture:

joint       one mixture retrained from scratch on all the data seen so far (the upper bound)
sequential  one shared classifier whose head grows, fine-tuned on each event's data only (forgetting)
separate    one whole model (trunk + head) per tenant: accuracy of a tenant-given expert, memory x tenants
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moe.data import Tenant
from moe.data.datamodule import TenantExamples, tenant_examples
from moe.evaluation import accuracy
from moe.experiments.scenario import Event, accuracies, new_data, restrict, split_outcome
from moe.lifecycle.growth import GrowthConfig, _trainer
from moe.model import ExpertInfo, build_mixture
from moe.training.module import MixtureClassifier


def joint_pathway_retrain(tenants: list[Tenant], lifecycle) -> dict[str, float]:
    """Every tenant's pathway expert trained again on all its data, as a store of pathway experts is retrained
    jointly (pathways share no weights: one after another), and the seconds it took."""
    start = time.perf_counter()
    for tenant in tenants:
        lifecycle.pathway_expert(tenant)
    return {"seconds": time.perf_counter() - start, "tenants": len(tenants)}


def joint_retrain(tenants: list[Tenant], encode, cfg: GrowthConfig, top_k: int = 2) -> dict[str, float]:
    """Train every tenant's expert and the gate together on all their data; test accuracies and seconds."""
    L.seed_everything(cfg.seed, workers=True)
    train = tenant_examples(tenants, "train", encode)
    model = build_mixture(
        [ExpertInfo(t.name, t.labels) for t in tenants],
        train.features.shape[1],
        top_k=top_k,
        rank=cfg.rank,
        dropout=cfg.dropout,
        input_scale=cfg.input_scale,
    )
    module = MixtureClassifier(model, tenants, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    _trainer(cfg, cfg.epochs).fit(module, DataLoader(train, batch_size=cfg.batch_size, shuffle=True))
    seconds = time.perf_counter() - start
    routed, given, routing = accuracies(split_outcome(model.eval(), tenants, encode))
    return {"seconds": seconds, "acc_routed": routed, "acc_tenant_given": given, "routing_acc": routing}


class SequentialBaseline:
    """One classifier over every (tenant, intent) seen so far, fine-tuned on each new batch of data alone."""

    def __init__(self, cfg: GrowthConfig, dim: int):
        self.cfg, self.dim = cfg, dim
        self.labels: list[str] = []  # "tenant/intent"
        self.model = None

    def learn(self, tenant: Tenant, encode) -> None:
        new = [f"{tenant.name}/{label}" for label in tenant.labels if f"{tenant.name}/{label}" not in self.labels]
        previous, self.labels = self.model, self.labels + new
        shared = Tenant("shared", tuple(self.labels))
        self.model = build_mixture(
            [ExpertInfo("shared", shared.labels)],
            self.dim,
            rank=self.cfg.rank,
            dropout=self.cfg.dropout,
            input_scale=self.cfg.input_scale,
        )
        if previous is not None:  # carry over what was learned; only the head's new columns are fresh
            self.model.bank.load_expert(0, previous.bank.expert_tensors(0, previous.bank.head.shape[-1]))
        examples = tenant.split("train")
        features = encode([e.text for e in examples])
        labels = torch.tensor([self.labels.index(f"{tenant.name}/{e.label}") for e in examples])
        data = TenantExamples([""] * len(labels), torch.zeros_like(labels), labels, features)
        module = MixtureClassifier(
            self.model, [shared], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, gate_weight=0.0, z_loss_weight=0.0
        )
        L.seed_everything(self.cfg.seed, workers=True)
        _trainer(self.cfg, self.cfg.epochs).fit(module, DataLoader(data, batch_size=self.cfg.batch_size, shuffle=True))
        self.model.eval()

    @torch.no_grad()
    def accuracies(self, tenant: str, features: torch.Tensor, labels: list[str]) -> tuple[float, float]:
        """(routed: any label, tenant given: only the tenant's labels) accuracy in percent."""
        x = features * self.model.input_scale
        logits = self.model.bank(x[None], torch.tensor([0]))[0]
        target = torch.tensor([self.labels.index(f"{tenant}/{label}") for label in labels])
        own = torch.tensor([name.startswith(f"{tenant}/") for name in self.labels])
        return accuracy(logits.argmax(-1), target), accuracy(logits.masked_fill(~own, float("-inf")).argmax(-1), target)


def sequential_run(
    events: list[Event], tenants: dict[str, Tenant], names: list[str], cfg: GrowthConfig, dim: int, encode
) -> list[dict[str, tuple[float, float]]]:
    """The sequential baseline through the scenario's events: after each, (routed, tenant-given) test accuracy of
    every tenant among `names` it has seen, on the intents it knows."""
    sequential, rows = SequentialBaseline(cfg, dim), []
    for event in tqdm(events, desc="sequential fine-tuning", unit="event"):
        if event.op == "grow":
            sequential.learn(restrict(tenants[event.tenant], event.intents), encode)
        elif event.op == "update":
            known = tuple(label.split("/", 1)[1] for label in sequential.labels if label.startswith(f"{event.tenant}/"))
            sequential.learn(new_data(tenants[event.tenant], known), encode)
        seen = {label.split("/", 1)[0] for label in sequential.labels}
        row = {}
        for name in names:
            if name in seen:
                labels = tuple(lab.split("/", 1)[1] for lab in sequential.labels if lab.startswith(f"{name}/"))
                test = [e for e in tenants[name].split("test") if e.label in labels]
                row[name] = sequential.accuracies(name, encode([e.text for e in test]), [e.label for e in test])
        rows.append(row)
    return rows
