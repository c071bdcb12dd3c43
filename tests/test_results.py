"""scripts/results/RESULTS.md is rendered from the JSON and CSV files beside it (scripts/render_results.py): it must
never drift from them, and the check must notice when a figure changes."""

from __future__ import annotations

import importlib.util
import json
import shutil

from tests.helpers import ROOT

SPEC = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
render_results = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(render_results)


def test_results_doc_matches_the_json():
    stale = render_results.check(render_results.RESULTS, render_results.README)
    assert not stale, f"RESULTS.md is stale in {stale}: run python scripts/render_results.py"


def test_check_names_the_section_whose_figure_changed(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(render_results.RESULTS, root)
    assert render_results.check(root) == []
    path = root / "dispatch_cpu.json"
    bench = json.loads(path.read_text())
    bench["results"][0]["dense_over_routed"] += 1.0
    path.write_text(json.dumps(bench))
    assert render_results.check(root) == ["Dispatch"]
    (root / render_results.DOC).write_text(render_results.render(root))
    assert render_results.check(root) == []
