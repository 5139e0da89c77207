"""Per-layer memory budgets with true shapes.

A linear layer of shape (out, in) reads out*in weight elements per dense decode step. Under a
layer sparsity s and a sparse share rho, R-Sparse keeps a fraction k = (1-s)*rho of the input
channels (each kept channel reads one weight column of `out` elements) and a rank-r low-rank
path that reads r*(out+in) elements, with r = floor((1-s)(1-rho) * out*in / (out+in)).
Together they read at most (1-s) of the dense bytes.

The reference code budgeted every attention projection as hidden x hidden, which is wrong for
grouped-query attention (k_proj/v_proj are smaller); here every layer uses its own shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rsparse.errors import BadInputError


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # "high", null, a list (a recipe is hand-edited JSON): refused below
        return math.nan


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    s = _float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise BadInputError(f"{what} must be in [0, 1), got {sparsity!r}")
    return s


def check_ratio(rho: float, what: str = "ratio (rho)") -> float:
    r = _float(rho)
    if not math.isfinite(r) or not 0.0 <= r <= 1.0:
        raise BadInputError(f"{what} must be in [0, 1], got {rho!r}")
    return r


@dataclass(frozen=True)
class LayerBudget:
    """What one (out, in) layer may read at decode, as a kept-channel fraction and a rank."""

    out_features: int
    in_features: int
    sparsity: float  # target layer sparsity s (fraction of dense bytes not read)
    rho: float  # sparse share of the budget
    keep_fraction: float  # k = (1-s)*rho, target fraction of input channels kept
    rank: int  # r of the low-rank path

    @property
    def dense_elements(self) -> int:
        return self.out_features * self.in_features

    @property
    def lowrank_elements(self) -> int:
        return self.rank * (self.out_features + self.in_features)

    def read_fraction(self, kept_fraction: float | None = None) -> float:
        """Fraction of the dense weight elements read for a given kept-channel fraction."""
        k = self.keep_fraction if kept_fraction is None else kept_fraction
        return k + self.lowrank_elements / self.dense_elements


def layer_budget(out_features: int, in_features: int, sparsity: float, rho: float) -> LayerBudget:
    s = check_sparsity(sparsity)
    rho = check_ratio(rho)
    keep = (1.0 - s) * rho
    # Guard floor() against values like 9.999999999 from float error.
    rank = math.floor((1.0 - s) * (1.0 - rho) * out_features * in_features / (out_features + in_features) + 1e-9)
    rank = max(0, min(rank, min(out_features, in_features)))
    return LayerBudget(out_features, in_features, s, rho, keep, rank)
