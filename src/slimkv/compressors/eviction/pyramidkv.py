"""PyramidKV: SnapKV's scores with per-layer budgets that fall linearly with depth, same total.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv:2406.02069.

The schedule lives in ``compressors/schedules.py`` and works with every method
(``make_compressor("knorm", ratio=0.5, schedule="pyramid")``); this class is the paper's pairing of it
with SnapKV's observation-window scores. Layers hold different numbers of entries - real bytes per
layer, no padding across layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .snapkv import SnapKVCompressor


@register
@dataclass
class PyramidKVCompressor(SnapKVCompressor):
    """SnapKV scores, layer budgets falling linearly with depth (pyramid schedule, same total)."""

    schedule: str = "pyramid"

    name = "pyramidkv"
    paper = ("Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling, "
             "arXiv:2406.02069")
