"""Applying the paper's baselines in place: CATS, GRIFFIN, ReLUfication (the wrapper, budgets
and measurements are in rsparse.methods.mlp). rsparse.sparsify_ calls these with a CatsConfig,
GriffinConfig or ReluConfig; rsparse.restore_ undoes them."""

from __future__ import annotations

import math

import torch
from torch import nn

from rsparse.core.budget import check_sparsity
from rsparse.core.calibrate import CalibrationActivations, calibrate_threshold, collect_activations, sample_module_inputs
from rsparse.core.models import replace_module
from rsparse.core.sparse_modules import check_tokens, restore_, token_mode
from rsparse.errors import BadInputError
from rsparse.methods.mlp import (BaselineMLP, _skippable_bytes, linear_bytes, mlp_modules, mlp_sparsity_for,
                                 model_sparsity_for)


def _wrap(model: nn.Module, method: str, tokens: str) -> list[BaselineMLP]:
    check_tokens(tokens)
    restore_(model)
    wrappers = []
    for name, mlp in mlp_modules(model):
        w = BaselineMLP(mlp, method, name)
        w.tokens = tokens
        wrappers.append(w)
    for w in wrappers:  # replace only once every MLP has been checked
        replace_module(model, w.name, w)
    return wrappers


def _target(model, method, sparsity, mlp_sparsity) -> tuple[float, float]:
    if (sparsity is None) == (mlp_sparsity is None):
        raise BadInputError(f"{method}: give exactly one of sparsity (model-level) or mlp_sparsity")
    if sparsity is not None:
        s = mlp_sparsity_for(model, method, sparsity)
    else:
        s = check_sparsity(mlp_sparsity, f"{method} MLP sparsity")
    return s, model_sparsity_for(model, method, s)


def _report(method, wrappers, mlp_sparsity, model_sparsity, **extra) -> dict:
    return {"method": method, "mlp_sparsity": mlp_sparsity, "target_sparsity": model_sparsity, **extra,
            "layers": [{"name": w.name, "mlp_sparsity": w.mlp_sparsity, "threshold": w.threshold,
                        "keep": w.keep} for w in wrappers]}


@torch.no_grad()
def apply_griffin_(model: nn.Module, sparsity: float | None = None, *, mlp_sparsity: float | None = None,
                   tokens: str = "decode") -> dict:
    """GRIFFIN at a model-level `sparsity` (or an MLP-level `mlp_sparsity`), in place."""
    s, model_s = _target(model, "griffin", sparsity, mlp_sparsity)
    wrappers = _wrap(model, "griffin", tokens)
    for w in wrappers:
        w.keep = max(0, min(w.intermediate_size, round((1.0 - s) * w.intermediate_size)))
        w.mlp_sparsity = 1.0 - w.keep / w.intermediate_size
    exact = sum(w.mlp_sparsity * _skippable_bytes(w) for w in wrappers) / linear_bytes(model)["total"]
    return _report("griffin", wrappers, s, model_s, exact_sparsity=exact)


@torch.no_grad()
def apply_relu_(model: nn.Module, tokens: str = "decode") -> dict:
    """ReLUfication without training: SiLU (or the model's act) replaced by ReLU in every MLP."""
    wrappers = _wrap(model, "relu", tokens)
    return _report("relu", wrappers, 0.0, 0.0)


def _mlp_inputs(calibration, name: str) -> torch.Tensor:
    rows = calibration.rows.get(f"{name}.gate_proj")
    if rows is None:
        raise BadInputError(f"calibration activations do not cover {name}.gate_proj (collected on another model?)")
    return rows


@torch.no_grad()
def apply_cats_(model: nn.Module, sparsity: float | None = None, *, mlp_sparsity: float | None = None,
                calibration=None, threshold: float | None = None, tokens: str = "decode",
                refine: bool = True, max_rows_per_layer: int = 2048, seed: int = 0) -> dict:
    """CATS at a model-level `sparsity` (or an MLP-level `mlp_sparsity`), in place.

    calibration: a (n, seq_len) LongTensor of token windows or rsparse CalibrationActivations
    (the MLP inputs are the gate_proj rows). Per layer, threshold = the MLP-sparsity quantile of
    |act(gate(x))| on the dense model's calibration tokens; with `refine` (and windows), one more
    pass re-sets the thresholds on the inputs that reach each MLP once the MLPs before it are
    sparse (as rsparse's own calibration does), so the achieved sparsity meets the target.
    `threshold` instead sets one fixed threshold for every layer (0.0 = skip only exact zeros).
    """
    if threshold is not None:
        if sparsity is not None or mlp_sparsity is not None:
            raise BadInputError("cats: give a threshold or a sparsity target, not both")
        wrappers = _wrap(model, "cats", tokens)
        for w in wrappers:
            w.threshold = float(threshold)
        return _report("cats", wrappers, math.nan, math.nan, threshold=float(threshold))

    s, model_s = _target(model, "cats", sparsity, mlp_sparsity)
    if calibration is None:
        raise BadInputError("cats needs calibration data (token windows or CalibrationActivations)")
    if not isinstance(calibration, CalibrationActivations):
        calibration = collect_activations(model, calibration, max_rows_per_layer, seed)
    wrappers = _wrap(model, "cats", tokens)
    for w in wrappers:
        rows = _mlp_inputs(calibration, w.name)
        w.threshold = _cats_threshold(w, rows, s)
        w.mlp_sparsity = s
    if refine and s > 0 and calibration.windows is not None:
        mode = "all" if tokens == "all" else "second_half"
        with token_mode(model, mode):
            rows = sample_module_inputs(model, {w.name: w for w in wrappers}, calibration.windows,
                                        max_rows_per_layer, seed + 1, second_half=mode == "second_half")
        for w in wrappers:
            w.threshold = _cats_threshold(w, rows[w.name], s)
    return _report("cats", wrappers, s, model_s)


def _cats_threshold(w: BaselineMLP, rows: torch.Tensor, s: float) -> float:
    dev = w.gate_proj.weight.device
    out = []
    for chunk in rows.split(1024):
        out.append(w.act_fn(w.gate_proj(chunk.to(dev, w.gate_proj.weight.dtype))).abs().float().cpu())
    return calibrate_threshold(torch.cat(out), 1.0 - s)
