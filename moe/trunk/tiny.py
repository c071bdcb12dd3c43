"""A tiny trainable trunk (hashed bag of words) that makes unit tests fast; not for real use."""

from __future__ import annotations

import re
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.trunk.base import Trunk

_WORD = re.compile(r"[a-z0-9']+")


class TinyTrunk(Trunk):
    """Words hashed into `buckets` embeddings, averaged, projected to `dim` and L2-normalised."""

    kind = "tiny"

    def __init__(self, dim: int = 32, buckets: int = 4096, seed: int = 0, freeze: bool = False):
        super().__init__()
        self.dim, self.buckets, self.seed = dim, buckets, seed
        generator = torch.Generator().manual_seed(seed)
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(buckets, dim, generator=generator))
            self.proj.weight.copy_(torch.eye(dim) + 0.01 * torch.randn(dim, dim, generator=generator))
            self.proj.bias.zero_()
        if freeze:
            self.freeze()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "buckets": self.buckets}

    def init_arguments(self) -> dict[str, Any]:
        return {"dim": self.dim, "buckets": self.buckets, "seed": self.seed}

    def token_ids(self, text: str) -> list[int]:
        return [zlib.crc32(word.encode()) % self.buckets for word in _WORD.findall(text.lower())] or [0]

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [self.token_ids(text) for text in texts]
        flat = torch.tensor([i for row in ids for i in row], device=self.proj.weight.device)
        offsets = torch.tensor([0] + [len(row) for row in ids[:-1]], device=flat.device).cumsum(0)
        return F.normalize(self.proj(self.embedding(flat, offsets)), dim=-1)
