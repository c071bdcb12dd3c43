"""A bundle opened for serving: its trunk rebuilt (refused unless the fingerprint matches) and its mixture built
(`load_mixture`); the format itself (reading, checking, writing) is `moe.store.bundle`'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.inference.answers import UNSURE_MARGIN
from moe.inference.build import GateSettings, Verify, load_mixture
from moe.inference.index import IndexSettings
from moe.inference.paged import PagedMixture
from moe.store.bundle import MANIFEST, Bundle, BundleError, read_bundle
from moe.trunk import TRUNK_KINDS, Trunk

log = logging.getLogger(__name__)

__all__ = ["Bundle", "BundleError", "OpenBundle", "build_trunk", "open_bundle", "read_bundle"]


def build_trunk(bundle: Bundle, device: str | torch.device = "cpu") -> Trunk:
    """The bundle's trunk, frozen, refused unless its fingerprint equals the manifest's."""
    entry, manifest = bundle.manifest["trunk"], bundle.path(MANIFEST)
    if entry["kind"] not in TRUNK_KINDS:
        raise BundleError(manifest, f"unknown trunk kind {entry['kind']!r}; known: {sorted(TRUNK_KINDS)}")
    folder = bundle.path(entry["folder"]) if entry["source"] == "copy" else None
    try:
        trunk = TRUNK_KINDS[entry["kind"]].rebuild(entry["init"], folder, entry.get("reference"))
    except ImportError as error:
        raise BundleError(manifest, f"the trunk can not be rebuilt: {error}") from error
    except FileNotFoundError as error:
        raise BundleError(manifest, str(error)) from error
    if trunk.fingerprint != entry["fingerprint"]:
        raise BundleError(
            manifest,
            f"the rebuilt trunk's fingerprint {trunk.fingerprint[:12]}… is not the exported one,"
            f" {entry['fingerprint'][:12]}…",
        )
    return trunk.to(device)


@dataclass
class OpenBundle:
    """A checked bundle with its trunk and mixture, and the out-of-scope rule it was exported with."""

    bundle: Bundle
    trunk: Trunk
    model: PagedMixture
    oos_score: str  # kind of out-of-scope score (`moe.inference.answers.OOS_SCORES`)
    threshold: float | None  # None: no threshold was chosen
    unsure_margin: float  # routed answers list the experts within this gate-logit margin of the first as runners-up


def open_bundle(
    bundle: str | Path | Bundle,
    device: str = "cpu",
    budget_bytes: int = 256 << 20,
    host_budget_bytes: int = 0,
    verify: Verify = "full",
    index: IndexSettings | None = None,
) -> OpenBundle:
    """Read and check a bundle, rebuild its trunk, and load its experts paged under `budget_bytes` (`verify`: every
    expert's file when the bundle opens, or each at its first page-in; `index`: routed batches through an index over
    the gate's rows: `load_mixture`)."""
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle, verify, damaged_ok=True)
    trunk = build_trunk(bundle, device)
    gate = bundle.manifest["gate"]
    settings = GateSettings(
        int(gate["top_k"]),
        bool(gate["normalize_weights"]),
        gate["source"],
        float(gate["shrinkage"]),
        float(gate.get("own_covariance", 0.0)),  # bundles made before it: the linear gate
    )
    if not (tenants := [t for t in bundle.tenants if t not in bundle.damaged]):
        raise BundleError(bundle.path(MANIFEST), f"every expert is damaged: {bundle.damaged}")
    model = load_mixture(
        bundle.path("experts"),
        tenants,
        settings,
        trunk.fingerprint,
        device,
        budget_bytes,
        host_budget_bytes,
        verify=verify,
        index=index,
        trunk=trunk,
        skip_failed=True,  # a damaged expert is left out, named in `model.left_out`; the others are served
    )
    model.left_out = {t: ValueError(why) for t, why in bundle.damaged.items()} | model.left_out
    for tenant, problem in sorted(model.left_out.items()):
        log.error("bundle %s: tenant %s left out, its expert is damaged: %s", bundle.root, tenant, problem)
    served = {info.tenant: list(info.labels) for info in model.experts}
    maps = bundle.manifest["label_maps"]
    if served != {t: list(labels) for t, labels in maps.items() if t not in model.left_out}:
        raise BundleError(bundle.path(MANIFEST), "label maps differ from the bundled experts' labels")
    oos = gate.get("oos") or {}
    unsure_margin = float(gate.get("unsure_margin", UNSURE_MARGIN))  # bundles made before it: the default
    return OpenBundle(bundle, trunk, model, oos.get("score", "max_score"), oos.get("threshold"), unsure_margin)
