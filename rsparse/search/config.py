"""The search's settings (rsparse.search.evolution), torch-free: `rsparse search --help` reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass

from rsparse.core.budget import check_sparsity
from rsparse.core.config import FACTORS, SCORED_MODES, RSparseConfig
from rsparse.errors import BadInputError

SHARES = ("layer", "type")


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
        return self
