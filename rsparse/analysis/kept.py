"""Analysis 4 (see rsparse.analysis): the per-token fraction of kept input channels of every
layer of a model sparsified with every token sparse, on held-out text."""

from __future__ import annotations

import torch
from torch import nn

from rsparse.core.calibrate import CalibrationActivations
from rsparse.core.config import RSparseConfig
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import restore_
from rsparse.eval.perplexity import evaluate_perplexity
from rsparse.methods.rsparse import sparsify_rsparse_

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# -- 4. kept-channel distributions ---------------------------------------------------------------

def _summary(v: torch.Tensor) -> dict:
    v = v.to(torch.float64)
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), **{f"p{int(100 * a)}": b for a, b in zip(QUANTILES, q)}}


@torch.no_grad()
def kept_fractions(model: nn.Module, windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-token kept-channel fraction of every RSparseLinear of a sparsified model on `windows`
    (every token sparsified), and the perplexity result of the same pass."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    for layer in rsparse_layers(model):
        store[layer.name] = []
        hook = lambda mod, args, key=layer.name: store[key].append(  # noqa: E731
            mod.mask(args[0]).float().mean(-1).reshape(-1).cpu())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        result = evaluate_perplexity(model, windows, tokens="all", desc="perplexity (sparsified)")
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items() if v}, result


def analyze_kept(model: nn.Module, activations: CalibrationActivations, windows: torch.Tensor,
                 sparsity: float, ratio: float, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    config = RSparseConfig(sparsity=sparsity, ratio=ratio, tokens="all", seed=seed,
                           max_rows_per_layer=max(int(r.shape[0]) for r in activations.rows.values()))
    report = sparsify_rsparse_(model, config, activations)
    try:
        fractions, result = kept_fractions(model, windows)
    finally:
        restore_(model)
    by_name = {r["name"]: r for r in report}
    layers = []
    for name, v in fractions.items():
        r = by_name[name]
        layers.append({"name": name, "block": r["block"], "type": r["type"], "target_keep": r["keep"],
                       "rank": r["rank"], "tokens": int(v.numel()), "stat_kept": result["layers"][name]["kept"],
                       **_summary(v)})
    return {"sparsity": sparsity, "ratio": ratio, "tokens": "all", "ppl": result["ppl"],
            "achieved_sparsity": result["achieved_sparsity"], "layers": layers}, fractions
