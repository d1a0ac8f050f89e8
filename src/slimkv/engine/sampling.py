"""Choosing the next token: greedy, or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: sample only among the k most likely tokens (0 = no limit)
    top_p: sample only among the smallest set of tokens whose probability reaches p (1 = no limit)
    seed: seed of the sampling generator; the same seed gives the same text
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Turns last-token logits into next tokens; holds the seeded generator of one generation."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(int(config.seed))

    def probabilities(self, logits: Tensor) -> Tensor:
        """[batch, vocab] logits -> [batch, vocab] float32 probabilities after temperature/top-k/top-p."""
        cfg = self.config
        logits = logits.float() / cfg.temperature
        if cfg.top_k:
            kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) >= cfg.top_p  # keep the token crossing p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        return logits.softmax(dim=-1)

    def __call__(self, logits: Tensor) -> Tensor:
        """[batch, vocab] -> [batch] next token ids."""
        if self.config.greedy:
            return logits.argmax(dim=-1)
        probs = self.probabilities(logits)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)
