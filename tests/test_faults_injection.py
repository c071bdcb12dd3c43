"""The fault-injection suite, bounded (scripts/faults.py): a grow, a retire and a trunk upgrade each killed at a seeded
random write point in a child process; each killed store still loads at its generation and every tenant answers as
before the operation or as after it; the killed upgrade, run again, completes."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def load_script():
    spec = importlib.util.spec_from_file_location("faults_script", ROOT / "scripts" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killed_operations_leave_a_store_that_loads_and_answers_as_before_or_after(tmp_path):
    faults = load_script()
    result = faults.suite(tmp_path, kills=1, seed=0, operations=("grow", "retire", "upgrade"), log=lambda line: None)
    counts = result["counts"]
    assert counts["states_checked"] == 3 and counts["operations_killed"] == 3, result["cases"]
    assert counts["did_not_load"] == 0 and counts["answered_otherwise"] == 0, result["cases"]
    assert counts["reruns_checked"] == 1 and counts["reruns_failed"] == 0, result["cases"]
