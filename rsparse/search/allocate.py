"""Per-layer sparsity s_l under the model-level byte budget.

The budget: every decoder projection l of dense size w_l (out x in elements) reads (1 - s_l) w_l
at a sparse token, so the model-level sparsity is sum(s_l w_l) / sum(w_l). An allocation is a
vector s_l meeting it; rho_l then splits each layer's (1 - s_l) between kept channels and rank.

greedy (the peer anchor; the idea of TEAL, Liu et al. 2024, "Training-Free Activation Sparsity in
Large Language Models", section 4: block-wise greedy allocation; this is our own code). Sparse-only
(rho 1) and block by block, every block at the target (so the model-level budget holds exactly):
  * a block's projections form groups that read one input (q/k/v; gate/up) or alone (o; down);
    a group shares one sparsity, as TEAL thresholds a shared input once;
  * start with every group dense; one step raises the sparsity of one group so that the block
    saves `step` of its bytes more (less if the group reaches `max_sparsity`); the step taken is
    the one with the least increase of the block's output error per byte saved, the error being
    ||B_sparse(h) - B_dense(h)||^2 / ||B_dense(h)||^2 over the calibration windows' hidden states h
    entering the block in the dense model (only the sparse positions: second halves by default);
  * the walk goes up to the highest target; a lower target is the walk's state where it crosses
    that target, its last step cut so that the block's saving is exactly the target. Thresholds
    are the quantiles of the dense calibration rows (as everywhere in the search).
  Cost: ceil(max target / step) x (number of groups) block forward passes per block.

block_rho: rho_l on a fixed allocation by the same block output error, no search (below).
recipe_on_shape: a recipe's allocation spread onto another model's shapes (the decode benchmark).

evolve: the search (rsparse.search.evolution) mutates s_l with rho_l; `project_budget` puts every
candidate back on the budget by shifting its sparsity genes by one constant (clipped to
[0, max_sparsity]).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from rsparse.core.calibrate import CalibrationActivations, logits_kwargs
from rsparse.core.models import decoder_blocks
from rsparse.core.sparse_modules import token_mode
from rsparse.errors import BadInputError
from rsparse.progress import progress
from rsparse.search.config import AllocationConfig, BlockRhoConfig

# projections of one block that read the same input tensor (one threshold in TEAL)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def layer_sizes(linears) -> np.ndarray:
    return np.array([l.module.out_features * l.module.in_features for l in linears], dtype=np.float64)


def model_sparsity(sparsities, sizes) -> float:
    """The model-level sparsity of per-layer sparsities: the byte-weighted mean."""
    return float(np.dot(np.asarray(sparsities, dtype=np.float64), sizes) / sizes.sum())


def project_budget(sparsities, sizes, target: float, max_sparsity: float, iters: int = 60) -> np.ndarray:
    """s + c clipped to [0, max_sparsity], with the one constant c (bisection) that makes the
    byte-weighted mean equal to `target`: the nearest allocation on the budget that keeps the
    candidate's differences between layers (up to the clipping)."""
    s = np.asarray(sparsities, dtype=np.float64)
    if not 0.0 <= target <= max_sparsity:
        raise BadInputError(f"target sparsity {target} is outside [0, {max_sparsity}]")
    lo, hi = -1.0 - s.max(), 1.0 + max_sparsity - s.min()
    for _ in range(iters):
        c = (lo + hi) / 2
        if model_sparsity(np.clip(s + c, 0.0, max_sparsity), sizes) < target:
            lo = c
        else:
            hi = c
    return np.clip(s + (lo + hi) / 2, 0.0, max_sparsity)


