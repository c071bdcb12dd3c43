"""Tenants arriving, changing, sleeping and leaving: grow, update, hibernate, wake, retire; and the trunk moving on
under them: adapt a new trunk version, upgrade a store onto it."""

from moe.lifecycle.adapt import AdaptConfig, adapt_trunk
from moe.lifecycle.growth import GrowthConfig
from moe.lifecycle.operations import Lifecycle
from moe.lifecycle.upgrade import UpgradeReport, upgrade_store

__all__ = ["AdaptConfig", "GrowthConfig", "Lifecycle", "UpgradeReport", "adapt_trunk", "upgrade_store"]
