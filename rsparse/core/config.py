"""The method configs (one dataclass per method; their defaults are the defaults everywhere,
the command line's included) and per-layer recipes.

    RSparseConfig   R-Sparse, and with `method` its sparse-only, low-rank-only and dense variants
    CatsConfig      CATS (threshold on the MLP activation)
    GriffinConfig   GRIFFIN (neurons chosen per sequence at prefill)
    ReluConfig      ReLUfication without training

rsparse.sparsify_(model, config, calibration) dispatches on the config's type.

A recipe is a JSON file a user can read and edit:

    {"sparsity": 0.5,                      # optional model-level target, for the record
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "shape": [576, 576], "rho": 0.9,
                 "sparsity": 0.5}, ...]}   # "shape" and "sparsity" optional per layer

It must name every decoder projection of the model exactly once; a per-layer "sparsity"
overrides the config's uniform one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rsparse.core.budget import LayerBudget, check_ratio, check_sparsity, layer_budget
from rsparse.errors import BadInputError, RecipeError

# The names a config field (and its command-line flag) accepts. This module imports no torch, so
# that the command line builds its --help from these and the defaults below without loading it.
LAYER_METHODS = ("dense", "sparse", "lowrank", "rsparse")  # RSparseConfig.method: what a layer does at a sparse token
BASELINES = ("cats", "griffin", "relu")  # CatsConfig, GriffinConfig, ReluConfig
METHODS = LAYER_METHODS + BASELINES  # every method name a command takes
SCORED_MODES = ("second_half", "all")  # token modes that score whole sequences (perplexity, lm-eval)
SCORES = ("auto", "abs", "weighted")
FACTORS = ("svd", "whitened")
WEIGHT_BITS = (16, 4)  # RSparseConfig.weight_bits: the layers' float weights, or 4-bit codes
INT4_GROUP_SIZES = (32, 64, 128, 256)  # rsparse.core.int4.GROUP_SIZES (here without torch)
INT4_ROUNDINGS = ("rtn", "hqq")  # rsparse.core.int4.ROUNDINGS


@dataclass
class RSparseConfig:
    sparsity: float = 0.5  # target model-level sparsity: fraction of linear-layer weight bytes not read
    ratio: float = 0.95  # uniform rho: share of each layer's budget spent on kept channels
    recipe: str | dict | None = None  # per-layer rho (file path or dict); overrides `ratio`
    method: str = "rsparse"  # dense | sparse (rho=1) | lowrank (rho=0) | rsparse
    score: str = "auto"  # auto: |x|*||W col|| where the layer has a low-rank path, else |x|
    tokens: str = "decode"  # which tokens are sparsified: decode | second_half | all
    calibration_samples: int = 16
    seq_len: int = 512
    max_rows_per_layer: int = 2048  # calibration tokens kept per layer for threshold quantiles
    refine: bool = True  # second calibration pass on the sparsified model (see calibrate.py)
    # whitened: rank-r factors fitted to the inputs that reach the low-rank path (measured better
    # than the paper's plain top-r SVD of W on SmolLM2, see README); svd: the paper's factors.
    factors: str = "whitened"
    seed: int = 0
    # 4: weights rounded to 4 bits (groups of group_size input channels; a layer whose width
    # it does not divide gets the largest smaller size that does) before calibration, and stored
    # as 4-bit codes (rsparse.core.int4_layer); the low-rank factors stay in the model's dtype
    weight_bits: int = 16
    group_size: int = 128
    # how the 4-bit scales and zeros are chosen: rtn (integer zero point) or hqq (HQQ's optimised
    # zero; needs rsparse[quant]); the stored format and the kernels are the same
    rounding: str = "rtn"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "RSparseConfig":
        check_sparsity(self.sparsity)
        check_ratio(self.ratio)
        if self.method not in LAYER_METHODS:
            raise BadInputError(f"unknown method {self.method!r}; expected one of {LAYER_METHODS}")
        if self.score not in SCORES:
            raise BadInputError(f"unknown score {self.score!r}; expected one of {SCORES}")
        if self.factors not in FACTORS:
            raise BadInputError(f"unknown factors {self.factors!r}; expected one of {FACTORS}")
        _check_tokens(self.tokens)
        _positive(self, "calibration_samples", "seq_len", "max_rows_per_layer")
        if self.weight_bits not in WEIGHT_BITS:
            raise BadInputError(f"weight_bits must be one of {WEIGHT_BITS}, got {self.weight_bits!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise BadInputError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
        if self.rounding not in INT4_ROUNDINGS:
            raise BadInputError(f"rounding must be one of {INT4_ROUNDINGS}, got {self.rounding!r}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.recipe, dict):
            d["recipe"] = "<inline>"
        return d


def _check_tokens(tokens: str) -> None:
    # the token modes live in sparse_modules, which imports torch: only when a config is made
    from rsparse.core.sparse_modules import check_tokens

    check_tokens(tokens)


def _positive(config, *names: str) -> None:
    for name in names:
        if int(getattr(config, name)) < 1:
            raise BadInputError(f"{name} must be positive, got {getattr(config, name)}")


def _mlp_target(config) -> None:
    if config.mlp_sparsity is not None:
        check_sparsity(config.mlp_sparsity, "MLP sparsity")
    elif config.sparsity is not None:
        check_sparsity(config.sparsity)
    else:
        raise BadInputError(f"{type(config).__name__}: give a sparsity (model-level) or an mlp_sparsity")
    _check_tokens(config.tokens)


@dataclass
class CatsConfig:
    """CATS: an MLP neuron is skipped where |act(gate(x))| is at most a per-layer threshold,
    calibrated for a target sparsity (model-level `sparsity`, or MLP-level `mlp_sparsity`, which
    wins when given); `threshold` instead sets one fixed threshold for every layer."""

    sparsity: float | None = 0.5
    mlp_sparsity: float | None = None
    threshold: float | None = None
    tokens: str = "decode"
    refine: bool = True  # re-set thresholds on the inputs of the sparsified model, as RSparseConfig
    max_rows_per_layer: int = 2048
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "CatsConfig":
        if self.threshold is None:
            _mlp_target(self)
        _check_tokens(self.tokens)
        _positive(self, "max_rows_per_layer")
        return self


@dataclass
class GriffinConfig:
    """GRIFFIN: per sequence, the top (1 - MLP sparsity) of the MLP neurons by their activation
    norm over the prompt are kept for the whole generation."""

    sparsity: float | None = 0.5  # model-level target; or mlp_sparsity (wins when given)
    mlp_sparsity: float | None = None
    tokens: str = "decode"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "GriffinConfig":
        _mlp_target(self)
        return self


@dataclass
class ReluConfig:
    """ReLUfication without training: the MLP activation replaced by ReLU (no weight skipped)."""

    tokens: str = "decode"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "ReluConfig":
        _check_tokens(self.tokens)
        return self


def load_recipe(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        return recipe
    path = Path(recipe)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise RecipeError(f"recipe {path} must be a JSON object with a 'layers' list")
    return data


def layer_budgets(config: RSparseConfig, linears) -> list[LayerBudget]:
    """Budgets of the given DecoderLinears under the config (method, uniform ratio or recipe)."""
    shapes = [(l.module.out_features, l.module.in_features) for l in linears]
    if config.method in ("sparse", "lowrank", "dense"):
        rho = {"sparse": 1.0, "lowrank": 0.0, "dense": 1.0}[config.method]
        s = 0.0 if config.method == "dense" else config.sparsity
        return [layer_budget(o, i, s, rho) for o, i in shapes]
    if config.recipe is None:
        return [layer_budget(o, i, config.sparsity, config.ratio) for o, i in shapes]

    recipe = load_recipe(config.recipe)
    entries = recipe.get("layers")
    if not isinstance(entries, list):
        raise RecipeError("recipe must have a 'layers' list")
    names = [l.name for l in linears]
    if len(entries) != len(names):
        raise RecipeError(f"recipe has {len(entries)} layers but the model has {len(names)} decoder projections")
    by_name = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or "rho" not in e:
            raise RecipeError(f"recipe layer {i} must be an object with a 'name' (a string) and a 'rho'")
        if e["name"] in by_name:
            raise RecipeError(f"recipe names layer {e['name']!r} twice")
        by_name[e["name"]] = e
    unknown = [n for n in by_name if n not in set(names)]
    if unknown:
        raise RecipeError(f"recipe layer names not in the model: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    budgets = []
    for name, (o, i) in zip(names, shapes):
        e = by_name[name]
        if "shape" in e and (not isinstance(e["shape"], (list, tuple)) or list(e["shape"]) != [o, i]):
            raise RecipeError(f"recipe gives {name} shape {e['shape']!r}, the model has [{o}, {i}]")
        try:
            rho = check_ratio(e["rho"], f"recipe rho of {name}")
            s = check_sparsity(e.get("sparsity", config.sparsity), f"recipe sparsity of {name}")
        except ValueError as err:
            raise RecipeError(str(err)) from None
        budgets.append(layer_budget(o, i, s, rho))
    return budgets
