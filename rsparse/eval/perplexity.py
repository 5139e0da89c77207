"""Perplexity on fixed token windows, and the sparsity a model actually achieved while scoring.

Windows: the first n non-overlapping windows of seq_len tokens of the corpus (rsparse.core.data).
Token modes follow the paper's simulation for scoring whole sequences:
  "second_half"  the first half of each window is run dense (it stands in for the prompt), the
                 second half sparse; perplexity counts only the predictions made at sparse
                 positions (targets T//2+1 .. T-1), for every method including dense, so numbers
                 compare across methods.
  "all"          every position sparse; perplexity over all predictions.
Achieved sparsity: kept channels vary per token, so while scoring we count, at every sparsified
token and layer, the weight elements read (kept channels * out + rank * (in + out)) and report
1 - read / dense over all decoder projections (the model-level figure the target refers to).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsparse.core.calibrate import logits_kwargs
from rsparse.core.config import SCORED_MODES
from rsparse.core.layer import rsparse_layers
from rsparse.core.models import decoder_linears
from rsparse.core.sparse_modules import token_mode
from rsparse.errors import BadInputError
from rsparse.methods.mlp import baseline_layers, measured_baseline_sparsity
from rsparse.progress import progress


def measured_read(model: nn.Module) -> dict:
    """Per-layer and model-level read fractions from the layers' tracked statistics."""
    layers = {id(l): l for l in rsparse_layers(model)}
    dense_total = read_total = 0.0
    per_layer = {}
    for lin in decoder_linears(model):
        m = lin.module
        size = m.in_features * m.out_features
        layer = layers.get(id(m))
        if layer is None or layer.method == "dense" or float(layer.stat_tokens) == 0:
            read = 1.0 if layer is None or layer.method == "dense" else math.nan
            kept = 1.0
        else:
            kept = float(layer.stat_kept) / (float(layer.stat_tokens) * m.in_features)
            read = kept + layer.rank * (m.in_features + m.out_features) / size
        per_layer[lin.name] = {"kept": kept, "read": read}
        dense_total += size
        read_total += size * (read if not math.isnan(read) else 1.0)
    return {"achieved_sparsity": 1.0 - read_total / dense_total, "layers": per_layer}


def measured_sparsity(model: nn.Module) -> dict:
    """Achieved model-level sparsity over the tokens sparsified since the statistics were reset,
    for any method (and, for the MLP baselines, "module_sparsity": the fraction of MLP neurons
    skipped)."""
    if baseline_layers(model):
        m = measured_baseline_sparsity(model)
        return {k: m[k] for k in ("achieved_sparsity", "module_sparsity", "skippable_sparsity") if k in m}
    if rsparse_layers(model):
        return {"achieved_sparsity": measured_read(model)["achieved_sparsity"]}
    return {"achieved_sparsity": 0.0}


def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of targets (B, N) under logits (B, N, vocab). One window at a
    time, so that cross-entropy's log-softmax copy is one window's, not the whole batch's; summed
    in float64, so the total does not depend on how the windows are batched."""
    return sum(float(F.cross_entropy(row.float(), t, reduction="none").double().sum())
               for row, t in zip(logits, targets))


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, windows: torch.Tensor, tokens: str = "second_half",
                        batch_size: int = 4, desc: str = "perplexity") -> dict:
    """Perplexity of `model` (dense, R-Sparse or a baseline) on (n, T) token windows, and the
    achieved model-level sparsity. With "second_half" only the predictions at the sparse
    positions count, for every method."""
    if tokens not in SCORED_MODES:
        raise BadInputError(f"tokens must be one of {SCORED_MODES} for perplexity, got {tokens!r}")
    if windows.dim() != 2 or windows.shape[1] < 4:
        raise BadInputError(f"perplexity needs (n, T>=4) token windows, got shape {tuple(windows.shape)}")
    T = windows.shape[1]
    first = T // 2 if tokens == "second_half" else 0  # first logit position scored
    device = next(model.parameters()).device
    # logits of the scored positions only (and the last one, dropped): the rest of the
    # (batch, T, vocab) logits is never computed
    kwargs = logits_kwargs(model, T - first)
    nll, count = 0.0, 0
    with token_mode(model, tokens, track=True):
        for start in progress(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
            ids = windows[start:start + batch_size].to(device)
            logits = model(ids, use_cache=False, **kwargs).logits
            logits = logits[:, logits.shape[1] - (T - first):-1]  # predictions of targets first+1 .. T-1
            targets = ids[:, first + 1:]
            nll += window_nll(logits, targets)
            count += targets.numel()
        read = measured_read(model)
        result = {"ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count,
                  "achieved_sparsity": read["achieved_sparsity"], "layers": read["layers"]}
        if baseline_layers(model):
            result.update(measured_sparsity(model))
    return result


def model_card_perplexity(model: nn.Module, tokenizer, corpus: str, seq_len: int, windows: int) -> dict | None:
    """Perplexity of a sparsified model (second half of each window sparse), as the model card of
    `rsparse compress` records it; None for windows < 1."""
    if windows < 1:
        return None
    from rsparse.core.data import load_windows

    evalw = load_windows(tokenizer, corpus, seq_len, windows, "perplexity")
    result = evaluate_perplexity(model, evalw, tokens="second_half", desc="perplexity (model card)")
    return {"ppl": result["ppl"], "achieved_sparsity": result["achieved_sparsity"], "corpus": corpus,
            "windows": int(evalw.shape[0]), "seq_len": seq_len, "tokens": "second_half"}