def recipe_on_shape(recipe, linears) -> list[tuple[float, float]]:
    """(sparsity, rho) for each of `linears` from a per-layer recipe (path or dict) made for
    another model of the same family: each projection takes the recipe's entry of its kind at the
    same relative depth, then every sparsity is shifted by one constant so that the byte-weighted
    model-level sparsity on these shapes equals the recipe's own (its "sparsity", else the
    byte-weighted mean over its layers' "shape"s): the same budget, spread as the recipe spreads it."""
    from rsparse.core.config import load_recipe
    from rsparse.errors import RecipeError

    recipe = load_recipe(recipe)
    target = recipe.get("sparsity")
    source: dict[tuple[int, str], tuple[float, float]] = {}
    sizes = []
    for e in recipe["layers"]:
        m = re.search(r"\.(\d+)\.(?:.+\.)?(\w+)$", e.get("name", "")) if isinstance(e, dict) else None
        if m is None or "rho" not in e or e.get("sparsity", target) is None:
            raise RecipeError(f"recipe layer {str(e)[:80]} needs a name with a block number, a rho and a sparsity")
        source[int(m.group(1)), m.group(2)] = (float(e.get("sparsity", target)), float(e["rho"]))
        shape = e.get("shape")
        sizes.append(shape[0] * shape[1] if isinstance(shape, (list, tuple)) and len(shape) == 2 else None)
    if target is None:  # the model-level sparsity the recipe has on its own shapes
        if None in sizes:
            raise RecipeError("recipe gives neither a model-level 'sparsity' nor every layer's 'shape'")
        target = model_sparsity([sp for sp, _ in source.values()], np.array(sizes, dtype=np.float64))
    blocks = 1 + max(b for b, _ in source)
    depth = 1 + max(lin.block for lin in linears)
    mapped = []
    for lin in linears:
        key = (min(blocks - 1, int((lin.block + 0.5) * blocks / depth)), lin.kind)
        if key not in source:
            raise RecipeError(f"recipe has no {lin.kind} in block {key[0]} (needed for {lin.name})")
        mapped.append(source[key])
    s = [sp for sp, _ in mapped]
    s = project_budget(s, layer_sizes(linears), float(target), max(0.95, max(s)))
    return [(float(sp), rho) for sp, (_, rho) in zip(s, mapped)]


