"""Where the project reads data and keeps caches; every location can be overridden by environment."""

from __future__ import annotations

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
