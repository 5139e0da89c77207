"""The search's objective: how a candidate recipe (a rho per layer) is applied and scored.

Fitness = mean perplexity of the sparsified model over the calibration windows, lower is better,
under the evaluation protocol (`tokens`): "second_half" (default) runs each window's first half
dense and scores the predictions at its sparse second half, as rsparse.evaluate_perplexity does;
"all" sparsifies and scores every position.

Costs are kept down by reusing what does not change between candidates:
  * the dense calibration activations (collected once) give every layer's thresholds for any
    kept fraction (one sort per layer and score kind, kept in a bounded cache; thresholds memoised);
  * one SVD per layer gives the factors for every rank (slices of the largest); with
    factors="whitened" (the final model's factors, fitted to the inputs each candidate's
    threshold drops) the factors of a (layer, rho) pair are computed once, when a candidate
    first asks for them, on the weight's device; `rho_step` bounds how many pairs there are;
  * the hidden states entering the first block of the group being optimised are the same for
    all candidates, so each candidate runs only the blocks from there on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsparse.core.budget import layer_budget
from rsparse.core.calibrate import CalibrationActivations, LayerPlanner, layer_method, logits_kwargs
from rsparse.core.config import RSparseConfig
from rsparse.core.layer import rsparse_layers
from rsparse.core.models import decoder_blocks
from rsparse.methods.rsparse import sparsify_rsparse_
from rsparse.progress import progress
from rsparse.search.cache import BoundedCache


class Thresholds:
    """One layer's threshold for any kept fraction and score kind: the k-th smallest calibration
    score, k = round((1 - keep) * n), exactly as calibrate_threshold picks it, read from the
    sorted scores (held in a bounded cache shared by all layers, re-sorted if evicted) and
    memoised per (kind, k): a per-layer sparsity makes the kept fractions too many for a table."""

    def __init__(self, planner: LayerPlanner, cache: BoundedCache, name: str):
        self.planner, self.cache, self.name = planner, cache, name
        self.n = planner.rows.numel()
        self.memo: dict = {}

    def __call__(self, keep: float, weighted: bool) -> float:
        if keep <= 0.0:
            return math.inf
        if keep >= 1.0:
            return -math.inf
        k = min(max(int(round((1.0 - keep) * self.n)), 1), self.n)
        t = self.memo.get((weighted, k))
        if t is None:
            ordered = self.cache.get(("sorted", self.name, weighted))
            if ordered is None:
                norms = self.planner.weight.detach().float().norm(dim=0) if weighted else None
                ordered = self.cache.put(("sorted", self.name, weighted),
                                         self.planner.scores(norms).reshape(-1).float().sort().values)
            t = self.memo[(weighted, k)] = float(ordered[k - 1])
        return t


class Candidates:
    """Applies a rho vector (and, optionally, a per-layer sparsity vector) to an already
    sparsified model quickly (no module rebuilding): each layer is re-planned by its
    LayerPlanner (rsparse.core.calibrate) with thresholds from `Thresholds` and factors cached
    (slices of one SVD per layer, or whitened fits per rank and threshold, in one bounded cache).
    lowrank=False: sparse-only candidates (rho 1), no SVD at the start."""

    def __init__(self, model: nn.Module, sparsity: float, activations: CalibrationActivations, score: str = "auto",
                 tokens: str = "second_half", factors: str = "svd", steps: int = 200, cache_mb: int = 2048,
                 lowrank: bool = True):
        base = RSparseConfig(sparsity=sparsity, ratio=0.0, tokens=tokens, refine=False, factors="svd",
                             method="rsparse" if lowrank else "sparse")
        sparsify_rsparse_(model, base, activations)  # rho = 0 everywhere: the largest ranks
        self.layers = rsparse_layers(model)
        self.sparsity, self.steps = sparsity, steps
        on_gpu = self.layers[0].weight.device.type != "cpu"
        self.cache = BoundedCache(cache_mb * 2**20, spill_bytes=cache_mb * 2**20 if on_gpu else 0)
        self.planners, self.thresholds = [], []
        for layer in self.layers:
            planner = LayerPlanner(layer.weight, activations.rows[layer.name], score, factors, cache=True,
                                   fit_cache=self.cache, name=layer.name)
            if layer.rank:
                planner.seed_factors(layer.lr_down.clone(), layer.lr_up.clone())  # the rank-0 budget's SVD factors
            self.planners.append(planner)
            self.thresholds.append(Thresholds(planner, self.cache, layer.name))

    def apply(self, rhos, sparsities=None, only=None) -> None:
        """Plan every layer (or the indices in `only`) under rho_l and s_l (default: the uniform sparsity)."""
        for i in range(len(self.layers)) if only is None else only:
            layer, planner = self.layers[i], self.planners[i]
            g = int(round(float(rhos[i]) * self.steps))
            s = self.sparsity if sparsities is None else float(sparsities[i])
            b = layer_budget(layer.out_features, layer.in_features, s, g / self.steps)
            w = planner.weighted(layer_method(b))
            planner.plan(b, thresholds={w: self.thresholds[i](b.keep_fraction, w)}).apply(layer)


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
