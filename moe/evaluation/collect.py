"""Run a mixture over a split, batch by batch, and keep a few numbers per query (never the texts)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from moe.data import TenantDataError
from moe.evaluation.sources import Query
from moe.inference import OOS_SCORES, Decoded, decode, oos_score
from moe.model import UNKNOWN_TENANT, Mixture
from moe.progress import bar as progress_bar

Encoder = Callable[[list[str]], torch.Tensor]
Sink = Callable[[list[Query], Decoded, dict[str, torch.Tensor]], None]


class Outcome(NamedTuple):
    """Per-query results of one split, in query order. Out-of-scope queries have tenant and label -1."""

    tenant: torch.Tensor  # (n,) true tenant index (into `model.tenants`)
    label: torch.Tensor  # (n,) true global label id
    routed: torch.Tensor  # (n,) predicted label id, the gate choosing among all experts
    given: torch.Tensor  # (n,) predicted label id with the true tenant given (routed when out of scope)
    routed_tenant: torch.Tensor  # (n,) tenant of the gate's top expert
    confidence: torch.Tensor  # (n,) combined score of the routed prediction
    given_score: torch.Tensor  # (n,) combined score of the tenant-given prediction
    gate_margin: torch.Tensor  # (n,) the routed gate's lead of its first expert over its second, in logits
    oos_scores: dict[str, torch.Tensor]  # kind -> (n,) out-of-scope score of the routed pass
    model_seconds: float  # gate + experts + decoding of the routed pass, features given
    encode_seconds: float

    @property
    def in_scope(self) -> torch.Tensor:
        return self.tenant >= 0

    def __len__(self) -> int:
        return self.tenant.numel()


class Targets:
    """True tenant indices and global label ids of queries (-1 for out-of-scope ones), looked up in O(1)."""

    def __init__(self, model: Mixture):
        self.model = model
        self.tenant = {name: i for i, name in enumerate(model.tenants)}
        self.label = {pair: i for i, pair in enumerate(model.labels)}

    def __call__(self, batch: list[Query]) -> tuple[torch.Tensor, torch.Tensor]:
        tenants, labels = [], []
        for query in batch:
            if query.tenant is None:
                tenants.append(UNKNOWN_TENANT)
                labels.append(-1)
                continue
            if query.tenant not in self.tenant:
                self.model.tenant_index(query.tenant)  # raises KeyError naming the known tenants
            if (query.tenant, query.label) not in self.label:
                raise TenantDataError(
                    query.source, f"label {query.label!r} is not a label of tenant {query.tenant!r}'s expert"
                )
            tenants.append(self.tenant[query.tenant])
            labels.append(self.label[(query.tenant, query.label)])
        return torch.tensor(tenants, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def collect(
    model: Mixture,
    batches: Iterable[list[Query]],
    encode: Encoder,
    desc: str = "evaluating",
    total: int | None = None,
    sink: Sink | None = None,
    progress: bool = True,
) -> Outcome:
    """Encode each batch, run it routed and with its tenant given, and keep what the metrics need.
    `total` (queries) sizes the progress bar; `sink` sees each batch's routed results (e.g. to write them)."""
    device = model.label_ids.device
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in Outcome._fields[:8]}
    scores: dict[str, list[torch.Tensor]] = {kind: [] for kind in OOS_SCORES}
    model_s = encode_s = 0.0
    targets = Targets(model)
    with progress_bar(desc=desc, unit="query", total=total, enabled=progress) as bar:
        for batch in batches:
            tenant, label = targets(batch)
            start = time.perf_counter()
            texts = [query.text for query in batch]
            features = encode(texts).to(device)
            hidden = model.hidden_states(texts)  # pathway experts: the token states of the shared lower layers
            encode_s += time.perf_counter() - start
            start = time.perf_counter()
            output = model(features, hidden=hidden)
            routed = decode(model, output)
            model_s += time.perf_counter() - start
            given = decode(model, model(features, tenant.to(device), hidden=hidden))
            batch_scores = {kind: oos_score(output, routed.score, kind).cpu() for kind in OOS_SCORES}
            values = (tenant, label, routed.label, given.label, routed.top_tenant, routed.score, given.score)
            values += (routed.gate_margin,)
            for name, value in zip(parts, values, strict=True):
                parts[name].append(value.cpu())
            for kind, value in batch_scores.items():
                scores[kind].append(value)
            if sink is not None:
                sink(batch, routed, batch_scores)
            bar.update(len(batch))
    if not parts["tenant"]:
        raise ValueError(f"{desc}: no queries to evaluate")
    cat = {name: torch.cat(values) for name, values in parts.items()}
    return Outcome(
        **cat, oos_scores={k: torch.cat(v) for k, v in scores.items()}, model_seconds=model_s, encode_seconds=encode_s
    )
