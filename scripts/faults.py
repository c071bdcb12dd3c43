"""Fault injection: every lifecycle operation and a trunk upgrade killed at seeded random points, then checked.

    PYTHONPATH=. python scripts/faults.py --kills 3 --seed 0 --out scripts/results/faults/faults.json

How a process is killed: the operation runs in a child process whose file-system write points (`os.replace`,
`os.link`, `os.rename`, `os.unlink`, `os.fsync`, `shutil.rmtree`, `shutil.move`) are counted, and which dies with
`os._exit(137)` (as a SIGKILL leaves it: no `finally`, no lock released by Python, nothing flushed) just before the
N-th one. A first, unkilled run of each operation on a copy of the store counts its points and gives the state
"after"; then each of `--kills` points drawn with `--seed` is killed on a fresh copy, and checked: the store loads
(`load_mixture` at its generation, on the trunk that generation serves) and every tenant's tenant-given answers on its
test texts equal its answers before the operation or after it. A killed upgrade is run again, and must complete
(its generation on the new trunk, answering as the unkilled run did). Prints and writes the counts: operations
killed, states checked, states that did not load, states that answered otherwise (the goal: 0 and 0).

On the tiny trunk (synthetic tenants, seconds per child); bounded by `--kills` per operation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ("grow", "update", "hibernate", "wake", "retire", "delete", "upgrade")
POINTS = (("os", "replace"), ("os", "link"), ("os", "rename"), ("os", "unlink"), ("os", "fsync"))
POINTS += (("shutil", "rmtree"), ("shutil", "move"))
KILLED = 137
INTENTS = {  # three small synthetic tenants (tests/helpers.py has the same idea, larger)
    "weather": {"rain": ["rain", "umbrella", "wet"], "sun": ["sunny", "hot", "bright"]},
    "music": {"play": ["play", "song", "jazz"], "stop": ["stop", "pause", "quiet"]},
    "bank": {"balance": ["balance", "money", "account"], "card": ["card", "lost", "block"]},
}


def write_tenant(path: Path, intents: dict[str, list[str]], seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["text,label,split"]
    for split, count in (("train", 24), ("val", 6), ("test", 6)):
        for label, words in intents.items():
            lines += [f"{' '.join(rng.choices(words, k=4))} {rng.choice(['please', 'now', 'today'])},{label},{split}"]
            lines += [f"{' '.join(rng.choices(words, k=3))},{label},{split}" for _ in range(count - 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def growth():
    from moe.lifecycle import GrowthConfig

    settings = dict(rank=8, dropout=0.0, input_scale=8.0, lr=3e-3, weight_decay=1e-4, epochs=3, batch_size=32)
    return GrowthConfig(**settings, routing_epochs=2, negatives_per_class=5, rehearsal_per_class=10)


def setup(folder: Path) -> Path:
    """`folder/store`: weather, music, bank grown on the tiny trunk, bank hibernating, and an adapted trunk version
    recorded for the upgrade; `folder/data`: their files (and more music for an update, a new tenant for a grow)."""
    from moe.data import read_tenant_file
    from moe.lifecycle import Lifecycle
    from moe.lifecycle.adapt import AdaptConfig, adapt_trunk
    from moe.store import ExpertStore, TrunkVersions
    from moe.trunk import TinyTrunk

    seed_all()
    data = folder / "data"
    files = {name: write_tenant(data / f"{name}.csv", intents, i) for i, (name, intents) in enumerate(INTENTS.items())}
    write_tenant(data / "music_more.csv", INTENTS["music"], 7)
    write_tenant(data / "late.csv", {"hello": ["hi", "hello", "hey"], "bye": ["bye", "later", "ciao"]}, 9)
    tenants = {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}
    trunk = TinyTrunk(dim=16, freeze=True)
    lifecycle = Lifecycle(ExpertStore(folder / "store"), trunk, trunk.encode, growth())
    for tenant in tenants.values():
        lifecycle.grow(tenant)
    lifecycle.hibernate("bank")
    adapt = AdaptConfig(epochs=2, lr=3e-2, head_lr=3e-2, batch_size=16, input_scale=8.0)
    new, _ = adapt_trunk(trunk, [tenants["weather"], tenants["music"]], adapt)
    TrunkVersions(folder / "store").record(new, parent=trunk.fingerprint, weights=True)
    (folder / "new_trunk").write_text(new.fingerprint)
    return folder / "store"


def seed_all() -> None:
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def operate(folder: Path, op: str) -> None:
    """Run `op` on `folder/store` (in a child process: `child`)."""
    from moe.data import read_tenant_file
    from moe.lifecycle import Lifecycle
    from moe.lifecycle.upgrade import upgrade_store
    from moe.store import ExpertStore, TrunkVersions
    from moe.trunk import TinyTrunk

    seed_all()
    data, store = folder / "data", ExpertStore(folder / "store")
    old = TinyTrunk(dim=16, freeze=True)

    def tenant(name: str, file: str | None = None):
        return read_tenant_file(name, data / f"{file or name}.csv", split_column="split")

    lifecycle = Lifecycle(store, old, old.encode, growth())
    if op == "grow":
        lifecycle.grow(tenant("late"))
    elif op == "update":
        lifecycle.update(tenant("music", "music_more"))
    elif op == "hibernate":
        lifecycle.hibernate("weather")
    elif op == "wake":
        lifecycle.wake("bank")
    elif op == "retire":
        lifecycle.retire("music")
    elif op == "delete":
        store.delete("weather")
    elif op == "upgrade":
        new = TrunkVersions(store.root).rebuild((folder / "new_trunk").read_text())
        upgraded = Lifecycle(store, new, new.encode, growth())
        upgrade_store(upgraded, old, [tenant("weather"), tenant("music")], "bridge")
    else:
        raise ValueError(f"unknown operation {op!r}; known: {OPERATIONS}")


def arm(kill_at: int) -> list[int]:
    """Count the write points from now on; die (as a SIGKILL would) just before the `kill_at`-th (-1: never)."""
    import importlib

    count = [0]
    for module_name, name in POINTS:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def point(*args, _original=original, **kwargs):
            if count[0] == kill_at:
                os._exit(KILLED)
            count[0] += 1
            return _original(*args, **kwargs)

        setattr(module, name, point)
    return count


def child(folder: Path, op: str, kill_at: int) -> None:
    import torch  # noqa: F401  # imported before arming: its own imports' file operations are not the operation's

    import moe.lifecycle  # noqa: F401

    count = arm(kill_at)
    operate(folder, op)
    print(json.dumps({"points": count[0]}), flush=True)


def answers(folder: Path) -> dict[str, list]:
    """Each awake tenant's tenant-given answers (label, score to 5 places) on its test texts, from the store's latest
    generation on the trunk it serves."""
    import torch

    from moe.data import read_tenant_file
    from moe.inference import load_mixture
    from moe.model import best_labels
    from moe.store import ExpertStore, TrunkVersions
    from moe.trunk import TinyTrunk

    store = ExpertStore(folder / "store")
    state = store.state()
    old = TinyTrunk(dim=16, freeze=True)
    trunk = old if state.trunk in (None, old.fingerprint) else TrunkVersions(store.root).rebuild(state.trunk)
    model = load_mixture(store.at(state), trunk_fingerprint=trunk.fingerprint)
    found = {}
    for name in model.tenants:
        file = folder / "data" / f"{name}.csv"
        texts = [e.text for e in read_tenant_file(name, file, split_column="split").split("test")]
        features = trunk.encode(texts)
        with torch.no_grad():
            output = model(features, torch.full((len(texts),), model.tenant_index(name)))
        best, scores = best_labels(output)
        found[name] = [
            [model.labels[i][1], round(float(s), 5)] for i, s in zip(best.tolist(), scores.tolist(), strict=True)
        ]
    return found


def run_child(folder: Path, op: str, kill_at: int, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), "child", str(folder), op, str(kill_at)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def same_tenants(found: dict, before: dict, after: dict) -> list[str]:
    """The tenants whose answers are neither their answers before nor after (absent counts as an answer)."""
    names = set(found) | set(before) | set(after)
    return sorted(t for t in names if found.get(t) not in (before.get(t), after.get(t)))


def suite(work: Path, kills: int, seed: int, operations=OPERATIONS, log=print) -> dict:
    """Kill each operation at `kills` seeded points and check each state; the counts and each case."""
    started = time.perf_counter()
    base = work / "base"
    if not (base / "store").is_dir():
        setup(base)
    before = answers(base)
    rng = random.Random(seed)
    counts = {"operations_killed": 0, "states_checked": 0, "did_not_load": 0, "answered_otherwise": 0}
    counts |= {"reruns_checked": 0, "reruns_failed": 0}
    cases = []
    for op in operations:
        reference = work / f"{op}-after"
        shutil.copytree(base, reference)
        done = run_child(reference, op, -1)
        if done.returncode != 0:
            raise RuntimeError(f"{op} failed unkilled:\n{done.stdout}\n{done.stderr}")
        points = json.loads(done.stdout.strip().splitlines()[-1])["points"]
        after = answers(reference)
        for kill_at in sorted(rng.sample(range(points), min(kills, points))):
            copy = work / f"{op}-{kill_at}"
            shutil.copytree(base, copy)
            killed = run_child(copy, op, kill_at)
            case = {"operation": op, "kill_at": kill_at, "points": points, "exit": killed.returncode}
            counts["operations_killed"] += killed.returncode == KILLED
            counts["states_checked"] += 1
            try:
                found = answers(copy)
            except Exception as error:  # noqa: BLE001  # any failure to load is what is counted
                counts["did_not_load"] += 1
                case["error"] = f"{type(error).__name__}: {error}"
            else:
                if differ := same_tenants(found, before, after):
                    counts["answered_otherwise"] += 1
                    case["differ"] = differ
                case["as"] = "before" if found == before else "after" if found == after else "mixed"
            if op == "upgrade":  # run again: it completes, as the unkilled run did
                again = run_child(copy, op, -1)
                counts["reruns_checked"] += 1
                try:
                    ok = again.returncode == 0 and answers(copy) == after
                except Exception:  # noqa: BLE001
                    ok = False
                counts["reruns_failed"] += not ok
                case["rerun"] = "completed" if ok else f"failed: {again.stderr[-400:]}"
            log(json.dumps(case))
            cases.append(case)
            shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(reference, ignore_errors=True)
    return {"counts": counts, "seconds": round(time.perf_counter() - started, 1), "seed": seed, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="suite", choices=["suite", "child"])
    parser.add_argument("args", nargs="*", help="child: FOLDER OPERATION KILL_AT")
    parser.add_argument("--kills", type=int, default=3, help="kill points per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument("--work", type=Path, default=None, help="a scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/faults/faults.json")
    args = parser.parse_args(argv)
    if args.mode == "child":
        folder, op, kill_at = args.args
        child(Path(folder), op, int(kill_at))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        result = suite(args.work or Path(scratch), args.kills, args.seed, args.operations)
    print(json.dumps(result["counts"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
