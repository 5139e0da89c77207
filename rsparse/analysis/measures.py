"""`rsparse analyze`: the paper's motivating measurements (sections 3.2-3.3) on a model.

Four analyses, all from one pass of calibration text through the dense model
(rsparse.core.calibrate.collect_activations: sampled input rows of every decoder projection):

1. Contribution heatmaps (Figures 1 and 3). For a layer y = x W^T with the thin SVD
   W = U diag(s) V^T, channel j reaches output direction U[:, i] with weight x_j s_i V[j, i]:
   y = sum_i sum_j (x_j s_i V[j, i]) U[:, i]. The heatmap is C[i, j] = mean over tokens of
   |x_j s_i V[j, i]| = s_i |V[j, i]| mean_t |x_tj| (exact: the token average factorises). Rows
   (components) and columns (input channels) are each sorted ascending by their total, so the
   largest contributions sit bottom-right, as in the paper. Mass fractions per layer: the share of
   sum(C) in the top-50% channels x top-50% components block, against keeping only channels
   (sparse-only) or only components (low-rank-only).
2. Stable rank of the bias matrix (section 3.3). Per token, the two-phase activation replaces the
   dropped channels (|h_k| <= T0) by sign(h_k) c, c = (T0 + T1) / 2; their contribution to the
   output is two bias vectors B+ = c W[:, D+] 1 and B- = -c W[:, D-] 1 (D+/D-: dropped channels
   with positive/negative value). The bias matrix M stacks [B+, B-] of N tokens as 2N columns.
   Reported: stable rank ||M||_F^2 / ||M||_2^2 and the numerical ranks at 90% / 99% energy, next
   to the same numbers for the exact residual R = W (h * drop) and for W itself.
3. Multi-phase ReLU (Figure 2): perplexity when the input of every down_proj (site
   `down_input`) or the output of every MLP activation function (site `act`, the paper's
   literal setting) goes through a 1-phase (dropped values -> 0) or 2-phase (dropped values ->
   the midpoint of [T1, T0]; or, as a diagnostic, their calibration mean) function, at several
   sparsities. See `multiphase` and `phase_levels`.
4. Kept-channel distributions: the model sparsified with rsparse.sparsify_ (tokens="all"), the
   per-token fraction of kept input channels of every layer on held-out text.

Outputs (in --out): contributions.png, contribution_mass.png, bias_rank.png,
multiphase_relu.png, kept_channels.png and analysis.json with every number. docs/analysis.md
describes the definitions and the results on the embedded SmolLM2-135M.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rsparse.core.calibrate import (CalibrationActivations, calibrate_threshold, collect_activations, restore_,
                               sparsify_, weight_svd)
from rsparse.core.layer import rsparse_layers
from rsparse.core.models import PROJ_TYPES, DecoderLinear, decoder_linears

PARTS = ("heatmap", "bias", "phase", "kept")
PHASE_SITES = ("down_input", "act")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# -- helpers -------------------------------------------------------------------------------------

def pick_blocks(n_blocks: int) -> dict[str, int]:
    """First, middle and last decoder block (labels may share a block on tiny models)."""
    return {"first": 0, "middle": n_blocks // 2, "last": n_blocks - 1}


def _svd(lin: DecoderLinear, activations: CalibrationActivations | None):
    """(u, s, vh) of the layer's weight, float64 on the CPU; taken from / put in activations.svd
    (shared with sparsify_) when the activations cache SVDs (cache_svd)."""
    cached = activations.svd.get(lin.name) if activations is not None else None
    if cached is not None:
        return tuple(t.to("cpu", torch.float64) for t in cached)
    svd = tuple(t.cpu() for t in weight_svd(lin.module.weight))
    if activations is not None and activations.cache_svd:
        activations.svd[lin.name] = tuple(t.float() for t in svd)
    return svd


def spectrum_stats(matrix: torch.Tensor, shape: list[int] | None = None, max_rank: int | None = None) -> dict:
    """Stable rank ||M||_F^2 / ||M||_2^2 and numerical ranks at 90% / 99% of the energy sum sigma^2.

    Singular values come from the eigenvalues of the Gram matrix of the smaller side, in float64
    (fast on a CPU; the small singular values lose relative accuracy, which the energy sums do not
    feel). `shape` / `max_rank` describe the matrix when `matrix` is a reduced form of it with the
    same singular values (default: its own shape and min dimension).
    """
    a = matrix.to(torch.float64)
    if a.shape[0] > a.shape[1]:
        a = a.t()
    energy = torch.linalg.eigvalsh(a @ a.t()).flip(0).clamp_min(0.0)
    sv = energy.sqrt()
    total = float(energy.sum())
    dim = min(matrix.shape) if max_rank is None else max_rank
    shape = list(matrix.shape) if shape is None else list(shape)
    if total <= 0.0:
        return {"shape": shape, "max_rank": dim, "stable_rank": math.nan,
                "rank_90": 0, "rank_99": 0, "singular_values": []}
    cum = energy.cumsum(0) / total
    rank = lambda q: int(torch.searchsorted(cum, torch.tensor(q, dtype=cum.dtype)).item()) + 1  # noqa: E731
    return {"shape": shape, "max_rank": dim, "stable_rank": total / float(energy[0]),
            "rank_90": min(rank(0.9), dim), "rank_99": min(rank(0.99), dim),
            "singular_values": sv[:dim].tolist()}


# -- 1. contribution heatmaps --------------------------------------------------------------------

def contribution_matrix(weight: torch.Tensor, rows: torch.Tensor, svd=None) -> torch.Tensor:
    """C[i, j] = mean over tokens t of |x_tj * s_i * V[j, i]|, shape (min(out, in), in), float64.

    W = U diag(s) V^T (thin SVD, s descending); rows: (tokens, in) inputs of the layer.
    """
    u, s, vh = svd if svd is not None else weight_svd(weight)
    mean_abs = rows.to("cpu", torch.float64).abs().mean(0)
    return s.to("cpu", torch.float64)[:, None] * vh.to("cpu", torch.float64).abs() * mean_abs[None, :]


def sort_contributions(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows and columns each sorted ascending by their totals (largest bottom-right).

    Returns (sorted matrix, row order, column order); row/column sums of the result are
    non-decreasing (individual cells need not be).
    """
    row_order = torch.argsort(c.sum(1), stable=True)
    col_order = torch.argsort(c.sum(0), stable=True)
    return c[row_order][:, col_order], row_order, col_order


