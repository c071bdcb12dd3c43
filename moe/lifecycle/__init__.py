"""Tenants arriving, changing, sleeping and leaving: grow, update, hibernate, wake, retire."""

from moe.lifecycle.growth import GrowthConfig
from moe.lifecycle.operations import Lifecycle

__all__ = ["GrowthConfig", "Lifecycle"]
