"""PagedMixture: inference over an expert store, with only the pager's budget of expert weights resident.

The gate's rows for every registered expert stay resident (they are small); expert weights are paged in,
wave by wave, for the experts a batch actually chose. Each expert's group is computed on its own
(`single_expert_logits`), so a prediction never depends on what else happened to be resident.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable
from dataclasses import asdict
from pathlib import Path

import torch

from moe.model import DispatchPlan, ExpertInfo, Mixture, TopKRouter, dispatch
from moe.model.experts import TENSOR_NAMES, single_expert_logits
from moe.model.stats import discriminant_rows, pooled_precision
from moe.paging.pager import ExpertPager
from moe.store import ExpertMeta, ExpertStore, ShardError, read_shard, read_tensors

log = logging.getLogger(__name__)
Key = tuple[str, int]  # (tenant, version)


def _identity(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class ShardLoader:
    """Reads expert weights for the pager. A shard is verified in full when registered, and again whenever
    its file changed since (inode, size or modification time); unchanged files are read without rehashing.

    Per expert it keeps only the file name, its identity and a digest of its metadata: at thousands of
    registered experts, every byte kept here is resident."""

    def __init__(self, trunk_fingerprint: str | None):
        self.trunk_fingerprint = trunk_fingerprint
        self.paths: dict[Hashable, str] = {}
        self.identities: dict[Hashable, tuple[int, int, int]] = {}
        self.digests: dict[Hashable, int] = {}

    def register(self, key: Hashable, path: Path) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
        """Read and check a shard in full, and remember it; returns its tensors and metadata."""
        try:
            identity = _identity(path)  # before the read: a change made during it shows as a change later
        except FileNotFoundError:
            raise ShardError(path, "file not found") from None
        tensors, meta = read_shard(path, self.trunk_fingerprint)
        self.paths[key], self.identities[key], self.digests[key] = str(path), identity, _digest(meta)
        return tensors, meta

    def forget(self, key: Hashable) -> None:
        for table in (self.paths, self.identities, self.digests):
            table.pop(key, None)

    def __call__(self, key: Hashable) -> dict[str, torch.Tensor]:
        path = self.paths[key]
        try:
            identity = _identity(path)
        except FileNotFoundError:
            raise ShardError(path, "file disappeared after it was registered") from None
        if identity == self.identities[key]:
            return read_tensors(path, TENSOR_NAMES)
        tensors, meta = read_shard(path, self.trunk_fingerprint)
        if _digest(meta) != self.digests[key]:
            raise ShardError(path, "file was replaced by a different expert after it was registered")
        self.identities[key] = identity
        return {name: tensors[name].clone() for name in TENSOR_NAMES}  # not views keeping every tensor alive


def _digest(meta: ExpertMeta) -> int:
    return hash(json.dumps(asdict(meta), sort_keys=True))


@torch.no_grad()
def fill_discriminants(
    router: TopKRouter, means: torch.Tensor, precision: torch.Tensor, input_scale: float, tenants: list[str]
) -> None:
    """The statistics gate's rows from class means (e, m, d), a chunk of experts at a time. Rows that overflow
    the gate's dtype are refused, naming their tenants: the pooled covariance is shared, so this is a property
    of the whole store in that dtype, not of one shard."""
    for start in range(0, means.shape[0], router.CHUNK):
        weight, bias = discriminant_rows(means[start : start + router.CHUNK], precision, input_scale)
        weight = weight.to(router.weight.dtype)
        if not (finite := torch.isfinite(weight).flatten(1).all(dim=1)).all():
            names = [tenants[start + i] for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(f"statistics-gate rows of {names} overflow {router.weight.dtype}: use float32 shards")
        router.weight[start : start + router.CHUNK] = weight
        router.bias[start : start + router.CHUNK] = bias


class PagedMixture(Mixture):
    def __init__(
        self,
        router: TopKRouter,
        experts: list[ExpertInfo],
        keys: list[Key],
        pager: ExpertPager,
        input_scale: float,
        gate_rows: str,
    ):
        super().__init__(router, experts, input_scale, gate_rows)
        self.keys, self.pager = list(keys), pager
        self.register_buffer("label_mask", self.label_ids >= 0, persistent=False)

    @classmethod
    def from_store(
        cls,
        store: ExpertStore,
        trunk_fingerprint: str | None = None,
        tenants: list[str] | None = None,
        device: str | torch.device = "cpu",
        device_budget: int = 256 << 20,
        host_budget: int = 0,
        top_k: int = 2,
        routing: str = "rows",
        shrinkage: float = 0.05,
    ) -> tuple[PagedMixture, dict[str, Exception]]:
        """The latest version of each tenant (all awake ones by default). A shard that fails its checks is
        left out and returned in the second value; it never stops the others.

        `routing`: "rows" uses the gate rows stored in each shard (learned); "stats" derives them from each
        expert's class means and the covariance pooled over every registered expert (the statistics gate)."""
        if routing not in ("rows", "stats"):
            raise ValueError(f"routing must be 'rows' or 'stats', got {routing!r}")
        loader = ShardLoader(trunk_fingerprint)
        pager = ExpertPager(loader, device, device_budget, host_budget)
        candidates, failed = [], {}
        for tenant in tenants if tenants is not None else store.tenants():
            try:
                key = (tenant, store.latest(tenant))
                candidates.append((key, store.meta(*key)))  # header only: sizes the gate before any tensor
            except (ShardError, KeyError, ValueError) as error:
                failed[tenant] = error
        if not candidates:
            raise ValueError(f"no expert could be loaded from {store.root}: {failed}")
        arch = candidates[0][1].architecture
        per_label = arch["gate_rows"] == "labels" or routing == "stats"
        rows = [len(meta.labels) if per_label else 1 for _, meta in candidates]
        dtype = getattr(torch, arch.get("dtype", "float32"))  # the gate is held in the experts' own precision
        # filled in place, expert by expert: no per-expert copies linger
        router = TopKRouter(arch["dim"], rows, top_k=top_k, random_init=False, dtype=dtype)
        means = torch.zeros(len(candidates), max(rows), arch["dim"]) if routing == "stats" else None
        infos, keys, kept = [], [], []
        scatter, count = torch.zeros(arch["dim"], arch["dim"], dtype=torch.float64), 0.0
        with torch.no_grad():
            for i, (key, header) in enumerate(candidates):
                try:
                    if header.architecture != arch:
                        raise ShardError(store.path(*key), f"architecture {header.architecture} differs from {arch}")
                    tensors, meta = loader.register(key, store.path(*key))
                    if means is not None and not tensors["stats.count"].sum() > 0:
                        loader.forget(key)
                        raise ShardError(store.path(*key), "holds no feature statistics, which routing='stats' needs")
                except (ShardError, KeyError, ValueError) as error:
                    failed[key[0]] = error
                    continue
                if means is not None:  # turned into gate rows once the pooled covariance is known
                    means[i, : rows[i]] = tensors["stats.mean"]
                else:
                    router.weight[i, : rows[i]] = tensors["gate.weight"]
                    router.bias[i, : rows[i]] = tensors["gate.bias"]
                scatter += tensors["stats.scatter"].double()  # per-expert statistics stay in the shards,
                count += tensors["stats.count"].sum().item()  # their aggregate stays resident
                pager.register(key, sum(tensors[n].numel() * tensors[n].element_size() for n in TENSOR_NAMES))
                infos.append(ExpertInfo(meta.tenant, meta.labels))
                keys.append(key)
                kept.append(i)
        for tenant, error in failed.items():
            log.warning("expert %s left out: %s", tenant, error)
        if not infos:
            raise ValueError(f"no expert could be loaded from {store.root}: {failed}")
        if len(kept) < len(candidates):
            router = router.subset(kept)
            means = means[kept, : router.weight.shape[1]] if means is not None else None
        if means is not None:
            classes = sum(len(info.labels) for info in infos)
            precision = pooled_precision(scatter, count, classes, shrinkage)
            fill_discriminants(router, means, precision, arch["input_scale"], [info.tenant for info in infos])
        model = cls(router, infos, keys, pager, arch["input_scale"], "labels" if per_label else "one")
        model.shared_scatter, model.shared_count = scatter.float(), count
        return model.to(device).eval(), failed

    def expert_logits(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # g: groups (chosen experts), n: capacity, c: label width
        groups = dispatch(x, plan)  # (g, n, d)
        counts = torch.bincount(plan.group, minlength=plan.experts.numel()).tolist()
        experts = plan.experts.tolist()
        out = x.new_zeros(len(experts), plan.capacity, self.width)
        out.masked_fill_(~self.label_mask[plan.experts][:, None, :], float("-inf"))
        position = {self.keys[e]: i for i, e in enumerate(experts)}
        for wave in self.pager.waves([self.keys[e] for e in experts]):
            self._compute_wave(wave, groups, counts, position, out)
        return out

    def _compute_wave(self, wave: list[Hashable], groups, counts, position, out: torch.Tensor) -> None:
        # a function of its own: no reference to this wave's weights outlives it, so the next wave's
        # evictions free their memory before its page-ins take more
        with self.pager.acquire(wave) as resident:
            for key, tensors in resident.items():
                i, n = position[key], counts[position[key]]
                c = tensors["head.bias"].shape[0]
                out[i, :n, :c] = single_expert_logits(groups[i, :n], tensors)
