"""A store's generation: a number every lifecycle write raises, and the served state that number names.

    <root>/.generation.json               the latest: {"generation": 17, "changes": [...], "time": ...}, a few bytes
    <root>/.generations/0000000017.json   generation 17's state, immutable: each tenant with a live version, the
                                          version served and whether it sleeps; the trunk the store serves on

A writer makes its change first (`ExpertStore`, under the tenant's lock), then `publish`es it: under the store-wide
generation lock it reads the latest state, recomputes the touched tenants' entries from the store (theirs alone: no
scan of every folder), and creates the next state's file exclusively (locally a hard link of a synced temporary
file; on S3 one PUT with `If-None-Match: *`), so two writers never hand out one number twice, even on two machines;
then it replaces the pointer. A reader polls `latest()` and loads the state that number names
(`ExpertStore.at`): since a state is written whole, after the change it records, a reader sees a change wholly or
not at all; an operation of many writes (a trunk upgrade) publishes once, at its end (`ExpertStore.changes`), so a
reader sees the store before it or after it, never between, and a killed one leaves the previous state served.

A store made before generations (or written around `ExpertStore`) has none: its first publish scans it once, and
`rescan` publishes what a scan finds (after shards were copied in by hand).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

FORMAT = "moe.generation/1"
POINTER = ".generation.json"
STATES = ".generations"
KEEP = 32  # state files kept besides the latest: a reader that read an older pointer still finds its state
RETRIES = 8  # a number taken by another machine's writer between read and create: read again, at most this often


@dataclass(frozen=True)
class TenantState:
    version: int  # the version served: the latest live one
    dormant: bool


@dataclass(frozen=True)
class State:
    """What a store serves at one generation."""

    generation: int
    tenants: dict[str, TenantState]  # every tenant with a live version, awake or sleeping
    trunk: str | None = None  # the fingerprint the store serves on (`TrunkVersions.current`), None: its experts'
    changes: tuple[dict[str, Any], ...] = ()  # what this generation changed: op, tenant, version
    time: str = ""

    @property
    def awake(self) -> list[str]:
        return sorted(t for t, s in self.tenants.items() if not s.dormant)

    @property
    def dormant(self) -> list[str]:
        return sorted(t for t, s in self.tenants.items() if s.dormant)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "generation": self.generation,
            "time": self.time,
            "trunk": self.trunk,
            "changes": list(self.changes),
            "tenants": {t: [s.version, s.dormant] for t, s in sorted(self.tenants.items())},
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> State:
        try:
            body = json.loads(raw)
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r} is not {FORMAT!r}")
            tenants = {t: TenantState(int(v), bool(d)) for t, (v, d) in body["tenants"].items()}
            return cls(int(body["generation"]), tenants, body["trunk"], tuple(body["changes"]), body["time"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"generation state {where}: unreadable ({type(error).__name__}: {error})") from None


class Files(Protocol):
    """Where a store keeps its generation files: names relative to the store's root."""

    def read(self, name: str) -> bytes | None: ...  # None: no such file
    def create(self, name: str, data: bytes) -> bool: ...  # whole, and only if the name is free (False: taken)
    def replace(self, name: str, data: bytes) -> None: ...  # whole, atomically
    def names(self, folder: str) -> list[str]: ...
    def remove(self, name: str) -> None: ...
    def where(self, name: str) -> str: ...


