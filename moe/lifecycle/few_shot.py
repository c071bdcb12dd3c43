"""How a new tenant's expert is made (`GrowthConfig.method`), from ten thousand examples or a handful, reusing what
the store already knows: its shards (weights, gate rows, class statistics), never another tenant's data.

    full         today's growth: the expert trained on the tenant's rows alone (`Grower.train`)
    statistics   no training: a head of linear discriminants, the tenant's class means under the within-class
                 covariance pooled over every expert's shard and the tenant's own rows (a pathway expert gets the
                 pathway that changes nothing: its features are the trunk's)
    warm         adapter experts: today's training with its head started from the statistics expert's (linear probing
                 then fine-tuning, Kumar et al. 2022)
    nearest      pathway experts: the pathway of the tenant the store's gate sends most of the new rows to, trained
                 from there for `nearest_epochs` (the LoRA hub idea with one module: the closest one)
    contrastive  pathway experts: a new pathway fine-tuned on pairs of the rows (SetFit's cosine loss), then its head

The choice between them by the number of examples is `method_for` (a grow) and `next_method` (an update), which
`Lifecycle` calls; docs/RESULTS.md (Few-example growth) has the learning curves they were chosen from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from moe.model.experts import TENSOR_NAMES
from moe.model.kinds import Architecture
from moe.model.router import ROUTING
from moe.model.stats import MEAN, PooledScatter, discriminant_rows

METHODS = ("full", "statistics", "warm", "nearest", "contrastive")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown growth method {method!r}: choose among {list(METHODS)}")


def method_for(counts: Sequence[int] | torch.Tensor, cfg, chosen: tuple[int, str] = (0, "statistics")) -> str:
    """How a tenant with `counts` train rows per intent is grown, by `cfg` (a `GrowthConfig`): a configured `method`
    other than "full" is an explicit choice and wins whatever the size; else `few_shot_method` when the smallest
    intent has fewer than `few_shot_below` rows (0: never), else "full". Either left None is `chosen`'s, the choice the
    learning curves made for the store's kind (`Grower.FEW_SHOT`)."""
    if cfg.method != "full":
        return cfg.method
    below = chosen[0] if cfg.few_shot_below is None else cfg.few_shot_below
    method = chosen[1] if cfg.few_shot_method is None else cfg.few_shot_method
    return method if int(min(torch.as_tensor(counts).tolist())) < below else "full"


def next_method(before: str, counts: Sequence[int] | torch.Tensor, cfg, chosen: tuple[int, str] = (0, "statistics")):
    """How an update makes a tenant's next version, grown by `before`, with `counts` rows per intent seen so far (its
    earlier counts and the new rows'): a tenant on the full method stays on it; one grown from few examples moves to
    the full method once `method_for` says so for its merged counts, and else stays with the method it was grown by."""
    return "full" if before == "full" or method_for(counts, cfg, chosen) == "full" else before


@dataclass
class Neighbours:
    """What a growing tenant may read of the store's other experts: their routing entries and statistics (by tenant),
    and the tensors of any of them on this trunk (`load`), read from its shard. Never their data."""

    entries: dict[str, dict[str, torch.Tensor]]
    load: Callable[[str], dict[str, torch.Tensor]]
    same_trunk: tuple[str, ...] = ()  # the tenants whose experts are on this trunk (their weights can be reused)


def statistics_expert(
    arch: Architecture, stats: Mapping[str, torch.Tensor], others: list[Mapping[str, torch.Tensor]], shrinkage: float
) -> dict[str, torch.Tensor]:
    """An expert with no training: its adapter the identity (up = 0) and its head the linear discriminants of the
    tenant's class means under the covariance pooled over `stats` (the tenant's own rows) and `others` (every other
    expert's stored scatter), shrunk by `shrinkage`: Fisher's LDA with a covariance the store has already estimated
    from far more rows than a few-example tenant brings."""
    precision = (PooledScatter.of([stats]) + PooledScatter.of(others, arch.dim)).precision(shrinkage)
    weight, bias = discriminant_rows(stats[MEAN], precision, arch.input_scale)  # (c, d), (c,)
    shapes = arch.shapes(len(bias))
    adapter = {name: torch.zeros(shapes[name]) for name in TENSOR_NAMES[:3]}
    head = weight.T.clone(memory_format=torch.contiguous_format)  # (d, c), row-major even for c = 1 (safetensors)
    return adapter | {"head.weight": head, "head.bias": bias.contiguous()}


@torch.no_grad()
def nearest_tenant(features: torch.Tensor, neighbours: Neighbours, input_scale: float) -> str:
    """The tenant (among `neighbours.same_trunk`) whose gate rows win most of the new rows `features` (n, d): where
    the store's gate would send the new tenant's queries today."""
    names = [name for name in neighbours.same_trunk if name in neighbours.entries]
    if not names:
        raise ValueError("growth method 'nearest' needs another expert on this trunk to start from; the store has none")
    # n: new rows, r: gate rows of every candidate tenant, d: features
    weight = torch.cat([neighbours.entries[name][ROUTING[0]] for name in names])  # (r, d)
    bias = torch.cat([neighbours.entries[name][ROUTING[1]] for name in names])  # (r,)
    owner = torch.cat([torch.full((len(neighbours.entries[n][ROUTING[1]]),), i) for i, n in enumerate(names)])
    best = owner[(features.float() * input_scale @ weight.T + bias).argmax(-1)]  # (n,) tenant index per row
    return names[Counter(best.tolist()).most_common(1)[0][0]]
