"""Trunk versions from a composed config: `moe.tasks.adapt_trunk.run` (conf/adapt_trunk.yaml) trains a new version
from the store's current one on its awake tenants' files; `run` here (conf/upgrade.yaml) moves the store onto it.

Both read the files of the tenants they name that are awake, and nothing else: an entry naming a hibernating
tenant is skipped before its file is opened (its data is gone, or must stay unread).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moe.data import Tenant
from moe.data.files import TenantFile, read_examples, read_tenant_file
from moe.lifecycle.operations import Lifecycle
from moe.lifecycle.upgrade import upgrade_store
from moe.store import ExpertStore, TrunkVersions
from moe.tasks.lifecycle import current_trunk, growth_config, open_store

log = logging.getLogger(__name__)


def awake_tenants(store: ExpertStore, entries) -> list[Tenant]:
    """The tenants of `entries` (conf `tenants`: name, files, columns) that are awake in the store, read whole; an
    entry of a hibernating tenant is skipped unopened, one the store does not know is an error."""
    files = [TenantFile.from_entry(OmegaConf.to_container(e) if isinstance(e, DictConfig) else e) for e in entries]
    known, dormant = set(store.tenants(dormant=True)), set(store.dormant())
    if unknown := sorted(f.name for f in files if f.name not in known):
        raise KeyError(f"tenants {unknown} have no expert in {store.root}; known: {sorted(known)}")
    tenants = []
    for entry in files:
        if entry.name in dormant:
            log.warning("%s is hibernating: its files are not read (it is kept through its shard)", entry.name)
            continue
        tenants.append(
            read_tenant_file(entry.name, entry.files, entry.text_column, entry.label_column, entry.split_column)
        )
    return tenants


def calibration_texts(cfg: DictConfig) -> list[str]:
    """Unlabeled calibration texts: one per line of each `.txt` file, or the `text_column` of a CSV/JSONL file."""
    texts: list[str] = []
    for path in cfg.files or []:
        path = Path(path)
        if path.suffix.lower() == ".txt":
            texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            rows = read_examples(path, cfg.text_column, cfg.text_column, None)  # the text column read as its own label
            texts += [example.text for _, _, example in rows]
    return texts


def resolve_version(versions: TrunkVersions, wanted: str, current: str) -> str:
    """A recorded fingerprint from a prefix, or `latest`: the newest recorded descendant of `current` (a version
    adapted from it, or from one adapted from it...), never an older one."""
    recorded = versions.fingerprints()
    if wanted == "latest":
        newer = [f for f in recorded if versions.descends_from(f, current)]
        if not newer:
            raise KeyError(f"{versions.root} records no trunk version adapted from the current one {current[:12]}…")
        return newer[-1]
    matches = [f for f in recorded if f.startswith(str(wanted))]
    if len(matches) != 1:
        raise KeyError(f"trunk version {wanted!r} matches {len(matches)} of the recorded {versions.short_list()}")
    return matches[0]


def run(cfg: DictConfig) -> dict:
    """`store_dir` moved onto trunk version `to`, by `strategy`; the report is written to the output folder."""
    store = open_store(cfg)
    old_trunk = current_trunk(store, cfg.trunk)
    versions = TrunkVersions(store.root)
    new = resolve_version(versions, str(cfg.to), old_trunk.fingerprint)
    tenants = awake_tenants(store, cfg.tenants or [])
    lifecycle = Lifecycle(store, (new_trunk := versions.rebuild(new)), new_trunk.encode, growth_config(cfg))
    report = upgrade_store(lifecycle, old_trunk, tenants, cfg.strategy, calibration_texts(cfg.calibration))
    summary = {"old": report.old, "new": report.new, "strategy": report.strategy, "bridge": report.bridge}
    summary |= {"tenants": report.tenants, "seconds": report.seconds}
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upgrade.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("upgraded %s to trunk %s…: %s", store.root, new[:12], report.tenants)
    return summary
