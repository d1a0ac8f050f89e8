"""slimkv: run Hugging Face causal LMs with a slim KV cache.

Quick start::

    import slimkv
    model, tokenizer = slimkv.load_model()            # the embedded SmolLM2-135M
    engine = slimkv.Engine(model, tokenizer, slimkv.make_compressor("snapkv", ratio=0.5))
    result = engine.generate("The capital of France is")
    print(result.text, result.cache.bytes_kept, result.cache.bytes_full)
"""

import logging

from .cache import CacheStats, SlimCache
from .compressors import Compressor, make_compressor, methods
from .engine import Engine, GenerationConfig, GenerationResult, LosslessConfig, Request, SamplingConfig
from .errors import ConfigError, InputError, ModelError, SlimKVError
from .models import DEFAULT_MODEL, load_model

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_MODEL", "CacheStats", "Compressor", "ConfigError", "Engine", "GenerationConfig",
    "GenerationResult", "InputError", "LosslessConfig", "ModelError", "Request", "SamplingConfig", "SlimCache",
    "SlimKVError", "load_model", "make_compressor", "methods",
]
