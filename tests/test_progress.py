"""Long work shows progress on a terminal and nothing in logs or CI (moe.progress): the rule, and a grow under it."""

from __future__ import annotations

import io
import sys

import pytest

from moe.data import read_tenant_file
from moe.lifecycle import Lifecycle
from moe.progress import bar, lightning_bar, shows_progress
from moe.store import ExpertStore
from moe.tasks import train
from moe.trunk import FeatureCache, TinyTrunk
from tests.helpers import compose_config, fast_growth, synthetic_data, write_synthetic_tenants


class Terminal(io.StringIO):
    """A stream that says it is a terminal, and keeps what was written to it."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "ci, stream, shown",
    [
        (None, Terminal(), True),
        ("", Terminal(), True),
        ("false", Terminal(), True),
        ("true", Terminal(), False),
        ("1", Terminal(), False),
        (None, io.StringIO(), False),  # a log file or a pipe
    ],
    ids=["terminal", "terminal-empty-ci", "terminal-ci-false", "ci-true", "ci-1", "not-a-terminal"],
)
def test_progress_is_shown_on_a_terminal_outside_ci_only(monkeypatch, ci, stream, shown):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(sys, "stdout", stream)
    assert shows_progress() is shown and lightning_bar() is shown
    for _ in bar(range(3), "counting", "step"):
        pass
    assert ("counting" in stream.getvalue()) is shown


def test_a_closed_stream_shows_no_progress(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    closed = io.StringIO()
    closed.close()  # its isatty raises ValueError
    assert not shows_progress(closed)


def test_a_bar_a_caller_turned_off_stays_off_on_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    with bar(desc="quiet", unit="row", total=3, enabled=False) as quiet:
        quiet.update(3)
    assert sys.stderr.getvalue() == ""


def on_terminal(monkeypatch, ci: str | None) -> Terminal:
    """A fake terminal as stdout and stderr, with `CI` set to `ci` (None: unset)."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return terminal


def test_a_grow_shows_its_encoding_and_epochs_on_a_terminal_and_prints_nothing_under_ci(tmp_path, monkeypatch):
    files = write_synthetic_tenants(tmp_path / "data")
    tenants = [read_tenant_file(name, path, split_column="split") for name, path in files.items()]
    trunk = TinyTrunk(dim=16, freeze=True)
    lifecycle = Lifecycle(
        ExpertStore(tmp_path / "store"), trunk, FeatureCache(tmp_path / "cache", trunk).encode, fast_growth()
    )

    def grow(tenant, ci: str | None) -> str:
        """What the grow wrote to a terminal's stdout and stderr."""
        terminal = on_terminal(monkeypatch, ci)
        lifecycle.grow(tenant)
        return terminal.getvalue()

    shown = grow(tenants[0], None)
    assert "encoding" in shown and "Epoch 2" in shown, shown  # the feature cache's bar, Lightning's epochs and steps
    assert grow(tenants[1], "true") == ""


@pytest.mark.slow  # a training run
@pytest.mark.parametrize("ci, shown", [(None, True), ("true", False)])
def test_a_training_run_draws_its_configured_bar_on_a_terminal_only(tmp_path, monkeypatch, ci, shown):
    """The run's own progress bar (`callbacks=default`: Lightning's TQDMProgressBar) follows the same rule: epochs on a
    terminal, nothing in CI logs."""
    terminal = on_terminal(monkeypatch, ci)
    overrides = [*synthetic_data(tmp_path / "data"), "trunk=tiny", "trainer.max_epochs=2", "logger=none"]
    train.run(compose_config("train", [*overrides, "callbacks=default"], tmp_path / "run"))
    assert ("Epoch 1" in terminal.getvalue()) == shown, terminal.getvalue()[-500:]
