"""Analyses 1 and 2 (see rsparse.analysis): contribution heatmaps of input channel x singular
component, and the stable rank of the two-phase bias matrix."""

from __future__ import annotations

import math

import torch
from torch import nn

from rsparse.core.calibrate import CalibrationActivations, calibrate_threshold
from rsparse.core.factors import weight_svd
from rsparse.core.models import PROJ_TYPES, DecoderLinear, decoder_linears
from rsparse.progress import progress


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
    for lin in progress(linears, desc="contributions", unit="layer", leave=False):
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
    for lin in progress(linears, desc="bias rank", unit="layer", leave=False):
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
