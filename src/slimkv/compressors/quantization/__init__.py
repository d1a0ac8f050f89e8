"""Quantization: every entry is kept, in fewer bits (packed codes plus per-group scales and zero points)."""

from . import commvq, kivi, minikv, zipvl
from .base import Quantizer

__all__ = ["Quantizer", "commvq", "kivi", "minikv", "zipvl"]
