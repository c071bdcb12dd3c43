"""Helpers shared by the tests (fixtures live in conftest.py): synthetic tenant files, composed Hydra configs,
child Python processes, file digests, and the tiny trained run that the evaluation and serving tests share."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# -- synthetic tenants whose intents a bag-of-words trunk can tell apart ----------------------------------

SYNTHETIC = {
    "weather": {"rain": ["rain", "umbrella", "wet"], "sun": ["sunny", "sunscreen", "hot"]},
    "music": {"play": ["play", "song", "track"], "stop": ["stop", "pause", "silence"]},
    "bank": {"balance": ["balance", "money", "account"], "transfer": ["transfer", "send", "wire"]},
}
FILLERS = ["please", "can you", "i want to", "tell me", "now", "today", "quickly", "my"]


def write_tenant_csv(
    path: Path, intents: dict[str, list[str]], per_split=(30, 8, 8), seed=0, columns=("text", "label")
) -> Path:
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
    """One CSV per SYNTHETIC tenant under `folder`."""
    return {
        name: write_tenant_csv(folder / f"{name}.csv", intents, seed=i)
        for i, (name, intents) in enumerate(SYNTHETIC.items())
    }


def read_synthetic_tenants(folder: Path) -> dict:
    """The SYNTHETIC tenants, written under `folder` and read back as `Tenant`s, by name."""
    from moe.data import read_tenant_file

    files = write_synthetic_tenants(folder)
    return {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}


def tenant_files_override(files: dict[str, Path]) -> str:
    """The `data.tenants=[...]` override that reads these files (with `data=tenant_files`)."""
    entries = ", ".join(
        f"{{_target_: moe.data.read_tenant_file, name: {name}, files: '{path}', split_column: split}}"
        for name, path in files.items()
    )
    return f"data.tenants=[{entries}]"


def synthetic_data(folder: Path) -> list[str]:
    """The data overrides of a run on the synthetic tenants, written under `folder`."""
    return ["data=tenant_files", tenant_files_override(write_synthetic_tenants(folder))]


# -- configs and child processes --------------------------------------------------------------------------


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The real `conf/<name>.yaml` composed as scripts/<name>.py would, writing under `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


# Set by a shell, a SLURM job or a sweep: each would change what a child run does.
INHERITED = ("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "WANDB_NAME", "WANDB_RUN_GROUP")


def child_env() -> dict[str, str]:
    """This session's environment (caches, data) for a child process: the checkout's `moe` first, wandb offline,
    nothing inherited from a launcher."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}


def run_python(
    *args: str, stdin: str | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """`python args` from the repository root in `child_env()`; with `check`, a failure shows the child's output."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=child_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, f"python {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# -- files ------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_last_byte(path) -> None:
    """One bit of a safetensors file's last tensor data (a weight or statistic, never the header)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def script(name: str):
    """scripts/<name>.py's `main`; called with a config, Hydra's decorator passes it straight through."""
    spec = importlib.util.spec_from_file_location(f"entry_point_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


GENERATION_FILES = (".generation.json", ".generations")  # a store's generation: every write changes it


def digests(folder: Path) -> dict[Path, str]:
    """sha256 of every file under `folder` (hidden and temporary ones too, but a store's generation files), by path
    relative to it."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {
        p.relative_to(folder): sha256_of(p) for p in files if p.relative_to(folder).parts[0] not in GENERATION_FILES
    }


# -- the tiny run shared by the evaluation and serving tests (the session fixture `tiny_run`) ---------------

THRESHOLD = 0.42  # a fixed out-of-scope threshold: the synthetic tenants have no out-of-scope queries to choose one
THRESHOLD_SCORE = "gate_max_prob"  # on this score (a fixed threshold needs a named one)
TINY_TRAIN = ["logger=none", "trunk=tiny", "callbacks=none", "trainer.max_epochs=3", "data.batch_size=16"]
TINY_TRAIN += ["trainer.check_val_every_n_epoch=10", "expert.dropout=0"]


@dataclass(frozen=True)
class TinyRun:
    run: Path  # the training run folder (config.yaml, experts/, gate.safetensors, metrics.json)
    evaluation: Path  # scripts/evaluate.py's output folder
    bundle: Path  # float32, trunk referenced
    bundle_bf16: Path  # bfloat16, trunk copied


def build_tiny_run(root: Path) -> TinyRun:
    """Synthetic tenants on the tiny trunk, trained; evaluated by scripts/evaluate.py in a child process; exported
    as two bundles (float32 referencing the trunk, bfloat16 with the trunk's weights copied)."""
    from moe.tasks import export, train

    data = synthetic_data(root / "data")
    run, evaluation = root / "run", root / "evaluation"
    train.run(compose_config("train", [*data, *TINY_TRAIN], run))
    run_python(
        "scripts/evaluate.py",
        f"store_dir={run / 'experts'}",
        *data,
        f"oos.threshold={THRESHOLD}",
        f"oos.score={THRESHOLD_SCORE}",
        "write_predictions=true",
        f"paths.output_dir={evaluation}",
        f"hydra.run.dir={root / 'hydra'}",
    )
    common = [*data, f"store_dir={run / 'experts'}", f"oos.threshold={THRESHOLD}", f"oos.score={THRESHOLD_SCORE}"]
    export.run(compose_config("export", common, root / "bundle"))
    export.run(compose_config("export", [*common, "export.dtype=bfloat16", "export.trunk=copy"], root / "bundle_bf16"))
    return TinyRun(run, evaluation, root / "bundle", root / "bundle_bf16")


def fast_growth(**overrides):
    """A fresh, seconds-long growth config for each test (no test sees another's changes)."""
    from moe.lifecycle import GrowthConfig

    settings = dict(rank=8, dropout=0.3, input_scale=8.0, lr=3e-3, weight_decay=1e-4, epochs=3, batch_size=32)
    settings |= dict(routing_epochs=2, negatives_per_class=5, rehearsal_per_class=10)
    return GrowthConfig(**settings | overrides)
