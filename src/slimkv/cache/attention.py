"""Attention of new queries over a layer's kept entries, grouped-query aware, masked by position.

The KV heads are never repeated to match the query heads: the ``G = q_heads / kv_heads`` query
heads of a group are folded into the query-token axis, so every kept entry is read once per group.
Causality comes from *positions*, not slots: a query at position ``p`` sees every kept entry with
position ``<= p`` (and ``> p - window`` on sliding-window layers). Rows that hold fewer entries than
the widest row (ragged heads, batched sequences of different length) mask their free slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

#: Query rows scored at once when attention weights must be materialised (never a full n x n).
EXPLICIT_ROWS = 256


@dataclass(frozen=True)
class AttentionMeta:
    """What a forward pass tells a layer's attention about one sequence's new tokens.

    positions:  [batch, T] positions of the new queries (and of the entries they appended)
    new_tokens: entries this pass appended to the layer (the last slots of a uniform layer)
    scale, sliding_window, softcap: how this model layer attends (``LayerAttention``)
    key_mass:   also return the attention mass every entry received (an observer needs it)
    tree:       [T, T] bool, which of this pass's tokens each one sees (a token tree being verified,
                ``speculative/tree.py``); None = causal by position
    mask_cache: masks built once per pass and shared by its layers
    """

    positions: Tensor
    new_tokens: int
    scale: float = 1.0
    sliding_window: int | None = None
    softcap: float | None = None
    key_mass: bool = False
    tree: Tensor | None = None
    mask_cache: dict = field(default_factory=dict, compare=False)


def attend_rows(query: Tensor, keys: Tensor, values: Tensor, positions: Tensor, meta: AttentionMeta,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Grouped-query attention over kept entries.

    query:     [B, Hq, T, D]   (RoPE applied at the query positions ``meta.positions`` [B, T])
    keys, values: [B, H, L, D] the layer's view, the last ``meta.new_tokens`` slots hold this pass's
                               tokens when ``valid`` is None (every row full)
    positions: [B, H, L]       original positions of the entries
    valid:     [B, H, L] bool or None when every slot of the view holds an entry
    A token tree (``meta.tree``) needs ``valid`` None and ``meta.new_tokens == T``.
    Returns (output [B, Hq, T, D], key mass [B, H, L] float32 or None).
    """
    batch, q_heads, tokens, dim = query.shape
    heads = keys.shape[1]
    groups = q_heads // heads
    query_positions, new_tokens, tree = meta.positions, meta.new_tokens, meta.tree
    sliding_window, softcap, scale = meta.sliding_window, meta.softcap, meta.scale
    window = sliding_window is not None and _window_bites(positions, query_positions, sliding_window)
    if tree is not None and (valid is not None or new_tokens != tokens):
        raise ValueError("tree attention needs a uniform layer whose last slots hold this pass's tokens")
    if tokens > 1 and new_tokens == keys.shape[2] and valid is None and softcap is None \
            and not meta.key_mass and not window and tree is None:
        # nothing cached yet (a prompt's first chunk): plain causal attention, the fastest kernel
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                             enable_gqa=groups > 1)
        return out, None
    q = query.reshape(batch, heads, groups * tokens, dim)  # rows ordered (group member, token)
    mask = _mask(positions, query_positions, valid, new_tokens, groups, sliding_window if window else None,
                 meta.mask_cache, tree)
    if softcap is None and not meta.key_mass:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        mass = None
    else:
        out, mass = _explicit(q, keys, values, mask, scale, softcap, meta.key_mass)
    return out.view(batch, heads, groups, tokens, dim).reshape(batch, q_heads, tokens, dim), mass


