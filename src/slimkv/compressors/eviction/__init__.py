"""Token eviction: keep a subset of KV entries per layer and KV head."""

from . import adakv, fastgen, h2o, keydiff, knorm, lacache, none, pyramidkv, random, snapkv, streaming_llm

__all__ = ["adakv", "fastgen", "h2o", "keydiff", "knorm", "lacache", "none", "pyramidkv", "random", "snapkv", "streaming_llm"]
