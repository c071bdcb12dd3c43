"""The serving bundle and runtime: a bundle loaded in a fresh process answers as the evaluation did, without
Lightning, Hydra or wandb; one altered byte anywhere is refused naming the file; concurrent callers get what
sequential ones get; the command line answers JSONL line for line."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe.serving import BundleError, Server, read_bundle
from tests.helpers import THRESHOLD, TinyRun, run_python, sha256_of

# Every test serves the session's tiny run (trained, evaluated by scripts/evaluate.py, exported).
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ANSWER = ("tenant", "intent", "score", "out_of_scope", "experts", "runners_up")

FRESH_PROCESS = """
import json, sys
from moe.serving import Server
queries = [json.loads(line) for line in open(sys.argv[2])]
server = Server(sys.argv[1], budget_bytes=20_000)
answers = [a.to_dict() for a in server.predict([q["text"] for q in queries])]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"lightning", "pytorch_lightning", "hydra", "wandb"})
print(json.dumps({"answers": answers, "heavy": heavy, "stats": server.stats()}))
"""


@pytest.fixture(scope="module")
def server(tiny_run):
    return Server(tiny_run.bundle)


def evaluated(run: TinyRun, split: str = "test") -> list[dict]:
    return [json.loads(line) for line in (run.evaluation / f"predictions_{split}.jsonl").read_text().splitlines()]


def test_a_fresh_process_serves_what_evaluation_predicted_without_lightning_hydra_or_wandb(tiny_run):
    expected = evaluated(tiny_run)
    done = run_python("-c", FRESH_PROCESS, str(tiny_run.bundle), str(tiny_run.evaluation / "predictions_test.jsonl"))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    stats = result["stats"]  # a 20 kB budget holds one expert at a time: the three were paged in turn
    assert stats["device"]["misses"] == 3 and stats["resident"]["peak_device_bytes"] <= 20_000
    assert result["answers"] == [{k: e[k] for k in ANSWER} for e in expected]  # scores to the last bit
    flags = [a["out_of_scope"] for a in result["answers"]]
    assert any(flags) and not all(flags), "the threshold should split these queries"


def test_the_manifest_describes_and_checksums_everything(tiny_run):
    manifest = read_bundle(tiny_run.bundle).manifest
    assert manifest["format"] == "moe.bundle/2" and manifest["package_version"] and manifest["dtype"] == "float32"
    trunk = manifest["trunk"]
    assert trunk["kind"] == "tiny" and trunk["source"] == "reference" and trunk["config"]["dim"] == 32
    assert len(trunk["fingerprint"]) == 64 and trunk["init"] == {"dim": 32, "buckets": 4096, "seed": 0}
    assert manifest["gate"]["top_k"] == 2 and manifest["gate"]["oos"]["threshold"] == THRESHOLD
    assert manifest["gate"]["source"] == "trained" and manifest["gate"]["shrinkage"] == 0.02
    assert [e["tenant"] for e in manifest["experts"]] == ["bank", "music", "weather"]
    for entry in manifest["experts"]:
        assert entry["sha256"] == sha256_of(tiny_run.bundle / entry["file"]) == manifest["files"][entry["file"]]
        assert manifest["label_maps"][entry["tenant"]] == entry["labels"]
    assert manifest["config"]["training"]["trunk"]["_target_"] == "moe.trunk.TinyTrunk"
    assert manifest["config"]["export"]["export"]["dtype"] == "float32"
    assert sorted(manifest["files"]) == [
        "experts/bank/v0001.safetensors",
        "experts/music/v0001.safetensors",
        "experts/weather/v0001.safetensors",
        "gate.safetensors",
    ]


@pytest.mark.parametrize(
    "name",
    ["experts/music/v0001.safetensors", "gate.safetensors", "trunk/trunk.safetensors", "manifest.json"],
)
def test_one_altered_byte_is_refused_naming_the_file(tiny_run, tmp_path, name):
    bundle = Path(shutil.copytree(tiny_run.bundle_bf16, tmp_path / "bundle"))
    path = bundle / name
    data = bytearray(path.read_bytes())
    key = b'"threshold": '  # in the manifest, one bit of a value that matters: the threshold's first digit
    at = data.index(key) + len(key) if name == "manifest.json" else len(data) // 2  # else tensor data, mid-file
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    if name.startswith("experts/"):  # a damaged expert: refused by name, the server starts without it (issue 30)
        with pytest.raises(BundleError, match=name.replace(".", r"\.")):
            read_bundle(bundle)
        assert name in Server(bundle).damaged()["music"]
        return
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        Server(bundle)
    Server(tiny_run.bundle_bf16)  # the original still loads


def test_an_unlisted_shard_is_refused(tiny_run, tmp_path):
    bundle = Path(shutil.copytree(tiny_run.bundle, tmp_path / "bundle"))
    shutil.copyfile(bundle / "experts/music/v0001.safetensors", bundle / "experts/music/v0002.safetensors")
    with pytest.raises(BundleError, match="v0002.safetensors: not listed"):
        read_bundle(bundle)


def test_unknown_tenant_is_named_with_the_known_ones(server):
    with pytest.raises(KeyError, match=r"unknown tenant 'acme'; known tenants: \['bank', 'music', 'weather'\]"):
        server.predict(["hello"], tenant="acme")
    with pytest.raises(ValueError, match="2 tenants given for 1 texts"):
        server.predict(["hello"], tenant=["bank", None])


def test_a_tenant_restricts_the_experts(server):
    texts = ["please play song", "tell me balance money"]
    routed = server.predict(texts)
    assert [a.tenant for a in routed] == ["music", "bank"]
    given = server.predict(texts, tenant=["weather", None])
    assert given[0].tenant == "weather" and given[0].experts == ("weather",) and given[1] == routed[1]


def test_threads_get_what_sequential_calls_get(tiny_run):
    server = Server(tiny_run.bundle, budget_bytes=20_000)  # one expert at a time: threads page experts under each other
    texts = [e["text"] for e in evaluated(tiny_run)] + [e["text"] for e in evaluated(tiny_run, "val")]
    requests = [
        (texts[i : i + n], tenant)
        for i, n in zip(range(0, 48, 6), [1, 3, 6, 2] * 2, strict=True)
        for tenant in (None, "bank", "music", "weather")
    ]
    expected = [server.predict(t, tenant) for t, tenant in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            assert list(pool.map(lambda r: server.predict(*r), requests)) == expected
    assert server.stats()["device"]["misses"] > len(requests)


def test_command_line_answers_jsonl_line_for_line(tiny_run, server):
    lines = [
        json.dumps({"text": "please play song"}),
        json.dumps({"text": "tell me balance money", "tenant": "bank"}),
        "{not json",
        json.dumps({"tenant": "bank"}),
        json.dumps({"text": "hot sunny", "tenant": "acme"}),
        "",
        json.dumps(["a list"]),
        json.dumps({"text": "rain umbrella", "tenant": None}),
        json.dumps({"text": "tell me balance money", "Tenant": "bank"}),
    ]
    done = run_python("-m", "moe.serving", str(tiny_run.bundle), "--budget-mb", "0.02", stdin="\n".join(lines) + "\n")
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(out) == len(lines)
    for i in (0, 1, 7):
        query = json.loads(lines[i])
        assert out[i] == server.predict([query["text"]], query.get("tenant"))[0].to_dict()
    assert out[2]["line"] == 3 and "not JSON" in out[2]["error"]
    assert out[3] == {"error": '"text" must be a non-blank string', "line": 4}
    assert "unknown tenant 'acme'" in out[4]["error"] and out[5]["error"] == "empty line"
    assert "expected a JSON object" in out[6]["error"]
    assert out[8] == {"error": 'unknown keys [\'Tenant\']: a query has "text" and, optionally, "tenant"', "line": 9}


def test_a_bfloat16_bundle_records_its_accuracy_cost_and_serves(tiny_run, server):
    bundle = read_bundle(tiny_run.bundle_bf16)
    cost = bundle.manifest["precision"]
    assert cost["dtype"] == "bfloat16" and "test/acc_routed" in cost["metrics"]
    figures = cost["metrics"]["test/acc_routed"]
    assert figures["cost"] == pytest.approx(figures["float32"] - figures["bfloat16"])
    with safe_open(str(tiny_run.bundle_bf16 / "experts/bank/v0001.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("head.weight").dtype == torch.bfloat16
        assert json.loads(handle.metadata()["architecture"])["dtype"] == "bfloat16"
    assert bundle.manifest["trunk"]["source"] == "copy" and "trunk/trunk.safetensors" in bundle.manifest["files"]
    texts = [e["text"] for e in evaluated(tiny_run)]
    low, full = Server(bundle).predict(texts), server.predict(texts)
    assert sum(a.intent == b.intent for a, b in zip(low, full, strict=True)) >= 0.9 * len(texts)
