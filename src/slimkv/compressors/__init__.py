"""Compression methods: the interface (``base``), the registry, and one module per method."""

from . import eviction  # noqa: F401  (registers the eviction methods)
from .base import Compressor, ScoreContext
from .registry import MethodInfo, make_compressor, method_info, methods, names, register

__all__ = [
    "Compressor", "MethodInfo", "ScoreContext", "make_compressor", "method_info", "methods", "names",
    "register",
]
