"""The sparsification methods behind one verb.

    sparsify_(model, config, calibration)   dispatched on the config's type:
        RSparseConfig   R-Sparse (method="rsparse"), sparse-only ("sparse"), low-rank-only
                        ("lowrank") or dense; returns the per-layer report (list of dicts)
        CatsConfig      CATS          }
        GriffinConfig   GRIFFIN       } return {"method", "mlp_sparsity", "target_sparsity", "layers", ...}
        ReluConfig      ReLUfication  }
    restore_(model)     undoes any of them (lossless)

Every method first undoes any other one. `calibration` is a (n, seq_len) LongTensor of token
windows or CalibrationActivations (collect once, sparsify many ways); GRIFFIN and ReLUfication
need none.
"""

from __future__ import annotations

from torch import nn

from rsparse.core.config import BASELINES, METHODS, CatsConfig, GriffinConfig, ReluConfig, RSparseConfig
from rsparse.core.config import LAYER_METHODS as RSPARSE_METHODS  # RSparseConfig.method
from rsparse.core.sparse_modules import restore_
from rsparse.errors import BadInputError

__all__ = ["BASELINES", "METHODS", "RSPARSE_METHODS", "method_config", "restore_", "sparsify_"]


def sparsify_(model: nn.Module, config, calibration=None):
    """Apply the method `config` describes to the model in place (see the module docstring)."""
    from rsparse.methods import baselines
    from rsparse.methods.rsparse import sparsify_rsparse_

    if isinstance(config, RSparseConfig):
        if calibration is None:
            raise BadInputError("R-Sparse needs calibration data (token windows or CalibrationActivations)")
        return sparsify_rsparse_(model, config, calibration)
    if isinstance(config, CatsConfig):
        config.validate()
        if config.threshold is not None:
            return baselines.apply_cats_(model, threshold=config.threshold, tokens=config.tokens)
        sparsity, mlp_sparsity = _target(config)
        return baselines.apply_cats_(model, sparsity, mlp_sparsity=mlp_sparsity, calibration=calibration, tokens=config.tokens,
                                     refine=config.refine, max_rows_per_layer=config.max_rows_per_layer,
                                     seed=config.seed)
    if isinstance(config, GriffinConfig):
        config.validate()
        sparsity, mlp_sparsity = _target(config)
        return baselines.apply_griffin_(model, sparsity, mlp_sparsity=mlp_sparsity, tokens=config.tokens)
    if isinstance(config, ReluConfig):
        config.validate()
        return baselines.apply_relu_(model, tokens=config.tokens)
    raise BadInputError(f"sparsify_ takes an RSparseConfig, CatsConfig, GriffinConfig or ReluConfig, "
                        f"got {type(config).__name__}")


def _target(config) -> tuple:
    """(model-level sparsity, mlp_sparsity=...) arguments: the MLP-level target wins when given."""
    if config.mlp_sparsity is not None:
        return (None, config.mlp_sparsity)
    return (config.sparsity, None)


def method_config(method: str, sparsity: float | None = None, *, mlp_sparsity: float | None = None,
                  tokens: str = "second_half", seed: int = 0, refine: bool = True, **rsparse_fields):
    """The config of a method named on the command line (METHODS), at a model-level `sparsity`
    (or, for CATS and GRIFFIN, an MLP-level `mlp_sparsity`). rsparse_fields: more RSparseConfig
    fields (ratio, recipe, factors, ...) for the R-Sparse methods. None for "dense": nothing to
    apply (restore_ the model)."""
    if method not in METHODS:
        raise BadInputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "relu":
        return ReluConfig(tokens=tokens)
    if method in ("cats", "griffin"):
        if sparsity is None and mlp_sparsity is None:
            raise BadInputError(f"{method} needs a target sparsity")
        cls = CatsConfig if method == "cats" else GriffinConfig
        extra = dict(refine=refine, seed=seed) if method == "cats" else {}
        return cls(sparsity=None if mlp_sparsity is not None else sparsity, mlp_sparsity=mlp_sparsity,
                   tokens=tokens, **extra)
    if mlp_sparsity is not None:
        raise BadInputError(f"{method} takes a model-level sparsity, not an MLP sparsity")
    if method == "dense":
        return None
    if sparsity is None:
        raise BadInputError(f"{method} needs a target sparsity")
    if method != "rsparse":
        rsparse_fields.pop("recipe", None)
    return RSparseConfig(sparsity=sparsity, method=method, tokens=tokens, seed=seed, refine=refine, **rsparse_fields)
