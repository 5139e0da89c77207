"""Calibration: what every method learns from a few text windows run through the dense model.

1. `collect_activations`: the calibration windows go through the dense model with forward
   pre-hooks on the 7 projections of every block, keeping a seeded random sample of token rows
   of each layer's input (the same token positions for every layer). They are reused for every
   method and recipe, so they are collected once. Projections reading one input (q/k/v,
   gate/up) share their rows; every pass stops at the last projection it samples (no logits).
   Where nobody else needs the rows (sparsify_ given windows, the refinement pass), they are
   sampled a group of layers at a time (`sample_module_groups`), each group used and freed
   before the next: the same rows, at a fraction of the memory.
2. `calibrate_threshold`: the one threshold rule: the (1-k) quantile of a layer's calibration
   scores, so that a fraction k of them is kept.
3. `LayerPlanner`: per layer and budget, the method, score scale, threshold and low-rank factors
   (a `LayerPlan`, applied with RSparseLinear.configure). sparsify_ plans every layer once; the
   search re-plans every layer for every candidate, from cached thresholds and factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rsparse.core.budget import LayerBudget
from rsparse.core.config import FACTORS, SCORES
from rsparse.core.factors import dropped_input_factors, lowrank_factors, weight_svd
from rsparse.core.layer import RSparseLinear
from rsparse.core.models import decoder_linears
from rsparse.core.sparse_modules import restore_
from rsparse.errors import BadInputError
from rsparse.progress import progress

@dataclass
class CalibrationActivations:
    """Sampled input rows (n_rows, in) of every decoder projection, keyed by module name
    (projections reading the same input, such as q/k/v, share one tensor: read-only)."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    windows: torch.Tensor | None = None  # the calibration token windows (n, seq_len)
    # Full SVDs (u, s, vh in float32 on the CPU, computed in float64) reused across methods and
    # recipes; filled lazily when cache_svd is True. Off by default: for a 7B model the cache is
    # about twice the model's size.
    cache_svd: bool = False
    svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def check_windows(windows: torch.Tensor) -> torch.Tensor:
    """The calibration windows if they are a (n_windows, seq_len >= 2) LongTensor; else BadInputError."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise BadInputError("calibration must be a (n_windows, seq_len) LongTensor of token ids "
                            "(see rsparse.core.data.load_windows) or CalibrationActivations")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise BadInputError(f"calibration needs at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    return windows


@torch.no_grad()
def collect_activations(model: nn.Module, windows: torch.Tensor, max_rows_per_layer: int = 2048,
                        seed: int = 0, batch_size: int = 4) -> CalibrationActivations:
    """Run the dense model over calibration windows and sample input rows of every projection."""
    windows = check_windows(windows)
    restore_(model)  # the dense model's activations
    rows = sample_layer_inputs(model, windows, max_rows_per_layer, seed, batch_size)
    return CalibrationActivations(rows, windows)


def sample_layer_inputs(model: nn.Module, windows: torch.Tensor, max_rows_per_layer: int, seed: int,
                   batch_size: int = 4, second_half: bool = False) -> dict[str, torch.Tensor]:
    """Input rows reaching every decoder projection (see sample_module_inputs)."""
    modules = {l.name: l.module for l in decoder_linears(model)}
    return sample_module_inputs(model, modules, windows, max_rows_per_layer, seed, batch_size, second_half)


def sample_module_inputs(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor,
                         max_rows: int, seed: int, batch_size: int = 4,
                         second_half: bool = False) -> dict[str, torch.Tensor]:
    """Input rows reaching each of `modules` while the model runs the windows, at the same seeded
    random token positions for every module (only positions >= seq_len//2 of each window if
    second_half); float32 on the CPU, keyed like `modules`. Modules that read the very same input
    tensor (q/k/v, gate/up of a Llama block) get one shared tensor of rows: treat them as read-only."""
    rows = next(sample_module_groups(model, modules, windows, max_rows, seed, batch_size, second_half))
    return {name: rows[name] for name in modules}


def sample_budget(model: nn.Module) -> int:
    """Bytes of sampled rows held at once where they can be taken a group of layers at a time:
    half the model's own size. SmolLM2-135M's rows (2048 per layer) take 1.5 times its float32
    weights, so they come in three groups; a 7B model's take well under half its weights: one group."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) // 2


