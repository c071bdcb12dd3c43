"""The serving bundle: a folder with a manifest that lists, with the sha256 of its bytes, every file it needs.

    manifest.json                     format, versions, trunk identity, gate settings, experts, label maps, config
    gate.safetensors                  the gate of the bundled experts (their rows, in manifest order, and top-k)
    experts/<tenant>/v0001.safetensors  one shard per expert (`moe.store` format)
    trunk/...                         the trunk's weights, when copied (else the manifest references a package)

`read_bundle` checks the manifest's own checksum and then every listed file before anything is used: one altered
byte anywhere is refused with an error naming the file. A file under `experts/` or `trunk/` that the manifest
does not list is refused too (the store would otherwise serve an unlisted shard version). `open_bundle` then
rebuilds its trunk (refused unless the fingerprint matches) and its mixture (`load_mixture`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.inference.answers import UNSURE_MARGIN
from moe.inference.build import GateSettings, Verify, load_mixture
from moe.inference.index import IndexSettings
from moe.inference.paged import PagedMixture
from moe.model import check_choice
from moe.paths import file_sha256
from moe.store import is_url, mirror_bundle
from moe.trunk import TRUNK_KINDS, Trunk

FORMAT = "moe.bundle/2"  # 2: the gate's `source` ("trained" | "statistics") replaced `routing` ("rows" | "stats")
MANIFEST = "manifest.json"
CHECKED_FOLDERS = ("experts", "trunk")


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


def read_bundle(root: str | Path, verify: Verify = "full") -> Bundle:
    """Read and verify a bundle: the manifest's checksum, then every listed file's sha256, then that no
    unlisted file hides under the checked folders. A URL (`s3://bucket/bundle`) is mirrored into the local cache
    first (`moe.store.mirror_bundle`), then read from there like any folder. `verify="lazy"` leaves the experts'
    shards unread (not the bridges beside them): their own checksums are verified when each is first paged in
    (`load_mixture`), which proves a shard intact but not that it is the very file the manifest lists."""
    check_choice(verify, Verify, "verify")
    root = mirror_bundle(str(root)) if is_url(root) else Path(root)
    manifest = _read_manifest(root)
    listed: dict[str, str] = manifest["files"]
    for name, expected in sorted(listed.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(path, "listed path leaves the bundle folder")
        if not path.is_file():
            raise BundleError(path, "listed in the manifest but missing")
        if verify == "lazy" and is_shard(name):  # bridges and trunk versions hold no checksum of their own
            continue
        if (actual := file_sha256(path)) != expected:
            raise BundleError(
                path, f"sha256 mismatch: the file hashes to {actual[:12]}…, the manifest lists {expected[:12]}…"
            )
    for folder in CHECKED_FOLDERS:
        for path in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else ():
            if path.is_file() and path.relative_to(root).as_posix() not in listed:
                raise BundleError(path, "not listed in the manifest (an unlisted file is never used)")
    for entry in manifest["experts"]:
        if entry.get("file") not in listed or entry.get("sha256") != listed[entry["file"]]:
            raise BundleError(root / MANIFEST, f"expert {entry.get('tenant')!r}: file not listed or checksum differs")
    return Bundle(root, manifest)


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
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle, verify)
    trunk = build_trunk(bundle, device)
    gate = bundle.manifest["gate"]
    settings = GateSettings(
        int(gate["top_k"]),
        bool(gate["normalize_weights"]),
        gate["source"],
        float(gate["shrinkage"]),
        float(gate.get("own_covariance", 0.0)),  # bundles made before it: the linear gate
    )
    model = load_mixture(
        bundle.path("experts"),
        bundle.tenants,
        settings,
        trunk.fingerprint,
        device,
        budget_bytes,
        host_budget_bytes,
        verify=verify,
        index=index,
        trunk=trunk,
    )
    served = {info.tenant: list(info.labels) for info in model.experts}
    if served != {t: list(labels) for t, labels in bundle.manifest["label_maps"].items()}:
        raise BundleError(bundle.path(MANIFEST), "label maps differ from the bundled experts' labels")
    oos = gate.get("oos") or {}
    unsure_margin = float(gate.get("unsure_margin", UNSURE_MARGIN))  # bundles made before it: the default
    return OpenBundle(bundle, trunk, model, oos.get("score", "max_score"), oos.get("threshold"), unsure_margin)
