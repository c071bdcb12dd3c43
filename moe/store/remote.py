"""An expert store (and a bundle) on object storage: any fsspec URL (`s3://bucket/prefix`), the local disk a cache.

The objects are laid out as a local store's files (`ExpertStore`), keys for paths:

    <prefix>/<tenant>/v0003.safetensors          a live version
    <prefix>/<tenant>/v0002.retired.safetensors  a retired version
    <prefix>/<tenant>/DORMANT                    the tenant is hibernating
    <prefix>/.retired/<tenant>                   a retired tenant's tombstone

and any other key (a `.v0004.safetensors.<pid>.tmp` copied from a local store, a folder that can not name a tenant)
is ignored. A `RemoteStore` is an `ExpertStore` over its local cache folder: listings come from the bucket, and
`path` hands out a local copy, downloaded on first use to a hidden name, verified there in full (`read_shard`, and
the store's rule that a shard is its folder's tenant's) and only then renamed into place: the cache never holds a
half-downloaded or unverified shard, and a bad object is refused with its URL named. Everything else (trunk
fingerprint, `check_shard`, `load_mixture`) reads the local copy as it reads a local store. The cache keeps its
shards under a byte budget of its own, evicting the least recently used (a shard evicted is downloaded again when
asked for).

Writes: a version is written locally (`write_shard`), then uploaded in one PUT (or one multipart upload, for files
over s3fs's chunk size) with `If-None-Match: *`. S3 makes an object visible only when its PUT (or its multipart
upload) completes, whole, so a failed or killed upload leaves no key behind, never part of one; and the condition
refuses a version that another writer (another machine, which this machine's lock does not reach) took
meanwhile, instead of overwriting it. Retiring a version is a copy and a delete (S3 has no rename): a writer killed
between the two leaves the version live, beside a retired copy. Archive and delete are not supported remotely.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from botocore.exceptions import BotoCoreError
from filelock import FileLock
from fsspec.exceptions import FSTimeoutError

from moe.paths import cache_dir as user_cache_dir
from moe.paths import file_sha256
from moe.store.bundle import MANIFEST
from moe.store.generation import Generations, RemoteFiles, TenantState
from moe.store.shard import ExpertMeta, Packed, ShardError, meta_from_strings, read_shard, read_tensors, write_shard
from moe.store.store import _FILE, _OWN, ExpertStore, ShardRecord, check_tenant_name

log = logging.getLogger(__name__)

CACHE_BUDGET = 4 << 30  # bytes of shards a remote store keeps on local disk by default
DORMANT = "DORMANT"
_PART = ".part"  # suffix of a download in flight (or killed) in the cache: never a shard's name
HEADER_READ = 64 << 10  # bytes of an object read first for its header (a shard's is a few KiB; more is read if not)
MAX_HEADER = 100 << 20  # a larger header length is not a safetensors file's (safetensors refuses them too)


# Remote faults are bounded in time and named: a connection is given CONNECT_TIMEOUT_S, a read READ_TIMEOUT_S, and
# botocore tries a request ATTEMPTS times in all ("standard" retry mode: exponential backoff with jitter) before the
# error reaches the store, which names the object's URL in a ShardError (`remote_errors`); s3fs's own retries of
# read errors stay at its default. A caller's own `config_kwargs` win over these.
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS = 3.0, 30.0, 2
S3_CONFIG = {  # `total_max_attempts` counts the first try (botocore's `max_attempts` counts retries only)
    "connect_timeout": CONNECT_TIMEOUT_S,
    "read_timeout": READ_TIMEOUT_S,
    "retries": {"total_max_attempts": ATTEMPTS, "mode": "standard"},
}


def bounded_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """fsspec `options` for `url` with this module's timeouts and retry policy where it is S3's and the caller set
    none."""
    if not url.startswith(("s3://", "s3a://")):
        return options
    ours = S3_CONFIG | {"retries": dict(S3_CONFIG["retries"])}  # a copy each: botocore rewrites `retries` in place
    return options | {"config_kwargs": ours | dict(options.get("config_kwargs") or {})}


@contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """A vanished object, a refused connection or a timeout met inside, as a ShardError naming `url` (the store's
    loaders and `load_mixture(skip_failed=True)` then leave that tenant out, named). FileExistsError (a conditional
    write refused) and ShardError pass through."""
    try:
        yield
    except (ShardError, FileExistsError):
        raise
    except FileNotFoundError:
        raise ShardError(url, "no such object (removed meanwhile, e.g. retired by another machine)") from None
    except (OSError, BotoCoreError, asyncio.TimeoutError, FSTimeoutError) as error:
        raise ShardError(url, f"unreachable ({type(error).__name__}: {error})") from None


def is_url(location: str | Path) -> bool:
    """Whether `location` names an fsspec URL (`s3://...`) rather than a local path."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def open_store(
    location: str | Path, cache_dir: str | Path | None = None, cache_budget_bytes: int = CACHE_BUDGET, **options: Any
) -> ExpertStore:
    """The expert store at `location`: a `RemoteStore` for a URL with a scheme (`s3://bucket/prefix`; `options`
    go to fsspec, e.g. `endpoint_url`), else a local `ExpertStore`."""
    if is_url(location):
        return RemoteStore(str(location), cache_dir, cache_budget_bytes, **options)
    return ExpertStore(str(location).removeprefix("file://"))


