"""Trunks: shared text encoders that turn queries into feature vectors, each with a fingerprint."""

from moe.trunk.base import Trunk, fingerprint_module
from moe.trunk.cache import FeatureCache
from moe.trunk.hf import HFEncoderTrunk, minilm_folder
from moe.trunk.tiny import TinyTrunk

TRUNK_KINDS: dict[str, type[Trunk]] = {cls.kind: cls for cls in (HFEncoderTrunk, TinyTrunk)}  # rebuilt by kind

__all__ = ["TRUNK_KINDS", "FeatureCache", "HFEncoderTrunk", "TinyTrunk", "Trunk", "fingerprint_module", "minilm_folder"]
