"""ExpertStore: a folder of expert shards, one file per version, its state held in file names alone.

    <root>/<tenant>/v0003.safetensors          a live version (the highest live one is the latest)
    <root>/<tenant>/v0002.retired.safetensors  a retired version: kept, never loaded
    <root>/<tenant>/.v0004.safetensors.<pid>.tmp  a write in flight (or killed): invisible to readers
    <root>/<tenant>/DORMANT                    the tenant is hibernating: kept, not routed to until woken
    <root>/.locks/<tenant>.lock                the tenant's write lock
    <root>/.retired/<tenant>                   a retired tenant's tombstone: where it was archived, or "deleted"
    <root>/.leaving/<tenant>.<pid>             a retired tenant's folder on its way out (or left by a killed process)

The one rule of a store: a tenant's folder is named by `check_tenant_name`, and every shard in it is that tenant's
(its metadata's tenant is the folder's name, its version the file name's). A shard that breaks it (a copied folder,
a shard moved or copied by hand) is refused by name wherever it is read: `load`, `load_latest`, `meta`,
`check_shard` (which the mixture builder calls). A folder whose name breaks the name rule (hidden ones, `tmp copy/`)
is no tenant: skipped with a warning.

Every change is one atomic rename, so a process killed at any point leaves a consistent store. Writers (`save`,
`hibernate`, `wake`, `retire`, `restore`, `rollback`, `archive`, `delete`) hold the tenant's file lock, so that
across threads and processes no version is handed out twice or lost; readers take no lock.

Every writer, as it releases the tenant's lock, publishes the store's next generation (`moe.store.generation`: a
number and the served state it names, in `.generation.json` and `.generations/`); `changes` makes many writes one
generation (a trunk upgrade). A reader that must not see half a change (a service following the store) reads
`generation()` and loads through `at(state())`: the tenants, versions and trunk of that generation.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from moe.model.kinds import Architecture
from moe.store.generation import Generations, LocalFiles, State, TenantState
from moe.store.shard import ExpertMeta, Packed, ShardError, read_meta, read_shard, read_tensors, write_shard

log = logging.getLogger(__name__)

NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE = re.compile(r"v(\d{4}|[1-9]\d{4,})(\.retired)?\.safetensors")  # the names `ExpertStore.path` writes
_OWN = (".locks", ".retired", ".leaving", ".trunks", ".bridges", ".generations")  # the store's own folders


def check_tenant_name(name: object) -> str:
    """`name` if it can name a tenant (and its folder): a string of at most 64 ASCII letters, digits, '_', '.' or
    '-' that starts with a letter or digit. Anything else is a ValueError saying why."""
    if not isinstance(name, str):
        raise ValueError(
            f"tenant name must be a string, got {type(name).__name__} {name!r} "
            f"(quote it in YAML/Hydra: tenant.name='\"{name}\"')"
        )
    if len(name) > NAME_LENGTH:
        raise ValueError(f"tenant name {name[:20]!r}... is {len(name)} characters long; at most {NAME_LENGTH}")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r} must be ASCII letters, digits, '_', '.' or '-', starting with a letter or digit "
            "(it names a folder)"
        )
    return name


def common_architecture(architectures: list[Architecture]) -> Architecture:
    """A store's architecture: the one most of its experts share (a tie: the one met first, in tenant order). One
    odd expert (a shard of another kind or size copied in) is then the one that differs and is refused, never the
    many good ones; the mixture builder and growth both choose by this rule."""
    if not architectures:
        raise ValueError("no expert to take an architecture from")
    keys = [json.dumps(a.to_dict(), sort_keys=True) for a in architectures]
    counts = Counter(keys)
    best = max(counts.values())
    return architectures[next(i for i, k in enumerate(keys) if counts[k] == best)]


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
        self.pinned: State | None = None  # a view of one generation (`at`): reads follow it, writes are refused
        self._deferred: list[str] | None = None  # tenants written inside `changes`, published at its end
        self._published: str | None = None  # a tenant whose write published its generation already

    # -- generations ---------------------------------------------------------------------------------------------

    @property
    def generations(self) -> Generations:
        return Generations(LocalFiles(self.root), self.root / ".locks")

    def generation(self) -> int:
        """The store's latest generation (0: none published yet): a few bytes read, for polling."""
        return self.generations.latest()

    def state(self) -> State:
        """The latest generation's state; for a store without one (made before generations), generation 0 from a
        scan, published by nobody (a reader writes nothing): its first write publishes generation 1."""
        if (state := self.generations.state()) is None:
            state = State(0, self._scan(), self._trunk())
        return state

    def at(self, state: State) -> ExpertStore:
        """This store as of `state`: `tenants`, `latest`, `is_dormant` answer from it (what `load_mixture` reads), so a
        mixture built from the view is that generation's, whatever was written since. A version retired since fails
        to load, by name: the reader then moves on to the newer generation. Writes through a view are refused."""
        view = copy.copy(self)
        view.pinned, view._deferred = state, None
        return view

    def rescan(self, op: str = "rescan") -> int:
        """Publish a generation from a scan of the whole store (after shards were copied in around the store)."""
        previous = self.generations.state()
        names = sorted(set(self.tenants(dormant=True)) | set(previous.tenants if previous else ()))
        changes = [{"op": op, "tenant": name} for name in names] or [{"op": op}]  # every tenant recomputed
        return self.generations.publish(changes, self._entry, self._scan, self._trunk, trunk_changed=True) or 0

    @contextmanager
    def changes(self, op: str, trunk: bool = False) -> Iterator[None]:
        """The writes made inside, through this store object, published as one generation at the end (with the
        store's current trunk if `trunk`); nothing is published if it raises, or a process dies inside: readers see
        the generation before. Nested: the outermost publishes."""
        if self._deferred is not None:
            yield
            return
        self._deferred = []
        try:
            yield
            # a trunk change: every tenant as the store now holds it (a rerun of a killed upgrade also publishes
            # the versions the killed run wrote and never published)
            touched = list(dict.fromkeys(self._deferred + (self.tenants(dormant=True) if trunk else [])))
        finally:
            self._deferred = None
        self._publish([{"op": op, "tenant": t} for t in touched] or [{"op": op}], trunk_changed=trunk)

    def _publish(self, changes: list[dict], trunk_changed: bool = False, if_changed: bool = False) -> int | None:
        for change in changes:
            if (tenant := change.get("tenant")) is not None and "version" not in change:
                change["version"] = entry.version if (entry := self._entry(tenant)) else None
        return self.generations.publish(changes, self._entry, self._scan, self._trunk, trunk_changed, if_changed)

    def _entry(self, tenant: str) -> TenantState | None:
        """A tenant's served state from the store itself (its folder alone): None without a live version."""
        live = [r.version for r in self.records(tenant) if not r.retired]
        return TenantState(live[-1], self.is_dormant(tenant)) if live else None

    def _scan(self) -> dict[str, TenantState]:
        return {t: entry for t in self.tenants(dormant=True) if (entry := self._entry(t)) is not None}

    def _trunk(self) -> str | None:
        from moe.store.trunks import TrunkVersions  # trunks imports shard, as this module does

        return TrunkVersions(self.root).current()

    def path(self, tenant: str, version: int, retired: bool = False) -> Path:
        """The file of a version. Through a view of a generation (`at`), a version that generation serves and that
        was retired since (by a write not published yet, or killed before it published) is read from its retired
        name: a reader sees the generation as it was."""
        suffix = ".retired.safetensors" if retired else ".safetensors"
        path = self.root / check_tenant_name(tenant) / f"v{version:04d}{suffix}"
        if self.pinned is None or retired or path.exists():
            return path
        served = (entry := self.pinned.tenants.get(tenant)) is not None and entry.version == version
        gone = path.with_name(f"v{version:04d}.retired.safetensors")
        return gone if served and gone.is_file() else path

    # -- reading ---------------------------------------------------------------------------------------------

    def records(self, tenant: str | None = None) -> list[ShardRecord]:
        """Every version of every tenant (or of one), live and retired, sorted by tenant and version."""
        folders = [self.root / check_tenant_name(tenant)] if tenant is not None else self._tenant_folders()
        found = []
        for folder in folders:
            for path in folder.glob("v*.safetensors") if folder.is_dir() else ():
                if match := _FILE.fullmatch(path.name):
                    try:
                        size = path.stat().st_size
                    except FileNotFoundError:  # renamed or removed meanwhile by a writer of that tenant
                        continue
                    found.append(ShardRecord(folder.name, int(match[1]), bool(match[2]), path, size))
        return sorted(found, key=lambda r: (r.tenant, r.version))

    def _tenant_folders(self) -> list[Path]:
        """The folders that can be tenants'; any other (hidden, `tmp copy`...) is skipped with a warning."""
        folders = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if folder.name in _OWN or not folder.is_dir():
                continue
            try:
                folders.append(self.root / check_tenant_name(folder.name))
            except ValueError as error:
                log.warning("expert store %s: folder %r skipped, it is no tenant's: %s", self.root, folder.name, error)
        return folders

    def _folder_names(self) -> list[str]:
        """The names in the store's root, unchecked and unsorted: one listing, nothing read per folder."""
        try:
            return os.listdir(self.root)
        except FileNotFoundError:
            return []

    def tenants(self, dormant: bool = False) -> list[str]:
        """Tenants with at least one live version: the awake ones, or also the hibernating ones."""
        if self.pinned is not None:
            return sorted(self.pinned.tenants) if dormant else self.pinned.awake
        live = {r.tenant for r in self.records() if not r.retired}
        return sorted(t for t in live if dormant or not self.is_dormant(t))

    def is_dormant(self, tenant: str) -> bool:
        if self.pinned is not None:
            return tenant in self.pinned.tenants and self.pinned.tenants[tenant].dormant
        return (self.root / check_tenant_name(tenant) / "DORMANT").is_file()

    def dormant(self) -> list[str]:
        return [t for t in self.tenants(dormant=True) if self.is_dormant(t)]

    def retired(self, tenant: str) -> str | None:
        """How a retired tenant left the store ("archived to <folder>" or "deleted"), from its tombstone; None if
        it was not retired, or its name was taken again since."""
        tombstone = self.root / ".retired" / check_tenant_name(tenant)
        return tombstone.read_text().strip() if tombstone.is_file() else None

    def versions(self, tenant: str) -> list[int]:
        """Live versions of a tenant, oldest first."""
        return [r.version for r in self.records(tenant) if not r.retired]

    def latest(self, tenant: str) -> int:
        if self.pinned is not None:
            if (entry := self.pinned.tenants.get(tenant)) is None:
                raise self._unknown(tenant)
            return entry.version
        if not (versions := self.versions(tenant)):
            raise self._unknown(tenant)
        return versions[-1]

    def _unknown(self, tenant: str) -> KeyError:
        """The error for a tenant without a live version: retired, all its versions retired, or unknown."""
        if (how := self.retired(tenant)) is not None:
            return KeyError(f"tenant {tenant!r} is retired ({how}); growing it again would start a new expert")
        if retired := [r.version for r in self.records(tenant)]:
            return KeyError(f"tenant {tenant!r} has no live version in {self.root}; retired: {retired} (restore one)")
        return KeyError(f"unknown tenant {tenant!r} in expert store {self.root}; known: {self.tenants(dormant=True)}")

    def read_tensors(self, tenant: str, version: int, names: tuple[str, ...]) -> tuple[Path, Packed]:
        """The file of a version and the tensors `names` read from it alone (its routing entry, registering an expert
        from its header), unchecked beyond their layout (`read_tensors`)."""
        path = self.path(tenant, version)
        return path, read_tensors(path, names)

    def check_shard(self, path: Path, meta: ExpertMeta) -> ExpertMeta:
        """The store's rule for a shard read from `path`: it is its folder's tenant's, under its own version's name."""
        if meta.tenant != path.parent.name:
            raise ShardError(
                path,
                f"folder {path.parent.name!r} holds a shard of tenant {meta.tenant!r} (a copied or misplaced shard: "
                f"every shard of a store lives in its own tenant's folder)",
            )
        if (match := _FILE.fullmatch(path.name)) and int(match[1]) != meta.version:
            raise ShardError(path, f"file name says version {int(match[1])}, its metadata version {meta.version}")
        return meta

    def load(
        self, tenant: str, version: int | None = None, trunk_fingerprint: str | None = None
    ) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
        """A live version (default: the latest), verified in full (`read_shard`) and against the store's rule."""
        version = self.latest(tenant) if version is None else version
        if version not in self.versions(tenant):
            raise KeyError(f"tenant {tenant!r} has no live version {version}; live: {self.versions(tenant)}")
        tensors, meta = read_shard(path := self.path(tenant, version), trunk_fingerprint)
        return tensors, self.check_shard(path, meta)

    def load_latest(
        self, tenants: list[str] | None = None, trunk_fingerprint: str | None = None
    ) -> tuple[dict[str, tuple[dict[str, torch.Tensor], ExpertMeta]], dict[str, Exception]]:
        """The latest version of each tenant; a bad shard or an unknown tenant is reported in the second dict, never
        raised, so that it can not stop the others from loading (a name that breaks the name rule is a ValueError)."""
        loaded, failed = {}, {}
        for tenant in [check_tenant_name(t) for t in tenants] if tenants is not None else self.tenants():
            try:
                loaded[tenant] = self.load(tenant, trunk_fingerprint=trunk_fingerprint)
            except (ShardError, KeyError, ValueError) as error:
                log.warning("expert %s not loaded: %s", tenant, error)
                failed[tenant] = error
        return loaded, failed

    def architecture(self, dim: int | None = None) -> Architecture:
        """The architecture most of the store's live experts share (`common_architecture`; each read as it takes
        features of width `dim` when given: experts bridged from an older trunk version count as the current one's).
        Headers that fail their checks are not counted."""
        found = []
        for tenant in self.tenants(dormant=True):
            try:
                arch = self.meta(tenant).architecture
            except (ShardError, KeyError, ValueError):
                continue
            found.append(arch.on(dim) if dim is not None else arch)
        return common_architecture(found)

    def meta(self, tenant: str, version: int | None = None) -> ExpertMeta:
        """A version's metadata from its header alone (no tensors read, no checksum), checked against the rule."""
        version = self.latest(tenant) if version is None else version
        path = self.path(tenant, version)
        return self.check_shard(path, read_meta(path)[0])

    # -- writing: one tenant at a time, under its lock ------------------------------------------------------

    @contextmanager
    def _writing(self, tenant: str, op: str, new: bool = False) -> Iterator[None]:
        """Hold `tenant`'s write lock, across threads and processes: `<root>/.locks/<tenant, lower case>.lock`, one
        for names that differ in case only, so that the case check of a new tenant's save has no race. Unless
        `new`, a tenant without a folder is a KeyError at once (and no lock file is made). Never nested: a second
        lock on the same file in one thread would wait for ever. Every write through here publishes the next
        generation as the lock is released (`op` names it; one that raised, only if it changed what is served), or
        leaves it to the enclosing `changes`."""
        check_tenant_name(tenant)
        if self.pinned is not None:
            raise ValueError(f"{self!r} is a read-only view of generation {self.pinned.generation}: write to the store")
        if not new and not self._has_folder(tenant):
            raise self._unknown(tenant)
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".locks" / f"{tenant.lower()}.lock"):
            try:
                yield
            except BaseException:
                self._published = None
                if self._deferred is None:
                    try:
                        self._publish([{"op": op, "tenant": tenant, "failed": True}], if_changed=True)
                    except Exception as error:  # the write's own error is the one to raise
                        log.warning("expert store %s: no generation published after a failed %s: %s", self, op, error)
                raise
            if self._deferred is not None:
                self._deferred.append(tenant)
            elif self._published == tenant:  # published before its files went (`_take_out`)
                self._published = None
            else:
                self._publish([{"op": op, "tenant": tenant}])

    def check_new_tenant(self, name: object) -> str:
        """`name` if a new tenant may take it, else a ValueError: it must pass `check_tenant_name`, have no version
        in the store (live or retired: update it, or restore one), and differ from every tenant's name in more than
        case (their folders would be one on a case-insensitive file system). A retired tenant's name is free."""
        name = check_tenant_name(name)
        if records := self.records(name):
            versions = [(r.version, "retired" if r.retired else "live") for r in records]
            raise ValueError(f"tenant {name!r} already has an expert in {self.root} {versions}; use update")
        folders = (f for f in self._folder_names() if f.lower() == name.lower() and f != name and f not in _OWN)
        if clash := sorted(t for t in folders if self.records(t)):  # names alone first: no stat of any other folder
            raise ValueError(f"tenant name {name!r} differs only in case from tenant {clash[0]!r} in {self.root}")
        return name

    def check_awake(self, tenant: str) -> None:
        """A ValueError if `tenant` is hibernating (an update would change what it wakes up as)."""
        if self.is_dormant(tenant):
            raise ValueError(
                f"tenant {tenant!r} is hibernating: wake it first, or pass allow_dormant=True to update it while it "
                "sleeps"
            )

    def save(
        self,
        tensors: dict[str, torch.Tensor],
        meta: ExpertMeta,
        new_tenant: bool = False,
        allow_dormant: bool = True,
        parent: int | None = None,
    ) -> Path:
        """Write `meta.tenant`'s next version, after every live or retired one (the version in `meta` is replaced),
        under the tenant's lock. A tenant's first version must pass `check_new_tenant`; `new_tenant` demands that it
        be the first (a grow), `allow_dormant=False` that the tenant be awake (an update), and `parent` that the
        latest live version still be the one the new version was made from (an update: of two at once, the later
        one is refused rather than silently dropping what the other added). A retired tenant's tombstone goes: its
        name now holds a new expert."""
        tenant = check_tenant_name(meta.tenant)
        if fresh := new_tenant or not self._has_folder(tenant):
            if parent is not None:
                raise self._unknown(tenant)  # retired (or deleted) while the update trained
            self.check_new_tenant(tenant)  # early too: a refused name leaves no lock file behind
        op = "update" if parent is not None else "grow" if fresh else "save"
        with self._writing(tenant, op, new=parent is None):
            taken = [r.version for r in self.records(tenant)]
            if new_tenant or not taken:
                if parent is not None:
                    raise self._unknown(tenant)
                self.check_new_tenant(tenant)
            if not allow_dormant:
                self.check_awake(tenant)
            if parent is not None and (latest := self.latest(tenant)) != parent:
                raise ValueError(
                    f"tenant {tenant!r} moved from version {parent} to {latest} while this version was made from "
                    f"{parent}: run it again on the latest"
                )
            path = self._write_version(tenant, max(taken, default=0) + 1, tensors, meta)
        return path

    def _has_folder(self, tenant: str) -> bool:
        """Whether the store holds anything of `tenant` (its folder)."""
        return (self.root / tenant).is_dir()

    def _write_version(self, tenant: str, version: int, tensors: dict[str, torch.Tensor], meta: ExpertMeta) -> Path:
        """Write a version not taken yet (the caller holds the tenant's lock); a retired tenant's tombstone goes: its
        name now holds a new expert."""
        path = write_shard(self.path(tenant, version), tensors, meta.with_version(version))
        (self.root / ".retired" / tenant).unlink(missing_ok=True)
        return path

    def hibernate(self, tenant: str) -> None:
        """Mark a tenant dormant: its shards stay as they are; mixtures built from the store leave it out."""
        with self._writing(tenant, "hibernate"):
            self.latest(tenant)  # an unknown tenant is an error, not a new folder
            marker = self.root / tenant / "DORMANT"
            tmp = marker.with_name(f".DORMANT.{os.getpid()}.tmp")
            tmp.write_text("hibernating\n")
            os.replace(tmp, marker)

    def wake(self, tenant: str) -> None:
        with self._writing(tenant, "wake"):
            if not self.is_dormant(tenant):
                raise KeyError(f"tenant {tenant!r} is not hibernating in {self.root}; dormant: {self.dormant()}")
            (self.root / tenant / "DORMANT").unlink()

    def retire(self, tenant: str, version: int | None = None) -> Path:
        """Take a version (default: the latest) out of use; the file stays, renamed, and can be restored."""
        with self._writing(tenant, "retire"):
            return self._retire(tenant, self.latest(tenant) if version is None else version)

    def _retire(self, tenant: str, version: int) -> Path:
        if version not in self.versions(tenant):
            raise KeyError(f"tenant {tenant!r} has no live version {version}")
        target = self.path(tenant, version, retired=True)
        os.replace(self.path(tenant, version), target)
        return target

    def restore(self, tenant: str, version: int) -> Path:
        with self._writing(tenant, "restore"):
            source = self.path(tenant, version, retired=True)
            if not source.is_file():
                raise KeyError(f"tenant {tenant!r} has no retired version {version}")
            os.replace(source, self.path(tenant, version))
        return self.path(tenant, version)

    def rollback(self, tenant: str, version: int) -> list[int]:
        """Make `version` the latest again by retiring every live version after it; returns those retired."""
        with self._writing(tenant, "rollback"):
            if version not in self.versions(tenant):
                raise KeyError(f"tenant {tenant!r} has no live version {version} to roll back to")
            newer = [v for v in self.versions(tenant) if v > version]
            for v in reversed(newer):
                self._retire(tenant, v)
        return newer

    def archive(self, tenant: str, destination: str | Path) -> Path:
        """Move every file of a tenant (live and retired) out of the store into `destination/<tenant>`, leaving a
        tombstone that names it (see `retired`)."""
        target = Path(destination) / check_tenant_name(tenant)
        with self._writing(tenant, "archive"):
            if not self.records(tenant):
                raise self._unknown(tenant)
            if target.exists():
                raise FileExistsError(f"{target} exists; refusing to overwrite an archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            leaving = self._take_out(tenant, "archive")
            self._bury(tenant, f"archived to {target.absolute()}")
            try:
                shutil.move(str(leaving), str(target))
            except OSError:  # e.g. a full disk: the tenant back in the store as it was, no partial archive left
                shutil.rmtree(target, ignore_errors=True)
                os.replace(leaving, self.root / tenant)
                (self.root / ".retired" / tenant).unlink()  # a live tenant has none but this one
                raise
        return target

    def remove(self, tenant: str, archive_dir: str | Path | None = None) -> Path | None:
        """A tenant out of the store for good: moved to `archive_dir` (its new folder returned, `archive`), or deleted
        when that is None (`delete`); a tombstone stays either way."""
        if archive_dir is not None:
            return self.archive(tenant, archive_dir)
        self.delete(tenant)
        return None

    def delete(self, tenant: str) -> None:
        """Remove a tenant and all its versions from disk, leaving a tombstone (see `retired`)."""
        with self._writing(tenant, "delete"):
            if not self.records(tenant):
                raise self._unknown(tenant)
            leaving = self._take_out(tenant, "delete")
            self._bury(tenant, "deleted")
            shutil.rmtree(leaving)

    def _take_out(self, tenant: str, op: str) -> Path:
        """One atomic rename takes the tenant's folder out of the store (to a hidden name, never read), so that a
        process killed while its files are moved or removed leaves no version of it behind to be served. Its removal
        is published first (unless inside `changes`): a process killed between the two leaves a generation that no
        longer serves it (what the write was to do), never one that names files gone."""
        if self._deferred is None:
            self.generations.publish(
                [{"op": op, "tenant": tenant, "version": None}],
                lambda name: None if name == tenant else self._entry(name),
                self._scan,
                self._trunk,
            )
            self._published = tenant  # `_writing` publishes nothing more for it
        leaving = self.root / ".leaving" / f"{tenant}.{os.getpid()}"
        leaving.parent.mkdir(exist_ok=True)
        os.replace(self.root / tenant, leaving)
        return leaving

    def _bury(self, tenant: str, how: str) -> None:
        tombstone = self.root / ".retired" / tenant
        tombstone.parent.mkdir(exist_ok=True)
        tmp = tombstone.with_name(f".{tenant}.{os.getpid()}.tmp")
        tmp.write_text(how + "\n")
        os.replace(tmp, tombstone)
