"""Compression methods: the interface (``base``), the registry, and one module per method."""

from . import eviction, merging, quantization  # noqa: F401  (registers the methods)
from .base import Compressor, ScoreContext
from .compose import Pipeline
from .registry import MethodInfo, make_compressor, method_info, methods, names, register

__all__ = [
    "Compressor", "MethodInfo", "Pipeline", "ScoreContext", "make_compressor", "method_info", "methods", "names",
    "register",
]
