"""Why a shape's choice went as it did: each candidate's expert alone, the tenant given, on the tenant's val and test
splits, beside the held-out share it was chosen on. Reads the stores scripts/select_growth.py left in its --work
folders (the pathway expert grown on all rows, the winner grown on the kept rows, the adapter expert) and grows the
`head` candidate on all rows (nothing saved). Writes scripts/results/select/<shape>_check.json.

    python scripts/select_growth_check.py all_intents --work /tmp/select-work --pathway-work /tmp/select-work2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from moe.data import load_clinc150
from moe.data.shapes import all_intents, near_duplicates
from moe.lifecycle import Lifecycle
from moe.lifecycle.selection import Candidate, accuracy, grow_candidate
from moe.paths import cache_dir
from moe.store import ExpertStore
from moe.trunk import FeatureCache, HFEncoderTrunk

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["near_duplicates", "all_intents"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--pathway-work", type=Path, help="where the `pathway` part's store is (default: --work)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import select_growth  # noqa: PLC0415  (beside this script)

    trunk = HFEncoderTrunk()
    encode = FeatureCache(cache_dir() / "features", trunk).encode
    domains = load_clinc150().tenants
    tenant = all_intents(domains) if args.shape == "all_intents" else near_duplicates(domains, encode, pairs=15)
    split = {}
    for s in ("train", "val", "test"):
        rows = tenant.split(s)
        split[s] = ([e.text for e in rows], torch.tensor([tenant.label_index(e.label) for e in rows]))
    features = {s: encode(texts) for s, (texts, _) in split.items()}
    stores = {
        "pathway (full, all rows)": (args.pathway_work or args.work) / f"{args.shape}_pathway",
        "select winner (kept rows)": args.work / f"{args.shape}_select_short_no_retrain",
        "adapter": args.work / f"{args.shape}_adapter",
    }
    report = {}
    for name, folder in stores.items():
        if not folder.exists():
            continue
        store = ExpertStore(folder)
        lifecycle = Lifecycle(store, trunk, encode, select_growth.growth(["expert=pathway"]))
        grower = lifecycle.grower(lifecycle.architecture())
        own = store.load(tenant.name, trunk_fingerprint=trunk.fingerprint)[0]
        report[name] = {s: accuracy(grower, own, own, split[s][0], features[s], split[s][1]) for s in ("val", "test")}
        logging.info("%s: %s", name, report[name])
    base = ExpertStore((args.pathway_work or args.work) / "base_pathway")
    cfg = select_growth.growth(["expert=pathway", "growth=default"])
    lifecycle = Lifecycle(base, trunk, encode, cfg)
    grower = lifecycle.grower(lifecycle.architecture())
    start = time.perf_counter()
    head = Candidate("head", cfg, head=True)
    expert, own = grow_candidate(grower, head, tenant, None, features["train"], split["train"][1], None)
    seconds = time.perf_counter() - start
    report["head (all rows)"] = {
        s: accuracy(grower, expert, own, split[s][0], features[s], split[s][1]) for s in ("val", "test")
    } | {"seconds": seconds}
    logging.info("head: %s", report["head (all rows)"])
    out = ROOT / "scripts/results/select" / f"{args.shape}_check.json"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
