"""How the decode engine chooses the next token: greedy, or temperature / top-k / top-p sampling,
all on the device (no host synchronisation per token, so a CUDA graph can hold it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsparse.errors import EngineError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (top_k / top_p unused)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # seeds the device generator at the start of each generate call

    def __post_init__(self):
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise EngineError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0 (got {self.temperature}, "
                              f"{self.top_p}, {self.top_k})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def choose(logits: torch.Tensor, sampling: Sampling, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The next token per row of logits (B, V). temperature and top_p are device tensors (so a
    captured graph reads new values per request); sampling decides which steps run."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a host sync
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
