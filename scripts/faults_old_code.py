"""Issue 30's case tests run against the code before the fix and after it: each must fail before and pass after.

    PYTHONPATH=. python scripts/faults_old_code.py --old 611919f^1 --new HEAD --out scripts/results/faults/old_code.json

Each commit is checked out in a scratch git worktree (`--work`), the same test files are copied into both (the case
tests, the helper they need that came later, `tests/service.py`, the fault-injection script `scripts/faults.py` the
injection test drives, and `scripts/faults_old_code/test_case1_alone.py`, case 1 without case 6 in the way), and one
pytest run per tree covers every test below (`--junitxml`). Written: per case, each test's outcome before and after
and the first line of its failure. Minutes on the tiny trunk: each tree builds the shared tiny run and starts Ray
Serve twice. `--from-reports` writes the JSON again from the reports an earlier run left in `--work`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = [  # (from this checkout, to the tree under test)
    ("tests/test_faults.py", "tests/test_faults.py"),
    ("tests/test_faults_http.py", "tests/test_faults_http.py"),
    ("tests/test_faults_injection.py", "tests/test_faults_injection.py"),
    ("tests/test_entry_points.py", "tests/test_entry_points.py"),
    ("tests/service.py", "tests/service.py"),
    ("scripts/faults.py", "scripts/faults.py"),
    ("scripts/faults_old_code/test_case1_alone.py", "tests/test_faults_case1_alone.py"),
]
F, H = "tests/test_faults.py::", "tests/test_faults_http.py::"
CASES = {
    "1 a damaged expert fails other tenants' requests (HTTP)": [
        H + "test_an_expert_damaged_later_fails_only_its_own_tenants_requests_under_16_clients",
        "tests/test_faults_case1_alone.py::"
        "test_an_expert_damaged_after_the_start_fails_only_its_own_tenants_requests_under_16_clients",
    ],
    "2 non-finite weights are served": [
        F + "test_a_non_finite_value_in_any_tensor_of_any_kind_is_refused_at_write_and_at_read_by_name",
        F + "test_a_nan_shard_in_a_store_is_left_out_by_name_and_changes_no_other_answer",
    ],
    "3 a trunk upgrade is not atomic": [
        F + "test_a_reader_sees_the_published_generation_not_a_version_written_since",
        "tests/test_faults_injection.py::test_killed_operations_leave_a_store_that_loads_and_answers_as_before_or_after",
    ],
    "4 an S3 object removed between listing and fetch, a stopped endpoint (moto)": [
        F + "test_an_object_removed_between_listing_and_fetch_leaves_that_tenant_out_naming_its_url",
        F + "test_a_stopped_endpoint_is_a_shard_error_naming_the_url_within_the_stated_bound",
        F + "test_a_refused_connection_after_listing_leaves_every_tenant_out_by_url",
        F + "test_the_s3_timeouts_and_retries_are_bounded",
    ],
    "5 one odd expert blames the good ones": [
        F + "test_one_odd_expert_is_the_one_refused_and_growth_picks_the_common_architecture",
    ],
    "6 a replica restarting over a bundle with one damaged expert takes the service down (HTTP)": [
        H + "test_a_replica_starts_over_a_damaged_expert_and_says_degraded",
    ],
    "weaker: an export that fails leaves half a bundle; a repeated header row": [
        "tests/test_entry_points.py::test_an_export_that_fails_midway_leaves_no_partial_bundle_and_an_earlier_one_whole",
        "tests/test_entry_points.py::test_a_successful_export_leaves_no_staging_folder",
        F + "test_a_repeated_header_row_is_refused_with_its_line",
    ],
    "control: a damaged byte was refused before the fix too (checksums)": [
        F + "test_a_damaged_byte_in_any_tensor_of_any_kind_is_refused_by_name",
    ],
}

NOTES = {  # what a test's outcome before the fix says, where it is not plainly the case's fault caught
    H + "test_an_expert_damaged_later_fails_only_its_own_tenants_requests_under_16_clients": "its service starts over "
    "a bundle damaged before the start (case 6), which the old code can not start: it errs at setup, before its own "
    "check; scripts/faults_old_code/test_case1_alone.py (the next row) is case 1 alone",
    "tests/test_faults_injection.py::test_killed_operations_leave_a_store_that_loads_and_answers_as_before_or_after": (
        "the suite's checker reads each killed store at its published generation (store.at(store.state())), which "
        "the old store had already; the old fault was a reader that did not: the test above"
    ),
    F + "test_the_s3_timeouts_and_retries_are_bounded": "imports the new constants (ATTEMPTS, ...): an ImportError "
    "before the fix, not a fault caught; the stopped-endpoint test is the old surface",
}


def checkout(commit: str, folder: Path) -> str:
    """A scratch worktree of `commit` at `folder` (made once, then moved to `commit`, what was copied in before
    discarded), the case tests copied in; its full hash."""
    if not folder.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT, check=True)
    else:
        commit = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True)
        subprocess.run(["git", "checkout", "-q", "-f", "--detach", commit.stdout.strip()], cwd=folder, check=True)
    for source, target in COPIED:
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / source, folder / target)
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def run_tests(folder: Path, report: Path, timeout: float) -> float:
    """Every case test in one pytest run in `folder`; its seconds."""
    env = os.environ | {"PYTHONPATH": str(folder), "MOE_CACHE_DIR": str(folder / ".cache")}
    tests = sorted({t.split("::")[0] for tests in CASES.values() for t in tests})
    ids = [t for tests in CASES.values() for t in tests]
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *ids]
    subprocess.run(command, cwd=folder, env=env, timeout=timeout, check=False, capture_output=True)
    assert report.is_file(), f"pytest wrote no report in {folder} (files: {tests})"
    return time.perf_counter() - started


def outcomes(report: Path) -> dict[str, dict]:
    """Each test case of the junit report by node id (parameters included): outcome and the failure's first line."""
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{module}::{case.get('name')}"
        outcome, reason = "passed", None
        for kind in ("failure", "error", "skipped"):
            if (element := case.find(kind)) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = element.get("message") or element.text or ""
                reason = next((line.strip() for line in message.splitlines() if line.strip()), "")[:300]
        found[node] = {"outcome": outcome, "reason": reason}
    return found


