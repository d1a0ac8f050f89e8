"""Token eviction: keep a subset of KV entries per layer and KV head."""

from . import (alisa, h2o, keydiff, knorm, lacache, none, pyramidkv, random, snapkv, streaming_llm,
               triattention)

__all__ = ["alisa", "h2o", "keydiff", "knorm", "lacache", "none", "pyramidkv", "random", "snapkv",
           "streaming_llm", "triattention"]
