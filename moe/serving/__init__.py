"""Serving: a checked bundle behind `Server.predict` (thread-safe, experts paged under a byte budget) and the
stdin/stdout command line (`python -m moe.serving BUNDLE`). Imports neither Lightning, Hydra nor wandb; the bundle
format and the inference core are `moe.inference`'s."""

from moe.inference import FORMAT, OOS_SCORES, Answer, Bundle, BundleError, read_bundle
from moe.serving.runtime import Server

__all__ = ["FORMAT", "OOS_SCORES", "Answer", "Bundle", "BundleError", "Server", "read_bundle"]