def mass_fractions(c: torch.Tensor, fraction: float = 0.5) -> dict:
    """Shares of the total contribution mass kept by selections of the (component x channel) grid.

    bottom_right: top `fraction` of channels x top `fraction` of components (fraction^2 of cells)
    sparse_only / lowrank_only: top `fraction` of channels (all components) / of components
    (all channels), i.e. what a sparse-only or low-rank-only method at that keep ratio reads
    sparse_only_eq / lowrank_only_eq: the same with fraction^2 of the channels / components,
    i.e. the same number of cells as the bottom-right block
    top_cells_eq: the largest fraction^2 of all cells (the best any selection of that size keeps)
    Importance of a channel (component) = its column (row) total of C.
    """
    c = c.to(torch.float64)
    total = float(c.sum())
    n_comp, n_chan = c.shape
    rows_by = torch.argsort(c.sum(1), descending=True)
    cols_by = torch.argsort(c.sum(0), descending=True)
    top = lambda order, n, f: order[:max(1, int(math.ceil(f * n)))]  # noqa: E731
    area = fraction * fraction
    rk, ck = top(rows_by, n_comp, fraction), top(cols_by, n_chan, fraction)
    flat = c.reshape(-1)
    n_cells = max(1, int(math.ceil(area * flat.numel())))
    return {
        "fraction": fraction,
        "bottom_right": float(c[rk][:, ck].sum()) / total,
        "sparse_only": float(c[:, ck].sum()) / total,
        "lowrank_only": float(c[rk].sum()) / total,
        "sparse_only_eq": float(c[:, top(cols_by, n_chan, area)].sum()) / total,
        "lowrank_only_eq": float(c[top(rows_by, n_comp, area)].sum()) / total,
        "top_cells_eq": float(flat.topk(n_cells).values.sum()) / total,
        "top_left": float(c[rows_by[len(rk):]][:, cols_by[len(ck):]].sum()) / total,
    }


def analyze_contributions(model: nn.Module, activations: CalibrationActivations, blocks: dict[str, int],
                          fraction: float = 0.5) -> tuple[dict, dict]:
    """Mass fractions of every decoder projection and sorted heatmaps of those in `blocks`.

    Returns (json-able results, {(block, kind): sorted heatmap tensor}).
    """
    linears = decoder_linears(model)
    wanted = set(blocks.values())
    per_layer, heatmaps = [], {}
    for lin in tqdm(linears, desc="contributions", unit="layer", leave=False):
        c = contribution_matrix(lin.module.weight, activations.rows[lin.name], _svd(lin, activations))
        entry = {"name": lin.name, "block": lin.block, "type": lin.kind, "shape": list(c.shape),
                 **mass_fractions(c, fraction)}
        per_layer.append(entry)
        if lin.block in wanted:
            heatmaps[(lin.block, lin.kind)] = sort_contributions(c)[0].float()
    return {"definition": "C[i,j] = mean_t |x_tj * s_i * V[j,i]|, W = U diag(s) V^T",
            "blocks": blocks, "layers": per_layer}, heatmaps


