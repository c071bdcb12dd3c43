"""Expert kinds: what differs between experts, behind one interface, chosen once from an expert's architecture.

    adapter   the expert formula (`expert_logits`: a residual adapter of rank r, 0 for a plain linear head, and a
              head over the tenant's labels) over the trunk's features
    pathway   the same formula over the features of the tenant's own pathway: LoRA inside the trunk's top layers
              (`moe.model.pathway`); its shard also keeps the statistics of those features

An expert's `Architecture` is one typed record, written once into its shard's metadata (`to_dict`) and read back once
(`from_dict`, which takes every format shards were written in). Its `kind` names an `ExpertKind` in `KINDS`, which owns
what differs: its tensors and their shapes (and so its bytes for the pager), its forward inside a mixed batch
(`ExpertForward`, chosen once when a mixture is built), whether it can be carried onto another trunk version, and what
its training reads of a tenant's data. Code outside the kinds asks the kind; it does not branch on which one it is.
Training lives a layer up (`moe.lifecycle.growth.GROWERS`, keyed as `KINDS`). PEFT's LoRA variants (one layer class
chosen from the config) and megablocks' forward (chosen once at construction) are the models.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, get_args

import torch

from moe.model.evidence import check_evidence, evidence_shapes
from moe.model.experts import TENSOR_NAMES
from moe.model.pathway import PATHWAY_STATISTICS, Hidden, PathwayLayout, Pathways
from moe.model.router import ROUTING, GateRows
from moe.model.stats import COUNT, MEAN, SCATTER

if TYPE_CHECKING:
    from moe.model.mixture import Mixture


REQUIRED = ("dim", "rank", "gate_rows", "input_scale")  # in every architecture's metadata


@dataclass(frozen=True)
class Architecture:
    """What an expert is, as its shard records it: feature size, adapter rank (0: a linear head), gate rows per label
    or one, the input scale, the dtype its tensors are stored in, its kind, the kind's own part (a pathway's
    layout; None for an adapter), and the evidence it keeps for routing (`moe.model.evidence`; "none" in shards
    written before evidence, whose metadata then lacks the entry)."""

    dim: int
    rank: int
    gate_rows: GateRows = "labels"
    input_scale: float = 8.0
    dtype: str = "float32"
    kind: str = "adapter"
    pathway: PathwayLayout | None = None
    evidence: str = "none"

    def __post_init__(self):
        check_evidence(self.evidence)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (self.dim, self.rank)):
            raise TypeError(f"an architecture's dim and rank are sizes, got {self.dim!r} and {self.rank!r}")
        if self.gate_rows not in get_args(GateRows):
            raise TypeError(f"gate_rows must be one of {get_args(GateRows)}, got {self.gate_rows!r}")
        if not isinstance(self.input_scale, (int, float)) or isinstance(self.input_scale, bool):
            raise TypeError(f"input_scale must be a number, got {self.input_scale!r}")
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise TypeError(f"dtype {self.dtype!r} names no torch dtype")
        if self.kind not in KINDS:
            raise TypeError(f"unknown expert kind {self.kind!r}; known: {sorted(KINDS)}")
        KINDS[self.kind].check(self)

    @property
    def expert_kind(self) -> ExpertKind:
        return KINDS[self.kind]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """As a shard's metadata records it: the keys every shard has used, plus its kind."""
        base = {
            "kind": self.kind,
            "dim": self.dim,
            "rank": self.rank,
            "gate_rows": self.gate_rows,
            "input_scale": self.input_scale,
            "dtype": self.dtype,
        }
        evidence = {"evidence": self.evidence} if self.evidence != "none" else {}  # old shards' metadata unchanged
        return base | self.expert_kind.fields(self) | evidence

    @classmethod
    def from_dict(cls, arch: Mapping[str, Any]) -> Architecture:
        """An architecture from a shard's metadata. Shards written before kinds were named carry no `kind`: a pathway
        expert's is known by its `pathway_layers` (the one place the old format is read)."""
        if isinstance(arch, Architecture):
            return arch
        if not isinstance(arch, Mapping):
            raise TypeError(f"an architecture is a mapping, got {arch!r}")
        kind = arch.get("kind", "pathway" if "pathway_layers" in arch else "adapter")
        if kind not in KINDS:
            raise TypeError(f"unknown expert kind {kind!r}; known: {sorted(KINDS)}")
        if missing := sorted(set(REQUIRED) - set(arch)):
            raise TypeError(f"architecture {dict(arch)!r} lacks {missing}")
        if unknown := sorted(set(arch) - set(REQUIRED) - {"kind", "dtype", "evidence"} - set(KINDS[kind].keys)):
            raise TypeError(f"architecture {dict(arch)!r} has entries {unknown} that a {kind} expert does not have")
        common = {k: arch[k] for k in REQUIRED}
        own = KINDS[kind].parse(arch) | {"evidence": arch.get("evidence", "none")}
        return cls(**common, dtype=arch.get("dtype", "float32"), kind=kind, **own)

    def __or__(self, changes: Mapping[str, Any]) -> Architecture:
        """A copy with `changes` made, given as its metadata records them (`{"dtype": "bfloat16"}`)."""
        return Architecture.from_dict(self.to_dict() | dict(changes))

    def on(self, dim: int) -> Architecture:
        """This architecture over features of another size (a bridged expert, served on a newer trunk)."""
        return replace(self, dim=dim)

    def shapes(self, num_labels: int) -> dict[str, tuple[int, ...]]:
        """Every tensor an expert of this architecture holds, by name: its weights, its routing entry (gate rows),
        the statistics of its training features, and its kind's own."""
        d, r = self.dim, self.rank
        rows = num_labels if self.gate_rows == "labels" else 1
        expert = dict(zip(TENSOR_NAMES, ((d, r), (r,), (r, d), (d, num_labels), (num_labels,)), strict=True))
        routing = dict(zip(ROUTING, ((rows, d), (rows,)), strict=True))
        statistics = {MEAN: (num_labels, d), COUNT: (num_labels,), SCATTER: (d, d)}
        own = self.expert_kind.own_shapes(self, num_labels) | self.expert_kind.evidence_shapes(self, num_labels)
        return expert | routing | statistics | own

    def weight_names(self) -> tuple[str, ...]:
        """The tensors an expert of this architecture computes with (what the pager holds)."""
        return TENSOR_NAMES + self.expert_kind.own_weights(self) + tuple(self.expert_kind.evidence_shapes(self, 0))


