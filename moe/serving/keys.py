"""API keys for the HTTP service: each key names the tenants it may query; an admin key also opens the routes that
reveal or change state (`/stats`, `/tenants`).

    python -m moe.serving.keys add --file keys.json --tenants banking,travel     # prints the new key, once
    python -m moe.serving.keys add --file keys.json --admin --tenants '*'
    python -m moe.serving.keys revoke --file keys.json KEY_ID
    python -m moe.serving.keys list --file keys.json

A key is `KEY_ID.SECRET` (32 random bytes, URL-safe). The keys file (JSON) holds, per key id, the sha256 of the
whole key, never the key; a presented key is compared with `hmac.compare_digest`. The file is written atomically
(a temporary file renamed over it), and `KeyFile` re-reads it when its identity (inode, size, mtime) changes,
looking at most every `poll_s` seconds: a revoked key is refused within `poll_s` of the write. A file that cannot be
read refuses every key until it can (never the keys of before).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ALL = "*"  # a key's tenants: every tenant served
HEADER = "authorization"  # `Authorization: Bearer KEY`; `x-api-key: KEY` is read too
ALT_HEADER = "x-api-key"


class KeyRefused(Exception):
    """A key that is missing, malformed, unknown or revoked (401), or a keys file that cannot be read (503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Key:
    """A key's record as stored: its id, the sha256 of the whole key, the tenants it may query (or every one)."""

    id: str
    sha256: str
    tenants: tuple[str, ...]
    admin: bool = False

    @property
    def every_tenant(self) -> bool:
        return ALL in self.tenants

    def may_query(self, tenant: str) -> bool:
        return self.every_tenant or tenant in self.tenants

    def among(self) -> frozenset[str] | None:
        """The tenants a routed query with this key is routed among (None: every tenant)."""
        return None if self.every_tenant else frozenset(self.tenants)

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "tenants": list(self.tenants), "admin": self.admin}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_file(text: str, where: str) -> dict[str, Key]:
    """The keys of a keys file's text, by id; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        raise ValueError(f'{where}: expected {{"keys": {{KEY_ID: {{"sha256": ..., "tenants": [...]}}}}}}')
    keys = {}
    for key_id, record in data["keys"].items():
        ok = isinstance(record, dict) and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64
        tenants = record.get("tenants") if isinstance(record, dict) else None
        ok = ok and isinstance(tenants, list) and all(isinstance(t, str) and t for t in tenants)
        if not ok or not isinstance(record.get("admin", False), bool):
            raise ValueError(f"{where}: key {key_id!r} needs a 64-hex 'sha256', a list of 'tenants', a bool 'admin'")
        keys[key_id] = Key(key_id, record["sha256"], tuple(tenants), record.get("admin", False))
    return keys


def read_keys(path: str | Path) -> dict[str, Key]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"keys file {path} cannot be read: {error}") from None
    return parse_file(text, f"keys file {path}")


def write_keys(path: str | Path, keys: dict[str, Key]) -> None:
    """Atomically: a replica re-reading the file sees the old keys or the new, never half a file."""
    path = Path(path)
    body = json.dumps({"keys": {k.id: k.to_json() for k in keys.values()}}, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_key(tenants: list[str], admin: bool = False) -> tuple[str, Key]:
    """A fresh key (shown once) and its record (what is stored)."""
    key_id = secrets.token_hex(6)
    key = f"{key_id}.{secrets.token_urlsafe(32)}"
    return key, Key(key_id, digest(key), tuple(tenants), admin)


def presented(headers) -> str | None:
    """The key a request presents (`Authorization: Bearer KEY` or `x-api-key: KEY`), or None."""
    value = headers.get(HEADER, "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(ALT_HEADER) or None


class KeyFile:
    """The keys of a file, re-read when it changes (looked at at most every `poll_s` seconds)."""

    def __init__(self, path: str | Path, poll_s: float = 1.0):
        self.path, self.poll_s = Path(path), poll_s
        self._lock = threading.Lock()
        self._identity: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._keys: dict[str, Key] = {}
        self._problem: str | None = None
        self.reloads = 0
        self._refresh(force=True)
        if self._problem:
            raise ValueError(self._problem)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.poll_s:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
                identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError as error:
                self._identity, self._keys, self._problem = None, {}, f"keys file {self.path}: {error.strerror}"
                return
            if identity == self._identity and not force:
                return
            try:
                self._keys, self._problem = read_keys(self.path), None
            except ValueError as error:
                self._keys, self._problem = {}, str(error)  # refuse every key, never serve the old ones
            self._identity = identity
            self.reloads += 1

    def keys(self) -> dict[str, Key]:
        self._refresh()
        return self._keys

    def authenticate(self, key: str | None) -> Key:
        """The record of a good key; `KeyRefused` (401, or 503 when the keys file cannot be read) otherwise."""
        keys = self.keys()
        if self._problem:
            raise KeyRefused(503, "the service's keys cannot be read; try again later")
        if not key:
            raise KeyRefused(401, "an API key is needed: send 'Authorization: Bearer KEY'")
        key_id, dot, _ = key.partition(".")
        record = keys.get(key_id) if dot else None
        # the digest is compared whether or not the id is known: the same work for a guessed id as for a real one
        expected = record.sha256 if record else "0" * 64
        if not hmac.compare_digest(digest(key), expected) or record is None:
            raise KeyRefused(401, "the API key is not valid (unknown or revoked)")
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe.serving.keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a key and print it (once: only its hash is stored)")
    add.add_argument("--tenants", required=True, help="comma-separated tenants the key may query; '*' for every one")
    add.add_argument("--admin", action="store_true", help="also open /stats and /tenants")
    revoke = sub.add_parser("revoke", help="revoke a key by its id (the part before the dot)")
    revoke.add_argument("key_id")
    sub.add_parser("list", help="the keys' ids, tenants and admin flags (never a key)")
    for p in sub.choices.values():
        p.add_argument("--file", default=os.environ.get("MOE_KEYS_FILE", "keys.json"), help="the keys file")
    args = parser.parse_args(argv)
    path = Path(args.file)
    try:
        keys = read_keys(path) if path.exists() or args.command != "add" else {}
    except ValueError as error:
        parser.error(str(error))
    if args.command == "add":
        tenants = [t.strip() for t in args.tenants.split(",") if t.strip()]
        if not tenants:
            parser.error("--tenants names no tenant")
        key, record = new_key(tenants, args.admin)
        write_keys(path, keys | {record.id: record})
        print(key)
        print(f"key id {record.id} for tenants {','.join(tenants)}{' (admin)' if args.admin else ''}", file=sys.stderr)
    elif args.command == "revoke":
        if args.key_id not in keys:
            parser.error(f"no key {args.key_id!r} in {path}; its keys: {sorted(keys)}")
        write_keys(path, {k: v for k, v in keys.items() if k != args.key_id})
        print(f"revoked {args.key_id}", file=sys.stderr)
    else:
        for record in keys.values():
            print(f"{record.id}\t{','.join(record.tenants)}\t{'admin' if record.admin else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
