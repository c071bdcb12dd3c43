"""Serving: load an exported bundle (checked file by file), page its experts under a byte budget, and answer
queries, from Python (`Server.predict`) or stdin/stdout (`python -m moe.serving BUNDLE`). Imports neither
Lightning, Hydra nor wandb."""

from moe.serving.answers import OOS_SCORES, Answer
from moe.serving.bundle import FORMAT, Bundle, BundleError, read_bundle
from moe.serving.runtime import Server

__all__ = ["FORMAT", "OOS_SCORES", "Answer", "Bundle", "BundleError", "Server", "read_bundle"]
