"""An expert store as a `PagedMixture`, with the gate settings (top-k, weight normalisation) of the run that made it.

Training, evaluation, export and serving all build their inference model here, the same way (tenants in sorted
order), so that they compute the same predictions to the last bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moe.paging import PagedMixture
from moe.store import ExpertStore


@dataclass(frozen=True)
class GateSettings:
    top_k: int = 2
    normalize_weights: bool = True
    routing: str = "rows"  # rows: the gate rows stored in each shard | stats: derived from its feature statistics
    shrinkage: float = 0.05  # of the pooled covariance, for routing="stats"


def read_gate_settings(path: str | Path) -> GateSettings:
    """Top-k and weight normalisation from a gate file's metadata (`save_gate`)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return GateSettings(int(meta["top_k"]), bool(json.loads(meta.get("normalize_weights", "true"))))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"gate file {path}: unreadable ({error})") from None
    except (KeyError, ValueError) as error:
        raise ValueError(f"gate file {path}: metadata lacks a valid top_k ({error})") from None


def load_mixture(
    store_dir: str | Path,
    tenants: list[str] | None = None,
    gate: GateSettings | None = None,
    trunk_fingerprint: str | None = None,
    device: str = "cpu",
    budget_bytes: int = 256 << 20,
    host_budget_bytes: int = 0,
) -> PagedMixture:
    """The latest version of each tenant (all live ones by default), paged under `budget_bytes`. Unlike
    `PagedMixture.from_store`, a shard that fails its checks is an error here: a partial model would be
    evaluated or served silently."""
    store, gate = ExpertStore(store_dir), gate or GateSettings()
    names = sorted(tenants if tenants is not None else store.tenants())
    if not names:
        raise ValueError(f"expert store {store.root} holds no live expert")
    model, failed = PagedMixture.from_store(
        store,
        trunk_fingerprint,
        names,
        device,
        budget_bytes,
        host_budget_bytes,
        top_k=gate.top_k,
        routing=gate.routing,
        shrinkage=gate.shrinkage,
    )
    if failed:
        raise ValueError(f"expert store {store.root}: " + "; ".join(f"{t}: {e}" for t, e in sorted(failed.items())))
    model.router.normalize_weights = gate.normalize_weights
    return model
