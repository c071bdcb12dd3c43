"""Multiruns of scripts/train.py as a user runs them: an Optuna search collected by scripts/collect_runs.py, and
the submitit and joblib launchers. Each job must get its own output folder; nothing may overwrite another job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_python, synthetic_data

pytestmark = pytest.mark.subprocess

# wandb (offline) so that the tests see each job's run name and group
FAST = ["trunk=tiny", "logger=wandb", "callbacks=none", "trainer.max_epochs=1", "data.batch_size=16"]


def job_folders(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def assert_own_outputs(job: Path) -> dict:
    """A finished job's folder: its config, metrics, and exactly one version of each tenant's expert."""
    shards = sorted(p.relative_to(job / "experts").as_posix() for p in (job / "experts").rglob("*.safetensors"))
    assert shards == ["bank/v0001.safetensors", "music/v0001.safetensors", "weather/v0001.safetensors"], job
    assert (job / "gate.safetensors").is_file() and (job / "config.yaml").is_file()
    metrics = json.loads((job / "metrics.json").read_text())
    assert 0 <= metrics["val/acc_routed"] <= 100 and metrics["data/train_examples"] == 180
    return metrics


@pytest.mark.slow
def test_optuna_search_and_collect_runs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=clinc150_optuna", *synthetic_data(tmp_path / "data"), *FAST]
    run_python("scripts/train.py", *args, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")

    jobs = job_folders(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2"]
    values = [assert_own_outputs(job)["val/acc_routed"] for job in jobs]
    # the sweeper maximized what the jobs returned: optimized_metric, val/acc_routed
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values))
    # one wandb group per sweep, one name per trial, as passed to the WandbLogger of each job
    wandb_cfgs = [yaml.safe_load((job / "config.yaml").read_text())["logger"]["wandb"] for job in jobs]
    assert {c["group"] for c in wandb_cfgs} == {str(sweep)}
    assert [c["name"] for c in wandb_cfgs] == ["trial-0", "trial-1", "trial-2"]
    assert all(list((job / "wandb").glob("offline-run-*/run-*.wandb")) for job in jobs)

    table = run_python("scripts/collect_runs.py", str(sweep), "--metric", "val/acc_routed").stdout
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["job"] for row in rows) == ["0", "1", "2"]
    for row in rows:
        assert row["gate"] in {"prototype", "switch"} and row["gate.top_k"] in {"1", "2", "3"}
        assert row["expert.rank"] in {"0", "16", "64", "128"} and 1e-3 <= float(row["optim.lr"]) <= 1e-2
        written = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["val/acc_routed"]) == pytest.approx(written["val/acc_routed"])
    # the printed table lists the jobs best first
    best_first = sorted(range(3), key=lambda j: -values[j])
    assert [int(line.split()[0]) for line in table.splitlines()[1:4]] == best_first
    assert (sweep / "metric_vs_params.png").stat().st_size > 1000


def test_collect_runs_refuses_a_folder_without_runs(tmp_path):
    done = run_python("scripts/collect_runs.py", str(tmp_path), check=False)
    assert done.returncode != 0 and "no runs under" in done.stderr


LAUNCHERS = {
    # launcher overrides, what Hydra logs when that launcher runs the jobs, whether jobs share a wandb group
    "submitit_local": (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"], "Submitit 'local'", False),
    "joblib": (
        # a plain multirun gets one wandb group the way conf/hparams_search/ sets it
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+hydra.job.env_set.WANDB_RUN_GROUP=${hydra:sweep.dir}"],
        "Joblib.Parallel(n_jobs=2",
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_runs_each_job_in_its_own_folder(launcher, tmp_path):
    overrides, logged, grouped = LAUNCHERS[launcher]
    sweep = tmp_path / "sweep"
    args = [*synthetic_data(tmp_path / "data"), *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    done = run_python("scripts/train.py", "-m", *overrides, *args)
    assert logged in done.stdout + done.stderr

    jobs = job_folders(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    configs = [yaml.safe_load((job / "config.yaml").read_text()) for job in jobs]
    assert [c["seed"] for c in configs] == [0, 1]
    assert {c["logger"]["wandb"]["group"] for c in configs} == {str(sweep) if grouped else None}
    for job in jobs:
        assert_own_outputs(job)
