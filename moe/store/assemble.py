"""From a trained mixture to its shards: one per expert, and the whole gate in one file (`moe.inference` builds a
mixture back from shards)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from moe.model import Mixture, MixtureOfExperts
from moe.model.kinds import Architecture
from moe.model.stats import empty_statistics
from moe.store.shard import ExpertMeta, save_atomically

Shard = tuple[dict[str, torch.Tensor], ExpertMeta]


def architecture(model: MixtureOfExperts) -> Architecture:
    """The architecture of a trainable mixture's experts (adapters over the trunk's features)."""
    dtype = str(model.bank.head.dtype).removeprefix("torch.")
    return Architecture(model.bank.dim, model.bank.rank, model.gate_rows, model.input_scale, dtype)


def expert_shards(
    model: MixtureOfExperts,
    trunk_fingerprint: str,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Iterator[Shard]:
    """`(tensors, meta)` for every expert: its weights, its routing entry and its feature statistics
    (`stats[tenant]`, from `class_statistics`; experts without any get empty statistics)."""
    arch = architecture(model)
    for i, info in enumerate(model.experts):
        c = len(info.labels)
        tensors = model.bank.expert_tensors(i, c) | model.router.entry(i, c if model.gate_rows == "labels" else 1)
        tensors |= (stats or {}).get(info.tenant) or empty_statistics(model.bank.dim, c)
        meta = ExpertMeta(info.tenant, info.labels, trunk_fingerprint, arch)
        yield tensors, meta


def save_gate(path: str | Path, model: Mixture, trunk_fingerprint: str, arch: Architecture | None = None) -> Path:
    """The whole gate in one file, experts in the mixture's order (each expert's rows also travel in its own
    shard). `arch` defaults to the architecture of a trainable mixture's bank."""
    metadata = {
        "format": "moe.gate/1",
        "experts": json.dumps([info.tenant for info in model.experts]),
        "top_k": str(model.router.top_k),
        "normalize_weights": json.dumps(model.router.normalize_weights),
        "trunk_fingerprint": trunk_fingerprint,
        "architecture": json.dumps((arch if arch is not None else architecture(model)).to_dict()),
    }
    router = model.router
    tensors = {
        "weight": router.weight.detach().cpu().contiguous().clone(),
        "bias": router.bias.detach().cpu().contiguous().clone(),
        "row_mask": router.row_mask.cpu().contiguous().clone(),
    }
    return save_atomically(path, tensors, metadata)
