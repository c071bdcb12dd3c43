"""Benchmark: peak resident memory of growing a tenant from a large file, beside evaluating on the same file.

    python scripts/bench_grow_memory.py --out scripts/results/grow_memory_cpu.json
    python scripts/bench_grow_memory.py --rows 20000 --out /tmp/grow_memory.json   # a quick look

Writes a synthetic tenant CSV (`--rows` rows with a split column: 80 % train, 10 % val, 10 % test; texts almost all
distinct, as a user's queries are) into `--work`, then runs, each in a fresh child process on the tiny trunk,
`scripts/grow.py` (into an empty store, `--epochs` growth epochs) and `scripts/evaluate.py` on the grown store and
the same file. Each child's peak resident memory is the kernel's (`/usr/bin/time -v`, else
`getrusage(RUSAGE_CHILDREN)` in a wrapper process of its own). Both run side by side in one run, so their ratio
holds on this machine whatever else it runs; the JSON records both peaks, their ratio, and the limit it is held to.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe.experiments.bench import machine_info

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1.3  # grow's peak may be at most this much of evaluate's
INTENTS = 20
FILLERS = ["please", "can you", "i want to", "tell me", "now", "today", "quickly", "my", "hey", "could you"]
TIME = Path("/usr/bin/time")
WRAPPER = (  # the peak of one child process, where there is no /usr/bin/time
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('Maximum resident set size (kbytes):', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "file=sys.stderr); sys.exit(rc)"
)


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def write_csv(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """`rows` rows of `INTENTS` intents (6 keywords each) with 2 words of a shared 5,000-word vocabulary."""
    rng = random.Random(seed)
    vocabulary = sorted({pseudo_word(rng) for _ in range(6000)})[:5000]
    keywords = [[pseudo_word(rng) for _ in range(6)] for _ in range(INTENTS)]
    counts = {"train": 0, "val": 0, "test": 0}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "split"])
        for _ in range(rows):
            intent = rng.randrange(INTENTS)
            draw = rng.random()
            split = "train" if draw < 0.8 else "val" if draw < 0.9 else "test"
            words = [rng.choice(FILLERS), *rng.sample(keywords[intent], 2), *rng.sample(vocabulary, 2)]
            writer.writerow([" ".join(words), f"intent_{intent:02d}", split])
            counts[split] += 1
    return counts


def measured(args: list[str], log: Path) -> dict:
    """Run `python args` from the repository root; its peak resident memory and wall time."""
    command = [sys.executable, *args]
    wrapped = [str(TIME), "-v", *command] if TIME.is_file() else [sys.executable, "-c", WRAPPER, *command]
    start = time.perf_counter()
    done = subprocess.run(wrapped, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {done.returncode}); its output is in {log}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if peak is None:
        raise SystemExit(f"no peak resident memory reported for {args[0]}; see {log}")
    return {
        "command": " ".join(["python", *args]),
        "peak_rss_bytes": int(peak[1]) * 1024,
        "peak_rss_mb": round(int(peak[1]) / 1024, 1),
        "wall_s": round(wall, 1),
        "peak_from": "/usr/bin/time -v" if TIME.is_file() else "getrusage(RUSAGE_CHILDREN)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=1, help="growth epochs")
    parser.add_argument("--work", type=Path, default=None, help="folder for the CSV, store and logs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "grow_memory_cpu.json")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-grow-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = work / "tenant.csv"
        start = time.perf_counter()
        counts = write_csv(data, args.rows)
        print(f"wrote {args.rows} rows ({data.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - start:.1f} s")
        common = ["trunk=tiny", f"hydra.run.dir={work / 'hydra'}"]
        store = work / "store"
        grow = measured(
            [
                "scripts/grow.py",
                f"store_dir={store}",
                "create_store=true",
                "tenant.name=bench",
                f"tenant.files={data}",
                "tenant.split_column=split",
                f"growth.epochs={args.epochs}",
                f"paths.cache_dir={work / 'cache_grow'}",
                *common,
            ],
            work / "grow.log",
        )
        print(f"grow: peak {grow['peak_rss_mb']} MB in {grow['wall_s']} s")
        tenants = (
            f"data.tenants=[{{_target_: moe.data.read_tenant_file, name: bench, files: '{data}', split_column: split}}]"
        )
        evaluate = measured(
            [
                "scripts/evaluate.py",
                f"store_dir={store}",
                "data=tenant_files",
                tenants,
                "logger=none",
                f"paths.output_dir={work / 'evaluation'}",
                f"paths.cache_dir={work / 'cache_evaluate'}",
                *common,
            ],
            work / "evaluate.log",
        )
        print(f"evaluate: peak {evaluate['peak_rss_mb']} MB in {evaluate['wall_s']} s")
        ratio = grow["peak_rss_bytes"] / evaluate["peak_rss_bytes"]
        result = {
            "machine": machine_info(),
            "config": {
                "rows": args.rows,
                "split_rows": counts,
                "file_bytes": data.stat().st_size,
                "intents": INTENTS,
                "trunk": "tiny",
                "growth_epochs": args.epochs,
            },
            "grow": grow,
            "evaluate": evaluate,
            "grow_over_evaluate": round(ratio, 3),
            "limit": LIMIT,
            "within_limit": ratio <= LIMIT,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"grow / evaluate peak resident memory: {ratio:.2f} (limit {LIMIT}); written to {args.out}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
