"""RoPE frequencies of a model, read from its config (part of the one place touching transformers).

Methods that work on keys *before* rotary embedding (CommVQ's codebooks, ``cache/vq.py``) need the
angle every key was rotated by: ``position * inv_freq[i]`` for the pair of channels ``(i, i + D/2)``
(transformers' ``rotate_half`` convention). The frequencies are computed the way the model's own
rotary module computes them, from ``config.rope_parameters`` (default, linear, llama3, yarn, ...).
The post-rotation scale some RoPE types apply (``attention_scaling``) is a constant factor on every
key; it does not change the angles and is carried by the stored key norms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ModelError
from .adapter import text_config

#: RoPE types whose frequencies depend on the sequence length at run time: a key's angle cannot be
#: recovered from its position alone
DYNAMIC = ("dynamic", "longrope")


def _parameters(cfg, layer_type: str | None) -> dict:
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        return {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    if layer_type is not None and layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type]
    return params


def rope_frequencies(model: torch.nn.Module) -> Tensor:
    """``[layers, head_dim / 2]`` float32 inverse frequencies of every attention layer.

    Raises :class:`ModelError` for models whose keys are not fully rotated at a fixed frequency per
    channel pair (partial rotary embeddings, length-dependent RoPE types).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = text_config(model)
    name = type(model).__name__
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ModelError(f"{name} rotates only part of each head (partial_rotary_factor); "
                         "CommVQ needs fully rotated keys")
    layer_types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
    out = []
    for layer_type in layer_types:
        params = _parameters(cfg, layer_type)
        rope_type = params.get("rope_type", "default")
        if rope_type in DYNAMIC:
            raise ModelError(f"{name} uses {rope_type} RoPE, whose angles depend on the sequence length; "
                             "CommVQ needs a fixed angle per position")
        if rope_type == "default":
            theta = float(params.get("rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        else:
            try:
                inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, layer_type=layer_type) if layer_type \
                    else ROPE_INIT_FUNCTIONS[rope_type](cfg)
            except TypeError:
                inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg)
        if inv_freq.numel() != head_dim // 2:
            raise ModelError(f"{name}: {inv_freq.numel()} RoPE frequencies for head_dim {head_dim}; "
                             "CommVQ needs one per channel pair")
        out.append(inv_freq.float().cpu())
    return torch.stack(out)
