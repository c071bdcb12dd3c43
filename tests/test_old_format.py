"""Stores and bundles written before expert kinds (tests/fixtures/old_format, made by the old code with
tests/fixtures/make_old_format.py) still load, and give the answers they gave then, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe.inference import load_mixture
from moe.trunk import HFEncoderTrunk, TinyTrunk
from tests.fixtures.make_old_format import TINY, answers_of, bundle_answers

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_format"
EXPECTED = json.loads((FIXTURE / "answers.json").read_text())


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """A copy of the fixture: loading may take the stores' locks, and the fixture stays as committed."""
    return shutil.copytree(FIXTURE, tmp_path_factory.mktemp("old") / "old_format")


@pytest.mark.parametrize(
    "store, tenants", [("adapter", ["weather", "music"]), ("linear", ["bank"]), ("pathway", ["weather", "bank"])]
)
def test_an_old_store_gives_the_answers_it_gave(old, store, tenants):
    trunk = HFEncoderTrunk(old / "tiny_bert") if store == "pathway" else TinyTrunk(**TINY, freeze=True)
    assert answers_of(load_mixture(old / store, trunk=trunk), trunk, tenants) == EXPECTED[store]


@pytest.mark.parametrize("bundle, tenants", [("bundle", ["weather", "music"]), ("bundle_pathway", ["weather", "bank"])])
def test_an_old_bundle_gives_the_answers_it_gave(old, bundle, tenants):
    assert bundle_answers(old / bundle, tenants) == EXPECTED[bundle]
