"""The serving bundle: a folder with a manifest that lists, with the sha256 of its bytes, every file it needs.

    manifest.json                     format, versions, trunk identity, gate settings, experts, label maps, config
    gate.safetensors                  the gate of the bundled experts (their rows, in manifest order, and top-k)
    experts/<tenant>/v0001.safetensors  one shard per expert (`moe.store` format)
    trunk/...                         the trunk's weights, when copied (else the manifest references a package)

The format's one home: `write_files` and `write_bundle_manifest` write a bundle (no Hydra), `read_bundle` reads it
back, checking the manifest's own checksum and then every listed file before anything is used: one altered byte
anywhere is refused with an error naming the file. A file under `experts/` or `trunk/` that the manifest does not list
is refused too (the store would otherwise serve an unlisted shard version). `moe.store.remote` mirrors a bundle by its
manifest; `moe.inference.open_bundle` rebuilds its trunk (refused unless the fingerprint matches) and its mixture.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moe import __version__
from moe.model import check_choice
from moe.paths import file_sha256
from moe.progress import bar
from moe.store.assemble import save_gate
from moe.store.precision import DTYPES, convert_shard
from moe.store.store import ExpertStore
from moe.store.trunks import BRIDGES, TrunkVersions

if TYPE_CHECKING:
    from moe.trunk import Trunk

FORMAT = "moe.bundle/2"  # 2: the gate's `source` ("trained" | "statistics") replaced `routing` ("rows" | "stats")
MANIFEST = "manifest.json"
CHECKED_FOLDERS = ("experts", "trunk")
GATE_FILE, TRUNK_FOLDER = "gate.safetensors", "trunk"
Verify = Literal["full", "lazy"]  # each shard's checksum: when the mixture is built, or at its first page-in


class BundleError(ValueError):
    """A bundle that can not be trusted or used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"bundle file {path}: {reason}")
        self.path, self.reason = str(path), reason


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of every entry but the checksum itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(root: str | Path, manifest: dict[str, Any], files: list[str]) -> Path:
    """Checksum `files` (paths relative to `root`), add them and the manifest's own checksum, write atomically."""
    root = Path(root)
    manifest = manifest | {"format": FORMAT, "files": {name: file_sha256(root / name) for name in sorted(files)}}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    damaged: dict[str, str] = field(default_factory=dict)  # tenant -> why its shard is refused (`read_bundle`)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def experts(self) -> list[dict[str, Any]]:
        return self.manifest["experts"]

    @property
    def tenants(self) -> list[str]:
        return [entry["tenant"] for entry in self.experts]


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(path, "not found (is this a bundle folder written by scripts/export.py?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(path, f"not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(path, f"format {found!r} is not {FORMAT!r} (export the store again with scripts/export.py)")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise BundleError(path, "manifest checksum mismatch: the manifest was altered or corrupted")
    for key in ("files", "experts", "trunk", "gate"):
        if key not in manifest:
            raise BundleError(path, f"manifest lacks {key!r}")
    return manifest


def is_shard(name: str) -> bool:
    """Whether a bundle's file is an expert's shard (`experts/<tenant>/v*.safetensors`), which checks itself."""
    parts = Path(name).parts
    return parts[0] == "experts" and not any(part.startswith(".") for part in parts[1:])


def read_bundle(root: str | Path, verify: Verify = "full", damaged_ok: bool = False) -> Bundle:
    """Read and verify a bundle: the manifest's checksum, then every listed file's sha256, then that no
    unlisted file hides under the checked folders. A URL (`s3://bucket/bundle`) is mirrored into the local cache
    first (`moe.store.mirror_bundle`), then read from there like any folder. `verify="lazy"` leaves the experts'
    shards unread (not the bridges beside them): their own checksums are verified when each is first paged in
    (`load_mixture`), which proves a shard intact but not that it is the very file the manifest lists.

    `damaged_ok` (a server): an expert's shard that is missing or fails its sha256 is recorded in `Bundle.damaged`
    (tenant -> reason) instead of refusing the bundle, so that the other experts are served; any other file
    (manifest, gate, trunk, bridges) is still refused."""
    from moe.store.remote import is_url, mirror_bundle  # which reads this module's MANIFEST

    check_choice(verify, Verify, "verify")
    root = mirror_bundle(str(root)) if is_url(root) else Path(root)
    manifest = _read_manifest(root)
    listed: dict[str, str] = manifest["files"]
    owner = {entry.get("file"): entry.get("tenant") for entry in manifest["experts"]}
    damaged: dict[str, str] = {}
    for name, expected in sorted(listed.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(path, "listed path leaves the bundle folder")
        try:
            if not path.is_file():
                raise BundleError(path, "listed in the manifest but missing")
            if verify == "lazy" and is_shard(name):  # bridges and trunk versions hold no checksum of their own
                continue
            if (actual := file_sha256(path)) != expected:
                raise BundleError(
                    path, f"sha256 mismatch: the file hashes to {actual[:12]}…, the manifest lists {expected[:12]}…"
                )
        except BundleError as error:
            if not (damaged_ok and is_shard(name) and owner.get(name) is not None):
                raise
            damaged[owner[name]] = str(error)
    for folder in CHECKED_FOLDERS:
        for path in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else ():
            if path.is_file() and path.relative_to(root).as_posix() not in listed:
                raise BundleError(path, "not listed in the manifest (an unlisted file is never used)")
    for entry in manifest["experts"]:
        if entry.get("file") not in listed or entry.get("sha256") != listed[entry["file"]]:
            raise BundleError(root / MANIFEST, f"expert {entry.get('tenant')!r}: file not listed or checksum differs")
    return Bundle(root, manifest, damaged)


# -- writing ----------------------------------------------------------------------------------------------------

TRUNK_MODES = ("reference", "copy")


def describe_trunk(trunk: Trunk, mode: str, trained: bool = False) -> dict[str, Any]:
    """The manifest's `trunk` entry. `trained`: the trunk's weights changed in training (they must be copied)."""
    if mode not in TRUNK_MODES:
        raise ValueError(f"export.trunk must be one of {TRUNK_MODES}, got {mode!r}")
    if mode == "reference" and trained:
        raise ValueError("the trunk was trained with the experts: only a copy of its weights rebuilds it (trunk=copy)")
    entry = {"kind": trunk.kind, "config": trunk.config(), "fingerprint": trunk.fingerprint}
    entry |= {"init": trunk.init_arguments(), "source": mode}
    if mode == "copy":
        entry["folder"] = "trunk"
    else:
        entry["reference"] = trunk.reference()
    return entry


def copy_trunk(trunk: Trunk, root: Path) -> list[str]:
    """Write the trunk's weights under `root/trunk/`; returns their paths relative to `root`."""
    trunk.save_weights(root / "trunk")
    return [p.relative_to(root).as_posix() for p in sorted((root / "trunk").rglob("*")) if p.is_file()]


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
    existing = [out / name for name in (MANIFEST, GATE_FILE, *CHECKED_FOLDERS) if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a bundle ({existing[0].name}); export.overwrite=true replaces it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def staging_folder(out: Path) -> Path:
    """Where an export writes a bundle before it is moved into `out` whole (`publish_bundle`): hidden, per process,
    so that an export that fails (or is killed) leaves `out` as it was."""
    return out / f".export.{os.getpid()}.partial"


def publish_bundle(staging: Path, out: Path, overwrite: bool) -> None:
    """Move a bundle written whole in `staging` into `out`: what `out` held of an earlier bundle is removed (only with
    `overwrite`), then each part renamed into place, the manifest last: a folder without it is no bundle, so a reader
    never takes a half-moved one for one. Leftover staging folders of killed exports are removed."""
    clear_target(out, overwrite)
    for name in (GATE_FILE, *CHECKED_FOLDERS, MANIFEST):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    for left in out.glob(".export.*.partial"):
        shutil.rmtree(left, ignore_errors=True)


def expert_file(tenant: str, version: int) -> str:
    return f"experts/{tenant}/v{version:04d}.safetensors"


def write_files(
    out: Path,
    store_dir: str | Path,
    model: Any,
    trunk: Trunk,
    dtype: str = "float32",
    trunk_mode: str = "reference",
    trained_trunk: bool = False,
    overwrite: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """Everything but the manifest, for `model` (a `PagedMixture` over `store_dir`); returns the files written
    (relative to `out`) and the trunk's manifest entry."""
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
    files.append(save_gate(out / GATE_FILE, model, trunk.fingerprint, architecture).name)
    if trunk_mode == "copy":
        files += copy_trunk(trunk, out)
    return files, trunk_entry


def write_bundle_manifest(
    out: Path,
    files: list[str],
    model: Any,
    trunk_entry: dict[str, Any],
    dtype: str,
    oos: dict[str, Any],
    gate: Any,
    unsure_margin: float,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest over `files` (`model`: the `PagedMixture` bundled, `gate`: its `GateSettings`): versions, trunk,
    gate settings (top-k, where routing rows come from, the out-of-scope rule `oos`, the gate-logit margin within
    which answers list runners-up), every expert with its file's sha256, the label maps, and `extra` entries
    (evaluation, precision, config)."""
    manifest = {
        "package_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype,
        "trunk": trunk_entry,
        "gate": {
            "file": GATE_FILE,
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
