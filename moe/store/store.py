"""ExpertStore: a folder of expert shards, one file per version, its state held in file names alone.

    <root>/<tenant>/v0003.safetensors          a live version (the highest live one is the latest)
    <root>/<tenant>/v0002.retired.safetensors  a retired version: kept, never loaded
    <root>/<tenant>/.v0004.safetensors.<pid>.tmp  a write in flight (or killed): invisible to readers
    <root>/<tenant>/DORMANT                    the tenant is hibernating: kept, not routed to until woken

Every change is one atomic rename, so a process killed at any point leaves a consistent store.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.store.shard import ExpertMeta, ShardError, read_meta, read_shard, write_shard

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE = re.compile(r"^v(\d+)(\.retired)?\.safetensors$")


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"tenant name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
    return name


@dataclass(frozen=True)
class ShardRecord:
    tenant: str
    version: int
    retired: bool
    path: Path
    size: int


class ExpertStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, tenant: str, version: int, retired: bool = False) -> Path:
        suffix = ".retired.safetensors" if retired else ".safetensors"
        return self.root / check_tenant_name(tenant) / f"v{version:04d}{suffix}"

    def records(self, tenant: str | None = None) -> list[ShardRecord]:
        """Every version of every tenant (or of one), live and retired, sorted by tenant and version."""
        folders = [self.root / check_tenant_name(tenant)] if tenant else sorted(self.root.glob("*/"))
        found = []
        for folder in folders:
            for path in folder.glob("v*.safetensors") if folder.is_dir() else ():
                if match := _FILE.match(path.name):
                    found.append(ShardRecord(folder.name, int(match[1]), bool(match[2]), path, path.stat().st_size))
        return sorted(found, key=lambda r: (r.tenant, r.version))

    def tenants(self, dormant: bool = False) -> list[str]:
        """Tenants with at least one live version: the awake ones, or also the hibernating ones."""
        live = {r.tenant for r in self.records() if not r.retired}
        return sorted(t for t in live if dormant or not self.is_dormant(t))

    def is_dormant(self, tenant: str) -> bool:
        return (self.root / check_tenant_name(tenant) / "DORMANT").is_file()

    def hibernate(self, tenant: str) -> None:
        """Mark a tenant dormant: its shards stay as they are; mixtures built from the store leave it out."""
        self.latest(tenant)  # an unknown tenant is an error, not a new folder
        marker = self.root / tenant / "DORMANT"
        tmp = marker.with_name(f".DORMANT.{os.getpid()}.tmp")
        tmp.write_text("hibernating\n")
        os.replace(tmp, marker)

    def wake(self, tenant: str) -> None:
        if not self.is_dormant(tenant):
            raise KeyError(f"tenant {tenant!r} is not hibernating in {self.root}; dormant: {self.dormant()}")
        (self.root / tenant / "DORMANT").unlink()

    def dormant(self) -> list[str]:
        return [t for t in self.tenants(dormant=True) if self.is_dormant(t)]

    def versions(self, tenant: str) -> list[int]:
        """Live versions of a tenant, oldest first."""
        return [r.version for r in self.records(tenant) if not r.retired]

    def latest(self, tenant: str) -> int:
        if not (versions := self.versions(tenant)):
            raise KeyError(
                f"unknown tenant {tenant!r} in expert store {self.root}; known: {self.tenants(dormant=True)}"
            )
        return versions[-1]

    def save(self, tensors: dict[str, torch.Tensor], meta: ExpertMeta) -> Path:
        """Write `meta.tenant`'s next version (after every live or retired one; the version in `meta` is replaced)."""
        taken = [r.version for r in self.records(meta.tenant)]
        version = max(taken, default=0) + 1
        return write_shard(self.path(meta.tenant, version), tensors, meta.with_version(version))

    def load(
        self, tenant: str, version: int | None = None, trunk_fingerprint: str | None = None
    ) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
        version = self.latest(tenant) if version is None else version
        if version not in self.versions(tenant):
            raise KeyError(f"tenant {tenant!r} has no live version {version}; live: {self.versions(tenant)}")
        return read_shard(self.path(tenant, version), trunk_fingerprint)

    def load_latest(
        self, tenants: list[str] | None = None, trunk_fingerprint: str | None = None
    ) -> tuple[dict[str, tuple[dict[str, torch.Tensor], ExpertMeta]], dict[str, Exception]]:
        """The latest version of each tenant; a bad shard is reported in the second dict, never raised, so that
        it can not stop the others from loading."""
        loaded, failed = {}, {}
        for tenant in tenants if tenants is not None else self.tenants():
            try:
                loaded[tenant] = self.load(tenant, trunk_fingerprint=trunk_fingerprint)
            except (ShardError, KeyError, ValueError) as error:
                log.warning("expert %s not loaded: %s", tenant, error)
                failed[tenant] = error
        return loaded, failed

    def meta(self, tenant: str, version: int | None = None) -> ExpertMeta:
        """A version's metadata from its header alone (no tensors read, no checksum)."""
        version = self.latest(tenant) if version is None else version
        return read_meta(self.path(tenant, version))[0]

    def retire(self, tenant: str, version: int | None = None) -> Path:
        """Take a version (default: the latest) out of use; the file stays, renamed, and can be restored."""
        version = self.latest(tenant) if version is None else version
        if version not in self.versions(tenant):
            raise KeyError(f"tenant {tenant!r} has no live version {version}")
        target = self.path(tenant, version, retired=True)
        os.replace(self.path(tenant, version), target)
        return target

    def restore(self, tenant: str, version: int) -> Path:
        source = self.path(tenant, version, retired=True)
        if not source.is_file():
            raise KeyError(f"tenant {tenant!r} has no retired version {version}")
        os.replace(source, self.path(tenant, version))
        return self.path(tenant, version)

    def rollback(self, tenant: str, version: int) -> list[int]:
        """Make `version` the latest again by retiring every live version after it; returns those retired."""
        if version not in self.versions(tenant):
            raise KeyError(f"tenant {tenant!r} has no live version {version} to roll back to")
        newer = [v for v in self.versions(tenant) if v > version]
        for v in reversed(newer):
            self.retire(tenant, v)
        return newer

    def archive(self, tenant: str, destination: str | Path) -> Path:
        """Move every file of a tenant (live and retired) out of the store into `destination/<tenant>`."""
        if not self.records(tenant):
            raise KeyError(f"unknown tenant {tenant!r} in expert store {self.root}")
        target = Path(destination) / check_tenant_name(tenant)
        if target.exists():
            raise FileExistsError(f"{target} exists; refusing to overwrite an archive")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.root / tenant), str(target))
        return target

    def delete(self, tenant: str) -> None:
        """Remove a tenant and all its versions from disk."""
        if not self.records(tenant):
            raise KeyError(f"unknown tenant {tenant!r} in expert store {self.root}")
        shutil.rmtree(self.root / check_tenant_name(tenant))
