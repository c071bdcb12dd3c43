"""The trunk interface and its fingerprint: a hash of the weights and config that define its features."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import reduce
from safetensors.torch import load_file, save_file
from torch import nn

from moe.progress import bar


def hash_tensors(digest, tensors: Mapping[str, torch.Tensor], separator: str = "") -> None:
    """Feed every tensor, in name order, into `digest`: its name, dtype and shape (joined by "|", then `separator`)
    and its bytes. Trunk fingerprints and shard checksums are both made here (their separators differ, as recorded)."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}{separator}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_module(module: nn.Module, config: dict[str, Any]) -> str:
    """sha256 over the config (canonical JSON) and every tensor of the state dict (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    hash_tensors(digest, module.state_dict())
    return digest.hexdigest()


def by_length(
    texts: list[str], batch_size: int, encode: Callable[[list[str]], torch.Tensor], progress: bool = False
) -> torch.Tensor:
    """`encode` run on `batch_size` texts at a time in order of length (little padding: about 1.7x faster on short
    queries), its rows returned in the order given."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = bar(range(0, len(order), batch_size), "encoding", "batch", enabled=progress)
    rows = [encode([texts[i] for i in order[start : start + batch_size]]) for start in starts]
    return torch.cat(rows)[torch.argsort(torch.tensor(order))]


class Trunk(nn.Module, ABC):
    """Encodes a batch of texts to `(batch, dim)` features. Frozen trunks may have their features cached.

    A trunk also says how it is rebuilt elsewhere (a serving bundle): `kind` and `init_arguments` name the class
    and its constructor arguments, `save_weights` writes its weights into a folder, `reference` says where they
    can be found without a copy, and `rebuild` makes the trunk again from these."""

    dim: int
    kind: ClassVar[str]

    @abstractmethod
    def forward(self, texts: list[str]) -> torch.Tensor: ...

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """What, with the weights, defines this trunk's features (recorded in every expert shard)."""

    @abstractmethod
    def init_arguments(self) -> dict[str, Any]:
        """The constructor arguments that, with its weights, rebuild this trunk."""

    def save_weights(self, folder: Path) -> None:
        """Write the weights into `folder`, as safetensors (a trunk with files of its own copies them)."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, folder / "trunk.safetensors")

    def reference(self) -> dict[str, Any]:
        """Where the weights are found without a copy (checked when rebuilt)."""
        return {"rebuilt_from": "init arguments (seeded weights)"}

    @classmethod
    def rebuild(
        cls, init: dict[str, Any], folder: Path | None = None, reference: dict[str, Any] | None = None
    ) -> Trunk:
        """The trunk from its init arguments and the weights `save_weights` wrote into `folder` (None: as `reference`
        says), frozen."""
        trunk = cls(**init)
        if folder is not None:
            trunk.load_state_dict(load_file(folder / "trunk.safetensors"))
        return trunk.freeze()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """(n, d) float32 features on the trunk's device, in the order given, `batch_size` texts at a time in order of
        length (`by_length`)."""
        if not texts:
            return torch.empty(0, self.dim)
        return by_length(texts, batch_size, lambda batch: self(batch).float(), progress)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> Trunk:
        self.requires_grad_(False)
        self._fingerprint = None  # hashed again: the weights may have been trained (or copied with a stale hash)
        return self.eval()

    @property
    def fingerprint(self) -> str:
        # Frozen weights never change, so their (costly) hash is computed once.
        if self.frozen and getattr(self, "_fingerprint", None):
            return self._fingerprint
        value = fingerprint_module(self, self.config())
        if self.frozen:
            self._fingerprint = value
        return value

    def train(self, mode: bool = True) -> Trunk:
        # A frozen trunk stays in eval mode (no dropout) even inside a module that is training.
        return super().train(mode and not self.frozen)


def sentence_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token states (b, t, d) -> the mean over each text's tokens, L2-normalised (b, d): the trunk's features."""
    # b: batch, t: tokens, d: hidden features
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
    summed = reduce(hidden * mask, "b t d -> b d", "sum")
    count = reduce(mask, "b t 1 -> b 1", "sum").clamp(min=1e-9)
    return F.normalize(summed / count, dim=-1)
