"""What every task shares: the wrapper that closes its loggers whether it succeeds or fails (`task`), its loggers
(`open_loggers`), a config group of named components (`instantiate_group`), and an experiment's start (`start_run`)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
T = TypeVar("T")
_LOGGERS: ContextVar[list[Any] | None] = ContextVar("moe_task_loggers", default=None)  # the running task's


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """A config group of named components (loggers, callbacks): instantiate each; None or an empty group gives none."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def open_loggers(cfg: DictConfig) -> list[Any]:
    """The run's loggers (`cfg.logger`), closed by the running task's wrapper (`task`) when it ends."""
    loggers = instantiate_group(cfg.get("logger"))
    if (running := _LOGGERS.get()) is not None:
        running += loggers
    return loggers


def _wandb_run() -> Any:
    wandb = sys.modules.get("wandb")  # never imported here: a task that logged to wandb imported it
    return getattr(wandb, "run", None)


def close_loggers(loggers: list[Any], failed: bool, wandb_before: Any = None) -> None:
    """Finalize each logger ("failed" or "success"), then finish the wandb run the task started (exit code 1 when it
    failed; a run that was open before the task is left open)."""
    for logger in loggers:
        try:
            logger.finalize("failed" if failed else "success")
        except Exception:  # closing the others matters more; the task's own error is not hidden
            log.exception("logger %s did not close", type(logger).__name__)
    if (run := _wandb_run()) is not None and run is not wandb_before:
        sys.modules["wandb"].finish(exit_code=1 if failed else 0)


def task(run: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """A task's entry (`moe.tasks.<name>.run`): its loggers (`open_loggers`) and the wandb run it started are closed
    when it returns and when it raises (then marked failed: exit code 1), and the error goes on."""

    @functools.wraps(run)
    def entry(cfg: DictConfig) -> T:
        token, before, failed = _LOGGERS.set([]), _wandb_run(), True
        try:
            result = run(cfg)
            failed = False
            return result
        finally:
            loggers = _LOGGERS.get() or []
            _LOGGERS.reset(token)
            close_loggers(loggers, failed, before)

    return entry


def start_run(cfg: DictConfig) -> Path:
    """An experiment's start: every seed set from `cfg.seed`, its output folder made, its resolved config saved there
    (`config.yaml`); returns the folder."""
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return out
