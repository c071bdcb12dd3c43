"""A tiny trained run shared by the evaluation and serving tests (built once per session): synthetic tenants on
the tiny trunk, its evaluation by scripts/evaluate.py in a child process, and two bundles (float32 referencing the
trunk, bfloat16 with the trunk's weights copied)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from moe.export.run import export
from moe.training.run import train
from tests.conftest import CONF, ROOT, compose_train, tenant_files_override, write_synthetic_tenants

THRESHOLD = 0.42  # a fixed out-of-scope threshold: the synthetic tenants have no out-of-scope queries to choose one
TRAIN = ["logger=none", "trunk=tiny", "callbacks=none", "trainer.max_epochs=3", "data.batch_size=16"]
TRAIN += ["trainer.check_val_every_n_epoch=10", "expert.dropout=0"]


@dataclass(frozen=True)
class TinyRun:
    root: Path
    data: str  # the data override naming the tenant files
    run: Path  # the training run folder (config.yaml, experts/, gate.safetensors, metrics.json)
    evaluation: Path  # scripts/evaluate.py's output folder
    bundle: Path  # float32, trunk referenced
    bundle_bf16: Path  # bfloat16, trunk copied


def run_python(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python args` from the repository root, in this session's environment (caches, offline wandb)."""
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"python {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def compose_export(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("export", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


_RUNS: dict[Path, TinyRun] = {}


def tiny_run(root: Path) -> TinyRun:
    if root in _RUNS:
        return _RUNS[root]
    data = tenant_files_override(write_synthetic_tenants(root / "data"))
    run, evaluation = root / "run", root / "evaluation"
    train(compose_train(["data=tenant_files", data, *TRAIN], run))
    run_python(
        "scripts/evaluate.py",
        f"store_dir={run / 'experts'}",
        "data=tenant_files",
        data,
        f"oos.threshold={THRESHOLD}",
        "write_predictions=true",
        f"paths.output_dir={evaluation}",
        f"hydra.run.dir={root / 'hydra'}",
    )
    common = ["data=tenant_files", data, f"store_dir={run / 'experts'}", f"oos.threshold={THRESHOLD}"]
    export(compose_export(common, root / "bundle"))
    export(compose_export([*common, "export.dtype=bfloat16", "export.trunk=copy"], root / "bundle_bf16"))
    _RUNS[root] = TinyRun(root, data, run, evaluation, root / "bundle", root / "bundle_bf16")
    return _RUNS[root]
