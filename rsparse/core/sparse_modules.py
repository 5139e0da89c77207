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

QUANT_METHOD = "rsparse"  # R-Sparse's quant_method in a transformers model's quantization_config

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
    _forget_quantizer(model)  # dense again: save_pretrained writes a plain transformers model
    return model


def _forget_quantizer(model: nn.Module) -> None:
    """Remove the rsparse quantizer and quantization_config that sparsify_ or from_pretrained gave
    the model (rsparse.io.transformers_format)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) == QUANT_METHOD:
        model.hf_quantizer = None
        if hasattr(model, "quantization_method"):
            delattr(model, "quantization_method")
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and (getattr(qc, "quant_method", None) == QUANT_METHOD
                           or (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD)):
        del config.quantization_config
        if hasattr(config, "_is_quantized"):
            config._is_quantized = False
