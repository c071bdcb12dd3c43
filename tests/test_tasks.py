"""Every entry point runs through one wrapper (`moe.tasks.base.task`), which closes the task's loggers and the wandb
run it started whether the task succeeds or fails (a failed run finishes with exit code 1)."""

from __future__ import annotations

import importlib
import pkgutil

import lightning as L
import pytest
import wandb
from omegaconf import OmegaConf

import moe.tasks
from moe.tasks import train
from moe.tasks.base import open_loggers, task
from tests.helpers import ROOT, compose_config, synthetic_data

TASKS = sorted(m.name for m in pkgutil.iter_modules(moe.tasks.__path__))


class FailingCallback(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("a failure in the middle of training")


@pytest.fixture
def finished(monkeypatch) -> list[int]:
    """The exit codes wandb runs were finished with (the runs really finish)."""
    codes, real = [], wandb.finish

    def spy(exit_code=None, **kwargs):
        codes.append(exit_code)
        return real(exit_code=exit_code, **kwargs)

    monkeypatch.setattr(wandb, "finish", spy)
    return codes


def test_a_training_run_that_fails_midway_still_finishes_its_wandb_run_as_failed(tmp_path, finished):
    overrides = [*synthetic_data(tmp_path / "data"), "trunk=tiny", "logger=wandb", "callbacks=none"]
    overrides += [
        "trainer.max_epochs=2",
        "data.batch_size=16",
        "+callbacks.fail._target_=tests.test_tasks.FailingCallback",
    ]
    with pytest.raises(RuntimeError, match="middle of training"):
        train.run(compose_config("train", overrides, tmp_path / "run"))
    assert finished == [1] and wandb.run is None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the run was never started: nothing was tested"


def test_a_task_closes_its_loggers_when_it_fails_and_when_it_succeeds(tmp_path, finished):
    cfg = OmegaConf.create({"logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "x"}}})
    cfg.logger.csv.save_dir = str(tmp_path)

    @task
    def failing(cfg):
        (logger,) = open_loggers(cfg)
        logger.log_metrics({"loss": 1.0})
        wandb.init(mode="offline", dir=str(tmp_path))
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        failing(cfg)
    assert finished == [1] and wandb.run is None
    assert "loss" in next(tmp_path.rglob("metrics.csv")).read_text()  # written when the logger was finalized

    @task
    def succeeding(cfg):
        wandb.init(mode="offline", dir=str(tmp_path))
        return 7

    assert succeeding(cfg) == 7 and finished == [1, 0] and wandb.run is None


def test_a_wandb_run_open_before_a_task_is_left_open(tmp_path, finished):
    outer = wandb.init(mode="offline", dir=str(tmp_path))
    try:
        assert task(lambda cfg: "done")(OmegaConf.create({})) == "done"
        assert finished == [] and wandb.run is outer
    finally:
        wandb.finish()


@pytest.mark.parametrize("name", [t for t in TASKS if t not in ("base", "inputs", "lifecycle")])
def test_every_task_is_run_through_the_wrapper_and_its_script_calls_it(name):
    run = importlib.import_module(f"moe.tasks.{name}").run
    assert getattr(run, "__wrapped__", None) is not None, f"moe.tasks.{name}.run is not wrapped by moe.tasks.base.task"
    assert f"{name}.run(cfg)" in (ROOT / "scripts" / f"{name}.py").read_text()
