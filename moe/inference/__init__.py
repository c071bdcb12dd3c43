"""The inference core: build a mixture from a store or a bundle (`load_mixture`, `open_bundle`), page its experts
between device, host memory and disk (`ExpertPager`), and decode answers (`predict`)."""

from moe.inference.answers import (
    AUTO,
    DEFAULT_OOS_SCORE,
    GATE_FREE_SCORES,
    OOS_SCORES,
    UNSURE_MARGIN,
    Answer,
    Decoded,
    answers,
    check_oos_rule,
    decode,
    oos_score,
    predict,
)
from moe.inference.build import GateSettings, Verify, load_mixture, read_gate_settings
from moe.inference.bundle import OpenBundle, open_bundle
from moe.inference.index import IndexSettings, RowIndex
from moe.inference.paged import PagedMixture, ShardLoader
from moe.inference.pager import ExpertPager, TierStats
from moe.store.bundle import FORMAT, Bundle, BundleError, read_bundle

__all__ = [
    "FORMAT",
    "AUTO",
    "DEFAULT_OOS_SCORE",
    "GATE_FREE_SCORES",
    "OOS_SCORES",
    "UNSURE_MARGIN",
    "Answer",
    "Bundle",
    "BundleError",
    "Decoded",
    "ExpertPager",
    "GateSettings",
    "Verify",
    "IndexSettings",
    "OpenBundle",
    "PagedMixture",
    "RowIndex",
    "ShardLoader",
    "TierStats",
    "answers",
    "check_oos_rule",
    "decode",
    "load_mixture",
    "oos_score",
    "open_bundle",
    "predict",
    "read_bundle",
    "read_gate_settings",
]