def _mask(
    positions: Tensor,
    query_positions: Tensor,
    valid: Tensor | None,
    new_tokens: int,
    groups: int,
    sliding_window: int | None,
    mask_cache: dict | None,
    tree: Tensor | None = None,
) -> Tensor | None:
    """Bool mask broadcastable to ``[B, H, G*T, L]`` (True = attend), or None when nothing is masked.

    sliding_window: given only when it excludes some entry (the caller checked it once).
    tree: [T, T] visibility among the new tokens (see ``attend_rows``), or None.
    """
    batch, heads, length = positions.shape
    tokens = query_positions.shape[1]
    window = sliding_window is not None
    if tree is not None:
        # a token tree: everything cached before this pass is visible (by position, so a sliding
        # window still applies); among the new tokens, each sees its ancestors and itself
        qpos = query_positions[:, None, :, None]  # [B, 1, T, 1]
        kpos = positions[:, :, None, :]  # [B, H, 1, L]
        allowed = kpos < qpos.min()  # [B, H, T, L]: entries older than the pass
        if window:
            allowed = allowed & (kpos > qpos - sliding_window)
        allowed = allowed.expand(batch, heads, tokens, length).clone()
        allowed[..., length - new_tokens :] = tree.to(positions.device)
        return allowed[:, :, None].expand(batch, heads, groups, tokens, length).reshape(
            batch, heads, groups * tokens, length
        )
    if valid is None and not window:
        if tokens == 1:
            return None
        # Every row is full and the new tokens sit in the last T slots: everything cached is
        # visible, the new block is causal. Same for every row and head, so build it once.
        key = ("block", groups, tokens, length, positions.device)
        if mask_cache is not None and key in mask_cache:
            return mask_cache[key]
        block = torch.ones(tokens, length, dtype=torch.bool, device=positions.device)
        block[:, length - new_tokens :] = torch.ones(
            tokens, new_tokens, dtype=torch.bool, device=positions.device
        ).tril(new_tokens - tokens)
        block = block.repeat(groups, 1)  # [G*T, L]
        if mask_cache is not None:
            mask_cache[key] = block
        return block
    if tokens == 1 and not window:
        assert valid is not None
        return valid[:, :, None, :]  # [B, H, 1, L] broadcasts over the G query rows
    qpos = query_positions[:, None, :, None]  # [B, 1, T, 1]
    kpos = positions[:, :, None, :]  # [B, H, 1, L]
    allowed = kpos <= qpos  # [B, H, T, L]
    if window:
        allowed = allowed & (kpos > qpos - sliding_window)
    if valid is not None:
        allowed = allowed & valid[:, :, None, :]
    return allowed[:, :, None].expand(batch, heads, groups, tokens, length).reshape(
        batch, heads, groups * tokens, length
    )


def _window_bites(positions: Tensor, query_positions: Tensor, window: int) -> bool:
    """True when some kept entry is older than the sliding window of some query."""
    return int(query_positions.max()) - int(positions.min()) >= window


def _explicit(
    q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float,
    softcap: float | None, want_key_mass: bool,
) -> tuple[Tensor, Tensor | None]:
    """Attention with materialised weights, ``EXPLICIT_ROWS`` query rows at a time.

    q: [B, H, R, D] with R = G*T rows; returns output [B, H, R, D] and key mass [B, H, L].
    """
    batch, heads, rows, _ = q.shape
    length = keys.shape[2]
    out = torch.empty_like(q)
    mass = torch.zeros(batch, heads, length, dtype=torch.float32, device=q.device) if want_key_mass else None
    for start in range(0, rows, EXPLICIT_ROWS):
        stop = min(start + EXPLICIT_ROWS, rows)
        m = None if mask is None else (mask[..., start:stop, :] if mask.shape[-2] == rows else mask)
        # Causal prefill: the chunk's queries see only a prefix of the slots; the rest would get
        # probability exactly 0, so skip them (about half the work of a prompt's first chunk).
        width = length if m is None else visible_width(m, length)
        if width < length:
            m = m[..., :width]
        # in place where it can be: these chunks are the explicit path's memory traffic
        logits = (q[:, :, start:stop] @ keys[:, :, :width].transpose(-1, -2)).float().mul_(scale)  # [B, H, r, w]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if m is not None:
            logits = torch.where(m, logits, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[:, :, start:stop] = (probs.to(values.dtype) @ values[:, :, :width])
        if mass is not None:
            mass[..., :width] += probs.sum(dim=2)
    return out, mass


def visible_width(mask: Tensor, length: int) -> int:
    """Slots ``[0, width)`` hold every entry a mask (``[..., L]`` bool, True = seen) lets some query see."""
    seen = mask.reshape(-1, mask.shape[-1]).any(dim=0)  # [L]
    if seen.shape[0] != length or not bool(seen.any()):
        return length
    return length - int(seen.flip(0).int().argmax())
