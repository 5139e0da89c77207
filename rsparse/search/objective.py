"""The search's objective: how a candidate recipe (a rho per layer) is applied and scored.

Fitness = mean perplexity of the sparsified model over the calibration windows, lower is better,
under the evaluation protocol (`tokens`): "second_half" (default) runs each window's first half
dense and scores the predictions at its sparse second half, as rsparse.evaluate_perplexity does;
"all" sparsifies and scores every position.

Costs are kept down by reusing what does not change between candidates:
  * the dense calibration activations (collected once) give every layer's thresholds on a grid
    of rho values (one sort per layer and score kind);
  * one SVD per layer gives the factors for every rank (slices of the largest); with
    factors="whitened" (the final model's factors, fitted to the inputs each candidate's
    threshold drops) the factors of a (layer, rho) pair are computed once, when a candidate
    first asks for them, on the weight's device; `rho_step` bounds how many pairs there are;
  * the hidden states entering the first block of the group being optimised are the same for
    all candidates, so each candidate runs only the blocks from there on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsparse.core.budget import layer_budget
from rsparse.core.calibrate import CalibrationActivations, LayerPlanner, logits_kwargs
from rsparse.core.config import RSparseConfig
from rsparse.core.layer import rsparse_layers
from rsparse.core.models import decoder_blocks
from rsparse.methods.rsparse import sparsify_rsparse_
from rsparse.progress import progress


class Candidates:
    """Applies a rho vector to an already sparsified model quickly (no module rebuilding): each
    layer is re-planned by its LayerPlanner (rsparse.core.calibrate), with the thresholds of
    every rho on the grid computed once (one sort per layer and score kind) and the factors
    cached (slices of one SVD per layer, or whitened fits per rank and threshold)."""

    def __init__(self, model: nn.Module, sparsity: float, activations: CalibrationActivations, score: str = "auto",
                 tokens: str = "second_half", factors: str = "svd", steps: int = 200):
        base = RSparseConfig(sparsity=sparsity, ratio=0.0, tokens=tokens, refine=False, factors="svd")
        sparsify_rsparse_(model, base, activations)  # rho = 0 everywhere: the largest ranks
        self.layers = rsparse_layers(model)
        self.sparsity, self.steps = sparsity, steps
        keeps = [(1.0 - sparsity) * (g / steps) for g in range(steps + 1)]  # layer_budget's keep fraction
        self.planners, self.tables = [], []
        for layer in self.layers:
            planner = LayerPlanner(layer.weight, activations.rows[layer.name], score, factors, cache=True)
            planner.seed_factors(layer.lr_down.clone(), layer.lr_up.clone())  # the rank-0 budget's SVD factors
            self.planners.append(planner)
            self.tables.append(planner.threshold_table(keeps))

    def apply(self, rhos: np.ndarray) -> None:
        for layer, planner, table, rho in zip(self.layers, self.planners, self.tables, rhos):
            g = int(round(float(rho) * self.steps))
            b = layer_budget(layer.out_features, layer.in_features, self.sparsity, g / self.steps)
            planner.plan(b, thresholds={w: t[g] for w, t in table.items()}).apply(layer)


class _Passthrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def _fitness(model: nn.Module, windows: torch.Tensor, start_block: int, cache: dict, batch_size: int = 4,
             tokens: str = "second_half") -> float:
    """Mean per-window perplexity, running blocks >= start_block from cached inputs; with
    "second_half" only the predictions of each window's second half count."""
    first = windows.shape[1] // 2 if tokens == "second_half" else 0
    blocks = decoder_blocks(model)
    saved = list(blocks[:start_block])
    ppls = []

    def inject(module, args):
        return (cache[current],) + tuple(args[1:])

    handle = blocks[start_block].register_forward_pre_hook(inject) if start_block else None
    try:
        for i in range(start_block):
            blocks[i] = _Passthrough()
        device = next(model.parameters()).device
        scored = windows.shape[1] - first
        kwargs = logits_kwargs(model, scored)  # no logits for the unscored positions
        for current in range(0, windows.shape[0], batch_size):
            ids = windows[current:current + batch_size].to(device)
            logits = model(ids, use_cache=False, **kwargs).logits
            logits = logits[:, logits.shape[1] - scored:-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, first + 1:], reduction="none").mean(dim=1)
            ppls.extend(nll.exp().tolist())
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
        if handle:
            handle.remove()
    return float(np.mean(ppls))


@torch.no_grad()
def _block_inputs(model: nn.Module, windows: torch.Tensor, block: int, batch_size: int = 4) -> dict:
    """Hidden states entering `block` for each batch of windows, under the current layers."""
    cache = {}
    blocks = decoder_blocks(model)

    class _Stop(Exception):
        pass

    def grab(module, args):
        cache[current] = args[0].detach().clone()
        raise _Stop

    handle = blocks[block].register_forward_pre_hook(grab)
    device = next(model.parameters()).device
    try:
        for current in range(0, windows.shape[0], batch_size):
            try:
                model(windows[current:current + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cache


@torch.no_grad()
def uniform_grid(model: nn.Module, windows: torch.Tensor, sparsity: float, grid, activations: CalibrationActivations,
                 tokens: str = "second_half", factors: str = "svd", batch_size: int = 4) -> list[dict]:
    """The search's calibration fitness of a uniform rho at each grid value: the paper's Table 4
    baseline ("uniform rho by grid search"), scored exactly as the search scores an individual.
    Returns [{"rho", "fitness"}] in grid order; leaves the model sparsified (restore_ undoes it)."""
    steps = 1000  # fine enough for any grid value a user types (0.95, 0.975, ...)
    cands = Candidates(model, sparsity, activations, tokens=tokens, factors=factors, steps=steps)
    n = len(cands.layers)
    out = []
    for rho in progress(list(grid), desc=f"uniform grid at {100 * sparsity:.0f}%", unit="rho value", leave=False):
        cands.apply(np.full(n, float(rho)))
        out.append({"rho": float(rho), "fitness": _fitness(model, windows, 0, {}, batch_size, tokens=tokens)})
    return out
