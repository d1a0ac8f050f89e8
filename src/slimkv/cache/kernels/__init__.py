"""Fused kernels for reading quantized layers (placeholder until the C kernel lands)."""

from __future__ import annotations


def available(query, layer) -> bool:
    return False


def decode_attention(query, layer, scale):  # pragma: no cover
    raise NotImplementedError
