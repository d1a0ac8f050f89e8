"""Errors of the KV store (both are :class:`slimkv.errors.SlimKVError`, so the CLI reports them)."""

from __future__ import annotations

from ..errors import SlimKVError


class StoreError(SlimKVError):
    """A store that cannot do what was asked: an unusable folder, an entry too large for any tier."""


class CorruptChunk(StoreError):
    """Stored bytes that fail verification (bad magic, version, lengths, checksum or layout).

    Raised by the codec; tiers and the stack catch it, drop the entry, log a warning and report a miss,
    so a corrupt entry can cost a recomputation but never produce wrong output.
    """
