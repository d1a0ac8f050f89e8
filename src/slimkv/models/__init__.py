"""Loading models and the one adapter that touches transformers internals."""

from .adapter import ModelAdapter, Rope, check_supported, register_attention
from .loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "ModelAdapter", "Rope", "check_supported", "load_model", "register_attention"]