# -- 2. stable rank of the bias matrix -----------------------------------------------------------

def two_phase_thresholds(values: torch.Tensor, sparsity: float) -> tuple[float, float]:
    """(T0, T1): T0 leaves a fraction 1-sparsity of `values` strictly above it; T1 = min(values)."""
    return calibrate_threshold(values, 1.0 - sparsity), float(values.min())


def bias_matrices(weight: torch.Tensor, rows: torch.Tensor, t0: float, t1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias matrix M (out, 2N) and exact residual R (out, N) of N input rows (N, in).

    `weight` may be any matrix with the layer's column space metric, e.g. diag(s) V^T of the SVD
    W = U diag(s) V^T: M and R are then U^T M and U^T R, with the same singular values.

    Dropped channels D = {k : |h_k| <= T0}; with c = (T0 + T1) / 2 the two-phase activation
    replaces h_k, k in D, by sign(h_k) c, so their output contribution is B+ + B- with
    B+ = c sum_{k in D, h_k > 0} W[:, k] and B- = -c sum_{k in D, h_k < 0} W[:, k].
    M[:, 2i] = B+ of token i, M[:, 2i+1] = B- of token i. R[:, i] = W (h_i * 1_D), what the
    dropped channels really contribute.
    """
    w = weight.detach().to(torch.float64).cpu()
    h = rows.to(torch.float64)
    drop = h.abs() <= t0
    c = (t0 + t1) / 2.0
    b_pos = w @ ((drop & (h > 0)).to(torch.float64) * c).t()
    b_neg = w @ ((drop & (h < 0)).to(torch.float64) * -c).t()
    m = torch.stack([b_pos, b_neg], dim=2).reshape(w.shape[0], -1)
    r = w @ (h * drop).t()
    return m, r


def analyze_bias_rank(model: nn.Module, activations: CalibrationActivations, block: int,
                      sparsities: list[float], n_tokens: int = 2000, kinds=PROJ_TYPES) -> dict:
    """Spectrum statistics of the bias matrix of the projections `kinds` of one block."""
    out = {"block": block, "tokens": None, "layers": []}
    linears = [l for l in decoder_linears(model) if l.block == block and l.kind in kinds]
    strip = lambda st: {k: v for k, v in st.items() if k != "singular_values"}  # noqa: E731
    for lin in tqdm(linears, desc="bias rank", unit="layer", leave=False):
        rows = activations.rows[lin.name]
        calib_abs = rows.abs()
        h = rows[:n_tokens]
        n = int(h.shape[0])
        out["tokens"] = n
        _, sing, vh = _svd(lin, activations)
        reduced = sing[:, None] * vh  # U^T W: same singular values for W, M and R as the (out, .) forms
        n_out, n_in = lin.module.out_features, lin.module.in_features
        w_stats = spectrum_stats(reduced, shape=[n_out, n_in])
        entry = {"name": lin.name, "type": lin.kind, "shape": [n_out, n_in], "weight": strip(w_stats),
                 "weight_singular_values": w_stats["singular_values"], "by_sparsity": []}
        for s in sparsities:
            t0, t1 = two_phase_thresholds(calib_abs, s)
            m, r = bias_matrices(reduced, h, t0, t1)
            # the token-dependent part: each family of biases (B+, B-) minus its mean over tokens
            mc = torch.cat([m[:, 0::2] - m[:, 0::2].mean(1, keepdim=True), m[:, 1::2] - m[:, 1::2].mean(1, keepdim=True)], 1)
            ms = spectrum_stats(m, shape=[n_out, 2 * n], max_rank=min(n_out, n_in, 2 * n))
            mcs = spectrum_stats(mc, shape=[n_out, 2 * n], max_rank=min(n_out, n_in, 2 * n))
            rs = spectrum_stats(r, shape=[n_out, n], max_rank=min(n_out, n_in, n))
            entry["by_sparsity"].append({
                "sparsity": s, "T0": t0, "T1": t1, "dropped_fraction": float((h.abs() <= t0).double().mean()),
                "bias": strip(ms), "bias_centered": strip(mcs), "residual": strip(rs),
                "bias_singular_values": ms["singular_values"],
                "bias_centered_singular_values": mcs["singular_values"]})
        out["layers"].append(entry)
    return out


# -- 3. multi-phase ReLU -------------------------------------------------------------------------

def multiphase(x: torch.Tensor, t0: float, fill: float, signed: bool) -> torch.Tensor:
    """The multi-phase ReLU tau with one replacement level.

    signed=False (magnitude, the R-Sparse convention; used on the down_proj input, whose values
    are symmetric around 0): values with |x| <= T0 become sign(x) * fill.
    signed=True (the paper's tau on the one-sided SiLU output): values x <= T0 become fill.
    Values above T0 pass unchanged; T0 = -inf changes nothing. fill = 0 is the 1-phase function
    (plain thresholding, ReLU-like); fill = (T0 + T1) / 2 the paper's 2-phase function.
    """
    if t0 == -math.inf:
        return x
    if signed:
        return torch.where(x <= t0, torch.tensor(fill, dtype=x.dtype, device=x.device), x)
    return torch.where(x.abs() <= t0, torch.sign(x) * fill, x)


PHASE_VARIANTS = {  # name: (phases, description)
    "1": (1, "1 phase: dropped values -> 0"),
    "2": (2, "2 phases: dropped values -> midpoint (T0 + T1) / 2 (the paper's tau)"),
    "2mean": (2, "2 phases, bin mean: dropped values -> their calibration mean"),
}


def phase_levels(values: torch.Tensor, sparsity: float, variant: str, signed: bool) -> tuple[float, float]:
    """(T0, fill) of a variant from a layer's calibration values at the site (|h| for magnitude sites)."""
    if variant not in PHASE_VARIANTS:
        raise ValueError(f"unknown phase variant {variant!r}; expected one of {tuple(PHASE_VARIANTS)}")
    t0, t1 = two_phase_thresholds(values, sparsity)
    if variant == "1" or t0 == -math.inf:
        return t0, 0.0
    if variant == "2":
        return t0, (t0 + t1) / 2.0
    dropped = values[values <= t0]
    return t0, float(dropped.double().mean()) if dropped.numel() else 0.0


def _act_module(model: nn.Module, lin: DecoderLinear) -> nn.Module:
    mlp = model.get_submodule(lin.name.rpartition(".")[0])
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.Module):
        raise ValueError(f"{lin.name}: the MLP has no act_fn module; use --phase-sites down_input")
    return act


def phase_site_values(model: nn.Module, activations: CalibrationActivations, site: str) -> dict[str, torch.Tensor]:
    """Calibration values at the site, keyed by the module the hook goes on (down_proj for
    `down_input`: |h|; gate_proj's block for `act`: act_fn(x W_gate^T) from gate_proj's inputs)."""
    if site not in PHASE_SITES:
        raise ValueError(f"unknown phase site {site!r}; expected one of {PHASE_SITES}")
    out = {}
    for lin in decoder_linears(model):
        if site == "down_input" and lin.kind == "down_proj":
            out[lin.name] = activations.rows[lin.name].abs()
        elif site == "act" and lin.kind == "gate_proj":
            with torch.no_grad():  # act_fn is parameter-free: run it on CPU copies
                g = activations.rows[lin.name] @ lin.module.weight.detach().float().cpu().t()
                out[lin.name] = _act_module(model, lin)(g)
    return out


class PhaseHooks:
    """Install the multi-phase function on every block (context manager); counts replaced values.

    levels: {module name (down_proj for `down_input`, gate_proj for `act`): (T0, fill)}.
    """

    def __init__(self, model: nn.Module, site: str, levels: dict[str, tuple[float, float]]):
        if site not in PHASE_SITES:
            raise ValueError(f"unknown phase site {site!r}; expected one of {PHASE_SITES}")
        self.model, self.site, self.levels = model, site, levels
        self.handles, self.replaced, self.total = [], 0, 0

    def _apply(self, x, t0, fill):
        signed = self.site == "act"
        if t0 != -math.inf:
            self.replaced += int(((x <= t0) if signed else (x.abs() <= t0)).sum())
        self.total += x.numel()
        return multiphase(x, t0, fill, signed)

    def __enter__(self):
        for lin in decoder_linears(self.model):
            if lin.name not in self.levels:
                continue
            t0, fill = self.levels[lin.name]
            if self.site == "down_input":
                hook = lambda mod, args, t0=t0, f=fill: (self._apply(args[0], t0, f),) + tuple(args[1:])  # noqa: E731
                self.handles.append(lin.module.register_forward_pre_hook(hook))
            else:
                hook = lambda mod, args, out, t0=t0, f=fill: self._apply(out, t0, f)  # noqa: E731
                self.handles.append(_act_module(self.model, lin).register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


def analyze_multiphase(model: nn.Module, activations: CalibrationActivations, windows: torch.Tensor,
                       sparsities: list[float], sites=("down_input",), variants=("1", "2", "2mean")) -> dict:
    """Perplexity (all positions) of the dense model with the multi-phase function at each site."""
    from rsparse.eval.perplexity import evaluate_perplexity

    restore_(model)
    dense = evaluate_perplexity(model, windows, tokens="all", desc="perplexity (dense)")
    out = {"dense_ppl": dense["ppl"], "windows": list(windows.shape),
           "variants": {v: PHASE_VARIANTS[v][1] for v in variants}, "sites": {}}
    for site in sites:
        values = phase_site_values(model, activations, site)
        rows = []
        for s in sparsities:
            for v in variants:
                levels = {name: phase_levels(vals, s, v, signed=site == "act") for name, vals in values.items()}
                with PhaseHooks(model, site, levels) as hooks:
                    r = evaluate_perplexity(model, windows, tokens="all", desc=f"perplexity ({site}, {v}, s={s})")
                fills = [f for _, f in levels.values()]
                rows.append({"sparsity": s, "variant": v, "phases": PHASE_VARIANTS[v][0], "ppl": r["ppl"],
                             "measured_sparsity": hooks.replaced / max(hooks.total, 1),
                             "fill_mean_over_layers": sum(fills) / len(fills)})
        out["sites"][site] = rows
    return out


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
    from rsparse.eval.perplexity import evaluate_perplexity

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
    from rsparse.core.config import RSparseConfig

    config = RSparseConfig(sparsity=sparsity, ratio=ratio, tokens="all", seed=seed,
                           max_rows_per_layer=max(int(r.shape[0]) for r in activations.rows.values()))
    report = sparsify_(model, config, activations)
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


# -- plots ---------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(heatmaps: dict, blocks: dict[str, int], masses: dict, path: Path, model_name: str = "") -> None:
    plt = _plt()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    rows = sorted(set(blocks.values()))
    labels = {b: "/".join(k for k, v in blocks.items() if v == b) for b in rows}
    fig, axes = plt.subplots(len(rows), len(PROJ_TYPES), figsize=(2.6 * len(PROJ_TYPES), 2.5 * len(rows) + 0.8),
                             squeeze=False)
    norm = LogNorm(vmin=1e-2, vmax=1e2)
    im = None
    for r, block in enumerate(rows):
        for c, kind in enumerate(PROJ_TYPES):
            ax = axes[r][c]
            h = heatmaps[(block, kind)]
            img = (h / h.mean()).clamp_min(1e-6).numpy()
            im = ax.imshow(img, aspect="auto", norm=norm, cmap="magma", interpolation="antialiased")
            n_comp, n_chan = img.shape
            ax.add_patch(Rectangle((n_chan / 2 - 0.5, n_comp / 2 - 0.5), n_chan / 2, n_comp / 2, fill=False,
                                   ec="cyan", lw=0.8, ls="--"))
            m = masses[(block, kind)]
            ax.set_title(f"{kind} {n_comp}x{n_chan}\nBR {100 * m['bottom_right']:.0f}% | TL {100 * m['top_left']:.1f}%",
                         fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"block {block} ({labels[block]})\ncomponent (sorted)", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("input channel (sorted)", fontsize=8)
    fig.suptitle(f"{model_name}: C[i,j] = mean_t |x_j s_i V[j,i]| relative to the panel mean; rows (components) "
                 "and columns (channels) sorted ascending by total;\ndashed: top-50% channels x top-50% components "
                 "(BR = its share of the mass, 25% if uniform; TL = share of the opposite, top-left block)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.95))
    cax = fig.add_axes((0.94, 0.1, 0.012, 0.8))
    fig.colorbar(im, cax=cax, label="cell / panel mean")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_masses(contrib: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5), sharey=True)
    series = [("bottom_right", "top-50% ch x top-50% comp (25% cells)", "C3", "-"),
              ("sparse_only_eq", "sparse-only: top-25% channels", "C0", "--"),
              ("lowrank_only_eq", "low-rank-only: top-25% components", "C2", "--"),
              ("top_cells_eq", "best 25% of cells", "0.5", ":")]
    for ax, kind in zip(axes.flat, PROJ_TYPES):
        layers = sorted((l for l in contrib["layers"] if l["type"] == kind), key=lambda l: l["block"])
        xs = [l["block"] for l in layers]
        for key, label, color, ls in series:
            ax.plot(xs, [l[key] for l in layers], color=color, ls=ls, marker="o", ms=2.5, label=label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of contribution mass")
    axes[1][0].set_ylabel("share of contribution mass")
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=9, title="same area: 25% of the grid")
    fig.suptitle("Contribution mass kept by selections of equal area of the (component x channel) grid", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bias(bias: dict, path: Path) -> None:
    plt = _plt()
    layers = bias["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.8))
    down = next((l for l in layers if l["type"] == "down_proj"), layers[0])
    ax = axes[0]

    def cum(values):
        e = torch.tensor(values, dtype=torch.float64).square()
        return (e.cumsum(0) / e.sum()).numpy()

    for k, e in enumerate(down["by_sparsity"]):
        c = cum(e["bias_singular_values"])
        ax.plot(range(1, len(c) + 1), c, color=f"C{k}",
                label=f"M, s={e['sparsity']:.2f}: stable rank {e['bias']['stable_rank']:.1f}, "
                      f"90%/99% at {e['bias']['rank_90']}/{e['bias']['rank_99']}")
        c = cum(e["bias_centered_singular_values"])
        ax.plot(range(1, len(c) + 1), c, color=f"C{k}", ls=":",
                label=f"M centred: stable rank {e['bias_centered']['stable_rank']:.1f}, "
                      f"90%/99% at {e['bias_centered']['rank_90']}/{e['bias_centered']['rank_99']}")
    c = cum(down["weight_singular_values"])
    w = down["weight"]
    ax.plot(range(1, len(c) + 1), c, "k--", label=f"W: stable rank {w['stable_rank']:.1f}, 90%/99% at "
                                                 f"{w['rank_90']}/{w['rank_99']}")
    for q in (0.9, 0.99):
        ax.axhline(q, color="0.6", lw=0.6)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("number of singular components")
    ax.set_ylabel("cumulative energy (sum of sigma^2)")
    ax.set_title(f"{down['name']} ({down['shape'][0]}x{down['shape'][1]}): bias matrix M of {bias['tokens']} tokens "
                 f"({2 * bias['tokens']} columns)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[1]
    kinds = [l["type"] for l in layers]
    sparsities = [e["sparsity"] for e in layers[0]["by_sparsity"]]
    width = 0.8 / (len(sparsities) + 1)
    for k, s in enumerate(sparsities):
        ax.bar([i + k * width for i in range(len(kinds))],
               [l["by_sparsity"][k]["bias"]["rank_90"] / l["by_sparsity"][k]["bias"]["max_rank"] for l in layers],
               width, color=f"C{k}", label=f"M, s={s:.2f}")
        ax.plot([i + k * width for i in range(len(kinds))],
                [l["by_sparsity"][k]["bias"]["stable_rank"] / l["by_sparsity"][k]["bias"]["max_rank"] for l in layers],
                "v", color="k", ms=4, label="stable rank / dim" if k == 0 else None)
    ax.bar([i + len(sparsities) * width for i in range(len(kinds))],
           [l["weight"]["rank_90"] / l["weight"]["max_rank"] for l in layers], width, color="0.5", label="W")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rank at 90% energy / max rank")
    ax.set_title(f"block {bias['block']}: 90%-energy rank (bars) and stable rank (triangles) over the max rank",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multiphase(phase: dict, path: Path) -> None:
    plt = _plt()
    sites = list(phase["sites"])
    fig, axes = plt.subplots(1, len(sites), figsize=(6 * len(sites), 4.6), squeeze=False)
    titles = {"down_input": "on the down_proj input h (|h| <= T0 replaced, sign kept)",
              "act": "on the SiLU output (values <= T0 replaced)"}
    styles = {"1": ("o-", "C0"), "2": ("s-", "C1"), "2mean": ("^--", "C2")}
    for ax, site in zip(axes[0], sites):
        rows = phase["sites"][site]
        for k, (v, label) in enumerate(phase["variants"].items()):
            pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["variant"] == v)
            if not pts:
                continue
            style, color = styles.get(v, (".-", None))
            ax.plot([100 * a for a, _ in pts], [b for _, b in pts], style, color=color, label=label)
            for a, b in pts:  # values stacked right of the points, one row per variant
                ax.annotate(f"{b:.4g}" if b < 1e5 else f"{b:.1e}", (100 * a, b), textcoords="offset points",
                            xytext=(6, 11 * (len(phase["variants"]) - 1 - k) + 2), fontsize=7, color=color)
        ax.axhline(phase["dense_ppl"], color="k", ls=":", label=f"dense ({phase['dense_ppl']:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity % (values replaced)")
        ax.set_ylabel("perplexity (all positions)")
        ax.set_title(titles.get(site, site), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Multi-phase ReLU on every MLP block, {phase['windows'][0]} held-out windows x "
                 f"{phase['windows'][1]} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kept(kept: dict, fractions: dict[str, torch.Tensor], path: Path, blocks: dict[str, int]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(4, 2, figsize=(14, 13))
    layers = kept["layers"]
    for ax, kind in zip(axes.flat, PROJ_TYPES):
        ls = sorted((l for l in layers if l["type"] == kind), key=lambda l: l["block"])
        data = [fractions[l["name"]].numpy() for l in ls]
        ax.boxplot(data, positions=[l["block"] for l in ls], widths=0.6, whis=(5, 95), showfliers=False,
                   medianprops={"color": "C3"})
        ax.plot([l["block"] for l in ls], [l["mean"] for l in ls], "x", color="C0", ms=4, label="mean over tokens")
        ax.plot([l["block"] for l in ls], [l["target_keep"] for l in ls], "_", color="k", ms=10,
                label="target keep fraction")
        ax.set_title(f"{kind} (box: quartiles, whiskers: 5-95%)", fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylabel("kept-channel fraction", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[-1]
    bins = torch.linspace(0, 1, 51).numpy()
    for label, b in blocks.items():
        name = next((l["name"] for l in layers if l["block"] == b and l["type"] == "down_proj"), None)
        if name is not None:
            ax.hist(fractions[name].numpy(), bins=bins, histtype="step", density=True, label=f"down_proj, block {b} ({label})")
    ax.set_xlabel("kept-channel fraction per token", fontsize=8)
    ax.set_title("per-token distribution, down_proj", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"Kept channels per token on held-out text: sparsity {kept['sparsity']}, rho {kept['ratio']}, every "
                 f"token sparsified (ppl {kept['ppl']:.2f}, achieved sparsity {100 * kept['achieved_sparsity']:.1f}%)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------

def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not (0.0 < v < 1.0) for v in vals):
        raise SystemExit(f"error: {what} must be in (0, 1), got {text!r}")
    return sorted(set(vals))


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if text.strip() == "all":
        return list(allowed)
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise SystemExit(f"error: unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return [v for v in allowed if v in vals]


def cmd_analyze(args) -> int:
    from rsparse.core.budget import check_ratio, check_sparsity

    parts = _names(args.parts, PARTS, "part(s)")
    sites = _names(args.phase_sites, PHASE_SITES, "phase site(s)")
    variants = _names(args.phase_variants, tuple(PHASE_VARIANTS), "phase variant(s)")
    sparsities = _floats(args.phase_sparsities, "--phase-sparsities")
    try:
        check_sparsity(args.sparsity)
        check_ratio(args.ratio)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.seq_len < 4 or args.samples < 1 or args.ppl_windows < 1 or args.bias_tokens < 1 or args.max_rows < 1:
        raise SystemExit("error: --seq-len must be >= 4 and --samples, --ppl-windows, --bias-tokens, --max-rows >= 1")

    if args.threads < 0:
        raise SystemExit("error: --threads must be >= 0")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _analyze(args, parts, sites, variants, sparsities)
    finally:
        torch.set_num_threads(threads)


def _analyze(args, parts: list[str], sites: list[str], variants: list[str], sparsities: list[float]) -> int:
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, load_model
    from rsparse.io.results import versions, write_json

    start = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    n_blocks = len({l.block for l in decoder_linears(model)})
    blocks = pick_blocks(n_blocks)
    calib = load_windows(tok, args.corpus, args.seq_len, args.samples, "calibration", args.seed)
    held_out = load_windows(tok, args.ppl_corpus, args.seq_len, args.ppl_windows, "perplexity") \
        if {"phase", "kept"} & set(parts) else None
    timings = {}
    t0 = time.time()
    activations = collect_activations(model, calib, max_rows_per_layer=args.max_rows, seed=args.seed)
    timings["collect_activations"] = time.time() - t0
    results = {"model": model_name, "settings": {k: v for k, v in vars(args).items() if k != "func"},
               "calibration": {"corpus": args.corpus, "windows": args.samples, "seq_len": args.seq_len,
                               "rows_per_layer": int(next(iter(activations.rows.values())).shape[0])},
               "blocks": blocks}
    if held_out is not None:
        results["held_out"] = {"corpus": args.ppl_corpus, "windows": int(held_out.shape[0]), "seq_len": args.seq_len}
    written = []
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731

    if "heatmap" in parts:
        t0 = time.time()
        contrib, heatmaps = analyze_contributions(model, activations, blocks)
        masses = {(l["block"], l["type"]): l for l in contrib["layers"]}
        plot_heatmaps(heatmaps, blocks, masses, out / "contributions.png", model_name)
        plot_masses(contrib, out / "contribution_mass.png")
        written += ["contributions.png", "contribution_mass.png"]
        results["contributions"] = contrib
        timings["heatmap"] = time.time() - t0
        for label, b in blocks.items():
            line = ", ".join(f"{k} {100 * masses[(b, k)]['bottom_right']:.0f}%" for k in PROJ_TYPES)
            log(f"bottom-right mass, block {b} ({label}): {line}")
    if "bias" in parts:
        t0 = time.time()
        bias = analyze_bias_rank(model, activations, blocks["middle"], sparsities, args.bias_tokens)
        plot_bias(bias, out / "bias_rank.png")
        written.append("bias_rank.png")
        results["bias_rank"] = bias
        timings["bias"] = time.time() - t0
        for l in bias["layers"]:
            line = ", ".join(f"s={e['sparsity']}: {e['bias']['stable_rank']:.1f}" for e in l["by_sparsity"])
            log(f"bias stable rank {l['name']} (max {l['by_sparsity'][0]['bias']['max_rank']}): {line}")
    if "phase" in parts:
        t0 = time.time()
        phase = analyze_multiphase(model, activations, held_out, sparsities, sites, variants)
        plot_multiphase(phase, out / "multiphase_relu.png")
        written.append("multiphase_relu.png")
        results["multiphase"] = phase
        timings["phase"] = time.time() - t0
        for site, rows in phase["sites"].items():
            log(f"multi-phase ({site}), dense {phase['dense_ppl']:.2f}: " +
                ", ".join(f"{r['variant']} s={r['sparsity']}: {r['ppl']:.4g}" for r in rows))
    if "kept" in parts:
        t0 = time.time()
        kept, fractions = analyze_kept(model, activations, held_out, args.sparsity, args.ratio, args.seed)
        plot_kept(kept, fractions, out / "kept_channels.png", blocks)
        written.append("kept_channels.png")
        results["kept"] = kept
        timings["kept"] = time.time() - t0
        log(f"sparsified (s={args.sparsity}, rho={args.ratio}, all tokens): ppl {kept['ppl']:.2f}, "
            f"achieved sparsity {100 * kept['achieved_sparsity']:.1f}%")
    restore_(model)
    timings["total"] = time.time() - start
    results["timings_s"] = timings
    results["versions"] = versions()
    write_json(out / "analysis.json", results)
    written.append("analysis.json")
    print(f"wrote {', '.join(str(out / w) for w in written)} ({timings['total']:.0f} s)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="the paper's analyses (Figures 1-3): contribution heatmaps, bias-matrix "
                                              "rank, multi-phase ReLU, kept-channel distributions")
    p.add_argument("--model", default=None,
                   help="hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default="coqa", help="calibration corpus: coqa (default, offline), boolq, sciq, "
                                                   "wikitext2, c4 or a text file")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration and held-out window")
    p.add_argument("--max-rows", type=int, default=2048, help="sampled input rows kept per layer")
    p.add_argument("--ppl-corpus", default="boolq", help="held-out corpus for perplexity and kept-channel counts")
    p.add_argument("--ppl-windows", type=int, default=4, help="held-out windows (first N of the corpus)")
    p.add_argument("--phase-sparsities", default="0.5,0.7,0.9",
                   help="sparsities for the multi-phase ReLU curve and the bias-matrix rank")
    p.add_argument("--phase-sites", default="down_input,act",
                   help="where the multi-phase function acts: down_input (the down_proj input, |h| thresholded), "
                        "act (the SiLU output, signed, the paper's literal setting), or both comma-separated")
    p.add_argument("--phase-variants", default="1,2,2mean",
                   help="1 (dropped values -> 0), 2 (-> the midpoint (T0+T1)/2, the paper's 2-phase tau), "
                        "2mean (-> the calibration mean of the dropped values); comma-separated")
    p.add_argument("--bias-tokens", type=int, default=2000, help="tokens (bias-matrix column pairs) for the rank")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of the model whose kept channels are counted")
    p.add_argument("--ratio", type=float, default=0.95, help="uniform rho of that model")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {', '.join(PARTS)} (default all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads oversubscribe and "
                        "run several times slower; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/analyze", help="output directory for the PNGs and analysis.json")
    p.set_defaults(func=cmd_analyze)