def _default_cache(url: str, kind: str) -> Path:
    return user_cache_dir() / kind / hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Listing:
    records: list[ShardRecord]
    dormant: set[str]


class RemoteStore(ExpertStore):
    """An expert store at an fsspec URL, read through a local cache folder (`root`) of at most
    `cache_budget_bytes` of shards."""

    def __init__(
        self,
        url: str,
        cache_dir: str | Path | None = None,
        cache_budget_bytes: int = CACHE_BUDGET,
        **options: Any,
    ):
        self.url = url.rstrip("/")
        super().__init__(Path(cache_dir) if cache_dir is not None else _default_cache(self.url, "stores"))
        self.fs, self.prefix = fsspec.core.url_to_fs(self.url, **bounded_options(self.url, options))
        self.prefix = self.prefix.rstrip("/")
        self.cache_budget_bytes = cache_budget_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache_lock = FileLock(self.root / ".cache.lock")

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, cache {self.root})"

    @property
    def generations(self) -> Generations:
        """The generation files in the bucket; the lock in the cache folder (one machine's writers; across
        machines, the exclusive PUT of each state refuses a number taken)."""
        return Generations(RemoteFiles(self.fs, self.prefix, self.url), self.root / ".locks")

    def generation(self) -> int:
        with remote_errors(self.url):
            return super().generation()

    def state(self):
        with remote_errors(self.url):
            return super().state()

    def _scan(self) -> dict[str, TenantState]:
        listing = self._list()  # one listing, not one request per tenant
        live: dict[str, int] = {}
        for record in listing.records:
            if not record.retired:
                live[record.tenant] = max(live.get(record.tenant, 0), record.version)
        return {t: TenantState(v, t in listing.dormant) for t, v in sorted(live.items())}

    # -- names: a local path in the cache <-> an object's key and URL --------------------------------------

    def key(self, local: Path) -> str:
        return f"{self.prefix}/{local.relative_to(self.root).as_posix()}"

    def object_url(self, local: Path) -> str:
        return f"{self.url}/{local.relative_to(self.root).as_posix()}"

    # -- reading: listings from the bucket, shards from the cache -----------------------------------------

    def _list(self, tenant: str | None = None) -> _Listing:
        """One listing of the store's keys (or of one tenant's), fresh from the bucket."""
        base = self.prefix if tenant is None else f"{self.prefix}/{check_tenant_name(tenant)}"
        self.fs.invalidate_cache()
        try:
            with remote_errors(f"{self.url}/{tenant}" if tenant else self.url):
                try:
                    found = self.fs.find(base, detail=True)
                except FileNotFoundError:
                    found = {}
        except ShardError as error:  # not one tenant's fault: the store's listing itself failed
            raise ShardError(error.path, f"listing failed: {error.reason}") from None
        records, dormant, skipped = [], set(), set()
        for key, info in found.items():
            parts = PurePosixPath(key).relative_to(self.prefix).parts
            if len(parts) != 2 or parts[0] in _OWN:
                continue
            folder, name = parts
            try:
                check_tenant_name(folder)
            except ValueError as error:
                skipped.add((folder, str(error)))
                continue
            if name == DORMANT:
                dormant.add(folder)
            elif match := _FILE.fullmatch(name):
                path = self.root / folder / name
                records.append(ShardRecord(folder, int(match[1]), bool(match[2]), path, int(info["size"])))
        for folder, reason in sorted(skipped):
            log.warning("expert store %s: folder %r skipped, it is no tenant's: %s", self.url, folder, reason)
        return _Listing(sorted(records, key=lambda r: (r.tenant, r.version)), dormant)

    def records(self, tenant: str | None = None) -> list[ShardRecord]:
        return self._list(tenant).records

    def _tenant_folders(self) -> list[Path]:
        return [self.root / t for t in sorted({r.tenant for r in self.records()})]

    def _has_folder(self, tenant: str) -> bool:
        return bool(self.records(tenant)) or self.is_dormant(tenant)

    def tenants(self, dormant: bool = False) -> list[str]:
        if self.pinned is not None:
            return super().tenants(dormant)
        listing = self._list()  # one listing, not one request per tenant
        live = {r.tenant for r in listing.records if not r.retired}
        return sorted(t for t in live if dormant or t not in listing.dormant)

    def is_dormant(self, tenant: str) -> bool:
        if self.pinned is not None:
            return super().is_dormant(tenant)
        with remote_errors(f"{self.url}/{tenant}/{DORMANT}"):
            return self.fs.exists(f"{self.prefix}/{check_tenant_name(tenant)}/{DORMANT}")

    def retired(self, tenant: str) -> str | None:
        tombstone = f"{self.prefix}/.retired/{check_tenant_name(tenant)}"
        try:
            return self.fs.cat_file(tombstone).decode().strip()
        except FileNotFoundError:
            return None

    def _folder_names(self) -> list[str]:
        self.fs.invalidate_cache(self.prefix)
        try:
            return [key.rsplit("/", 1)[-1] for key in self.fs.ls(self.prefix, detail=False)]
        except FileNotFoundError:
            return []

    def meta(self, tenant: str, version: int | None = None) -> ExpertMeta:
        """A version's metadata from its header alone: the cached copy's, or a ranged read of the object's first
        bytes (the safetensors header), never a download of its tensors."""
        version = self.latest(tenant) if version is None else version
        local = super().path(tenant, version)  # the name alone: no download
        if local.is_file():
            return super().meta(tenant, version)
        url = self.object_url(local)
        try:
            with remote_errors(url):
                head = self.fs.cat_file(self.key(local), start=0, end=HEADER_READ)
            if len(head) < 8:
                raise ShardError(url, f"truncated: {len(head)} bytes, not a safetensors file")
            size = int.from_bytes(head[:8], "little")
            if size > MAX_HEADER:
                raise ShardError(url, f"header of {size} bytes: not a safetensors file")
            if 8 + size > len(head):
                with remote_errors(url):
                    head += self.fs.cat_file(self.key(local), start=len(head), end=8 + size)
            header = json.loads(head[8 : 8 + size])
            strings = header.get("__metadata__") or {}
            if len(head) < 8 + size or not isinstance(strings, dict):
                raise ValueError("header cut short or without metadata")
        except FileNotFoundError:
            raise ShardError(url, "no such object") from None
        except ShardError:
            raise
        except (UnicodeDecodeError, ValueError, AttributeError) as error:
            raise ShardError(url, f"truncated or not a safetensors file ({error})") from None
        try:
            return self.check_shard(local, meta_from_strings(url, strings)[0])
        except ShardError as error:
            raise ShardError(url, error.reason) from None

    def read_tensors(self, tenant: str, version: int, names: tuple[str, ...]) -> tuple[Path, Packed]:
        """The tensors `names` of a version: from its cached copy, or by ranged reads of the object (its header, then
        each tensor's bytes), never a download of the rest. The path is the copy's name, fetched only when asked for
        (`path`)."""
        local = super().path(tenant, version)  # the name alone: no download
        if local.is_file():
            return local, read_tensors(local, names)
        url = self.object_url(local)
        try:
            with remote_errors(url), self.fs.open(self.key(local), "rb", cache_type="none") as handle:
                return local, read_tensors(url, names, handle, handle.size)
        except FileNotFoundError:
            raise ShardError(url, "no such object") from None

    def path(self, tenant: str, version: int, retired: bool = False) -> Path:
        """A local copy of the version's object, downloaded and verified if the cache lacks it (a ShardError naming
        the object's URL if it is missing or fails a check)."""
        return self._fetch(super().path(tenant, version, retired))

    def _fetch(self, local: Path) -> Path:
        with self._cache_lock:
            try:
                _touch(local)
                return local
            except FileNotFoundError:
                pass
            url = self.object_url(local)
            with remote_errors(url):
                self.fs.invalidate_cache(self.key(local))  # a listing's cached entry says nothing of it now
                size = int(self.fs.info(self.key(local))["size"])
            if size > self.cache_budget_bytes:
                raise ShardError(url, f"{size} bytes do not fit the cache budget of {self.cache_budget_bytes} bytes")
            self._make_room(size)
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(f".{local.name}.{os.getpid()}{_PART}")
            try:
                with remote_errors(url):
                    self.fs.get_file(self.key(local), str(part))
                try:
                    self.check_shard(local, read_shard(part)[1])  # the trunk is the loader's to check
                except ShardError as error:
                    raise ShardError(url, error.reason) from None
                os.replace(part, local)
            finally:
                part.unlink(missing_ok=True)
            return local

    # -- the cache's byte budget ----------------------------------------------------------------------------

    def cached(self) -> Iterator[Path]:
        """The shards in the cache (downloads in flight and staged uploads excluded)."""
        for folder in self.root.iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                yield from (p for p in folder.iterdir() if _FILE.fullmatch(p.name))

    def cache_bytes(self) -> int:
        return sum(_size(p) for p in self.cached())

    def _make_room(self, incoming: int) -> None:
        """Evict the least recently used shards until `incoming` more bytes fit the budget (the caller holds the
        cache lock). A model still paging an evicted shard from its file needs it back through `path`."""
        stats = [(p, p.stat()) for p in self.cached()]
        total = sum(st.st_size for _, st in stats)
        for path, st in sorted(stats, key=lambda item: item[1].st_atime_ns):
            if total + incoming <= self.cache_budget_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st.st_size
            log.debug("cache of %s: evicted %s (%d bytes)", self.url, path, st.st_size)

    # -- writing ----------------------------------------------------------------------------------------------

    def _write_version(self, tenant: str, version: int, tensors: dict[str, torch.Tensor], meta: ExpertMeta) -> Path:
        """Write the shard locally, upload it whole under the condition that its key is free, then keep it in
        the cache."""
        local = super().path(tenant, version)
        staged = write_shard(self.root / ".uploads" / tenant / local.name, tensors, meta.with_version(version))
        try:
            try:
                self.fs.put_file(str(staged), self.key(local), mode="create")
            except FileExistsError:
                raise ValueError(
                    f"{self.object_url(local)} was written meanwhile by another writer: run it again"
                ) from None
            tombstone = f"{self.prefix}/.retired/{tenant}"
            if self.fs.exists(tombstone):
                self.fs.rm_file(tombstone)
            with self._cache_lock:
                if (size := _size(staged)) <= self.cache_budget_bytes:
                    self._make_room(size)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, local)
        finally:
            staged.unlink(missing_ok=True)
        return local

    def hibernate(self, tenant: str) -> None:
        with self._writing(tenant, "hibernate"):
            self.latest(tenant)  # an unknown tenant is an error, not a new folder
            self.fs.pipe_file(f"{self.prefix}/{tenant}/{DORMANT}", b"hibernating\n")

    def wake(self, tenant: str) -> None:
        with self._writing(tenant, "wake"):
            if not self.is_dormant(tenant):
                raise KeyError(f"tenant {tenant!r} is not hibernating in {self.url}; dormant: {self.dormant()}")
            self.fs.rm_file(f"{self.prefix}/{tenant}/{DORMANT}")

    def _move(self, source: Path, target: Path) -> None:
        """Copy then delete (no rename on object storage); the cached copy, if any, is renamed."""
        self.fs.copy(self.key(source), self.key(target))
        self.fs.rm_file(self.key(source))
        with self._cache_lock:
            if source.is_file():
                os.replace(source, target)

    def _retire(self, tenant: str, version: int) -> Path:
        if version not in self.versions(tenant):
            raise KeyError(f"tenant {tenant!r} has no live version {version}")
        target = super().path(tenant, version, retired=True)
        self._move(super().path(tenant, version), target)
        return target

    def restore(self, tenant: str, version: int) -> Path:
        with self._writing(tenant, "restore"):
            if not any(r.retired and r.version == version for r in self.records(tenant)):
                raise KeyError(f"tenant {tenant!r} has no retired version {version}")
            self._move(super().path(tenant, version, retired=True), live := super().path(tenant, version))
        return live

    def archive(self, tenant: str, destination: str | Path) -> Path:
        raise NotImplementedError(f"archive is not supported on object storage ({self.url}); retire its versions")

    def delete(self, tenant: str) -> None:
        raise NotImplementedError(f"delete is not supported on object storage ({self.url}); retire its versions")