class ExpertForward:
    """How a mixture's experts of one kind compute a wave of groups: the inputs each resident expert's formula reads.
    This one: experts over the trunk's features, whose inputs are their groups' dispatched features."""

    def hidden_states(self, texts: list[str]) -> Hidden | None:
        """What the experts read of a batch besides its features (None: nothing)."""
        return None

    def check_hidden(self, hidden: Hidden | None) -> None:
        """Refuses a batch without what `hidden_states` gives, where the experts need it."""

    def inputs(self, mixture, resident: Mapping, groups, counts, position, rows, hidden, experts) -> dict:
        """Each resident expert's inputs (n, d), scaled as the mixture scales features."""
        return {key: groups[position[key], : counts[position[key]]] for key in resident}

    def encode(self, mixture: Mixture, trunk, texts: list[str], tenant: torch.Tensor | None, gate: bool):
        """A batch's features for the gate, and its `hidden_states` (`tenant`: every text's, when all are given)."""
        return trunk.encode(texts), None

    def given_pass(self, mixture, hidden: Hidden, tenant: torch.Tensor, gate: bool = True):
        raise ValueError("experts over the trunk's features have no pass over the trunk's layers of their own")


class PathwayForward(ExpertForward):
    """Pathway experts: each wave's queries run the trunk's top layers once, each row with its expert's LoRA."""

    def __init__(self, pathways: Pathways):
        self.pathways = pathways

    def hidden_states(self, texts: list[str]) -> Hidden:
        return self.pathways.lower(texts)

    def check_hidden(self, hidden: Hidden | None) -> None:
        if hidden is None:
            raise ValueError("pathway experts read the queries' token states: pass hidden=model.hidden_states(texts)")

    def encode(self, mixture, trunk, texts: list[str], tenant: torch.Tensor | None, gate: bool):
        """When every text's tenant is given, its pathway's features are computed with the gate's in one pass
        (`given_pass`); else the gate reads the trunk's features and the experts the token states."""
        hidden = self.pathways.lower(texts)
        if mixture.tenant_expert is not None and tenant is not None:
            return self.given_pass(mixture, hidden, tenant.to(hidden.states.device), gate)
        return trunk.encode(texts), hidden

    @torch.no_grad()
    def given_pass(
        self, mixture, hidden: Hidden, tenant: torch.Tensor, gate: bool = True
    ) -> tuple[torch.Tensor, Hidden]:
        """Every query's tenant given: each query's pathway features and, with `gate`, the gate's features in the
        same pass over the top layers (the trunk's own rows, a zero pathway, beside the pathways' rows) -> (features
        for the gate (b, d), `hidden` with the pathway features, which the mixture then reads instead of running the
        top layers again). Without `gate` the pathway features stand in for the gate's: a tenant's one expert is its
        queries' only candidate, so only an out-of-scope score that reads the gate would see the difference. Batches
        whose experts do not fit the pager's budget at once take two passes instead."""
        experts = mixture.tenant_expert[tenant]  # one expert per tenant: its query's only candidate
        used, which = experts.unique(return_inverse=True)  # which: each query's expert among those used
        keys = [mixture.keys[e] for e in used.tolist()]
        if len(mixture.pager.waves(keys)) > 1:
            return self.pathways.upper(hidden, []), hidden  # no pathway: the trunk's own features
        b = len(tenant)
        with mixture.pager.acquire(keys) as resident:
            pathways = [resident[k] for k in keys]
            if not gate:
                out = self.pathways.upper(hidden, pathways, which)
                return out, hidden._replace(pathway=(experts, out))
            rows = torch.cat([torch.zeros_like(which), which + 1])  # the gate's rows first, on the zero pathway
            out = self.pathways.upper(
                hidden.take(torch.arange(b).repeat(2)), [self.pathways.zero(pathways[0])] + pathways, rows
            )
        return out[:b], hidden._replace(pathway=(experts, out[b:]))

    def inputs(self, mixture, resident: Mapping, groups, counts, position, rows, hidden: Hidden, experts) -> dict:
        """Every resident pathway expert's features of its own queries, in one pass over the top layers: each row
        of the pass gathers its expert's LoRA tensors (no loop over experts or queries)."""
        keys: list[Hashable] = list(resident)
        sizes = [counts[position[key]] for key in keys]
        queries = torch.cat([rows[position[key], :n] for key, n in zip(keys, sizes, strict=True)])
        if hidden.pathway is not None:  # computed with the gate's features (`given_pass`), for these very experts
            chosen = torch.cat([experts[position[key]].repeat(n) for key, n in zip(keys, sizes, strict=True)])
            if torch.equal(hidden.pathway[0][queries], chosen):
                features = hidden.pathway[1][queries] * mixture.input_scale
                return dict(zip(keys, features.split(sizes), strict=True))
        which = torch.repeat_interleave(
            torch.arange(len(keys), device=queries.device), torch.tensor(sizes, device=queries.device)
        )
        features = self.pathways.upper(hidden.take(queries), [resident[key] for key in keys], which)
        return dict(zip(keys, (features * mixture.input_scale).split(sizes), strict=True))


