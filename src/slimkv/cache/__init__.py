"""The KV cache slimkv owns: per-layer storage with explicit positions and real byte accounting."""

from .cache import CacheMark, CacheSpec, CacheStats, SlimCache
from .layer import KVLayer
from .quantized import QuantizedLayer, QuantSpec
from .ragged import RaggedLayer

__all__ = ["CacheMark", "CacheSpec", "CacheStats", "KVLayer", "QuantizedLayer", "QuantSpec", "RaggedLayer", "SlimCache"]
