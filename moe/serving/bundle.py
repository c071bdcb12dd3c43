"""The serving bundle: a folder with a manifest that lists, with the sha256 of its bytes, every file it needs.

    manifest.json                     format, versions, trunk identity, gate settings, experts, label maps, config
    gate.safetensors                  the gate of the bundled experts (their rows, in manifest order, and top-k)
    experts/<tenant>/v0001.safetensors  one shard per expert (`moe.store` format)
    trunk/...                         the trunk's weights, when copied (else the manifest references a package)

`read_bundle` checks the manifest's own checksum and then every listed file before anything is used: one altered
byte anywhere is refused with an error naming the file. A file under `experts/` or `trunk/` that the manifest
does not list is refused too (the store would otherwise serve an unlisted shard version).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "moe.bundle/1"
MANIFEST = "manifest.json"
CHECKED_FOLDERS = ("experts", "trunk")


class BundleError(ValueError):
    """A bundle that can not be trusted or used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"bundle file {path}: {reason}")
        self.path, self.reason = str(path), reason


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        raise BundleError(path, f"format {found!r} is not {FORMAT!r}")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise BundleError(path, "manifest checksum mismatch: the manifest was altered or corrupted")
    for key in ("files", "experts", "trunk", "gate"):
        if key not in manifest:
            raise BundleError(path, f"manifest lacks {key!r}")
    return manifest


def read_bundle(root: str | Path) -> Bundle:
    """Read and verify a bundle: the manifest's checksum, then every listed file's sha256, then that no
    unlisted file hides under the checked folders."""
    root = Path(root)
    manifest = _read_manifest(root)
    listed: dict[str, str] = manifest["files"]
    for name, expected in sorted(listed.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(path, "listed path leaves the bundle folder")
        if not path.is_file():
            raise BundleError(path, "listed in the manifest but missing")
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
