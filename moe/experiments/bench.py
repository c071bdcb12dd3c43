"""What the benchmark scripts share: synthetic expert stores, resident-memory readers and a description of the
machine they ran on."""

from __future__ import annotations

import os
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moe.model import ExpertInfo, build_mixture
from moe.progress import bar
from moe.store import ExpertMeta, ExpertStore, expert_shards, write_shard
from moe.store.precision import DTYPES, cast_shard

DIM, LABELS = 384, 15  # the shape of a CLINC150 domain expert on all-MiniLM-L6-v2
SYNTHETIC_FINGERPRINT = "bench" * 12 + "0000"  # the trunk fingerprint of shards written without a trunk


def rank_for(megabytes: float, dtype: str = "float32") -> int:
    """Adapter rank that makes a synthetic expert's weights about `megabytes`."""
    elements = megabytes * 2**20 / DTYPES[dtype].itemsize
    return max(1, round((elements - DIM * LABELS - LABELS) / (2 * DIM + 1)))


def write_store(
    root: str | Path,
    tenants: int,
    rank: int,
    dtype: str = "float32",
    seed: int = 0,
    trunk_fingerprint: str = SYNTHETIC_FINGERPRINT,
    init_std: dict[str, float] | None = None,
    progress: bool = True,
) -> ExpertStore:
    """A fresh store of `tenants` experts (`t00000`, `t00001`, ...) of `LABELS` labels on `DIM` features and adapter
    rank `rank`, stored in `dtype` as `scripts/export.py` writes a bundle. `init_std`: the mixture's parameters
    drawn afresh from a normal of that deviation, in that order (default: the adapter's up-projection, 0.02)."""
    torch.manual_seed(seed)
    store = ExpertStore(root)
    if store.records():
        raise FileExistsError(f"write_store writes a fresh store, but {store.root} has experts")
    infos = [ExpertInfo(f"t{i:05d}", tuple(f"intent{j}" for j in range(LABELS))) for i in range(tenants)]
    init_std = {"bank.up": 0.02} if init_std is None else init_std
    chunks = bar(range(0, tenants, 64), f"writing {tenants} {dtype} shards", "chunk", enabled=progress)
    for start in chunks:
        model = build_mixture(infos[start : start + 64], DIM, rank=rank)
        with torch.no_grad():
            for name, std in init_std.items():
                model.get_parameter(name).normal_(std=std)
        for tensors, meta in expert_shards(model, trunk_fingerprint):
            # straight to version 1: a fresh store whose names are unique by construction needs none of `save`'s
            # checks, whose scan of every tenant for a clash of case would make writing n experts O(n^2)
            write_shard(store.path(meta.tenant, 1), *cast_shard(tensors, meta.with_version(1), dtype))
    return store


def write_pathway_store(
    root: str | Path,
    tenants: int,
    trunk,
    layers: int = 6,
    lora_rank: int = 16,
    rank: int = 16,
    seed: int = 0,
    std: float = 0.02,
    progress: bool = True,
) -> ExpertStore:
    """A fresh store of `tenants` pathway experts on `trunk` (a Hugging Face encoder: MiniLM for the CLINC150 shape),
    as `write_store` writes adapters: `LABELS` labels, adapter rank `rank`, and a LoRA pathway over the trunk's top
    `layers` layers at rank `lora_rank` (6 and 16: about 2.7 MB of weights each), every LoRA tensor drawn from a
    normal of deviation `std`, so that each expert's pathway is its own. Written through the shard writer
    (`write_shard`), checked against the shapes the architecture implies."""
    from moe.model.pathway import PathwayLayout, PathwaySpec

    torch.manual_seed(seed)
    store = ExpertStore(root)
    if store.records():
        raise FileExistsError(f"write_pathway_store writes a fresh store, but {store.root} has experts")
    spec = PathwaySpec(layers, lora_rank)
    infos = [ExpertInfo(f"p{i:05d}", tuple(f"intent{j}" for j in range(LABELS))) for i in range(tenants)]
    chunks = bar(range(0, tenants, 16), f"writing {tenants} pathway shards", "chunk", enabled=progress)
    for start in chunks:
        model = build_mixture(infos[start : start + 16], DIM, rank=rank)
        with torch.no_grad():
            model.get_parameter("bank.up").normal_(std=std)
        for tensors, meta in expert_shards(model, trunk.fingerprint):
            arch = meta.architecture | ({"kind": "pathway"} | PathwayLayout.of(spec, trunk).to_dict())
            shapes = arch.shapes(LABELS)
            lora = {name: torch.randn(shape) * std for name, shape in shapes.items() if name.startswith("lora.")}
            statistics = {name: torch.zeros(shape) for name, shape in shapes.items() if name.startswith("pathway.")}
            statistics["pathway.count"] += 1.0
            meta = replace(meta, architecture=arch).with_version(1)
            write_shard(store.path(meta.tenant, 1), tensors | lora | statistics, meta)
    return store


def synthetic_expert(
    tenant: str, rank: int, seed: int, trunk_fingerprint: str = SYNTHETIC_FINGERPRINT, std: float = 0.02
) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
    """One expert of `write_store`'s shape for `tenant` (its up-projection drawn from `seed`), to `ExpertStore.save`:
    a tenant grown, or a new version of one, in a benchmark store."""
    torch.manual_seed(seed)
    model = build_mixture([ExpertInfo(tenant, tuple(f"intent{j}" for j in range(LABELS)))], DIM, rank=rank)
    with torch.no_grad():
        model.get_parameter("bank.up").normal_(std=std)
    (tensors, meta), *_ = expert_shards(model, trunk_fingerprint)
    return tensors, meta


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """A truncated Zipf law over `n` items: item i (from 0) has weight 1 / (i + 1)^s."""
    popularity = 1.0 / np.arange(1, n + 1) ** s
    return popularity / popularity.sum()


def rss_bytes(field: str = "VmRSS") -> int:
    """One field of /proc/self/status in bytes: VmRSS (resident now), VmHWM (peak), RssAnon, RssFile; 0 where
    there is no such file."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_now() -> dict[str, int]:
    """Resident bytes now: all of it, anonymous (heap, tensors) and file-backed (mapped code and files)."""
    return {field: rss_bytes(field) for field in ("VmRSS", "RssAnon", "RssFile")}


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so that the peak covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for a CUDA device, else the device's type ("cpu")."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Platform, processor, cores, torch version and threads, the device computed on, and the load average."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device_name(device),
        "load_average": os.getloadavg(),
    }
