"""FastGen: profile every KV head on the prompt and give it the cheapest policy that suffices.

Paper: Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs",
arXiv:2310.01801.

Profiling uses the attention of the last ``window`` prompt queries (recorded as SnapKV does). For
every KV head (its query heads' attention summed) the candidate policies are, in the paper's order
of cost, each containing the previous one:

1. special: the first ``sinks`` tokens (BOS and attention sinks);
2. + punctuation: tokens whose text is only punctuation (flags given by the engine);
3. + frequent: the ``frequent`` share of the seen tokens that received the most attention;
4. + local: the most recent ``local`` share of the seen tokens;
5. full: every entry.

A head takes the first policy whose entries recover at least ``recovery`` of its attention mass, and
keeps exactly those entries (scores ``-inf`` outside it). Heads therefore keep very different
numbers of entries; the layer becomes a paged :class:`~slimkv.cache.RaggedLayer`, so the bytes
held are those of the kept entries plus less than one page per head.

Budget choice: ``ratio`` (or ``budget``) is a *cap* on each layer's total, ``kv_heads * keep``
entries per sequence. Under the cap every head keeps its whole policy and the cache can be far
smaller than the ratio says; over it, the entries of all policies compete by attention share as in
head-wise allocation (``allocation.py``), special tokens first. A tiny ratio (e.g. 0.01) gives the
uncapped method of the paper; ratio 0 or none compresses nothing, like every method. Report
``bytes_kept``, not the ratio.

Generation (``phase="both"``): every head keeps following the policy it was given on the prompt, as
the paper does. Before each new token is written, a head evicts an entry its policy no longer holds:

- special: everything but the first ``sinks`` tokens (each generated token is attended to once, by
  itself, then evicted);
- + punctuation: generated tokens that are not punctuation (the engine flags every generated token);
- + frequent: entries outside the ``frequent`` share of the seen tokens with the most accumulated
  attention (the profiling window's mass, then every generated query's, as H2O accumulates it);
- + local: ... and outside the most recent ``local`` share of the seen tokens;
- full: nothing.

A head holds its policy's entries plus at most the newest token. The cap still holds per layer: when
a layer holds ``kv_heads * keep`` entries, every head evicts its least attended entry before it
writes, never a sink and, while older entries remain, none of the recent ``local`` share (as H2O
keeps a recent window: a new token has had few queries to gather mass). State (per request and
layer): each head's policy (:class:`FastGenState`, kept through compression when decoding) and one
float per entry (its mass, ``+inf`` for special and punctuation entries, ``layer.entry_state``), both
counted in ``bytes_kept``. ``phase="prefill"`` (the default) appends generated tokens to every head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cache import CacheLayer, CacheSpec, CompressorState, Room
from ...errors import ConfigError
from ..base import Compressor, ScoreContext
from ..registry import register
from ..state import QueryWindow, window_bytes
from .h2o import sampled_mass
from .snapkv import window_attention

log = logging.getLogger(__name__)


@dataclass
class FastGenState(CompressorState):
    """What FastGen records for one layer of one request.

    window: the profiling window's queries (prefill)
    punct: [B, tokens seen] bool punctuation flags, by position (prefill)
    policy: [B, H] each head's policy index once chosen, kept for the decode phase
    member, mass: [B, H, L] the chosen policies' entries and the window's attention, from the profiling
                  that ``compress`` runs and ``score`` reads (one compression)
    The entries' accumulated mass (``+inf`` for special and punctuation entries) is a per-entry state of
    the layer under the same key.
    """

    window: QueryWindow = field(default_factory=QueryWindow)
    punct: Tensor | None = None
    policy: Tensor | None = None
    member: Tensor | None = None
    mass: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [*super().tensors(), *self.window.tensors()]

    def clone(self) -> FastGenState:
        out = super().clone()
        out.window = self.window.clone()
        return out


@register
@dataclass
class FastGenCompressor(Compressor):
    """Per-head policy (special, +punctuation, +frequent, +local, full) chosen on the prompt's attention.

    recovery: share of a head's attention (window queries) its policy must keep, in (0, 1]
    sinks:    initial tokens of the special policy
    frequent: share of the seen tokens the frequent (heavy-hitter) policy adds
    local:    share of the seen tokens the local (recent window) policy adds
    window:   prompt queries whose attention profiles the heads
    """

    recovery: float = 0.95
    sinks: int = 4
    frequent: float = 0.1
    local: float = 0.1
    window: int = 16
    allocation: str = "head"
    floor: float = 0.0

    name = "fastgen"
    paper = ("Ge et al., Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs, "
             "arXiv:2310.01801")
    supported_phases = ("prefill", "decode")
    needs_punctuation = True
    excludes = True
    decodes_per_head = True
    decode_state = True
    state_fields = ("window",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation != "head":
            raise ConfigError("fastgen chooses a policy per head; it needs allocation='head' (the default)")
        if self.phase == "decode":
            raise ConfigError("fastgen chooses each head's policy on the prompt, then follows it while "
                              "decoding: use phase='both' (--phase both), or 'prefill'")
        if not 0.0 < self.recovery <= 1.0:
            raise ConfigError(
                f"fastgen recovery must be in (0, 1] (share of attention kept), got {self.recovery}"
            )
        if self.sinks < 0 or self.window < 1:
            raise ConfigError(f"fastgen needs sinks >= 0 and window >= 1, got {self.sinks}, {self.window}")
        for what, share in (("frequent", self.frequent), ("local", self.local)):
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"fastgen {what} must be a share of the seen tokens in [0, 1], got {share}")

    def _state(self, ctx: ScoreContext) -> FastGenState:
        return ctx.states.setdefault(self.state_key, FastGenState)

    def state_bytes(self, spec: CacheSpec, q_heads: int, tokens: int) -> int:
        per_layer = spec.kv_heads * (8 + 4 * tokens) + tokens  # policies, entry mass, punctuation flags
        return window_bytes(spec, q_heads, self.window) + spec.layers * per_layer

    def observe(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor,
                key_mass: Tensor | None) -> None:
        state = self._state(ctx)
        if state.policy is not None:  # the prompt was profiled: follow the policies (decode phase)
            self._follow(layer, ctx, query, query_positions)
            return
        state.window.record(query, query_positions, self.window)
        if ctx.punctuation is not None:  # [B, T] flags of this pass's tokens, kept in position order
            flags = ctx.punctuation.to(torch.bool)
            state.punct = flags if state.punct is None else torch.cat([state.punct, flags], dim=1)

    def _follow(self, layer: CacheLayer, ctx: ScoreContext, query: Tensor, query_positions: Tensor) -> None:
        """After profiling: add this pass's attention to every entry's mass; mark new punctuation."""
        _, _, positions = layer.view()  # [B, H, L]
        state, length = layer.entry_state(self.state_key), positions.shape[-1]
        state[:, :, :length] += sampled_mass(layer, query, query_positions, 1)
        if ctx.punctuation is None:
            return
        first = query_positions[:, :1, None]  # [B, 1, 1]: this pass's tokens sit at first..first+T-1
        offset = (positions.long() - first).clamp(min=0, max=ctx.punctuation.shape[1] - 1)
        flags = ctx.punctuation.to(torch.bool)[:, None].expand(-1, positions.shape[1], -1)  # [B, H, T]
        new_punct = (positions.long() >= first) & flags.gather(2, offset)
        if bool(new_punct.any()):
            state[:, :, :length] = state[:, :, :length].masked_fill(new_punct, float("inf"))

    def policies(self, layer: CacheLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor, Tensor]:
        """Each head's policy: index (0-4, the module docstring's order) [B, H], its entries [B, H, L]
        bool, and the attention mass of every slot [B, H, L] (window queries, summed over the group)."""
        choice, member, mass, _ = self._profile(layer, ctx)
        return choice, member, mass

    def _profile(self, layer: CacheLayer, ctx: ScoreContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`policies`, and the special-or-punctuation entries [B, H, L] bool."""
        keys, _, positions = layer.view()  # [B, H, L, D], [B, H, L]
        state = ctx.states.get(self.state_key, FastGenState)
        probs, _ = window_attention(layer, keys, positions, None if state is None else state.window)  # [B, H, G, w, L]
        mass = probs.sum(dim=(2, 3))  # [B, H, L]
        valid = layer.valid_mask() if not layer.uniform else torch.ones_like(mass, dtype=torch.bool)
        seen = ctx.seen.to(positions.device).double()[:, None, None]  # [B, 1, 1]
        pos = positions.long()
        special = (pos < self.sinks) & valid
        punct_set = special
        flags = state.punct if state is not None else None  # [B, tokens seen] bool, by position
        if flags is not None:
            at = flags.gather(1, pos.flatten(1).clamp(max=flags.shape[1] - 1)).view_as(pos)
            punct_set = special | (at & (pos < flags.shape[1]) & valid)
        rank = _rank(mass.masked_fill(~valid, -1.0))  # 0 = most attended
        frequent = punct_set | ((rank < (seen * self.frequent).ceil()) & valid)
        local = frequent | ((pos >= seen - (seen * self.local).ceil()) & valid)
        sets = torch.stack([special, punct_set, frequent, local, valid])  # [5, B, H, L]
        recovered = (mass[None] * sets).sum(dim=-1) / mass.sum(dim=-1).clamp(min=1e-30)  # [5, B, H]
        enough = recovered >= self.recovery - 1e-6
        enough[-1] = True
        choice = enough.float().argmax(dim=0)  # the first (cheapest) sufficient policy
        member = sets.gather(0, choice[None, ..., None].expand(1, *mass.shape))[0]
        log.debug("fastgen layer %d heads per policy (special, +punct, +frequent, +local, full): %s",
                     ctx.layer_idx, torch.bincount(choice.flatten(), minlength=5).tolist())
        return choice, member, mass, punct_set

    def score(self, layer: CacheLayer, ctx: ScoreContext) -> Tensor:
        state = self._state(ctx)
        if state.member is not None and state.mass is not None:  # profiled by compress (decode ahead)
            member, mass = state.member, state.mass
        else:
            _, member, mass = self.policies(layer, ctx)
        _, _, positions = layer.view()  # [B, H, L]
        scores = mass.masked_fill(~member, float("-inf"))  # outside the policy: never kept
        return scores.masked_fill(member & (positions.long() < self.sinks), float("inf"))

    # ------------------------------------------------------------------ decode phase (phase="both")
    def compress(self, layer: CacheLayer, ctx: ScoreContext,
                 merger: Compressor | None = None) -> CacheLayer | None:
        """Profile and keep each head's policy (prefill); in the decode phase, after a multi-token pass
        (a question), keep the policies: ``make_room`` evicts what they do not hold, a token per step."""
        if not self.active("decode"):
            return super().compress(layer, ctx, merger)
        state = self._state(ctx)
        if state.policy is not None or not layer.initialized:
            return None
        choice, member, mass, protected = self._profile(layer, ctx)
        length = mass.shape[-1]
        layer.entry_state(self.state_key)[:, :, :length] = mass.float().masked_fill(protected, float("inf"))
        state.member, state.mass = member, mass.float()  # score() reads them
        out = super().compress(layer, ctx, merger)
        # what outlives the compression: the policies (and the per-entry mass, which moved along)
        state.policy, state.member, state.mass, state.punct = choice, None, None, None
        state.window = QueryWindow()
        return out

    def make_room(self, layer: CacheLayer, ctx: ScoreContext, cap: int) -> Room | None:
        """Per head: evict an entry its policy does not hold; at the layer's cap, its least attended one."""
        if not layer.initialized:
            return None
        state = ctx.states.get(self.state_key, FastGenState)
        policy = None if state is None else state.policy
        if policy is None:
            raise RuntimeError("fastgen decodes with the policies it chose on the prompt; compress the "
                               "prompt first (Engine.prepare and generate do)")
        assert layer.lengths is not None
        _, _, positions = layer.view()  # [B, H, L]
        pos = positions.long()
        valid = layer.valid_mask() if not layer.uniform else torch.ones_like(pos, dtype=torch.bool)
        mass = layer.entry_state(self.state_key)[:, :, : pos.shape[-1]]  # [B, H, L]
        seen = ctx.seen.to(pos.device)[:, None, None]  # [B, 1, 1], counting the token about to come
        sink = (pos < self.sinks) & valid
        protected = torch.isinf(mass) & valid  # special and punctuation entries
        open_ = valid & ~protected
        rank = _rank(mass.masked_fill(~open_, -1.0))  # 0 = most attended
        frequent = open_ & (rank < (seen.double() * self.frequent).ceil())
        local = valid & (pos >= seen - (seen.double() * self.local).ceil().long())
        p = policy.to(pos.device)[..., None]  # [B, H, 1]
        member = sink | ((p >= 1) & protected) | ((p >= 2) & frequent) | ((p >= 3) & local) | ((p >= 4) & valid)
        stray = valid & ~member  # entries the head's policy no longer holds
        at_cap = layer.lengths.sum(dim=-1) >= ctx.keep.to(pos.device) * pos.shape[1]  # [B]
        finite = mass.masked_fill(torch.isinf(mass), torch.finfo(torch.float32).max)
        worst_stray = finite.masked_fill(~stray, float("inf")).argmin(dim=-1)  # [B, H]
        # at the cap: the least attended entry outside the sinks and the recent share (new tokens have
        # had few queries to gather mass; without this a capped head would drop each one at once)
        worst = finite.masked_fill(~valid | sink | local, float("inf"))
        older = torch.isfinite(worst).any(dim=-1, keepdim=True)
        worst = torch.where(older, worst, finite.masked_fill(~valid | sink, float("inf")))
        has_stray, evictable = stray.any(dim=-1), torch.isfinite(worst).any(dim=-1)
        victim = torch.where(has_stray, worst_stray, worst.argmin(dim=-1))
        full = has_stray | (at_cap[:, None] & evictable)
        if not bool(full.any()):
            return None
        return Room(victim, full)


def _rank(scores: Tensor) -> Tensor:
    """Rank of every slot in its row by ``scores``, 0 = highest ([B, H, L] -> [B, H, L] long)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    steps = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, steps)
