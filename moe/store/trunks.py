"""The trunk versions a store's experts were trained on, the one it serves on now, and the bridges between them.

    <root>/.trunks/<fingerprint[:32]>/version.json   what rebuilds the version: kind, init arguments, and a reference
                                                     (a package and version, or a seed) or its saved weights
    <root>/.trunks/<fingerprint[:32]>/weights/       its weights as safetensors, when nothing else rebuilds it
    <root>/.trunks/CURRENT                           the fingerprint queries are encoded with and new experts trained on
    <root>/.bridges/<old[:32]>-<new[:32]>.safetensors   a bridge from an old version's features to a new one's

A store describes its own trunk: training records it and makes it `CURRENT`, growth records the trunk it trains on,
an upgrade records both versions and moves `CURRENT`; `serving_trunk` rebuilds it from the store alone. Every file is
written whole or not at all (a temporary name, then a rename), and a rebuilt trunk is refused unless its fingerprint
is the recorded one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from moe.model.bridge import Bridge
from moe.store.shard import ShardError, read_tensors, save_atomically

if TYPE_CHECKING:
    from moe.trunk import Trunk

TRUNKS, BRIDGES = ".trunks", ".bridges"  # the store's folders of trunk versions and of bridges
VERSION_FORMAT = "moe.trunk_version/1"
BRIDGE_FORMAT = "moe.bridge/1"


def _short(fingerprint: str) -> str:
    return fingerprint[:32]


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rebuilt(entry: dict, folder: Path | None) -> Trunk:
    """The trunk a version record describes, from its saved weights (`folder`) or its reference."""
    from moe.trunk import TRUNK_KINDS  # here: reading a store needs no transformers

    if entry["kind"] not in TRUNK_KINDS:
        raise ValueError(
            f"trunk {entry['fingerprint'][:12]}…: unknown kind {entry['kind']!r}; known: {sorted(TRUNK_KINDS)}"
        )
    return TRUNK_KINDS[entry["kind"]].rebuild(entry["init"], folder, entry.get("reference"))


def serving_trunk(root: str | Path, unrecorded: Callable[[], tuple[Trunk, bool]]) -> tuple[Trunk, bool]:
    """The trunk the store at `root` serves on, rebuilt from the store alone (`TrunkVersions.serving`, checked against
    its fingerprint, frozen), and whether it was trained (its weights are kept in the store: no package rebuilds it).
    A store that records no trunk gets `unrecorded()`'s: a new store (the configured trunk), or one trained before
    training recorded its trunk (the old format, whose trunk only the run's config.yaml names)."""
    versions = TrunkVersions(root)
    if (fingerprint := versions.serving()) is None:
        return unrecorded()
    return versions.rebuild(fingerprint), bool(versions.describe(fingerprint).get("weights"))


class TrunkVersions:
    """The trunk versions and bridges of the store at `root` (its `.trunks/` and `.bridges/` folders)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.folder, self.bridges_folder = self.root / TRUNKS, self.root / BRIDGES

    # -- versions --------------------------------------------------------------------------------------------

    def has(self, fingerprint: str) -> bool:
        return (self.folder / _short(fingerprint) / "version.json").is_file()

    def record(self, trunk: Trunk, parent: str | None = None, note: str = "", weights: bool = False) -> dict:
        """Record `trunk` (once: a version recorded already is left as it is). `weights`: save its weights in the
        store (a trunk that was trained: nothing else rebuilds it), else record its reference, checked first by
        rebuilding from it (a trained copy of a packaged trunk has its weights saved instead)."""
        if self.has(trunk.fingerprint):
            return self.describe(trunk.fingerprint)
        entry: dict[str, Any] = {
            "format": VERSION_FORMAT,
            "fingerprint": trunk.fingerprint,
            "kind": trunk.kind,
            "config": trunk.config(),
            "init": trunk.init_arguments(),
            "parent": parent,
            "note": note,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        folder = self.folder / _short(trunk.fingerprint)
        if not weights:  # a reference is kept only if it rebuilds this very trunk (a trained copy's would not)
            entry["reference"] = trunk.reference()
            if weights := _rebuilt(entry, None).fingerprint != trunk.fingerprint:
                del entry["reference"]
        if weights:
            staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
            trunk.save_weights(staging / "weights")
            entry["weights"] = "weights"
            _write_text(staging / "version.json", json.dumps(entry, indent=1) + "\n")
            os.replace(staging, folder)  # the whole version appears at once
        else:
            _write_text(folder / "version.json", json.dumps(entry, indent=1) + "\n")
        return entry

    def describe(self, fingerprint: str) -> dict:
        path = self.folder / _short(fingerprint) / "version.json"
        if not path.is_file():
            raise KeyError(f"trunk {fingerprint[:12]}… is not recorded in {self.root} (recorded: {self.short_list()})")
        entry = json.loads(path.read_text())
        if entry.get("format") != VERSION_FORMAT or entry.get("fingerprint", "")[:32] != _short(fingerprint):
            raise ValueError(f"{path}: not a trunk version record of {fingerprint[:12]}…")
        return entry

    def fingerprints(self) -> list[str]:
        """Every recorded version, oldest first."""
        entries = [json.loads(p.read_text()) for p in self.folder.glob("[!.]*/version.json")]  # not a staging folder
        return [e["fingerprint"] for e in sorted(entries, key=lambda e: (e["created"], e["fingerprint"]))]

    def descends_from(self, fingerprint: str, ancestor: str) -> bool:
        """Whether `fingerprint` was adapted from `ancestor`, directly or through recorded versions in between."""
        seen = set()
        while (parent := self.describe(fingerprint).get("parent")) and parent not in seen:
            if parent == ancestor:
                return True
            seen.add(fingerprint := parent)
            if not self.has(parent):
                return False
        return False

    def short_list(self) -> list[str]:
        return [f[:12] for f in self.fingerprints()]

    def rebuild(self, fingerprint: str) -> Trunk:
        """The recorded version, frozen; refused unless it has the recorded fingerprint."""
        entry = self.describe(fingerprint)
        folder = self.folder / _short(fingerprint) / entry["weights"] if entry.get("weights") else None
        trunk = _rebuilt(entry, folder)
        if trunk.fingerprint != entry["fingerprint"]:
            raise ValueError(
                f"trunk version {fingerprint[:12]}… of {self.root} rebuilds with fingerprint {trunk.fingerprint[:12]}…"
                " (its weights or reference changed)"
            )
        return trunk

    def current(self) -> str | None:
        """The fingerprint the store serves on, if one was set (`set_current`)."""
        path = self.folder / "CURRENT"
        return path.read_text().strip() if path.is_file() else None

    def set_current(self, fingerprint: str) -> None:
        self.describe(fingerprint)  # only a recorded version
        _write_text(self.folder / "CURRENT", fingerprint + "\n")

    def serving(self) -> str | None:
        """The version the store serves on: `current()` when set (by training or an upgrade), else its one recorded
        version not adapted from another (a store the lifecycle grew records the trunk it trained on, and an adapted
        version is not served before an upgrade moves the store onto it); None when it records none."""
        if (current := self.current()) is not None:
            return current
        roots = [f for f in self.fingerprints() if not self.describe(f).get("parent")]
        if len(roots) > 1:
            raise ValueError(f"{self.root} records trunks {[f[:12] for f in roots]} and serves on none (no CURRENT)")
        return roots[0] if roots else None

    # -- bridges ---------------------------------------------------------------------------------------------

    def bridge_path(self, old: str, new: str) -> Path:
        return self.bridges_folder / f"{_short(old)}-{_short(new)}.safetensors"

    def save_bridge(self, bridge: Bridge) -> Path:
        metadata = {"format": BRIDGE_FORMAT, "old": bridge.old, "new": bridge.new, "info": json.dumps(bridge.info)}
        return save_atomically(self.bridge_path(bridge.old, bridge.new), bridge.tensors(), metadata)

    def bridge(self, old: str, new: str) -> Bridge | None:
        """The bridge from trunk `old`'s features to trunk `new`'s, or None when the store has none."""
        path = self.bridge_path(old, new)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = read_tensors(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"bridge {path}: unreadable ({error})") from None
        if meta.get("format") != BRIDGE_FORMAT or (meta.get("old"), meta.get("new")) != (old, new):
            raise ValueError(f"bridge {path}: not a bridge from trunk {old[:12]}… to {new[:12]}…")
        if sorted(tensors) != sorted(Bridge.TENSORS):
            raise ValueError(f"bridge {path}: tensors {sorted(tensors)}, expected {sorted(Bridge.TENSORS)}")
        return Bridge.from_tensors(old, new, tensors, json.loads(meta.get("info", "{}")))

    def require_bridge(self, old: str, new: str, shard: str | Path) -> Bridge:
        """The bridge for an expert (`shard`) trained on trunk `old` to run on trunk `new`, else a ShardError naming
        both fingerprints."""
        bridge = self.bridge(old, new)
        if bridge is None:
            raise ShardError(
                shard,
                f"trained on trunk {old[:12]}…, not on this model's trunk {new[:12]}…, and {self.root} holds no bridge"
                " from one to the other and no version of this expert transported to the new one (scripts/upgrade.py"
                " makes them)",
            )
        return bridge

    def bridge_files(self) -> list[Path]:
        return sorted(self.bridges_folder.glob("*.safetensors"))
