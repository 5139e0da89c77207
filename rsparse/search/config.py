"""The search's settings (rsparse.search.evolution), torch-free: `rsparse search --help` reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsparse.core.budget import check_sparsity
from rsparse.core.config import FACTORS, SCORED_MODES, RSparseConfig
from rsparse.errors import BadInputError

SHARES = ("layer", "type")
ALLOCATIONS = ("uniform", "greedy", "evolve")


@dataclass
class AllocationConfig:
    """How the model-level byte budget is split into per-layer sparsities s_l (rsparse.search.allocate).

    uniform: s_l = the target everywhere. greedy: TEAL-style block-wise greedy (sparse-only, on
    calibration block outputs), then the rho search on top with s_l fixed. evolve: the search
    mutates s_l together with rho_l, every candidate projected back onto the budget."""

    method: str = "uniform"
    step: float = 0.025  # greedy: share of a block's bytes one step moves to sparsity
    max_sparsity: float = 0.95  # no layer sparser than this (greedy and evolve)
    spread: float = 0.05  # evolve: standard deviation of the initial sparsity genes around the start

    def validate(self) -> "AllocationConfig":
        if self.method not in ALLOCATIONS:
            raise BadInputError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.method!r}")
        if not 0 < self.step <= 0.5:
            raise BadInputError(f"allocation step must be in (0, 0.5], got {self.step}")
        if not 0 < self.max_sparsity < 1:
            raise BadInputError(f"max sparsity must be in (0, 1), got {self.max_sparsity}")
        if not 0 <= self.spread <= 1:
            raise BadInputError(f"sparsity spread must be in [0, 1], got {self.spread}")
        return self


RHO_BY = ("search", "block")


@dataclass
class BlockRhoConfig:
    """rho_l chosen without a search (rsparse.search.allocate.block_rho): each projection takes the
    value of `grid` with the least block output error on the calibration windows, rank only where
    it lowers its block's sparse-only error by more than `min_gain` of it. 0.1 measured better
    than 0.01 on held-out text (docs/allocation.md): small local gains do not carry over."""

    grid: tuple = (1.0, 0.975, 0.95, 0.925, 0.9)
    min_gain: float = 0.1

    def validate(self) -> "BlockRhoConfig":
        if not self.grid or any(not 0 <= float(r) <= 1 for r in self.grid):
            raise BadInputError(f"rho grid values must lie in [0, 1], got {list(self.grid)}")
        if self.min_gain < 0:
            raise BadInputError(f"min gain must be >= 0, got {self.min_gain}")
        return self


@dataclass
class SearchConfig:
    sparsity: float = 0.5
    population: int = 32
    generations: int = 5  # per group
    group_size: int = 28  # layers per group
    mutation: float = 0.5  # F
    crossover: float = 0.5  # CR
    init_ratio: float = RSparseConfig.ratio  # centre of the initial population (see `initial_population`)
    init_spread: float = 0.05
    share: str = "layer"  # one rho per projection ("layer", the paper) or per projection type ("type")
    tokens: str = "second_half"  # sparse (and scored) positions of the objective: second_half | all
    # Low-rank factors the objective scores candidates with: "svd" (slices of one SVD per layer,
    # cheap) or "whitened" (what sparsify_ builds by default; computed per layer and rho value).
    factors: str = "svd"
    rho_step: float = 0.005  # genes live on a grid of this step; thresholds (and factors) per grid point
    seed: int = 0
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    # Early stop: this share of the calibration windows is held out of the fitness; after each
    # generation the best individual is scored on it, and the search stops after `patience`
    # generations without a held-out gain (0: never), returning the held-out best.
    holdout: float = 0.0
    patience: int = 0
    cache_mb: int = 2048  # bound of the caches of sorted scores and whitened factors (not part of a resume's identity)

    @property
    def steps(self) -> int:
        return round(1 / self.rho_step)

    def validate(self) -> "SearchConfig":
        check_sparsity(self.sparsity)
        if self.population < 4:
            raise BadInputError(f"population must be at least 4 (differential evolution needs 3 donors), got {self.population}")
        if self.generations < 1 or self.group_size < 1:
            raise BadInputError("generations and group_size must be positive")
        if not 0 < self.mutation <= 2 or not 0 <= self.crossover <= 1:
            raise BadInputError(f"mutation F must be in (0, 2] and crossover CR in [0, 1], got {self.mutation}, {self.crossover}")
        if not 0 <= self.init_spread <= 1:
            raise BadInputError(f"init_spread must be in [0, 1], got {self.init_spread}")
        if self.tokens not in SCORED_MODES:
            raise BadInputError(f"tokens must be second_half or all, got {self.tokens!r}")
        if self.factors not in FACTORS:
            raise BadInputError(f"factors must be one of {', '.join(FACTORS)}, got {self.factors!r}")
        if not 0 < self.rho_step <= 1 or abs(round(1 / self.rho_step) * self.rho_step - 1) > 1e-9:
            raise BadInputError(f"rho_step must divide 1 (e.g. 0.005, 0.05, 0.1), got {self.rho_step}")
        if self.share not in SHARES:
            raise BadInputError(f"share must be one of {', '.join(SHARES)}, got {self.share!r}")
        self.allocation.validate()
        if self.allocation.method != "uniform" and self.sparsity > self.allocation.max_sparsity:
            raise BadInputError(f"sparsity {self.sparsity} is above the per-layer max sparsity "
                                f"{self.allocation.max_sparsity}")
        if not 0 <= self.holdout < 1 or self.patience < 0:
            raise BadInputError(f"holdout must be in [0, 1) and patience >= 0, got {self.holdout}, {self.patience}")
        if self.patience and not self.holdout:
            raise BadInputError("patience (early stop) needs a held-out share of the calibration windows (holdout > 0)")
        if self.cache_mb < 1:
            raise BadInputError(f"cache_mb must be positive, got {self.cache_mb}")
        return self
