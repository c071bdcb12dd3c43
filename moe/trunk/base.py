"""The trunk interface and its fingerprint: a hash of the weights and config that define its features."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


def fingerprint_module(module: nn.Module, config: dict[str, Any]) -> str:
    """sha256 over the config (canonical JSON) and every tensor of the state dict (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Trunk(nn.Module, ABC):
    """Encodes a batch of texts to `(batch, dim)` features. Frozen trunks may have their features cached."""

    dim: int

    @abstractmethod
    def forward(self, texts: list[str]) -> torch.Tensor: ...

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """What, with the weights, defines this trunk's features (recorded in every expert shard)."""

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> Trunk:
        self.requires_grad_(False)
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
