"""Settings chosen per tenant, on the tenant's own held-out share (`GrowthConfig.select`).

The defaults of growth were chosen on CLINC150's 15-intent domains; a tenant of another shape (ten thousand rows,
dozens of fine-grained intents) may grow better with other settings. With `select` set (a list of candidates, each a
dict of `GrowthConfig` overrides, `pathway` settings merged into the configured ones, and an optional `name`), a grow:

1. holds out a stratified, seeded share of the tenant's own train rows (`held_out_rows`: `select_held_out` of each
   intent's rows, rounded down, so an intent with fewer than 1 / `select_held_out` rows (5 at 0.2) keeps all of them in
   train);
2. grows each candidate on the rest, as growth would (its expert and its kind's own tensors, nothing saved);
3. scores each on the held-out rows with the candidate's expert alone, the tenant given (its pathway's features for a
   pathway expert), and keeps the best (ties: the first listed);
4. grows the winner again on all the rows (`select_retrain`), or keeps the one grown on the rest.

Only the tenant's own rows are read (and, as growth always does, the other experts' shards). Candidates vary settings
within the store's one architecture: a store refuses an expert of another kind, and the winner's pathway layers, LoRA
rank and head come from the store (`PathwayGrower.config`), so a pathway candidate varies epochs, learning rates and the
growth method. Beside `moe.lifecycle.few_shot.METHODS`, a candidate may name `method: head`, selection's own: the
expert's head trained on the frozen trunk's features (`train_expert` at rank 0, `epochs` at `lr`), its adapter and
pathway the ones that change nothing: the frozen linear probe, inside the store's kind of expert.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, fields, replace

import torch

from moe.data import Tenant
from moe.lifecycle.few_shot import Neighbours
from moe.lifecycle.growth import Grower, GrowthConfig, train_expert
from moe.lifecycle.stream import EncodedRows
from moe.model.experts import TENSOR_NAMES, expert_logits
from moe.model.stats import class_statistics

log = logging.getLogger(__name__)
HEAD = "head"  # a candidate's method: the frozen linear probe inside the store's kind of expert
NOT_OVERRIDES = ("select", "select_held_out", "select_retrain", "kind", "evidence", "rank", "input_scale")


@dataclass(frozen=True)
class Candidate:
    name: str
    cfg: GrowthConfig  # growth's settings with the candidate's overrides (its method `full` when `head`)
    head: bool  # method: head (`head_expert`)


def candidates(cfg: GrowthConfig) -> list[Candidate]:
    """`cfg.select`'s candidates, each checked (a ValueError naming an unknown setting, a bad method or a repeated
    name) before anything is grown."""
    known = {f.name for f in fields(GrowthConfig)} - set(NOT_OVERRIDES)
    made = []
    for i, entry in enumerate(cfg.select or []):
        overrides = dict(entry)
        name = str(overrides.pop("name", None) or ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or i)
        if unknown := sorted(set(overrides) - known):
            raise ValueError(
                f"select candidate {name!r}: {unknown} are not growth settings a candidate may change; "
                f"choose among {sorted(known)}"
            )
        if "pathway" in overrides:  # merged into the configured pathway settings
            overrides["pathway"] = dict(cfg.pathway or {}) | dict(overrides["pathway"] or {})
        head = overrides.get("method") == HEAD
        if head:
            overrides["method"] = "full"
        made.append(Candidate(name, replace(cfg, **overrides, select=None), head))
    if len({c.name for c in made}) != len(made):
        raise ValueError(f"select candidates need distinct names: {[c.name for c in made]}")
    return made


def held_out_rows(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) row indices of `labels` (n,), each sorted: of each intent's m rows, floor(share * m) drawn at
    random (seeded) are held out, so an intent with fewer than 1 / share rows keeps all of them."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"select_held_out is the share of the train rows held out, in (0, 1): got {share}")
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():  # sorted: the draw does not depend on row order within the loop
        rows = (labels == label).nonzero()[:, 0]
        take = math.floor(share * len(rows) + 1e-9)
        held[rows[torch.randperm(len(rows), generator=generator)[:take]]] = True
    return (~held).nonzero()[:, 0], held.nonzero()[:, 0]


def head_expert(grower: Grower, tenant: Tenant, encoded, features, labels, stats):
    """The `head` candidate: a linear head trained on the trunk's features (`train_expert` at rank 0, no dropout),
    the store's adapter and pathway those that change nothing -> as `Grower.grow`."""
    trained = train_expert(tenant, features, labels, replace(grower.cfg, rank=0, dropout=0.0))
    shapes = grower.arch.shapes(len(tenant.labels))
    expert = {name: torch.zeros(shapes[name]) for name in TENSOR_NAMES[:3]}
    expert |= {name: trained[name] for name in TENSOR_NAMES[3:]}
    return expert, grower.unchanged_trunk(stats) | grower.evidence(tenant, encoded, expert, features, labels)


