"""Writing a serving bundle from a paged mixture over a store (no Hydra): the expert shards (copied, or rewritten in
a lower precision), the gate of exactly these experts, the trunk's weights when copied, and last the manifest."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from moe import __version__
from moe.export.precision import DTYPES, convert_shard
from moe.inference import GateSettings, PagedMixture
from moe.inference.bundle import MANIFEST, copy_trunk, describe_trunk, write_manifest
from moe.paths import file_sha256
from moe.progress import bar
from moe.store import ExpertStore, TrunkVersions, save_gate
from moe.store.trunks import BRIDGES
from moe.trunk import Trunk


def check_target(out: Path, store_dir: str | Path, run_dir: str | Path | None = None) -> None:
    """A bundle goes into a folder of its own, away from the store it is made from: `out` may not be the store or
    inside it (the bundle's files would sit among its experts), nor a folder whose `experts/` or `trunk/` (what an
    export writes, and with `overwrite` first deletes) is the store or holds it, nor the training run's folder
    `run_dir` (its gate.safetensors would be replaced). A ValueError saying which, before anything is read."""
    target, store = Path(out).resolve(), Path(store_dir).resolve()
    if target == store or store in target.parents:
        raise ValueError(
            f"paths.output_dir {out} is inside the expert store {store_dir}: the bundle would be written among its "
            "experts; choose a folder outside the store"
        )
    for name in ("experts", "trunk"):
        if (target / name) == store or (target / name) in store.parents:
            raise ValueError(
                f"paths.output_dir {out} would put the bundle's {name}/ folder over the expert store {store_dir}; "
                "choose a folder outside the store's run folder"
            )
    if run_dir is not None and target == Path(run_dir).resolve() and (target / "config.yaml").is_file():
        raise ValueError(
            f"paths.output_dir {out} is the training run's folder of the store {store_dir}: the bundle's "
            "gate.safetensors would replace the run's; choose another folder"
        )


def clear_target(out: Path, overwrite: bool) -> None:
    """Refuse to write over a bundle unless asked; then remove only what an export writes."""
    existing = [out / name for name in (MANIFEST, "gate.safetensors", "experts", "trunk") if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a bundle ({existing[0].name}); export.overwrite=true replaces it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def expert_file(tenant: str, version: int) -> str:
    return f"experts/{tenant}/v{version:04d}.safetensors"


def write_files(
    out: Path,
    store_dir: str | Path,
    model: PagedMixture,
    trunk: Trunk,
    dtype: str = "float32",
    trunk_mode: str = "reference",
    trained_trunk: bool = False,
    overwrite: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """Everything but the manifest; returns the files written (relative to `out`) and the trunk's manifest entry."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_target(out, store_dir)
    trunk_entry = describe_trunk(trunk, trunk_mode, trained_trunk)  # refuses a reference to a trained trunk, early
    out.mkdir(parents=True, exist_ok=True)
    clear_target(out, overwrite)
    store, files = ExpertStore(store_dir), []
    for tenant, version in bar(model.keys, "writing experts", "expert"):
        convert_shard(store.path(tenant, version), out / expert_file(tenant, version), dtype)
        files.append(expert_file(tenant, version))
    versions = TrunkVersions(store_dir)  # experts on an older trunk version travel with their bridge
    for old in sorted({fp for fp in model.expert_trunks.values() if fp != trunk.fingerprint}):
        name = f"experts/{BRIDGES}/{versions.bridge_path(old, trunk.fingerprint).name}"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(versions.bridge_path(old, trunk.fingerprint), out / name)
        files.append(name)
    architecture = store.meta(*model.keys[0]).architecture | {"dtype": dtype, "dim": trunk.dim}
    files.append(save_gate(out / "gate.safetensors", model, trunk.fingerprint, architecture).name)
    if trunk_mode == "copy":
        files += copy_trunk(trunk, out)
    return files, trunk_entry


def write_bundle_manifest(
    out: Path,
    files: list[str],
    model: PagedMixture,
    trunk_entry: dict[str, Any],
    dtype: str,
    oos: dict[str, Any],
    gate: GateSettings,
    unsure_margin: float,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest over `files`: versions, trunk, gate settings (top-k, where routing rows come from, the
    out-of-scope rule `oos`, the gate-logit margin within which answers list runners-up), every expert with its
    file's sha256, the label maps, and `extra` entries (evaluation, precision, config)."""
    manifest = {
        "package_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype,
        "trunk": trunk_entry,
        "gate": {
            "file": "gate.safetensors",
            "top_k": gate.top_k,
            "normalize_weights": gate.normalize_weights,
            "source": gate.source,
            "shrinkage": gate.shrinkage,
            "own_covariance": gate.own_covariance,
            "oos": oos,
            "unsure_margin": unsure_margin,
        },
        "experts": [
            {
                "tenant": info.tenant,
                "version": version,
                "labels": list(info.labels),
                "file": expert_file(info.tenant, version),
                "sha256": file_sha256(out / expert_file(info.tenant, version)),
                "dtype": dtype,
                "trunk": model.expert_trunks.get(
                    info.tenant, trunk_entry["fingerprint"]
                ),  # bridged when not the trunk's
            }
            for info, (_, version) in zip(model.experts, model.keys, strict=True)
        ],
        "label_maps": {info.tenant: list(info.labels) for info in model.experts},
    } | extra
    write_manifest(out, manifest, files)
    return manifest
