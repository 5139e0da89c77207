"""What every sparse module shares (R-Sparse layers, the baselines' MLP wrappers): which tokens
it sparsifies, the statistics it counts while scoring, and how it is undone.

Token modes (`tokens`):
  "decode"       only forward calls with one token per sequence (generation steps); prefill dense.
  "second_half"  the paper's simulation for scoring whole sequences: positions >= T//2 sparse.
  "all"          every token.
  "none"         every token dense (the module behaves exactly as the original).
"""

from __future__ import annotations

import contextlib

from torch import nn

from rsparse.core.models import replace_module
from rsparse.errors import BadInputError

TOKEN_MODES = ("decode", "second_half", "all", "none")


class SparseModule:
    """Mixin of the modules that replace a dense one: RSparseLinear, BaselineMLP.

    Subclasses have the attributes `tokens` (a TOKEN_MODES entry) and `track_stats` (count kept
    channels while True), and implement reset_stats() and dense_module() (the original module,
    to put back)."""

    tokens: str
    track_stats: bool

    def reset_stats(self) -> None:
        raise NotImplementedError

    def dense_module(self) -> nn.Module:
        raise NotImplementedError

    def forget_prompt(self) -> None:
        """Drop any state chosen at the last prefill (GRIFFIN's selection); nothing by default."""


def check_tokens(tokens: str) -> str:
    if tokens not in TOKEN_MODES:
        raise BadInputError(f"unknown token mode {tokens!r}; expected one of {TOKEN_MODES}")
    return tokens


def sparse_modules(model: nn.Module) -> list[SparseModule]:
    return [m for m in model.modules() if isinstance(m, SparseModule)]


def set_token_mode(model: nn.Module, tokens: str) -> None:
    """Choose which tokens every sparse module of the model sparsifies (see the module docstring)."""
    check_tokens(tokens)
    for m in sparse_modules(model):
        m.tokens = tokens
        m.forget_prompt()


@contextlib.contextmanager
def token_mode(model: nn.Module, tokens: str, track: bool = False):
    """Every sparse module of the model in token mode `tokens` for the block, then back as it was.
    With track=True each one also counts fresh statistics (kept channels) inside the block."""
    check_tokens(tokens)
    modules = sparse_modules(model)
    saved = [(m.tokens, m.track_stats) for m in modules]
    for m in modules:
        m.tokens = tokens
        m.forget_prompt()
        if track:
            m.track_stats = True
            m.reset_stats()
    try:
        yield
    finally:
        for m, (mode, tracked) in zip(modules, saved):
            m.tokens, m.track_stats = mode, tracked
            m.forget_prompt()


def restore_(model: nn.Module) -> nn.Module:
    """Undo any method: put the original dense modules back (same weights). Lossless."""
    names = {id(m): n for n, m in model.named_modules()}
    for m in sparse_modules(model):
        if id(m) in names:  # not inside a module already put back
            replace_module(model, names[id(m)], m.dense_module())
    from rsparse.io.transformers_format import detach

    detach(model)  # dense again: save_pretrained writes a plain transformers model
    return model
