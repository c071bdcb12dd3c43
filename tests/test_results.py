"""docs/RESULTS.md is rendered from the JSON and CSV files in scripts/results/ (scripts/render_results.py): it must
never drift from them, and the check must notice when a figure changes."""

from __future__ import annotations

import importlib.util
import json
import shutil

import yaml

from tests.helpers import ROOT

SPEC = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
render_results = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(render_results)


def test_results_doc_matches_the_json():
    stale = render_results.check(render_results.RESULTS, render_results.README, render_results.DOC)
    assert not stale, f"RESULTS.md is stale in {stale}: run python scripts/render_results.py"


def test_the_rendered_batch_wait_is_the_services_default():
    from moe.serving.http import ServiceSettings

    assert ServiceSettings(bundle="").batch_wait_ms == render_results.SERVICE_BATCH_WAIT_MS


def test_check_names_the_section_whose_figure_changed(tmp_path):
    root, doc = tmp_path / "results", tmp_path / "RESULTS.md"
    shutil.copytree(render_results.RESULTS, root)
    shutil.copy(render_results.DOC, doc)
    assert render_results.check(root, doc=doc) == []
    path = root / "dispatch_cpu.json"
    bench = json.loads(path.read_text())
    bench["results"][0]["dense_over_routed"] += 1.0
    path.write_text(json.dumps(bench))
    assert render_results.check(root, doc=doc) == ["Dispatch"]
    doc.write_text(render_results.render(root))
    assert render_results.check(root, doc=doc) == []


def test_the_settings_chosen_on_val_are_the_ones_the_configs_use():
    """The continual experiment's growth settings and λ are the best of their validation sweeps (first of equals)."""
    import csv

    import yaml

    folder = render_results.RESULTS / "clinc150_incremental"
    experiment = yaml.safe_load((ROOT / "conf/experiment/clinc150_incremental.yaml").read_text())
    growth = yaml.safe_load((ROOT / "conf/growth/default.yaml").read_text())
    own = list(csv.DictReader((folder / "own_covariance_val.csv").open()))
    assert float(max(own, key=lambda r: float(r["val/acc_routed"]))["routing.own_covariance"]) == float(
        experiment["routing"]["own_covariance"]
    )
    sweep = list(csv.DictReader((folder / "growth_sweep_val.csv").open()))
    best = max(sweep, key=lambda r: float(r["final/acc_routed"]))
    assert (int(best["growth.epochs"]), int(best["growth.rehearsal_per_class"])) == (
        growth["epochs"],
        growth["rehearsal_per_class"],
    )


def test_the_trunk_adaptation_settings_are_the_ones_chosen_on_val():
    """conf/trunk_upgrade.yaml and conf/adapt_trunk.yaml adapt as the val runs chose (`chosen_adaptation`), and the
    reported run used them."""
    import yaml

    folder = render_results.RESULTS / "clinc150_trunk_upgrade"
    chosen = render_results.chosen_adaptation(
        render_results.load_rows(folder.parent, "clinc150_trunk_upgrade/val_settings.csv")
    )
    wanted = (int(chosen["adapt.epochs"]), float(chosen["adapt.compatibility"] or 0.0))
    for name in ("trunk_upgrade", "adapt_trunk"):
        adapt = yaml.safe_load((ROOT / f"conf/{name}.yaml").read_text())["adapt"]
        assert (adapt["epochs"], float(adapt["compatibility"])) == wanted, name
    used = json.loads((folder / "settings.json").read_text())["adapt"]
    assert (used["epochs"], float(used["compatibility"])) == wanted


def test_the_pathway_settings_are_the_ones_chosen_on_val():
    """conf/expert/pathway.yaml trains pathways as the val grid chose (`chosen_pathway`), and the reported run used
    them."""
    rows = render_results.load_rows(render_results.RESULTS, "clinc150_pathway/val_settings.csv")
    chosen = render_results.chosen_pathway(rows)
    keys = ("layers", "lora_rank", "lora_alpha", "epochs", "lr", "lora_dropout")
    wanted = tuple(float(chosen[f"expert.pathway.{k}"]) for k in keys) + (float(chosen["expert.rank"]),)
    configured = yaml.safe_load((ROOT / "conf/expert/pathway.yaml").read_text())
    assert tuple(float(configured["pathway"][k]) for k in keys) + (float(configured["rank"]),) == wanted
    used = json.loads((render_results.RESULTS / "clinc150_pathway/settings.json").read_text())
    assert tuple(float(used[k]) for k in keys) + (float(used["head_rank"]),) == wanted
    assert configured["pathway"]["schedule"] == used["schedule"] == render_results.lr_schedule(chosen)
