"""The full cache: nothing is removed (the reference every method is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

from ...cache import CacheLayer
from ..base import Compressor, ScoreContext
from ..registry import register


@register
@dataclass
class NoCompression(Compressor):
    """Full cache: keeps every KV entry; ratio and budget are ignored."""

    name = "none"
    kind = "none"
    paper = "-"
    supported_phases = ("prefill", "decode")

    @property
    def compresses(self) -> bool:
        return False

    def describe(self) -> str:
        return "none (full cache)"

    def score(self, layer: CacheLayer, ctx: ScoreContext):  # pragma: no cover - never called
        raise RuntimeError("the full cache never scores entries")
