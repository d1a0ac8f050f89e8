"""Storage tiers behind one interface (:class:`Tier`): in-process memory, local disk, Redis."""

from .base import Tier, TierStats
from .disk import DiskTier
from .memory import MemoryTier
from .redis import RedisTier

__all__ = ["DiskTier", "MemoryTier", "RedisTier", "Tier", "TierStats"]
