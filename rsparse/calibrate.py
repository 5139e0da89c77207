"""Calibration: `sparsify_(model, config, calibration)` turns a dense model into an R-Sparse one.

1. Run the calibration windows through the dense model with forward pre-hooks on the 7
   projections of every block, keeping a seeded random sample of token rows of each layer's
   input (the same token positions for every layer). These activations are reused for every
   method and recipe, so they are collected once (`collect_activations`).
2. Per layer: budget (keep fraction k, rank r) from its true shape; threshold = the (1-k)
   quantile of the layer's calibration scores, so a fraction k of channels is kept on average;
   rank-r factors from an SVD of W in float64.
3. Replace each nn.Linear with an RSparseLinear in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from rsparse.budget import LayerBudget
from rsparse.config import RSparseConfig, layer_budgets
from rsparse.layer import RSparseLinear, rsparse_layers
from rsparse.models import DecoderLinear, decoder_linears, replace_module


@dataclass
class CalibrationActivations:
    """Sampled input rows (n_rows, in) of every decoder projection, keyed by module name."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    windows: torch.Tensor | None = None  # the calibration token windows (n, seq_len)
    # Full SVDs (u, s, vh in float32 on the CPU, computed in float64) reused across methods and
    # recipes; filled lazily when cache_svd is True. Off by default: for a 7B model the cache is
    # about twice the model's size.
    cache_svd: bool = False
    svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def restore_(model: nn.Module) -> nn.Module:
    """Undo sparsify_: put plain nn.Linear layers (same weights) back. Lossless."""
    names = {id(m): n for n, m in model.named_modules()}
    for layer in rsparse_layers(model):
        replace_module(model, names[id(layer)], layer.to_linear())
    from rsparse.io.transformers_format import detach
    detach(model)  # dense again: save_pretrained writes a plain model
    return model


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("calibration must be a (n_windows, seq_len) LongTensor of token ids "
                         "(see rsparse.data.load_windows) or CalibrationActivations")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"calibration needs at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    return windows


@torch.no_grad()
def collect_activations(model: nn.Module, windows: torch.Tensor, max_rows_per_layer: int = 2048,
                        seed: int = 0, batch_size: int = 4) -> CalibrationActivations:
    """Run the dense model over calibration windows and sample input rows of every projection."""
    windows = _check_windows(windows)
    restore_(model)
    rows = _sample_inputs(model, windows, max_rows_per_layer, seed, batch_size)
    return CalibrationActivations(rows, windows)


def _sample_inputs(model: nn.Module, windows: torch.Tensor, max_rows_per_layer: int, seed: int,
                   batch_size: int = 4, second_half: bool = False) -> dict[str, torch.Tensor]:
    """Input rows reaching every decoder projection (see sample_module_inputs)."""
    modules = {l.name: l.module for l in decoder_linears(model)}
    return sample_module_inputs(model, modules, windows, max_rows_per_layer, seed, batch_size, second_half)