class LocalFiles:
    def __init__(self, root: Path):
        self.root = root

    def where(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def _synced(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def _sync_folder(self, folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, name: str, data: bytes) -> bool:
        path = self.root / name
        tmp = self._synced(path, data)
        try:
            os.link(tmp, path)  # fails if the name is taken: never overwrites
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_folder(path.parent)
        return True

    def replace(self, name: str, data: bytes) -> None:
        path = self.root / name
        os.replace(self._synced(path, data), path)
        self._sync_folder(path.parent)

    def names(self, folder: str) -> list[str]:
        try:
            return os.listdir(self.root / folder)
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class RemoteFiles:
    """Generation files on object storage (fsspec): each written in one PUT, visible whole or not at all."""

    def __init__(self, fs: Any, prefix: str, url: str):
        self.fs, self.prefix, self.url = fs, prefix, url

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.prefix}/{name}")
        except FileNotFoundError:
            return None

    def create(self, name: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(f"{self.prefix}/{name}", data, mode="create")
        except FileExistsError:
            return False
        return True

    def replace(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.prefix}/{name}", data)

    def names(self, folder: str) -> list[str]:
        self.fs.invalidate_cache(f"{self.prefix}/{folder}")
        try:
            return [key.rsplit("/", 1)[-1] for key in self.fs.ls(f"{self.prefix}/{folder}", detail=False)]
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self.prefix}/{name}")


_STATE = re.compile(r"(\d{10})\.json")


def state_name(generation: int) -> str:
    return f"{STATES}/{generation:010d}.json"


def numbers(names: Iterable[str]) -> list[int]:
    """The generations of the state files among `names` (temporary files and strangers ignored), ascending."""
    return sorted(int(m[1]) for n in names if (m := _STATE.fullmatch(n)))


@dataclass(frozen=True)
class Generations:
    """The generation files of a store, and the lock its writers publish under (a file lock in `lock_folder`: across
    threads and processes of one machine; across machines, the exclusive create refuses a number taken)."""

    files: Files
    lock_folder: Path

    # -- reading ------------------------------------------------------------------------------------------------

    def latest(self) -> int:
        """The latest generation's number (0: the store has none yet): the highest state file present, or the
        pointer's if higher. The state files decide because a pointer may lag: a writer killed between its state
        and its pointer, or two machines' pointers landing out of order on object storage. One listing of at most
        `KEEP` + 1 names and a read of a few bytes: cheap enough to poll every second."""
        raw = self.files.read(POINTER)
        number = 0 if raw is None else int(json.loads(raw)["generation"])
        return max([number, *numbers(self.files.names(STATES))])

    def state(self, generation: int | None = None) -> State | None:
        """Generation `generation`'s state (default: the latest), or None if the store has none; a KeyError if that
        one was pruned (a reader that far behind reads the latest instead)."""
        generation = self.latest() if generation is None else generation
        if generation == 0:
            return None
        raw = self.files.read(state_name(generation))
        if raw is None:
            raise KeyError(f"generation {generation} of {self.files.where('')} is gone (pruned): read the latest")
        return State.from_json(raw, self.files.where(state_name(generation)))

    def log(self) -> list[dict[str, Any]]:
        """The changes of the generations still kept, oldest first, each with its generation's number."""
        entries = []
        for number in numbers(self.files.names(STATES)):
            raw = self.files.read(state_name(number))
            if raw is not None:
                state = State.from_json(raw, self.files.where(state_name(number)))
                entries += [{"generation": number, "time": state.time} | c for c in state.changes]
        return entries

    # -- writing ------------------------------------------------------------------------------------------------

    def publish(
        self,
        changes: Iterable[dict[str, Any]],
        entry: Callable[[str], TenantState | None],
        scan: Callable[[], dict[str, TenantState]],
        trunk: Callable[[], str | None],
        trunk_changed: bool = False,
        if_changed: bool = False,
    ) -> int | None:
        """The next generation, from the latest one with the tenants `changes` name recomputed by `entry` (None: it
        has no live version now) and, if `trunk_changed`, the trunk from `trunk`. A store without a generation is
        scanned once (`scan`). `if_changed`: publish only if the state differs from the latest (a write that failed
        may have changed nothing). Returns the number published, or None."""
        changes = [dict(c) for c in changes]
        self.lock_folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_folder / ".generation.lock"):
            for _ in range(RETRIES):
                previous = self.state()
                if previous is None:
                    tenants, current = scan(), trunk()
                else:
                    tenants, current = dict(previous.tenants), previous.trunk if not trunk_changed else trunk()
                    for tenant in {c["tenant"] for c in changes if c.get("tenant")}:
                        if (now := entry(tenant)) is None:
                            tenants.pop(tenant, None)
                        else:
                            tenants[tenant] = now
                if if_changed and previous is not None and (tenants, current) == (previous.tenants, previous.trunk):
                    return None
                number = (previous.generation if previous else 0) + 1
                stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
                state = State(number, tenants, current, tuple(changes), stamp)
                if self.files.create(state_name(number), state.to_json()):
                    break
            else:
                raise RuntimeError(f"{self.files.where(STATES)}: {RETRIES} numbers taken by other writers meanwhile")
            pointer = {"format": FORMAT, "generation": number, "time": stamp, "changes": changes}
            self.files.replace(POINTER, json.dumps(pointer).encode())
            for old in numbers(self.files.names(STATES)):
                if old < number - KEEP:
                    self.files.remove(state_name(old))
        return number
