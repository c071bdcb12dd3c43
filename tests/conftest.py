"""Shared fixtures: an isolated cache, the CLINC150 folder, synthetic tenant files and composed configs."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


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


# Synthetic tenants whose intents a bag-of-words trunk can tell apart.
SYNTHETIC = {
    "weather": {"rain": ["rain", "umbrella", "wet"], "sun": ["sunny", "sunscreen", "hot"]},
    "music": {"play": ["play", "song", "track"], "stop": ["stop", "pause", "silence"]},
    "bank": {"balance": ["balance", "money", "account"], "transfer": ["transfer", "send", "wire"]},
}
FILLERS = ["please", "can you", "i want to", "tell me", "now", "today", "quickly", "my"]


def write_tenant_csv(
    path: Path, intents: dict[str, list[str]], per_split=(30, 8, 8), seed=0, columns=("text", "label")
):
    """A CSV with a split column: `per_split` rows per intent for train, val, test."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "split"])
        for split, count in zip(("train", "val", "test"), per_split, strict=True):
            for label, words in intents.items():
                for _ in range(count):
                    text = " ".join([rng.choice(FILLERS), *rng.sample(words, 2)])
                    writer.writerow([text, label, split])
    return path


def write_synthetic_tenants(folder: Path) -> dict[str, Path]:
    return {
        name: write_tenant_csv(folder / f"{name}.csv", intents, seed=i)
        for i, (name, intents) in enumerate(SYNTHETIC.items())
    }


@pytest.fixture
def synthetic_tenants(tmp_path) -> dict[str, Path]:
    return write_synthetic_tenants(tmp_path)


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real `conf/train.yaml` composed as scripts/train.py would, writing under `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def tenant_files_override(files: dict[str, Path]) -> str:
    entries = ", ".join(
        f"{{_target_: moe.data.read_tenant_file, name: {name}, files: '{path}', split_column: split}}"
        for name, path in files.items()
    )
    return f"data.tenants=[{entries}]"