def sample_module_inputs(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor,
                         max_rows: int, seed: int, batch_size: int = 4,
                         second_half: bool = False) -> dict[str, torch.Tensor]:
    """Input rows reaching each of `modules` while the model runs the windows, at the same seeded
    random token positions for every module (only positions >= seq_len//2 of each window if
    second_half); float32 on the CPU, keyed like `modules`."""
    n, seq_len = windows.shape
    total = n * seq_len
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.arange(total)
    if second_half:
        candidates = candidates[candidates % seq_len >= seq_len // 2]
    picked = candidates[torch.randperm(len(candidates), generator=gen)[:max_rows]].sort().values
    store: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    current = {"rows": None}  # row indices (into the flattened batch) sampled from the current batch

    def hook(name):
        def fn(module, args):
            x = args[0]
            store[name].append(x.reshape(-1, x.shape[-1])[current["rows"]].detach().to("cpu", torch.float32))
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, n, batch_size), desc="calibration", unit="batch", leave=False):
            lo, hi = start * seq_len, min(start + batch_size, n) * seq_len
            sel = picked[(picked >= lo) & (picked < hi)] - lo
            current["rows"] = sel.to(device)
            model(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def calibrate_threshold(scores: torch.Tensor, keep_fraction: float) -> float:
    """Threshold t such that a fraction keep_fraction of `scores` is strictly above t."""
    if keep_fraction <= 0.0:
        return math.inf
    if keep_fraction >= 1.0:
        return -math.inf
    flat = scores.reshape(-1).float()
    k = min(max(int(round((1.0 - keep_fraction) * flat.numel())), 1), flat.numel())
    return float(flat.kthvalue(k).values)


def weight_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (u, s, vh) of W in float64, singular values descending.

    Computed from the eigendecomposition of the smaller Gram matrix, on the weight's device:
    several times faster than a direct SVD on a CPU, and accurate for the leading components the
    factors use.
    """
    w = weight.detach().to(torch.float64)
    tall = w.shape[0] >= w.shape[1]
    a = w if tall else w.t()
    evals, v = torch.linalg.eigh(a.t() @ a)  # ascending
    evals, v = evals.flip(0).clamp_min(0), v.flip(1)
    s = evals.sqrt()
    u = (a @ v) / s.clamp_min(torch.finfo(torch.float64).tiny)
    return (u, s, v.t()) if tall else (v, s, u.t())


def lowrank_factors(weight: torch.Tensor, rank: int, svd=None) -> tuple[torch.Tensor, torch.Tensor]:
    """lr_down (in, r), lr_up (r, out) with W ~= (lr_down @ lr_up)^T, top-r SVD in float64.

    A = U_r S_r^(1/2), B = S_r^(1/2) V_r^T as in the paper; `svd` is a precomputed (u, s, vh).
    """
    if svd is None:
        svd = weight_svd(weight)
    u, s, vh = (t.to(torch.float64) for t in svd)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root  # (out, r)
    b = root[:, None] * vh[:rank]  # (r, in)
    return b.t().contiguous(), a.t().contiguous()


def whitened_factors(weight: torch.Tensor, residual: torch.Tensor, rank: int,
                     damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware rank-r factors: minimise E||(W - A B) x||^2 over the residual inputs x that
    reach the low-rank path (the dropped channels), instead of ||W - A B||_F.

    With the input covariance C = E[x x^T] = L L^T (damped by `damp` times its mean diagonal, so
    directions no calibration input spans stay well defined), the best rank-r map is the top-r
    SVD of W L mapped back through L^-1. Returns lr_down (in, r), lr_up (r, out) like
    lowrank_factors, computed on the weight's device.
    """
    w = weight.detach().to(torch.float64)
    x = residual.to(w.device, torch.float64)
    cov = x.t() @ x / max(x.shape[0], 1)
    cov += (damp * cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(cov.shape[0], dtype=torch.float64, device=w.device)
    chol = torch.linalg.cholesky(cov)
    u, s, vh = weight_svd(w @ chol)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root  # (out, r)
    b = torch.linalg.solve_triangular(chol, root[:, None] * vh[:rank], upper=False, left=False)  # B L = M: (r, in)
    return b.t().contiguous(), a.t().contiguous()


def dropped_input_factors(weight: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor | None, threshold: float,
                          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened rank-r factors fitted to the calibration inputs the threshold drops (score
    |x| * scale <= threshold): what reaches the layer's low-rank path."""
    scores = rows.abs() * (scale.cpu() if scale is not None else 1.0)
    return whitened_factors(weight, rows * (scores <= threshold), rank)


def _layer_method(budget: LayerBudget) -> str:
    if budget.sparsity == 0.0:
        return "dense"
    if budget.rank == 0:
        return "sparse"
    if budget.keep_fraction == 0.0:
        return "lowrank"
    return "rsparse"


def _score_scale(weight: torch.Tensor, method: str, score: str) -> torch.Tensor | None:
    weighted = score == "weighted" or (score == "auto" and method == "rsparse")
    if not weighted:
        return None
    return weight.detach().float().norm(dim=0)  # ||W[:, j]||_2 per input channel


@torch.no_grad()
def sparsify_(model: nn.Module, config: RSparseConfig,
              calibration: torch.Tensor | CalibrationActivations) -> list[dict]:
    """Sparsify the model in place; returns a per-layer report (one dict per projection).

    `calibration` is a (n, seq_len) LongTensor of token windows, or activations already
    collected with `collect_activations` (to sparsify the same model several ways cheaply).
    """
    config.validate()
    restore_(model)
    linears: list[DecoderLinear] = decoder_linears(model)
    budgets = layer_budgets(config, linears)  # validates the recipe before any work
    if not isinstance(calibration, CalibrationActivations):
        calibration = collect_activations(model, calibration, config.max_rows_per_layer, config.seed)
    missing = [l.name for l in linears if l.name not in calibration.rows]
    if missing:
        raise ValueError(f"calibration activations do not cover layer {missing[0]} (collected on another model?)")

    report = []
    for lin, budget in tqdm(list(zip(linears, budgets)), desc=f"sparsify ({config.method})", unit="layer", leave=False):
        method = _layer_method(budget) if config.method != "dense" else "dense"
        weight = lin.module.weight
        layer = RSparseLinear.from_linear(lin.module, name=lin.name)
        layer.tokens = config.tokens
        scale = _score_scale(weight, method, config.score)
        rows = calibration.rows[lin.name]
        if rows.shape[1] != lin.module.in_features:
            raise ValueError(f"calibration activations for {lin.name} have {rows.shape[1]} channels, "
                             f"the layer has {lin.module.in_features}")
        scores = rows.abs() * (scale.cpu() if scale is not None else 1.0)
        threshold = calibrate_threshold(scores, budget.keep_fraction) if method != "dense" else -math.inf
        down = up = None
        if budget.rank and method != "dense" and config.factors == "whitened":
            down, up = dropped_input_factors(weight, rows, scale, threshold, budget.rank)
        elif budget.rank and method != "dense":
            svd = calibration.svd.get(lin.name)
            if svd is None:
                svd = weight_svd(weight)
                if calibration.cache_svd:
                    calibration.svd[lin.name] = tuple(t.float().cpu() for t in svd)
            down, up = lowrank_factors(weight, budget.rank, svd)
        layer.configure(method, threshold, budget.keep_fraction, scale, down, up)
        replace_module(model, lin.name, layer)
        report.append({
            "name": lin.name, "block": lin.block, "type": lin.kind,
            "shape": [lin.module.out_features, lin.module.in_features],
            "method": method, "sparsity": budget.sparsity, "rho": budget.rho,
            "keep": budget.keep_fraction, "rank": budget.rank, "threshold": threshold,
            "score": "weighted" if scale is not None else "abs",
            "calibration_kept": float((scores > threshold).float().mean()) if method != "dense" else 1.0,
            "read_fraction": budget.read_fraction() if method != "dense" else 1.0,
        })
    if config.refine and calibration.windows is not None and config.method != "dense":
        _refine_thresholds(model, config, calibration.windows, report)
    from rsparse.io.transformers_format import attach
    attach(model, config, report)  # model.save_pretrained writes the rsparse transformers format
    return report


@torch.no_grad()
def _refine_thresholds(model: nn.Module, config: RSparseConfig, windows: torch.Tensor, report: list[dict]) -> None:
    """Re-set thresholds on the inputs that reach each layer once the layers before it are sparse.

    Thresholds from dense activations keep too few channels downstream, because sparsified
    layers shift the activations that follow them. One more pass, sparsified the way the model
    will run (every token for tokens="all"; otherwise a dense first half standing in for the
    prompt and sparse tokens after it, as in decoding), brings the kept fraction on held-out
    text back to the target.
    """
    layers = {l.name: l for l in rsparse_layers(model)}
    mode = "all" if config.tokens == "all" else "second_half"
    for l in layers.values():
        l.tokens = mode
    try:
        rows = _sample_inputs(model, windows, config.max_rows_per_layer, config.seed + 1,
                              second_half=mode == "second_half")
    finally:
        for l in layers.values():
            l.tokens = config.tokens
    for entry in report:
        layer = layers[entry["name"]]
        if layer.method in ("dense", "lowrank"):
            continue
        scores = rows[entry["name"]].abs() * layer.score_scale.cpu()
        entry["threshold"] = calibrate_threshold(scores, layer.keep_fraction)
        entry["calibration_kept"] = float((scores > entry["threshold"]).float().mean())
        layer.threshold.fill_(entry["threshold"])