def grow_candidate(grower: Grower, candidate: Candidate, tenant, encoded, features, labels, neighbours: Neighbours):
    """One candidate grown on (`features`, `labels`; `tenant`'s train split the same rows) -> as `Grower.grow`."""
    chosen = copy.copy(grower)
    chosen.cfg = candidate.cfg
    stats = class_statistics(features, labels, len(tenant.labels))
    if candidate.head:
        return head_expert(chosen, tenant, encoded, features, labels, stats)
    return chosen.grow(tenant, encoded, features, labels, stats, neighbours)


@torch.no_grad()
def accuracy(grower: Grower, expert, own, texts: list[str], features: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of the rows the expert alone labels right, the tenant given: over the trunk's `features`, or its
    pathway's features of `texts` for an expert that reads a pathway of its own (one whose B are all zero reads the
    trunk's)."""
    lora = {name: own[name] for name in getattr(getattr(grower, "pathways", None), "shapes", dict)()}
    if any(own[name].any() for name in lora):
        features = grower.pathways.encode(texts, lora)
    logits = expert_logits(features.float() * grower.arch.input_scale, expert)  # (n, c)
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def grow_selected(grower: Grower, tenant: Tenant, encoded, features, labels, stats, neighbours: Neighbours):
    """The tenant's expert as `grower.grow` makes it, or, with `grower.cfg.select` set, the best of its candidates on
    the tenant's held-out share (see the module) -> (expert, own tensors, metrics for the shard: `selected`,
    `selected_held_out_acc`, `select_acc.<name>` per candidate, `select_s`, `growth_method`, ...; {} when off)."""
    cfg = grower.cfg
    if not cfg.select:
        expert, own = grower.grow(tenant, encoded, features, labels, stats, neighbours)
        return expert, own, {}
    start = time.perf_counter()
    options = candidates(cfg)
    kept, held = held_out_rows(labels, cfg.select_held_out, cfg.seed)
    if len(held) == 0:  # every intent too small: nothing to compare on
        log.warning(
            "%s: no intent has %g rows to hold out: growing the first candidate, %r, unchosen",
            tenant.name,
            math.ceil(1 / cfg.select_held_out),
            options[0].name,
        )
        expert, own = grow_candidate(grower, options[0], tenant, encoded, features, labels, neighbours)
        return expert, own, {"selected": options[0].name, "select_s": 0.0, "growth_method": _method(options[0])}
    rows = tenant.split("train")  # none when the rows came encoded (`encoded`)
    texts = [rows[i].text for i in held.tolist()] if rows else []
    part = replace(tenant, splits=tenant.splits | {"train": [rows[i] for i in kept.tolist()]}) if rows else tenant
    part_encoded = None if encoded is None else EncodedRows(features[kept], labels[kept])
    scores, best = {}, None
    for candidate in options:
        grown = grow_candidate(grower, candidate, part, part_encoded, features[kept], labels[kept], neighbours)
        scores[candidate.name] = accuracy(grower, *grown, texts, features[held], labels[held])
        log.info(
            "%s: candidate %s, %.2f%% on its %d held-out rows",
            tenant.name,
            candidate.name,
            scores[candidate.name],
            len(held),
        )
        if best is None or scores[candidate.name] > scores[best[0].name]:
            best = (candidate, grown)
    winner, (expert, own) = best
    select_s = time.perf_counter() - start
    if cfg.select_retrain:
        expert, own = grow_candidate(grower, winner, tenant, encoded, features, labels, neighbours)
    log.info(
        "%s: selected %s (%.2f%% held out) in %.1f s of selection",
        tenant.name,
        winner.name,
        scores[winner.name],
        select_s,
    )
    metrics = {
        "selected": winner.name,
        "selected_held_out_acc": scores[winner.name],
        "select_s": select_s,
        "select_held_out_rows": len(held),
        "select_trained_on": "all" if cfg.select_retrain else "kept",
        "growth_method": _method(winner),
    }
    return expert, own, metrics | {f"select_acc.{name}": acc for name, acc in scores.items()}


def _method(candidate: Candidate) -> str:
    return HEAD if candidate.head else candidate.cfg.method
