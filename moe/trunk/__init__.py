"""Trunks: shared text encoders that turn queries into feature vectors, each with a fingerprint."""

from moe.trunk.base import Trunk, fingerprint_module
from moe.trunk.cache import FeatureCache
from moe.trunk.hf import HFEncoderTrunk, minilm_folder
from moe.trunk.tiny import TinyTrunk

__all__ = ["FeatureCache", "HFEncoderTrunk", "TinyTrunk", "Trunk", "fingerprint_module", "minilm_folder"]
