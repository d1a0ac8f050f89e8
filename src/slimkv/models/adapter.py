"""The one module that touches transformers internals.

slimkv plugs into a Hugging Face causal LM without patching it: it registers an attention function
and a (no-op) mask builder under its own name, ``"slimkv"``, in transformers' ``AttentionInterface``
and ``AttentionMaskInterface``, and switches a model instance to that implementation only inside
:meth:`ModelAdapter.attached`, which restores the previous one in ``finally``. Forward passes run
with ``use_cache=False``, explicit ``position_ids`` and a ``slimkv=`` keyword that transformers hands
down to every attention call; the attention function gives the new keys and values to slimkv's cache
and attends over what the cache holds. Called without that keyword (the model used on its own), the
function is plain SDPA, so the model keeps working as usual.

Everything that depends on the transformers version lives here: the registration, the attention
function signature, the config fields read for the cache shape, and the capability checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..cache import CacheSpec
from ..errors import ModelError

log = logging.getLogger(__name__)

ATTENTION_NAME = "slimkv"


class AttentionSink(Protocol):
    """What the attention function hands each layer's new tokens to (``engine.forward.ForwardContext``)."""

    def attend(
        self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
        sliding_window: int | None, softcap: float | None,
    ) -> Tensor:
        """query [B, Hq, T, D], key/value [B, H, T, D] -> attention output [B, T, Hq, D]."""
        ...


def _slimkv_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    slimkv: AttentionSink | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention-function signature; see the module docstring."""
    if slimkv is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = slimkv.attend(module.layer_idx, query, key, value, scale, sliding_window, softcap)
    return out, None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask builder for our attention: causality comes from the cache's positions."""
    return None


