"""Shared fixtures: an isolated cache, the CLINC150 folder and the tiny trained run.
The helpers they build on are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ROOT, TinyRun, build_tiny_run


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Caches go to a temporary folder; wandb never reaches for the network."""
    os.environ["MOE_CACHE_DIR"] = str(tmp_path_factory.mktemp("moe-cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    yield


@pytest.fixture(scope="session")
def clinc_dir() -> Path:
    """CLINC150 from $MOE_DATA_DIR (CI sets it to ../shared/data); tests never download it."""
    folder = Path(os.environ.get("MOE_DATA_DIR", ROOT.parent / "shared" / "data")) / "clinc150"
    if not (folder / "data_full.json").is_file():
        pytest.fail(f"CLINC150 not found at {folder}: set MOE_DATA_DIR to the folder that holds clinc150/")
    os.environ["MOE_DATA_DIR"] = str(folder.parent)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One tiny trained, evaluated and exported run for the whole session (see `build_tiny_run`)."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))
