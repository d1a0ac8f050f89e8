"""Merging: fold the entries a cache frees into the entries it keeps instead of dropping them."""

from . import kvmerger

__all__ = ["kvmerger"]