def sample_module_groups(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor,
                         max_rows: int, seed: int, batch_size: int = 4, second_half: bool = False,
                         budget: int | None = None):
    """Yields the input rows of `modules` (as sample_module_inputs) a group of consecutive modules
    at a time, each group's rows taking about `budget` bytes or less (None: one group). Every group
    runs the windows through the model again, up to its last module only (n groups cost about
    (n + 1) / 2 passes), and its rows are sampled at the same positions, so they are the rows one
    pass would give. A caller that is done with a group's rows before taking the next one holds
    one group's rows at a time."""
    n, seq_len = windows.shape
    total = n * seq_len
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.arange(total)
    if second_half:
        candidates = candidates[candidates % seq_len >= seq_len // 2]
    picked = candidates[torch.randperm(len(candidates), generator=gen)[:max_rows]].sort().values
    device = next(model.parameters()).device
    layout = _input_layout(model, modules, windows[:1, :2].to(device))
    for group in _groups(layout, len(picked) * 4, budget):
        yield _sample_group(model, {name: modules[name] for name in group}, group, windows, picked, batch_size, device)


class _Sampled(Exception):
    """Raised by the last hook of a forward pass: every module wanted has its input, the rest of
    the model need not run."""


def _run_to_last_hook(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        # if it does run to the end: the logits of one position, not (batch, seq_len, vocab)
        model(ids, use_cache=False, **logits_kwargs(model, 1))
    except _Sampled:
        pass


def _input_layout(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, tuple[str, int]]:
    """{module: (owner, width)} in call order, from a forward pass over a couple of tokens: the
    width of each module's input, and the owner of its rows: the module called just before it if
    that one read the very same input tensor (q/k/v, gate/up), else itself."""
    layout: dict[str, tuple[str, int]] = {}
    last = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            if name not in layout:
                shared = last.get("input") is x
                layout[name] = (last["owner"] if shared else name, x.shape[-1])
                if not shared:
                    last.update(input=x, owner=name)
            if len(layout) == len(modules):
                raise _Sampled
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        _run_to_last_hook(model, ids)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in modules if name not in layout]
    if missing:
        raise RuntimeError(f"{missing[0]} was not called when the model ran (calibration hooks)")
    return layout


def _groups(layout: dict[str, tuple[str, int]], row_bytes: int, budget: int | None) -> list[dict[str, tuple[str, int]]]:
    """Consecutive modules of `layout` in about equal groups of at most ~budget bytes of rows;
    a group starts only at an owner, so modules sharing rows stay together."""
    sizes = {name: row_bytes * width if owner == name else 0 for name, (owner, width) in layout.items()}
    n_groups = 1 if budget is None else max(1, math.ceil(sum(sizes.values()) / max(budget, 1)))
    target = sum(sizes.values()) / n_groups
    groups, held = [{}], 0
    for name, entry in layout.items():
        if entry[0] == name and groups[-1] and held + sizes[name] > target * 1.001 and len(groups) < n_groups:
            groups.append({})
            held = 0
        groups[-1][name] = entry
        held += sizes[name]
    return groups


def _sample_group(model: nn.Module, modules: dict[str, nn.Module], layout: dict[str, tuple[str, int]],
                  windows: torch.Tensor, picked: torch.Tensor, batch_size: int, device) -> dict[str, torch.Tensor]:
    n_rows, seq_len = len(picked), windows.shape[1]
    owner = {name: entry[0] for name, entry in layout.items()}
    # One allocation for all the group's rows, filled in place batch by batch: no per-batch pieces
    # to concatenate (that doubled the peak), and a block this large is mapped by malloc on its
    # own, so the forward passes' temporaries do not fragment the heap around it for good.
    flat = torch.empty(n_rows * sum(w for name, (o, w) in layout.items() if o == name), dtype=torch.float32)
    rows, offset = {}, 0
    for name, (o, width) in layout.items():
        if o == name:
            rows[name] = flat[offset:offset + n_rows * width].view(n_rows, width)
            offset += n_rows * width
    for name, o in owner.items():
        rows[name] = rows[o]
    del flat
    batch = {"rows": None, "at": 0, "last": None, "seen": set()}  # this batch's sampled rows, where they go

    def hook(name):
        def fn(module, args):
            x = args[0]
            last = batch["last"]
            if owner[name] != name and not (last is not None and last[1] == owner[name] and last[0] is x):
                rows[name] = rows[name].clone()  # shared in the layout's pass, not in this one: rows of its own
                owner[name] = name
            if owner[name] == name:
                sel, at = batch["rows"], batch["at"]
                rows[name][at:at + len(sel)] = x.detach().reshape(-1, x.shape[-1])[sel]
                batch["last"] = (x, name)
            batch["seen"].add(name)
            if len(batch["seen"]) == len(modules):
                raise _Sampled
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for start in progress(range(0, windows.shape[0], batch_size), desc="calibration", unit="batch", leave=False):
            lo, hi = start * seq_len, min(start + batch_size, windows.shape[0]) * seq_len
            sel = picked[(picked >= lo) & (picked < hi)] - lo
            batch.update(rows=sel.to(device), last=None, seen=set())
            _run_to_last_hook(model, windows[start:start + batch_size].to(device))
            batch["at"] += len(sel)
    finally:
        for h in handles:
            h.remove()
    batch["last"] = None
    return {name: rows[name] for name in modules}


def logits_kwargs(model: nn.Module, positions: int) -> dict:
    """Forward arguments that make the model compute logits for its last `positions` positions
    only, where it takes them (transformers' `logits_to_keep`): the rest of the full-vocabulary
    logits is never materialised."""
    import inspect

    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": positions} if takes else {}


def calibrate_threshold(scores: torch.Tensor, keep_fraction):
    """Threshold t such that a fraction keep_fraction of `scores` is strictly above t: the k-th
    smallest score, k = round((1 - keep_fraction) * n) clamped to [1, n]; +inf keeps nothing,
    -inf everything. keep_fraction: a float (one threshold), or a sequence of them (a list of
    thresholds from one sort of the scores)."""
    flat = scores.reshape(-1).float()
    n = flat.numel()

    def kth(keep: float) -> int:
        return min(max(int(round((1.0 - keep) * n)), 1), n)

    if isinstance(keep_fraction, (int, float)):
        if keep_fraction <= 0.0:
            return math.inf
        if keep_fraction >= 1.0:
            return -math.inf
        return float(flat.kthvalue(kth(keep_fraction)).values)
    ordered = flat.sort().values
    return [math.inf if k <= 0.0 else -math.inf if k >= 1.0 else float(ordered[kth(k) - 1]) for k in keep_fraction]


def layer_method(budget: LayerBudget) -> str:
    """What a layer does under its budget: dense (no sparsity), sparse (no rank), lowrank (no
    kept channel) or rsparse (both)."""
    if budget.sparsity == 0.0:
        return "dense"
    if budget.rank == 0:
        return "sparse"
    if budget.keep_fraction == 0.0:
        return "lowrank"
    return "rsparse"


@dataclass
class LayerPlan:
    """One layer's settings under its budget (the arguments of RSparseLinear.configure)."""

    method: str
    keep_fraction: float
    threshold: float
    score_scale: torch.Tensor | None  # None: the score is |x_j|
    lr_down: torch.Tensor | None = None  # (in, r)
    lr_up: torch.Tensor | None = None  # (r, out)

    @property
    def weighted(self) -> bool:
        return self.score_scale is not None

    def apply(self, layer: RSparseLinear) -> RSparseLinear:
        layer.configure(self.method, self.threshold, self.keep_fraction, self.score_scale, self.lr_down, self.lr_up)
        return layer


class LayerPlanner:
    """Plans one layer: method, score scale, threshold and low-rank factors for a budget, from the
    layer's weight and its calibration input rows (n_rows, in).

    score: "auto" (|x_j| * ||W[:, j]|| where the layer has a low-rank path, |x_j| otherwise),
    "abs" or "weighted". factors: "whitened" (fitted to the calibration inputs the threshold
    drops) or "svd" (top-r SVD of W; `svd` is a precomputed (u, s, vh)). With cache=True the
    planner keeps what later plans of other budgets reuse: the SVD factors of the largest rank
    (every rank is a slice of them), and whitened factors per (rank, threshold), in its own dict
    or, given `fit_cache` (a bounded cache shared by many planners, rsparse.search.cache), there
    under keys that start with `name`.
    """

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor, score: str = "auto", factors: str = "whitened",
                 svd=None, cache: bool = False, fit_cache=None, name: str = ""):
        if score not in SCORES:
            raise BadInputError(f"unknown score {score!r}; expected one of {SCORES}")
        if factors not in FACTORS:
            raise BadInputError(f"unknown factors {factors!r}; expected one of {FACTORS}")
        self.weight, self.rows, self.score, self.factor_kind = weight, rows, score, factors
        self.svd, self.cache = svd, cache
        self._norms = None
        self._full = None  # SVD factors of the largest rank planned so far (cache=True)
        self._fitted: dict = {}  # (rank, threshold, weighted) -> whitened factors (cache=True)
        self.fit_cache, self.name = fit_cache, name

    def weighted(self, method: str) -> bool:
        return self.score == "weighted" or (self.score == "auto" and method == "rsparse")

    def score_scale(self, method: str) -> torch.Tensor | None:
        """||W[:, j]||_2 per input channel where the score is weighted, else None."""
        if not self.weighted(method):
            return None
        if self._norms is None or not self.cache:
            self._norms = self.weight.detach().float().norm(dim=0)
        return self._norms

    def scores(self, scale: torch.Tensor | None) -> torch.Tensor:
        return self.rows.abs() * (scale.cpu() if scale is not None else 1.0)

    def threshold_table(self, keep_fractions) -> dict[bool, list[float]]:
        """{weighted: thresholds}: both score kinds' thresholds for many keep fractions at once
        (one sort per kind; pick one for `plan` with thresholds={w: table[w][i] for w in table})."""
        norms = self.weight.detach().float().norm(dim=0)
        return {False: calibrate_threshold(self.scores(None), keep_fractions),
                True: calibrate_threshold(self.scores(norms), keep_fractions)}

    def seed_factors(self, lr_down: torch.Tensor, lr_up: torch.Tensor) -> None:
        """SVD factors of some rank computed already (cache=True): lower ranks are their slices."""
        self._full = lr_down, lr_up

    def factors(self, rank: int, scale: torch.Tensor | None, threshold: float):
        """(lr_down, lr_up) of rank `rank`, or (None, None) for rank 0."""
        if rank == 0:
            return None, None
        if self.factor_kind == "whitened":
            key = (rank, threshold, scale is not None)
            store = self._fitted if self.fit_cache is None else None
            hit = store.get(key) if store is not None else self.fit_cache.get((self.name,) + key)
            if hit is not None:
                return hit
            down, up = dropped_input_factors(self.weight, self.rows, scale, threshold, rank)
            if self.cache:
                w = self.weight
                down, up = down.to(w.device, w.dtype), up.to(w.device, w.dtype)
                if store is not None:
                    store[key] = down, up
                else:
                    self.fit_cache.put((self.name,) + key, (down, up))
            return down, up
        if self.cache and self._full is not None and self._full[0].shape[1] >= rank:
            return self._full[0][:, :rank], self._full[1][:rank]
        if self.svd is None:
            self.svd = weight_svd(self.weight)
        if not self.cache:
            return lowrank_factors(self.weight, rank, self.svd)
        down, up = lowrank_factors(self.weight, rank, self.svd)
        self._full = down.to(self.weight.dtype), up.to(self.weight.dtype)
        return self._full[0][:, :rank], self._full[1][:rank]

    def plan(self, budget: LayerBudget, dense: bool = False, thresholds: dict[bool, float] | None = None,
             fit_factors: bool = True) -> LayerPlan:
        """The layer's plan under `budget` (dense=True: the dense plan whatever the budget).
        thresholds: {weighted: threshold} computed beforehand (threshold_table) instead of
        calibrating one here. fit_factors=False leaves lr_down / lr_up None, for a caller that
        brings its own (e.g. random factors of the right rank in a speed benchmark)."""
        method = "dense" if dense else layer_method(budget)
        scale = self.score_scale(method)
        if method == "dense":
            return LayerPlan("dense", budget.keep_fraction, -math.inf, scale)
        if thresholds is not None:
            threshold = thresholds[scale is not None]
        else:
            threshold = calibrate_threshold(self.scores(scale), budget.keep_fraction)
        down, up = self.factors(budget.rank, scale, threshold) if fit_factors else (None, None)
        return LayerPlan(method, budget.keep_fraction, threshold, scale, down, up)


