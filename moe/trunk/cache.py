"""On-disk cache of frozen-trunk features, keyed by trunk fingerprint and text: each text is encoded once."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe.trunk.base import Trunk

log = logging.getLogger(__name__)


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class FeatureCache:
    """`root/<fingerprint>/chunk-*.safetensors`, each chunk holding `keys` (n, 16) uint8 and `features` (n, d).

    New features are appended as a new chunk written atomically, so concurrent runs never corrupt each
    other; an unreadable chunk is skipped with a warning (its texts are simply encoded again).
    """

    def __init__(self, root: str | Path, trunk: Trunk, batch_size: int = 64):
        if not trunk.frozen:
            raise ValueError("only a frozen trunk's features can be cached: its weights must not change")
        self.trunk, self.batch_size = trunk, batch_size
        self.folder = Path(root) / trunk.fingerprint[:32]
        self.index: dict[bytes, torch.Tensor] = {}
        for chunk in sorted(self.folder.glob("chunk-*.safetensors")):
            self._load_chunk(chunk)

    def _load_chunk(self, path: Path) -> None:
        try:
            tensors = load_file(path)
            keys, features = tensors["keys"], tensors["features"]
            if keys.shape[0] != features.shape[0] or features.shape[1:] != (self.trunk.dim,):
                raise ValueError(f"keys {tuple(keys.shape)} do not match features {tuple(features.shape)}")
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            log.warning("skipping unreadable feature cache chunk %s: %s", path, error)
            return
        for key, row in zip(keys.numpy(), features, strict=True):
            self.index[key.tobytes()] = row

    def __len__(self) -> int:
        return len(self.index)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Features `(len(texts), dim)` for `texts`, encoding and storing only those not cached yet."""
        keys = [text_key(text) for text in texts]
        missing = {key: text for key, text in zip(keys, texts, strict=True) if key not in self.index}
        if missing:
            features = self.trunk.encode(list(missing.values()), self.batch_size, progress=True).cpu()
            new_keys = torch.tensor([list(key) for key in missing], dtype=torch.uint8)
            self._write_chunk(new_keys, features)
            for key, row in zip(missing, features, strict=True):
                self.index[key] = row
        if not texts:
            return torch.empty(0, self.trunk.dim)
        return torch.stack([self.index[key] for key in keys])

    def _write_chunk(self, keys: torch.Tensor, features: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"chunk-{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"keys": keys.contiguous(), "features": features.contiguous()}, tmp)
        os.replace(tmp, path)
