"""ExpertStore: a folder of expert shards, `<root>/<tenant>/v0001.safetensors`, one file per version."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moe.store.shard import ExpertMeta, read_shard, write_shard

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION = re.compile(r"^v(\d+)\.safetensors$")


def check_tenant_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"tenant name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
    return name


class ExpertStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, tenant: str, version: int) -> Path:
        return self.root / check_tenant_name(tenant) / f"v{version:04d}.safetensors"

    def tenants(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, tenant: str) -> list[int]:
        folder = self.root / check_tenant_name(tenant)
        found = (_VERSION.match(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self, tenant: str) -> int:
        if not (versions := self.versions(tenant)):
            raise KeyError(f"unknown tenant {tenant!r} in expert store {self.root}; known: {self.tenants()}")
        return versions[-1]

    def save(self, tensors: dict[str, torch.Tensor], meta: ExpertMeta) -> Path:
        """Write `meta.tenant`'s next version (the version in `meta` is replaced)."""
        versions = self.versions(meta.tenant)
        version = versions[-1] + 1 if versions else 1
        return write_shard(self.path(meta.tenant, version), tensors, meta.with_version(version))

    def load(
        self, tenant: str, version: int | None = None, trunk_fingerprint: str | None = None
    ) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
        version = self.latest(tenant) if version is None else version
        return read_shard(self.path(tenant, version), trunk_fingerprint)