def register_attention() -> None:
    """Register slimkv's attention under its own name (idempotent; never replaces another entry)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _slimkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


#: RoPE types whose frequencies depend on the sequence length at run time
DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Rope:
    """The rotary position embedding of one attention layer, as transformers applies it.

    inv_freq: [head_dim // 2] float32, angular frequency of rotary pair ``f``: dimensions ``f`` and
              ``f + head_dim // 2`` (transformers' rotate-half layout) turn by ``inv_freq[f] * position``
    scaling:  factor transformers multiplies cos and sin by (1.0 for plain RoPE; YaRN and longrope differ)
    """

    inv_freq: Tensor
    scaling: float


class ModelAdapter:
    """A causal LM as slimkv runs it: cache shape, context length, and forward passes over our cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        check_supported(model)
        register_attention()
        self.model = model.eval()
        cfg = text_config(model)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.spec = CacheSpec(
            layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim,
            dtype=next(model.parameters()).dtype,
        )
        self.q_heads = heads
        self.max_positions: int = getattr(cfg, "max_position_embeddings", None) or 2048
        self.device = next(model.parameters()).device
        self._attach_lock = threading.Lock()
        self._attached = 0
        self._previous: str | None = None

    def fingerprint(self) -> str:
        """Identity of the model's weights and config, for store keys (stable across processes).

        sha256 over the config, every parameter's name, shape and dtype, and 1,024 evenly spaced
        values of each parameter: different weights or configs give different fingerprints without
        hashing every byte of a large model.
        """
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.sha256(text_config(self.model).to_json_string(use_diff=False).encode())
        with torch.no_grad():
            for name, p in sorted(self.model.named_parameters()):
                flat = p.detach().reshape(-1)
                k = min(1024, flat.numel())
                idx = torch.arange(k, dtype=torch.long) * (flat.numel() - 1) // max(k - 1, 1)
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
                h.update(flat[idx].float().cpu().numpy().tobytes())
        self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def rope(self, layer_idx: int) -> Rope:
        """RoPE frequencies of layer ``layer_idx``, read from the model's rotary-embedding module.

        Per-layer-type tables (Gemma 3's local and global layers) are honoured. Raises
        :class:`ModelError` for a model without RoPE, with RoPE on only part of each head, or with a
        RoPE type whose angles depend on the sequence length (dynamic, longrope): methods that reason
        about a key's rotation need a fixed angle per position.
        """
        cfg = text_config(self.model)
        layer_types = getattr(cfg, "layer_types", None) or []
        kind = layer_types[layer_idx] if layer_idx < len(layer_types) else None
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if kind is not None and isinstance(params.get(kind), dict):
            params = params[kind]
        if params.get("rope_type", params.get("type")) in DYNAMIC_ROPE:
            raise ModelError(f"{type(self.model).__name__} uses {params.get('rope_type', params.get('type'))} "
                             "RoPE, whose angles depend on the sequence length; RoPE-aware methods (triattention, "
                             "commvq) need a fixed angle per position")
        for module in self.model.modules():
            inv_freq = getattr(module, f"{kind}_inv_freq", None) if kind else None
            scaling = getattr(module, f"{kind}_attention_scaling", None) if kind else None
            if inv_freq is None:
                inv_freq = getattr(module, "inv_freq", None)
                scaling = getattr(module, "attention_scaling", 1.0)
            if isinstance(inv_freq, Tensor):
                break
        else:
            raise ModelError(f"{type(self.model).__name__} has no rotary position embedding; "
                             "methods that reason about RoPE phases (triattention) cannot run on it")
        if 2 * inv_freq.numel() != self.spec.head_dim:
            raise ModelError(
                f"{type(self.model).__name__} rotates {2 * inv_freq.numel()} of {self.spec.head_dim} dimensions "
                "per head (partial RoPE); triattention supports models with RoPE on the whole head"
            )
        return Rope(inv_freq.detach().float().cpu(), float(scaling if scaling is not None else 1.0))

    def rope_table(self) -> Tensor:
        """``[layers, head_dim // 2]`` float32 inverse frequencies of every layer (see :meth:`rope`)."""
        return torch.stack([self.rope(i).inv_freq for i in range(self.spec.layers)])

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Run the model with slimkv's attention inside this block; restore the previous one after.

        Blocks may nest and run on several threads at once (the engine loop's steps beside a
        calibration in a caller's thread): the model is switched by the first and restored by the last.
        """
        with self._attach_lock:
            if self._attached == 0:
                self._previous = self.model.config._attn_implementation
                if self._previous != ATTENTION_NAME:
                    self.model.set_attn_implementation(ATTENTION_NAME)
            self._attached += 1
        try:
            yield
        finally:
            with self._attach_lock:
                self._attached -= 1
                if self._attached == 0 and self._previous != ATTENTION_NAME:
                    self.model.set_attn_implementation(self._previous)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, sink: AttentionSink, all_logits: bool = False) -> Tensor:
        """One forward pass over new tokens (call inside :meth:`attached`).

        input_ids, positions: [batch, tokens]
        Returns logits [batch, tokens, vocab] if ``all_logits`` else [batch, 1, vocab] of the last token.
        """
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=0 if all_logits else 1,
            slimkv=sink,
        )
        return out.logits


def check_supported(model: torch.nn.Module) -> None:
    """Raise :class:`ModelError` unless slimkv's cache can run this model.

    Capabilities, not class names: a decoder-only LM whose attention layers go through
    transformers' attention-function interface, know their ``layer_idx``, and take ``position_ids``.
    """
    name = type(model).__name__
    cfg = text_config(model)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelError(f"{name} is an encoder-decoder model; slimkv runs decoder-only causal LMs.")
    if not getattr(model, "_supports_attention_backend", False):
        raise ModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so slimkv "
            "cannot hold its KV cache. Use a model family such as Llama, Mistral, Qwen2/3 or Gemma."
        )
    for field in ("num_attention_heads", "num_hidden_layers", "hidden_size"):
        if getattr(cfg, field, None) is None:
            raise ModelError(f"{name}'s config has no `{field}`; slimkv needs it to shape the cache.")
    layer_types = getattr(cfg, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise ModelError(
            f"{name} has layers of type {', '.join(odd)}; slimkv's cache holds attention layers only."
        )
    attn_layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if len(attn_layers) != cfg.num_hidden_layers:
        raise ModelError(
            f"{name}: found {len(attn_layers)} attention modules with a layer index for "
            f"{cfg.num_hidden_layers} layers; slimkv cannot map its cache onto this model."
        )