class ExpertKind:
    """What differs between experts of one kind. Stateless: every method takes the architecture it is asked about."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()  # its own entries in a shard's architecture metadata
    trains_on_texts: ClassVar[bool] = False  # what growth needs of a tenant's data: its texts, or their features
    carry_problem: ClassVar[str | None] = None  # why it can not be bridged or transported to another trunk (None: can)

    def check(self, arch: Architecture) -> None:
        """Refuses an architecture whose kind's own part is missing or not its own (TypeError)."""
        if arch.pathway is not None:
            raise TypeError(f"a {self.name} expert has no pathway, got {arch.pathway}")

    def parse(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        """The kind's own fields of `Architecture`, from a shard's metadata."""
        return {}

    def fields(self, arch: Architecture) -> dict[str, Any]:
        """The kind's own entries of a shard's metadata."""
        return {}

    def own_shapes(self, arch: Architecture, num_labels: int) -> dict[str, tuple[int, ...]]:
        """The tensors its shards hold beyond every expert's (`Architecture.shapes`)."""
        return {}

    def own_weights(self, arch: Architecture) -> tuple[str, ...]:
        """The tensors it computes with beyond the expert formula's (paged in with them)."""
        return ()

    def evidence_shapes(self, arch: Architecture, num_labels: int) -> dict[str, tuple[int, ...]]:
        """The tensors of its evidence for routing (`moe.model.evidence`), over the features its head reads; paged in
        with its weights, since a query's evidence is computed with its logits."""
        return evidence_shapes(arch.evidence, arch.dim, num_labels)

    def forward(self, arch: Architecture, trunk, bridged: bool) -> ExpertForward:
        """Its forward inside a mixed batch, for a mixture over `trunk` (`bridged`: some experts read it bridged)."""
        return ExpertForward()


class AdapterKind(ExpertKind):
    name = "adapter"


class PathwayKind(ExpertKind):
    name = "pathway"
    keys = PathwayLayout.KEYS
    trains_on_texts = True
    carry_problem = "its LoRA adapts its own trunk's layers"

    def check(self, arch: Architecture) -> None:
        if not isinstance(arch.pathway, PathwayLayout):
            raise TypeError(f"a pathway expert needs its pathway's layout, got {arch.pathway!r}")

    def parse(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        return {"pathway": PathwayLayout.from_dict(arch)}

    def fields(self, arch: Architecture) -> dict[str, Any]:
        return arch.pathway.to_dict()

    def own_shapes(self, arch: Architecture, num_labels: int) -> dict[str, tuple[int, ...]]:
        """Its LoRA tensors, and the class statistics of its own features (what an update rehearses from)."""
        d = arch.dim
        statistics = dict(zip(PATHWAY_STATISTICS, ((num_labels, d), (num_labels,), (d, d)), strict=True))
        return arch.pathway.lora_shapes(d) | statistics

    def own_weights(self, arch: Architecture) -> tuple[str, ...]:
        return tuple(arch.pathway.lora_shapes(arch.dim))

    def forward(self, arch: Architecture, trunk, bridged: bool) -> ExpertForward:
        if trunk is None:
            raise ValueError("the store holds pathway experts, which adapt the trunk's layers: load it with its trunk")
        if bridged:
            raise ValueError("pathway experts adapt their own trunk's layers: they can not be bridged to another trunk")
        return PathwayForward(Pathways(trunk, arch.pathway.spec))


KINDS: dict[str, ExpertKind] = {kind.name: kind for kind in (AdapterKind(), PathwayKind())}