def input_groups(linears, indices) -> list[list[int]]:
    """Indices of one block's projections, grouped by the input they read."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(SHARED_INPUT.get(linears[i].kind, linears[i].kind), []).append(i)
    return list(groups.values())


@torch.no_grad()
def block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[list[tuple]]:
    """[block][batch] -> (hidden states entering the block, its keyword arguments), one pass."""
    blocks = decoder_blocks(model)
    saved: list[list[tuple]] = [[] for _ in blocks]
    handles = []
    for b, block in enumerate(blocks):
        def grab(module, args, kwargs, b=b):
            saved[b].append((args[0].detach().clone(), dict(kwargs)))
        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            # the last block's output is not needed: logits of one position only
            model(windows[start:start + batch_size].to(device), use_cache=False, **logits_kwargs(model, 1))
    finally:
        for h in handles:
            h.remove()
    return saved


def _block_out(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_error(block: nn.Module, inputs, first: int):
    """A function giving the block's relative output error ||B(h) - B_now(h)||^2 / ||B_now(h)||^2
    over `inputs` (positions from `first` on), B_now being the block as it is at this call (dense,
    in greedy_allocation, block_errors and block_rho): the objective of all three."""
    reference = [_block_out(block, h, kw)[:, first:] for h, kw in inputs]
    norm = max(sum(float(d.float().pow(2).sum()) for d in reference), 1e-30)

    def error() -> float:
        return sum(float((_block_out(block, h, kw)[:, first:] - d).float().pow(2).sum())
                   for (h, kw), d in zip(inputs, reference)) / norm
    return error


@torch.no_grad()
def greedy_allocation(model: nn.Module, windows: torch.Tensor, targets, activations: CalibrationActivations,
                      cfg: AllocationConfig | None = None, tokens: str = "second_half", batch_size: int = 4,
                      cache_mb: int = 2048) -> dict:
    """TEAL-style greedy allocation (see the module docstring) for each of `targets`.
    Returns {"sparsity": {target: [s_l per decoder projection]}, "names": [...], "error": {target:
    [block output error per block]}, "evaluations": block passes}. Leaves the model sparsified
    (sparse-only): restore_ undoes it."""
    from rsparse.search.objective import Candidates

    cfg = (cfg or AllocationConfig(method="greedy")).validate()
    targets = sorted(float(t) for t in targets)
    if not targets or targets[0] < 0 or targets[-1] > cfg.max_sparsity:
        raise BadInputError(f"greedy targets must lie in [0, {cfg.max_sparsity}], got {targets}")
    cands = Candidates(model, targets[-1], activations, tokens=tokens, lowrank=False, cache_mb=cache_mb)
    from rsparse.core.models import decoder_linears

    linears = decoder_linears(model)
    assert [l.name for l in linears] == [l.name for l in cands.layers]
    sizes = layer_sizes(linears)
    n = len(linears)
    ones = np.ones(n)
    current = np.zeros(n)
    cands.apply(ones, current)  # dense everywhere (s = 0 plans a dense layer)
    inputs = block_inputs(model, windows, batch_size)
    blocks = decoder_blocks(model)
    first = windows.shape[1] // 2 if tokens == "second_half" else 0
    result = {t: np.zeros(n) for t in targets}
    errors = {t: [] for t in targets}
    evaluations = 0

    with token_mode(model, tokens):
        for b in progress(range(len(blocks)), desc="greedy allocation", unit="block"):
            idx = [i for i, l in enumerate(linears) if l.block == b]
            groups = input_groups(linears, idx)
            gbytes = [sizes[g].sum() for g in groups]
            total = sizes[idx].sum()
            error = block_error(blocks[b], inputs[b], first)

            level = np.zeros(len(groups))
            saved, err_now, ti = 0.0, 0.0, 0
            while ti < len(targets):
                best = None
                for gi, g in enumerate(groups):
                    if level[gi] >= cfg.max_sparsity - 1e-12:
                        continue
                    new = min(cfg.max_sparsity, level[gi] + cfg.step * total / gbytes[gi])
                    current[g] = new
                    cands.apply(ones, current, only=g)
                    err = error()
                    evaluations += 1
                    current[g] = level[gi]
                    cands.apply(ones, current, only=g)
                    gain = (new - level[gi]) * gbytes[gi]
                    cost = (err - err_now) / gain
                    if best is None or cost < best[0]:
                        best = (cost, gi, new, err, gain)
                if best is None:  # every group at max_sparsity: only if a target exceeds it
                    raise BadInputError(f"block {b} cannot reach {targets[ti]} with max sparsity {cfg.max_sparsity}")
                _, gi, new, err, gain = best
                while ti < len(targets) and saved + gain >= targets[ti] * total - 1e-9 * total:
                    part = current.copy()
                    part[groups[gi]] = level[gi] + (targets[ti] * total - saved) / gbytes[gi]
                    result[targets[ti]][idx] = part[idx]
                    errors[targets[ti]].append(err)  # the full step's error: an upper bound at the target
                    ti += 1
                level[gi] = new
                current[groups[gi]] = new
                cands.apply(ones, current, only=groups[gi])
                saved += gain
                err_now = err
            # the next blocks are measured on dense inputs: this block's layers go back to dense
            current[idx] = 0.0
            cands.apply(ones, current, only=idx)
    return {"sparsity": {t: result[t].tolist() for t in targets}, "names": [l.name for l in linears],
            "error": errors, "evaluations": evaluations, "step": cfg.step, "max_sparsity": cfg.max_sparsity}


@torch.no_grad()
def block_errors(model: nn.Module, windows: torch.Tensor, sparsities, activations: CalibrationActivations,
                 tokens: str = "second_half", batch_size: int = 4) -> list[float]:
    """Greedy's objective for any allocation: per block, the relative output error of the block
    sparse-only at s_l against the dense block, both on the dense model's hidden states. Leaves
    the model sparsified (restore_ undoes it)."""
    from rsparse.search.objective import Candidates

    s = np.asarray(sparsities, dtype=np.float64)
    cands = Candidates(model, float(s.max()), activations, tokens=tokens, lowrank=False)
    ones = np.ones(len(s))
    cands.apply(ones, np.zeros(len(s)))
    inputs = block_inputs(model, windows, batch_size)
    blocks = decoder_blocks(model)
    first = windows.shape[1] // 2 if tokens == "second_half" else 0
    with token_mode(model, tokens):
        errors = [block_error(block, block_in, first) for block, block_in in zip(blocks, inputs)]  # dense now
        cands.apply(ones, s)
        return [error() for error in errors]


@torch.no_grad()
def block_rho(model: nn.Module, windows: torch.Tensor, sparsities, activations: CalibrationActivations,
              cfg: BlockRhoConfig | None = None, tokens: str = "second_half", factors: str = "whitened",
              batch_size: int = 4, cache_mb: int = 2048) -> dict:
    """rho_l per projection on a fixed allocation s_l, chosen by greedy's own objective instead of
    a perplexity search: block by block, each projection in turn takes the rho of `grid` that
    gives the least relative block output error (||B(h) - B_dense(h)||^2 / ||B_dense(h)||^2 over
    the dense model's hidden states h at the sparse positions), the others of its block at their
    current choice. Rank is kept only where it lowers the error by more than `cfg.min_gain` of the
    block's sparse-only error (a local, low-variance objective: one block pass per projection and grid
    value, no over-fit of hundreds of genes to a few windows). Every rho costs the same bytes
    (rsparse.core.budget), so the budget is untouched. Returns {"rho": [...], "names": [...],
    "error": {"sparse": [per block], "chosen": [per block]}, "evaluations": block passes}; leaves
    the model sparsified (restore_ undoes it)."""
    from rsparse.core.models import decoder_linears
    from rsparse.search.objective import Candidates

    cfg = (cfg or BlockRhoConfig()).validate()
    s = np.asarray(sparsities, dtype=np.float64)
    grid, min_gain = sorted({float(r) for r in cfg.grid} | {1.0}, reverse=True), cfg.min_gain
    cands = Candidates(model, float(s.max()), activations, tokens=tokens, factors=factors, steps=1000,
                       cache_mb=cache_mb)  # rho on a 0.001 grid: the grid's values as given
    linears = decoder_linears(model)
    n = len(linears)
    rho, zeros = np.ones(n), np.zeros(n)
    cands.apply(rho, zeros)  # dense: the blocks' inputs and reference outputs are the dense model's
    inputs = block_inputs(model, windows, batch_size)
    blocks = decoder_blocks(model)
    first = windows.shape[1] // 2 if tokens == "second_half" else 0
    current = zeros.copy()
    errors = {"sparse": [], "chosen": []}
    evaluations = 0
    with token_mode(model, tokens):
        for b in progress(range(len(blocks)), desc="block rho", unit="block"):
            idx = [i for i, l in enumerate(linears) if l.block == b]
            error = block_error(blocks[b], inputs[b], first)
            current[idx] = s[idx]
            cands.apply(rho, current, only=idx)
            err_now = sparse_err = error()
            for i in idx:
                best = (err_now, rho[i])
                for r in grid:
                    if r == rho[i]:
                        continue
                    rho[i] = r
                    cands.apply(rho, current, only=[i])
                    err = error()
                    evaluations += 1
                    if err < best[0] - min_gain * sparse_err:  # every r tried here is < 1: a rank
                        best = (err, r)
                err_now, rho[i] = best
                cands.apply(rho, current, only=[i])
            errors["sparse"].append(sparse_err)
            errors["chosen"].append(err_now)
            current[idx] = 0.0  # the next blocks are measured on dense inputs (as in greedy_allocation)
            cands.apply(rho, current, only=idx)
    return {"rho": rho.tolist(), "names": [l.name for l in linears], "error": errors, "evaluations": evaluations,
            "grid": grid, "min_gain": min_gain}
