"""Rank-r factors of a layer's weight for the low-rank path: the paper's top-r SVD of W, or
factors fitted to the inputs that really reach the low-rank path (whitened)."""

from __future__ import annotations

import torch


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
    cov = x.t() @ x
    cov /= max(x.shape[0], 1)
    del x  # in place from here on: no (in, in) temporaries beside cov and chol
    cov.diagonal().add_(damp * cov.diagonal().mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky(cov)
    del cov
    u, s, vh = weight_svd(w @ chol)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root  # (out, r)
    b = torch.linalg.solve_triangular(chol, root[:, None] * vh[:rank], upper=False, left=False)  # B L = M: (r, in)
    return b.t().contiguous(), a.t().contiguous()


def dropped_input_factors(weight: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor | None, threshold: float,
                          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened rank-r factors fitted to the calibration inputs the threshold drops (score
    |x| * scale <= threshold): what reaches the layer's low-rank path."""
    dropped = rows.abs() * (scale.cpu() if scale is not None else 1.0) <= threshold
    return whitened_factors(weight, rows * dropped, rank)
