"""Token eviction: keep a subset of KV entries per layer and KV head."""

from . import (
               adakv,
               alisa,
               expected_attention,
               fastgen,
               h2o,
               keydiff,
               knorm,
               lacache,
               none,
               pyramidkv,
               random,
               snapkv,
               streaming_llm,
               triattention,
)

__all__ = ["adakv", "alisa", "expected_attention", "fastgen", "h2o", "keydiff", "knorm", "lacache", "none", "pyramidkv", "random",
           "snapkv", "streaming_llm", "triattention"]
