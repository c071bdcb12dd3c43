"""Where the project reads data and keeps caches (every location can be overridden by environment), and the
checksum of a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir() -> Path:
    """User cache for downloads and trunk features: `$MOE_CACHE_DIR`, else the platform's user cache."""
    return Path(os.environ.get("MOE_CACHE_DIR") or user_cache_dir("moe"))


def data_dir() -> Path | None:
    """Folder holding data sets (e.g. `clinc150/`) from `$MOE_DATA_DIR`; None means download into the cache."""
    value = os.environ.get("MOE_DATA_DIR")
    return Path(value) if value else None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
