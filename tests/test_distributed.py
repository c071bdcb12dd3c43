"""Data-parallel training (`trainer=ddp_cpu`: 2 processes, gloo) trains the same experts as one process.

Both runs use the DDP strategy so that both draw batches through Lightning's DistributedSampler with the same
seed: one process with batch 16 and two with batch 8 each take the same 16 examples per optimizer step, and
DDP averages their gradients. Dropout is off, so the experts must match to float rounding.
"""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import run_python, synthetic_data

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

TENANTS = ["bank", "music", "weather"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process, two processes): the run folder of each, the same data, seed and epochs."""
    folder = tmp_path_factory.mktemp("ddp")
    common = ["scripts/train.py", *synthetic_data(folder / "data"), "trunk=tiny", "callbacks=none", "expert.dropout=0"]
    common += ["trainer=ddp_cpu", "trainer.max_epochs=4"]
    single, double = folder / "single", folder / "double"
    # the same 16 examples per step: 1 process x 16, or 2 x 8; the single run also checks wandb in run mode
    run_python(*common, "trainer.devices=1", "data.batch_size=16", "logger=wandb", f"hydra.run.dir={single}")
    run_python(*common, "trainer.devices=2", "data.batch_size=8", "logger=csv", f"hydra.run.dir={double}")
    return single, double


def test_two_processes_train_the_same_experts_as_one(runs):
    single, double = runs
    for tenant in TENANTS:
        one = load_file(single / "experts" / tenant / "v0001.safetensors")
        two = load_file(double / "experts" / tenant / "v0001.safetensors")
        assert one.keys() == two.keys() and one["head.weight"].abs().max() > 1e-3
        for name, tensor in one.items():
            assert two[name].allclose(tensor, atol=1e-5, rtol=0), f"{tenant}/{name} differs"


def test_only_rank_zero_writes_shards_gate_and_metrics(runs):
    _, double = runs
    files = (p.relative_to(double / "experts").as_posix() for p in (double / "experts").rglob("*"))
    shards = sorted(f for f in files if not f.startswith("."))  # the store's own: locks, trunks, generations
    assert shards == [x for t in TENANTS for x in (t, f"{t}/v0001.safetensors")]  # one version each, never v0002
    assert (double / "gate.safetensors").is_file()
    # each rank logs to its own file: both ran the whole run, only rank 0 saved
    rank0, rank1 = (double / "train.log").read_text(), (double / "train_ddp_process_1.log").read_text()
    assert "metrics:" in rank0 and "metrics:" in rank1
    assert rank0.count("saved expert") == 3 and "saved expert" not in rank1


def test_evaluation_metrics_cover_every_rank(runs):
    """Eval metrics are synced across ranks (sync_dist): the same model scores the same as in one process."""
    one, two = (json.loads((run / "metrics.json").read_text()) for run in runs)
    for key in ("val/acc_routed", "val/acc_tenant_given", "test/acc_routed", "test/acc_tenant_given"):
        assert 0 <= two[key] <= 100 and two[key] == pytest.approx(one[key], abs=1e-3), key
    assert two["test/acc_tenant_given"] > 90 and two["data/train_examples"] == 180


def test_a_single_run_has_no_wandb_group(runs):
    single, _ = runs
    wandb = yaml.safe_load((single / "config.yaml").read_text())["logger"]["wandb"]
    assert wandb["group"] is None and wandb["name"] == "train"
    assert list((single / "wandb").glob("offline-run-*"))
