"""Analysis 3 (see rsparse.analysis): the multi-phase ReLU, perplexity when dropped values go to
0 (1 phase) or to one replacement level (2 phases), at the down_proj input or the MLP activation."""

from __future__ import annotations

import math

import torch
from torch import nn

from rsparse.analysis import PHASE_SITES, PHASE_VARIANTS
from rsparse.analysis.measures import two_phase_thresholds
from rsparse.core.calibrate import CalibrationActivations
from rsparse.core.models import DecoderLinear, decoder_linears
from rsparse.core.sparse_modules import restore_
from rsparse.errors import BadInputError
from rsparse.eval.perplexity import evaluate_perplexity


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


def phase_levels(values: torch.Tensor, sparsity: float, variant: str, signed: bool) -> tuple[float, float]:
    """(T0, fill) of a variant from a layer's calibration values at the site (|h| for magnitude sites)."""
    if variant not in PHASE_VARIANTS:
        raise BadInputError(f"unknown phase variant {variant!r}; expected one of {tuple(PHASE_VARIANTS)}")
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
        raise BadInputError(f"{lin.name}: the MLP has no act_fn module; use --phase-sites down_input")
    return act


def phase_site_values(model: nn.Module, activations: CalibrationActivations, site: str) -> dict[str, torch.Tensor]:
    """Calibration values at the site, keyed by the module the hook goes on (down_proj for
    `down_input`: |h|; gate_proj's block for `act`: act_fn(x W_gate^T) from gate_proj's inputs)."""
    if site not in PHASE_SITES:
        raise BadInputError(f"unknown phase site {site!r}; expected one of {PHASE_SITES}")
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
            raise BadInputError(f"unknown phase site {site!r}; expected one of {PHASE_SITES}")
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
