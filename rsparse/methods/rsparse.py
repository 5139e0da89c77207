"""R-Sparse (and its sparse-only / low-rank-only variants): every decoder projection becomes an
RSparseLinear, planned per layer by rsparse.core.calibrate.LayerPlanner.

Steps: budgets from the config (uniform rho or a recipe, checked against the model before any
work); calibration activations of the dense model (or ones collected before); per layer a plan
(method, score scale, threshold = quantile of the calibration scores, rank-r factors); then,
with `refine`, a second pass that re-sets each threshold on the inputs that reach the layer
once the layers before it are sparse.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from rsparse.core.calibrate import (CalibrationActivations, LayerPlanner, sample_layer_inputs, calibrate_threshold,
                                    collect_activations)
from rsparse.core.config import RSparseConfig, layer_budgets
from rsparse.core.layer import RSparseLinear, rsparse_layers
from rsparse.core.models import decoder_linears, replace_module
from rsparse.core.sparse_modules import restore_, token_mode
from rsparse.errors import BadInputError


@torch.no_grad()
def sparsify_rsparse_(model: nn.Module, config: RSparseConfig,
                      calibration: torch.Tensor | CalibrationActivations) -> list[dict]:
    """R-Sparse in place; returns a per-layer report (one dict per projection)."""
    config.validate()
    restore_(model)
    linears = decoder_linears(model)
    budgets = layer_budgets(config, linears)  # validates the recipe before any work
    if not isinstance(calibration, CalibrationActivations):
        calibration = collect_activations(model, calibration, config.max_rows_per_layer, config.seed)
    missing = [l.name for l in linears if l.name not in calibration.rows]
    if missing:
        raise BadInputError(f"calibration activations do not cover layer {missing[0]} (collected on another model?)")

    report = []
    for lin, budget in tqdm(list(zip(linears, budgets)), desc=f"sparsify ({config.method})", unit="layer", leave=False):
        weight = lin.module.weight
        rows = calibration.rows[lin.name]
        if rows.shape[1] != lin.module.in_features:
            raise BadInputError(f"calibration activations for {lin.name} have {rows.shape[1]} channels, "
                                f"the layer has {lin.module.in_features}")
        svd = calibration.svd.get(lin.name)
        if svd is None and budget.rank and config.factors == "svd" and config.method != "dense":
            from rsparse.core.factors import weight_svd

            svd = weight_svd(weight)
            if calibration.cache_svd:
                calibration.svd[lin.name] = tuple(t.float().cpu() for t in svd)
        planner = LayerPlanner(weight, rows, config.score, config.factors, svd=svd)
        plan = planner.plan(budget, dense=config.method == "dense")
        layer = plan.apply(RSparseLinear.from_linear(lin.module, name=lin.name))
        layer.tokens = config.tokens
        replace_module(model, lin.name, layer)
        dense = plan.method == "dense"
        report.append({
            "name": lin.name, "block": lin.block, "type": lin.kind,
            "shape": [lin.module.out_features, lin.module.in_features],
            "method": plan.method, "sparsity": budget.sparsity, "rho": budget.rho,
            "keep": budget.keep_fraction, "rank": budget.rank, "threshold": plan.threshold,
            "score": "weighted" if plan.weighted else "abs",
            "calibration_kept": 1.0 if dense else float((planner.scores(plan.score_scale) > plan.threshold).float().mean()),
            "read_fraction": 1.0 if dense else budget.read_fraction(),
        })
    if config.refine and calibration.windows is not None and config.method != "dense":
        refine_thresholds_(model, config, calibration.windows, report)
    from rsparse.io.transformers_format import attach

    attach(model, config, report)  # model.save_pretrained writes the rsparse transformers format
    return report


@torch.no_grad()
def refine_thresholds_(model: nn.Module, config: RSparseConfig, windows: torch.Tensor, report: list[dict]) -> None:
    """Re-set thresholds on the inputs that reach each layer once the layers before it are sparse.

    Thresholds from dense activations keep too few channels downstream, because sparsified
    layers shift the activations that follow them. One more pass, sparsified the way the model
    will run (every token for tokens="all"; otherwise a dense first half standing in for the
    prompt and sparse tokens after it, as in decoding), brings the kept fraction on held-out
    text back to the target.
    """
    layers = {l.name: l for l in rsparse_layers(model)}
    mode = "all" if config.tokens == "all" else "second_half"
    with token_mode(model, mode):
        rows = sample_layer_inputs(model, windows, config.max_rows_per_layer, config.seed + 1,
                              second_half=mode == "second_half")
    for entry in report:
        layer = layers[entry["name"]]
        if layer.method in ("dense", "lowrank"):
            continue
        scores = rows[entry["name"]].abs() * layer.score_scale.cpu()
        entry["threshold"] = calibrate_threshold(scores, layer.keep_fraction)
        entry["calibration_kept"] = float((scores > entry["threshold"]).float().mean())
        layer.threshold.fill_(entry["threshold"])
