"""Expert shards in a lower precision: every tensor cast, `architecture.dtype` recorded, checksums recomputed."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from moe.store.shard import ExpertMeta, ShardError, read_shard, write_shard

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_shard(source: str | Path, target: str | Path, dtype: str) -> Path:
    """Write `source`'s expert to `target` in `dtype` (a byte copy when it is already in that dtype)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tensors, meta = read_shard(source)
    target = Path(target)
    if meta.architecture.dtype == dtype:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target
    return write_shard(target, *cast_shard(tensors, meta, dtype, source))


def cast_shard(
    tensors: dict[str, torch.Tensor], meta: ExpertMeta, dtype: str, source: str | Path = "<memory>"
) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
    """An expert's tensors in `dtype`, with `architecture.dtype` recorded; refuses a tensor that overflows it."""
    cast = {name: t.to(DTYPES[dtype]) for name, t in tensors.items()}
    for name, t in cast.items():
        if not torch.isfinite(t).all():
            raise ShardError(source, f"tensor {name} overflows {dtype} (largest magnitude {tensors[name].abs().max()})")
    return cast, replace(meta, architecture=meta.architecture | {"dtype": dtype})
