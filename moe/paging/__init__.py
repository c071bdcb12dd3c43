"""Experts paged between device, host memory and disk, and the mixture that serves through them."""

from moe.paging.mixture import PagedMixture, ShardLoader
from moe.paging.pager import ExpertPager, TierStats

__all__ = ["ExpertPager", "PagedMixture", "ShardLoader", "TierStats"]
