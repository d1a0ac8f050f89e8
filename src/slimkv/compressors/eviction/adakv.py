"""AdaKV: SnapKV's scores with one budget per layer shared by its KV heads (head-wise allocation).

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", arXiv:2407.11550.

The allocation lives in ``compressors/allocation.py`` and works with every scoring method
(``make_compressor("knorm", ratio=0.5, allocation="head")``, ``--allocation head`` on the CLI); this
class is the paper's pairing of it with SnapKV's observation-window scores. Heads hold different
numbers of entries, stored in a paged :class:`~slimkv.cache.RaggedLayer`: the bytes follow the
entries, no head is padded to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .snapkv import SnapKVCompressor


@register
@dataclass
class AdaSnapKVCompressor(SnapKVCompressor):
    """SnapKV scores, a layer's budget spread over its KV heads by score (Ada-KV), with a per-head floor."""

    allocation: str = "head"

    name = "adasnapkv"
    paper = ("Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient "
             "LLM Inference, arXiv:2407.11550")