def _touch(path: Path) -> None:
    """Mark a cached file used (its access time, the eviction order), leaving its modification time alone: the
    pager's `ShardLoader` tells a changed file by it."""
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- bundles ----------------------------------------------------------------------------------------------------


def mirror_bundle(url: str, cache_dir: str | Path | None = None, **options: Any) -> Path:
    """A local copy of the bundle folder at `url`, for `moe.store.bundle.read_bundle` (which verifies it again,
    manifest checksum included). Every file its manifest lists is downloaded and checked against the manifest's
    sha256 (a ValueError naming the object's URL), in a hidden folder renamed into place whole, named by the
    manifest's hash: a mirror is never half-visible, and one bundle version's never mixes with another's."""
    url = url.rstrip("/")
    fs, prefix = fsspec.core.url_to_fs(url, **bounded_options(url, options))
    prefix = prefix.rstrip("/")
    try:
        raw = fs.cat_file(f"{prefix}/{MANIFEST}")
    except FileNotFoundError:
        raise ValueError(f"bundle file {url}/{MANIFEST}: not found (is this a bundle written by export?)") from None
    try:
        files = json.loads(raw)["files"]
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise TypeError(f"'files' is {type(files).__name__}, not a map of names to sha256")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"bundle file {url}/{MANIFEST}: unreadable ({type(error).__name__}: {error})") from None
    root = Path(cache_dir) if cache_dir is not None else _default_cache(url, "bundles")
    target = root / hashlib.sha256(raw).hexdigest()[:16]
    if (target / MANIFEST).is_file():
        return target
    staging = root / f".{target.name}.{os.getpid()}{_PART}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name, expected in sorted(files.items()):
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise ValueError(f"bundle file {url}/{name}: listed path leaves the bundle folder")
            (local := staging / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{prefix}/{name}", str(local))
            except FileNotFoundError:
                raise ValueError(f"bundle file {url}/{name}: listed in the manifest but missing") from None
            if (actual := file_sha256(local)) != expected:
                raise ValueError(
                    f"bundle file {url}/{name}: sha256 mismatch: the object hashes to {actual[:12]}…, the manifest "
                    f"lists {expected[:12]}…"
                )
        (staging / MANIFEST).write_bytes(raw)
        try:
            os.replace(staging, target)
        except OSError:  # another process mirrored it meanwhile
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
