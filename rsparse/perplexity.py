"""Perplexity on fixed token windows, and the sparsity a model actually achieved while scoring.

Windows: the first n non-overlapping windows of seq_len tokens of the corpus (rsparse.data).
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
from tqdm.auto import tqdm

from rsparse.layer import rsparse_layers, set_token_mode
from rsparse.models import decoder_linears

SCORED_MODES = ("second_half", "all")


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


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, windows: torch.Tensor, tokens: str = "second_half",
                        batch_size: int = 4, desc: str = "perplexity") -> dict:
    """Perplexity of `model` on (n, T) token windows, and the achieved model-level sparsity."""
    if tokens not in SCORED_MODES:
        raise ValueError(f"tokens must be one of {SCORED_MODES} for perplexity, got {tokens!r}")
    if windows.dim() != 2 or windows.shape[1] < 4:
        raise ValueError(f"perplexity needs (n, T>=4) token windows, got shape {tuple(windows.shape)}")
    layers = rsparse_layers(model)
    saved = [(l.tokens, l.track_stats) for l in layers]
    set_token_mode(model, tokens)
    for l in layers:
        l.track_stats = True
        l.reset_stats()
    T = windows.shape[1]
    first = T // 2 if tokens == "second_half" else 0  # first logit position scored
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
            ids = windows[start:start + batch_size].to(device)
            logits = model(ids, use_cache=False).logits[:, first:-1].float()
            targets = ids[:, first + 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
        read = measured_read(model)
    finally:
        for l, (mode, track) in zip(layers, saved):
            l.tokens, l.track_stats = mode, track
    return {"ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count,
            "achieved_sparsity": read["achieved_sparsity"], "layers": read["layers"]}