def matched(found: dict[str, dict], test: str) -> dict[str, dict]:
    return {node: result for node, result in found.items() if node == test or node.startswith(test + "[")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="611919f^1", help="the commit before the fix (the faults merge's parent)")
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "faults-old-code")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per tree")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/faults/old_code.json")
    parser.add_argument("--from-reports", action="store_true", help="re-read the reports of an earlier run in --work")
    args = parser.parse_args(argv)
    trees, seconds = {}, {}
    if args.from_reports:
        seconds = json.loads((args.work / "seconds.json").read_text())
    for side, commit in (("old", args.old), ("new", args.new)):
        folder = args.work / side
        trees[side] = checkout(commit, folder)
        if not args.from_reports:
            seconds[side] = round(run_tests(folder, args.work / f"{side}.xml", args.timeout), 1)
    (args.work / "seconds.json").write_text(json.dumps(seconds))
    found = {side: outcomes(args.work / f"{side}.xml") for side in trees}
    cases, shown = {}, {}
    for case, tests in CASES.items():
        rows = []
        for test in tests:
            old, new = matched(found["old"], test), matched(found["new"], test)
            row = {
                "test": test,
                "old": dict(Counter(r["outcome"] for r in old.values())),
                "old_reasons": sorted({r["reason"] for r in old.values() if r["reason"]}),
                "new": dict(Counter(r["outcome"] for r in new.values())),
                "new_reasons": sorted({r["reason"] for r in new.values() if r["reason"]}),
            }
            rows.append(row | ({"note": NOTES[test]} if test in NOTES else {}))
        cases[case] = rows
        caught = [r for r in rows if r["old"] and "passed" not in r["old"]]
        caught = [r for r in caught if not any("ImportError" in x for x in r["old_reasons"])]
        shown[case] = bool(caught) and all(list(r["new"]) == ["passed"] for r in rows)  # fails before (not by import)
    result = {"old_commit": trees["old"], "new_commit": trees["new"], "seconds": seconds}
    result["case_failed_before_and_passes_after"] = shown
    result["cases"] = cases
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
