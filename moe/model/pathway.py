"""Pathway experts: a tenant's own low-rank adapters (LoRA, Hu et al. 2021) inside the trunk's top layers.

    lower layers   the frozen trunk's first L - N transformer layers: run once per query, shared by every pathway
    top N layers   run again for each chosen expert, every target linear as  W x + (alpha / r) B_e A_e x
    pooling        the trunk's own (mean over tokens, L2-normalised): the pathway's features
    expert         the one expert formula (`expert_logits`: adapter and head) over those features

The LoRA terms ride on forward hooks of the trunk's own linear modules, active only inside `Pathways.upper`: the
trunk's weights, state dict and fingerprint stay as they are, and its plain forward (the gate's features) is the
trunk's bit for bit. A batch whose rows belong to many experts runs in one pass: each row gathers its expert's A and
B (Punica's BGMV, S-LoRA), with no loop over rows or experts. PEFT's `lora.Linear` is the reference for the formula
(tests/test_pathway.py checks the two agree); PEFT's mixed-adapter forward loops over the adapters of a batch and
keeps every adapter registered as modules of the model, where here a pathway is a plain dict of tensors, read from
its shard and paged like any expert's.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import nn

from moe.model.stats import STATISTICS

if TYPE_CHECKING:
    from moe.trunk.hf import HFEncoderTrunk

TARGETS = (  # every linear module of a BERT-family layer
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass(frozen=True)
class PathwaySpec:
    """Where a pathway's adapters sit and their size: the top `layers` layers, rank `rank`, scale `alpha / rank`."""

    layers: int
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.layers < 1 or self.rank < 1:
            raise ValueError(
                f"a pathway needs at least one layer and rank 1, got layers={self.layers}, rank={self.rank}"
            )
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown pathway targets {unknown}: choose among {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class PathwayLayout:
    """A pathway expert's part of its architecture: its spec, and the trunk sizes its tensors' shapes follow from."""

    spec: PathwaySpec
    trunk_layers: int
    intermediate_size: int
    KEYS: ClassVar[tuple[str, ...]] = (
        "pathway_layers",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "trunk_layers",
        "intermediate_size",
    )

    @classmethod
    def of(cls, spec: PathwaySpec, trunk: HFEncoderTrunk) -> PathwayLayout:
        config = trunk.encoder.config
        return cls(spec, int(config.num_hidden_layers), int(config.intermediate_size))

    def to_dict(self) -> dict:
        """As a shard's metadata records it (the keys every shard since pathways has used)."""
        return {
            "pathway_layers": self.spec.layers,
            "lora_rank": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_targets": list(self.spec.targets),
            "trunk_layers": self.trunk_layers,
            "intermediate_size": self.intermediate_size,
        }

    @classmethod
    def from_dict(cls, arch: Mapping) -> PathwayLayout:
        ints = ("pathway_layers", "lora_rank", "trunk_layers", "intermediate_size")
        if not all(isinstance(arch.get(k), int) and arch[k] >= 0 for k in ints):
            raise TypeError(f"a pathway architecture needs integer {list(ints)}, got {dict(arch)!r}")
        if not isinstance(arch.get("lora_alpha"), (int, float)) or not isinstance(arch.get("lora_targets"), list):
            raise TypeError(f"a pathway architecture needs lora_alpha and lora_targets, got {dict(arch)!r}")
        spec = PathwaySpec(
            arch["pathway_layers"], arch["lora_rank"], float(arch["lora_alpha"]), tuple(arch["lora_targets"])
        )
        return cls(spec, arch["trunk_layers"], arch["intermediate_size"])

    def lora_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """The LoRA tensors by name, `lora.<layer>.<target>.A` (rank, in) and `.B` (out, rank)."""
        d, ff = dim, self.intermediate_size
        sizes = {target: (d, d) for target in TARGETS} | {"intermediate.dense": (d, ff), "output.dense": (ff, d)}
        shapes = {}
        for layer in range(self.trunk_layers - self.spec.layers, self.trunk_layers):
            for target in self.spec.targets:
                d_in, d_out = sizes[target]
                shapes[f"lora.{layer}.{target}.A"] = (self.spec.rank, d_in)
                shapes[f"lora.{layer}.{target}.B"] = (d_out, self.spec.rank)
        return shapes


PATHWAY_STATISTICS = tuple("pathway." + name.removeprefix("stats.") for name in STATISTICS)  # of its own features


def as_pathway_statistics(stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`class_statistics` of a pathway's own features, named as its shard keeps them (`pathway.*`)."""
    return {"pathway." + name.removeprefix("stats."): t for name, t in stats.items()}


def pathway_statistics(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pathway shard's statistics of its own features, named as `class_statistics` names them (`stats.*`)."""
    return {"stats." + name.removeprefix("pathway."): tensors[name] for name in PATHWAY_STATISTICS}


class Hidden(NamedTuple):
    """Token states after the shared lower layers: states (b, t, d), attention mask (b, t); and, where they were
    computed with the gate's features in one pass, each row's expert and its pathway's features (b,), (b, d)."""

    states: torch.Tensor
    mask: torch.Tensor
    pathway: tuple[torch.Tensor, torch.Tensor] | None = None

    def take(self, rows) -> Hidden:
        done = None if self.pathway is None else (self.pathway[0][rows], self.pathway[1][rows])
        return Hidden(self.states[rows], self.mask[rows], done)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, t) attention mask of 1s and 0s -> the (b, 1, 1, t) additive mask a BERT layer takes."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class _Run(NamedTuple):
    """The pathways a call of `Pathways.upper` runs: module -> (A, B), one pathway's (`rows` None) or stacks of
    several and each row's pathway; the scale; dropout on the LoRA terms' inputs (None: none)."""

    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor | None
    scale: float
    dropout: nn.Module | None


_RUN: ContextVar[_Run | None] = ContextVar("pathway_run", default=None)


def _adds_lora(name: str):
    """A forward hook adding the running pathways' LoRA term to linear module `name`'s output."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        # b: rows, t: tokens, i: in features, o: out features, r: rank, e: pathways
        #   output (b t o) + scale * (x (b t i) @ A[rows]^T (b i r)) @ B[rows]^T (b r o)
        run = _RUN.get()
        if run is None or name not in run.lora:
            return None  # outside `Pathways.upper`, or no pathway given: the trunk as it is
        a, b = run.lora[name]  # one pathway: A (r, i), B (o, r); with rows: stacks (e, r, i), (e, o, r)
        x = inputs[0] if run.dropout is None else run.dropout(inputs[0])
        if a.dtype != x.dtype:  # a trunk run in another precision than its pathways are kept in
            a, b = a.to(x.dtype), b.to(x.dtype)
        if run.rows is None:  # one pathway for every row: two matrix products, no gather
            low = torch.mm(x.flatten(0, -2), a.t())  # ((b t) r)
            return torch.addmm(output.flatten(0, -2), low, b.t(), alpha=run.scale).view_as(output)
        low = torch.bmm(x, a[run.rows].transpose(1, 2))  # each row its own pathway's A and B (BGMV)
        return torch.baddbmm(output, low, b[run.rows].transpose(1, 2), alpha=run.scale)

    return hook


class Pathways:
    """A frozen Hugging Face encoder trunk split at its top `spec.layers` layers, which run with pathway adapters."""

    def __init__(self, trunk: HFEncoderTrunk, spec: PathwaySpec):
        encoder = trunk.encoder
        if not (hasattr(encoder, "embeddings") and hasattr(getattr(encoder, "encoder", None), "layer")):
            raise ValueError(f"pathway experts need a BERT-family encoder, not {type(encoder).__name__}")
        self.trunk, self.spec = trunk, spec
        self.layers = encoder.encoder.layer
        if spec.layers > len(self.layers):
            raise ValueError(f"a pathway of {spec.layers} layers does not fit a trunk of {len(self.layers)}")
        self.first = len(self.layers) - spec.layers
        for name in self.module_names():  # one hook per module, however many `Pathways` share the trunk
            layer, target = name.split(".", 1)
            module = self.layers[int(layer)].get_submodule(target)
            if not getattr(module, "_pathway_hook", False):
                module.register_forward_hook(_adds_lora(name))
                module._pathway_hook = True
        self._names = [(name, f"lora.{name}.A", f"lora.{name}.B") for name in self.module_names()]

    def module_names(self) -> list[str]:
        """`<layer>.<target>` of every linear module a pathway adapts, in order."""
        return [f"{i}.{target}" for i in range(self.first, len(self.layers)) for target in self.spec.targets]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each pathway tensor's shape, as a shard of this trunk and spec holds it (`lora_shapes`)."""
        return PathwayLayout.of(self.spec, self.trunk).lora_shapes(self.trunk.dim)

    def init_tensors(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A new pathway: A random (as PEFT's default), B zero, so that it starts as the frozen trunk."""
        tensors = {}
        for name, shape in self.shapes().items():
            if name.endswith(".A"):
                tensors[name] = torch.randn(shape, generator=generator) * shape[1] ** -0.5
            else:
                tensors[name] = torch.zeros(shape)
        return tensors

    def lower(self, texts: list[str]) -> Hidden:
        """The shared part: embeddings and the frozen lower layers, once per text."""
        # b: texts, t: tokens, d: hidden features
        tokens = self.trunk.tokens(texts)
        with torch.no_grad():
            states = self.trunk.encoder.embeddings(
                input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids")
            )
            mask = additive_mask(tokens["attention_mask"], states.dtype)
            for layer in self.layers[: self.first]:
                states = layer(states, attention_mask=mask)
        return Hidden(states, tokens["attention_mask"])

    def upper(
        self,
        hidden: Hidden,
        pathways: list[Mapping[str, torch.Tensor]],
        rows: torch.Tensor | None = None,
        dropout: nn.Module | None = None,
    ) -> torch.Tensor:
        """The top layers with row i adapted by pathway `rows[i]` of `pathways` (each `lora.<module>.A/B`; one
        pathway: every row's, `rows` unused; none: the trunk's own layers), pooled as the trunk pools -> features
        (b, d). `dropout`: on each LoRA term's input (training)."""
        from moe.trunk.base import sentence_features  # here: the store reads pathway shapes without the trunk package

        if len(pathways) > 1 and rows is None:
            raise ValueError(f"{len(pathways)} pathways need each row's pathway (`rows`)")
        if len(pathways) == 1:  # its tensors as they are (views: gradients flow in training), no gather
            (p,) = pathways
            lora, rows = {module: (p[a], p[b]) for module, a, b in self._names}, None
        else:
            lora = self._stack(pathways) if pathways else {}
        states, mask = hidden.states, additive_mask(hidden.mask, hidden.states.dtype)
        token = _RUN.set(_Run(lora, rows, self.spec.scale, dropout))
        try:
            for layer in self.layers[self.first :]:
                states = layer(states, attention_mask=mask)
        finally:
            _RUN.reset(token)
        return sentence_features(states, hidden.mask)

    def zero(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pathway that changes nothing (B = 0: the frozen trunk's own rows), shaped and typed as `like`."""
        return {name: torch.zeros_like(like[name]) for name in self.shapes()}

    def _stack(self, pathways: list[Mapping[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Several pathways' tensors stacked as the hooks gather them: module -> A (e, r, i), B (e, o, r)."""
        return {
            module: (torch.stack([p[a] for p in pathways]), torch.stack([p[b] for p in pathways]))
            for module, a, b in self._names
        }

    def features(self, texts: list[str], pathway: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One pathway's features of `texts` (tenant given): lower layers, then the adapted top ones."""
        return self.upper(self.lower(texts), [pathway])

    @torch.no_grad()
    def encode(self, texts: list[str], pathway: Mapping[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
        """`features` of many texts, `batch_size` at a time in order of length (`by_length`), in the order given."""
        from moe.trunk.base import by_length  # here: the store reads pathway shapes without the trunk package

        if not texts:
            return torch.empty(0, self.trunk.dim)
        return by_length(texts, batch_size, lambda batch: self.features(batch, pathway).float().cpu())
