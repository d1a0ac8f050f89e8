"""The KV cache slimkv owns: per-layer storage with explicit positions and real byte accounting."""

from .attention import AttentionMeta
from .cache import CacheMark, CacheSpec, CacheStats, SlimCache
from .layer import KVLayer
from .protocol import CacheLayer, Room
from .quantized import QuantizedLayer, QuantSpec
from .ragged import RaggedLayer
from .state import CompressorState, LayerStates, StateKey

__all__ = ["AttentionMeta", "CacheLayer", "CacheMark", "CacheSpec", "CacheStats", "CompressorState", "KVLayer",
           "LayerStates", "QuantizedLayer", "QuantSpec", "RaggedLayer", "Room", "SlimCache", "StateKey"]
