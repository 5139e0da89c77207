"""The paper's training-free baselines (CATS, GRIFFIN, ReLUfication) as in-place MLP transforms.

Each transform wraps the gated MLP of every decoder block (the module holding gate_proj,
up_proj, down_proj, found by structure as in rsparse.models) in a `BaselineMLP`. The wrapper
registers the same three projection modules under the same names, so parameter names, the
state dict and `decoder_linears` are unchanged; `restore_baselines_` puts the original MLP
modules back (lossless: the weights are never touched). One method at a time: applying a
baseline first undoes any R-Sparse layers and other baseline, and vice versa in rsparse.evaluate.

Methods (the MLP is y = down(act(gate(x)) * up(x))):

  cats     CATS (Lee et al., 2024): a = act(gate(x)) is computed densely; neurons with
           |a_i| <= t are skipped, so only the active rows of up and columns of down are read:
           y = down((a * [|a| > t]) * up(x)). One threshold t per layer, the `s` quantile of
           |a| on calibration tokens, for a target MLP ("module") sparsity s.
           Skipped bytes: s * (up + down).
  griffin  GRIFFIN (Dong et al., 2024): per sequence, from the prompt's (prefill) tokens,
           z = act(gate(x)) * up(x), each token's z normalised to unit norm, neuron score =
           norm of its column over the prompt tokens; the top k = round((1-s) * d_ff) neurons are
           kept for the whole generation (rows of gate and up, columns of down).
           Skipped bytes: s * (gate + up + down).
  relu     ReLUfication (Mirzadeh et al., 2023) without training: act replaced by ReLU.
           It changes only the activation; no weight is skipped. The zero fraction of
           ReLU(gate(x)) is reported as what CATS-style skipping could save.

Model-level sparsity = skipped bytes / weight bytes of all 7 linear layers of every block
(the budget of rsparse.budget). CATS can reach at most (up+down)/all and GRIFFIN
(gate+up+down)/all of it (about 44.5% and 66.8% on Llama-2-7B); `mlp_sparsity_for` solves for
the MLP sparsity of a model-level target and raises UnreachableSparsityError beyond that.

Token modes as for RSparseLinear (`tokens`):
  "decode"       sparse only in single-token forward calls (generation steps); multi-token
                 (prefill) calls run dense, and GRIFFIN selects its neurons there.
  "second_half"  the paper's protocol for scoring whole sequences: positions < T//2 are dense
                 (bit-identical to the dense model), positions >= T//2 sparse; GRIFFIN selects
                 from the first half of each sequence (the simulated prompt).
  "all"          every token sparse; GRIFFIN selects from the whole sequence itself.
  "none"         dense.
In a right-padded batch whose row lengths the evaluator declares (rsparse.layer.scored_lengths),
the halves and GRIFFIN's selection are those of each real row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsparse.budget import check_sparsity
from rsparse.layer import TOKEN_MODES, gather_rows, padded_positions, scatter_rows_
from rsparse.models import MLP_PROJ, UnsupportedModelError, _find_child_with, decoder_blocks, decoder_linears, replace_module

BASELINES = ("cats", "griffin", "relu")
# Projections whose bytes each method can skip.
SKIPPED_PROJ = {"cats": ("up_proj", "down_proj"), "griffin": ("gate_proj", "up_proj", "down_proj"),
                "relu": ("up_proj", "down_proj")}
LABELS = {"cats": "CATS", "griffin": "GRIFFIN", "relu": "ReLUfication"}


class UnreachableSparsityError(ValueError):
    """A model-level sparsity that an MLP-only method cannot reach on this model."""


# -- budgets ------------------------------------------------------------------------------------

def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Weight bytes of the 7 decoder projections, summed over blocks, per projection type and total."""
    out: dict[str, int] = {}
    for lin in decoder_linears(model):
        w = lin.module.weight
        out[lin.kind] = out.get(lin.kind, 0) + w.numel() * w.element_size()
    out["total"] = sum(out.values())
    return out


def skippable_share(model: nn.Module, method: str) -> float:
    """Largest model-level sparsity the method could reach (all of its MLP projections skipped)."""
    if method not in SKIPPED_PROJ:
        raise ValueError(f"unknown baseline {method!r}; expected one of {BASELINES}")
    b = linear_bytes(model)
    return sum(b[k] for k in SKIPPED_PROJ[method]) / b["total"]


def model_sparsity_for(model: nn.Module, method: str, mlp_sparsity: float) -> float:
    """Model-level sparsity of an MLP sparsity s: s * (skipped projections' bytes) / (all 7)."""
    return check_sparsity(mlp_sparsity, f"{method} MLP sparsity") * skippable_share(model, method)


def mlp_sparsity_for(model: nn.Module, method: str, target: float) -> float:
    """The MLP sparsity that gives a model-level target; UnreachableSparsityError if it is >= 1."""
    target = check_sparsity(target, "target sparsity")
    if method == "relu":
        raise ValueError("ReLUfication has no sparsity target (it only swaps the activation)")
    share = skippable_share(model, method)
    s = target / share
    if s >= 1.0:
        parts = "+".join(p.split("_")[0] for p in SKIPPED_PROJ[method])
        raise UnreachableSparsityError(
            f"{LABELS[method]} sparsifies only the MLP ({parts} = {100 * share:.1f}% of the linear-layer weight "
            f"bytes of this model), so a model-level sparsity of {100 * target:.0f}% would need an MLP sparsity of "
            f"{100 * s:.0f}%; choose a target below {100 * share:.1f}%")
    return s


# -- the wrapper --------------------------------------------------------------------------------

class BaselineMLP(nn.Module):
    """Wraps a gated MLP; see the module docstring. Keeps the original module for the dense
    path (bit-identical outputs) and for `restore_baselines_`."""

    def __init__(self, mlp: nn.Module, method: str, name: str = ""):
        super().__init__()
        if method not in BASELINES:
            raise ValueError(f"unknown baseline {method!r}; expected one of {BASELINES}")
        act = getattr(mlp, "act_fn", None)
        if act is None or not callable(act):
            raise UnsupportedModelError(f"{name or type(mlp).__name__}: the MLP has no act_fn; the baselines need "
                                        "a Llama-style gated MLP down(act(gate(x)) * up(x))")
        object.__setattr__(self, "_orig", mlp)  # not registered: no duplicate parameters
        for proj in MLP_PROJ:
            setattr(self, proj, getattr(mlp, proj))
        self.act_fn = act
        self.name = name
        self.method = method
        self.tokens = "decode"
        self.mlp_sparsity = 0.0  # target MLP sparsity (fraction of neurons skipped)
        self.threshold = -math.inf  # CATS
        self.keep = self.intermediate_size  # GRIFFIN: neurons kept per sequence
        self._selected = None  # GRIFFIN: (B, 1, d_ff) bool mask chosen at the last prefill (decode mode)
        self.track_stats = False
        self.reset_stats()

    @property
    def intermediate_size(self) -> int:
        return self.up_proj.out_features

    @property
    def original(self) -> nn.Module:
        return self._orig

    def reset_stats(self) -> None:
        self.stat_tokens = 0  # sparsified tokens seen
        self.stat_kept = 0  # neurons kept (CATS, GRIFFIN) or non-zero (ReLU), summed over those tokens

    def extra_repr(self) -> str:
        extra = {"cats": f", threshold={self.threshold:.4g}", "griffin": f", keep={self.keep}", "relu": ""}[self.method]
        return f"method={self.method}, mlp_sparsity={self.mlp_sparsity:.3f}{extra}, tokens={self.tokens}"

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.tokens
        if mode == "none":
            return self._orig(x)
        single = x.dim() == 1 or x.shape[-2] == 1
        halves = padded_positions(x) if mode in ("all", "second_half") and not single else None
        if halves is not None:
            # A right-padded batch with declared row lengths: the halves of each real row.
            first, second, at = halves
            if mode == "all":
                first = second = first | second
                at = second.reshape(-1).nonzero()[:, 0]
            y = self._orig(x)
            return scatter_rows_(y, at, self._sparse_rows(x, at, first))
        if mode == "all":
            return self._sparse(x, prompt=x)
        if mode == "decode":
            if single:
                return self._sparse(x, prompt=None)
            if self.method == "griffin":
                self._selected = self._select(x)
            return self._orig(x)
        if mode == "second_half" and not single:
            half = x.shape[-2] // 2
            # Dense over the whole sequence, then the second half replaced: the first half is
            # bit-identical to the dense model's (same shapes), as in RSparseLinear.
            y = self._orig(x)
            y[..., half:, :] = self._sparse(x[..., half:, :], prompt=x[..., :half, :])
            return y
        return self._orig(x)

    def _sparse_rows(self, x: torch.Tensor, at: torch.Tensor, prompt_at: torch.Tensor) -> torch.Tensor:
        """Sparse outputs (N, hidden) at the N flat positions `at` (indices into B*T) of a padded
        batch x (B, T, hidden); GRIFFIN selects each row's neurons from that row's positions
        `prompt_at` (B, T bool)."""
        xs = gather_rows(x, at)
        if self.method != "griffin":
            return self._sparse(xs, prompt=None)
        selected = self._select(x, weights=prompt_at)[:, 0]  # (B, d_ff)
        mask = selected.index_select(0, at // x.shape[1])  # (N, d_ff): each position gets its row's selection
        self._count(mask.sum(), xs.shape[0])
        return self.down_proj(self.act_fn(self.gate_proj(xs)) * self.up_proj(xs) * mask)

    def _count(self, kept: torch.Tensor, tokens: int) -> None:
        if self.track_stats:  # summed on the device: no wait for the GPU in every layer
            self.stat_tokens += tokens
            self.stat_kept = self.stat_kept + kept

    def _sparse(self, x: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if self.method == "relu":
            a = F.relu(self.gate_proj(x))
            self._count((a != 0).sum(), tokens)
            return self.down_proj(a * self.up_proj(x))
        if self.method == "cats":
            a = self.act_fn(self.gate_proj(x))  # gate is read densely
            keep = a.abs() > self.threshold
            self._count(keep.sum(), tokens)
            return self.down_proj((a * keep) * self.up_proj(x))
        # griffin
        mask = self._select(prompt) if prompt is not None else self._selected
        if mask is None or mask.shape[:-2] != x.shape[:-2]:
            # A generation step without a prefill this wrapper saw (or another batch size): pick
            # the neurons from this step itself rather than fail.
            mask = self._select(x)
        self._count(mask.sum() * (tokens // max(1, mask.numel() // mask.shape[-1])), tokens)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h * mask)

    @torch.no_grad()
    def _select(self, prompt: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """GRIFFIN's expert selection: a (..., 1, d_ff) bool mask of the top-k neurons per sequence.
        `weights` (..., T) bool: the prompt tokens of each sequence (default: all of them)."""
        if prompt.dim() == 1:
            prompt = prompt[None]
        z = (self.act_fn(self.gate_proj(prompt)) * self.up_proj(prompt)).float()
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # each token's activation to unit norm
        if weights is not None:
            z = z * weights[..., None]
        score = z.norm(dim=-2)  # (..., d_ff): per-neuron norm over the prompt's tokens
        mask = torch.zeros_like(score, dtype=torch.bool)
        if self.keep > 0:
            mask.scatter_(-1, score.topk(self.keep, dim=-1).indices, True)
        return mask.unsqueeze(-2)


# -- finding, applying, restoring ----------------------------------------------------------------

def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, gated MLP module) of every decoder block (a BaselineMLP if one is applied)."""
    decoder_linears(model)  # UnsupportedModelError for anything that is not a Llama-family decoder
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(mlp)], mlp) for mlp in (_find_child_with(b, MLP_PROJ) for b in decoder_blocks(model))]


def baseline_layers(model: nn.Module) -> list[BaselineMLP]:
    return [m for m in model.modules() if isinstance(m, BaselineMLP)]


def restore_baselines_(model: nn.Module) -> nn.Module:
    """Put the original MLP modules back (lossless; weights were never modified)."""
    names = {id(m): n for n, m in model.named_modules()}
    for layer in baseline_layers(model):
        orig = layer.original
        for proj in MLP_PROJ:  # keep any projection swapped in while wrapped
            setattr(orig, proj, getattr(layer, proj))
        layer._selected = None
        replace_module(model, names[id(layer)], orig)
    return model


def set_baseline_token_mode(model: nn.Module, tokens: str) -> None:
    if tokens not in TOKEN_MODES:
        raise ValueError(f"unknown token mode {tokens!r}; expected one of {TOKEN_MODES}")
    for layer in baseline_layers(model):
        layer.tokens = tokens
        layer._selected = None


def _wrap(model: nn.Module, method: str, tokens: str) -> list[BaselineMLP]:
    if tokens not in TOKEN_MODES:
        raise ValueError(f"unknown token mode {tokens!r}; expected one of {TOKEN_MODES}")
    from rsparse.calibrate import restore_

    restore_(model)
    restore_baselines_(model)
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
        raise ValueError(f"{method}: give exactly one of sparsity (model-level) or mlp_sparsity")
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
        raise ValueError(f"calibration activations do not cover {name}.gate_proj (collected on another model?)")
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
    from rsparse.calibrate import (CalibrationActivations, calibrate_threshold, collect_activations,
                                   sample_module_inputs)

    if threshold is not None:
        if sparsity is not None or mlp_sparsity is not None:
            raise ValueError("cats: give a threshold or a sparsity target, not both")
        wrappers = _wrap(model, "cats", tokens)
        for w in wrappers:
            w.threshold = float(threshold)
        return _report("cats", wrappers, math.nan, math.nan, threshold=float(threshold))

    s, model_s = _target(model, "cats", sparsity, mlp_sparsity)
    if calibration is None:
        raise ValueError("cats needs calibration data (token windows or CalibrationActivations)")
    if not isinstance(calibration, CalibrationActivations):
        from rsparse.calibrate import restore_
        restore_(model)
        restore_baselines_(model)
        calibration = collect_activations(model, calibration, max_rows_per_layer, seed)
    wrappers = _wrap(model, "cats", tokens)
    for w in wrappers:
        rows = _mlp_inputs(calibration, w.name)
        w.threshold = _cats_threshold(w, rows, s, calibrate_threshold)
        w.mlp_sparsity = s
    if refine and s > 0 and calibration.windows is not None:
        mode = "all" if tokens == "all" else "second_half"
        saved = [w.tokens for w in wrappers]
        for w in wrappers:
            w.tokens = mode
        try:
            rows = sample_module_inputs(model, {w.name: w for w in wrappers}, calibration.windows,
                                        max_rows_per_layer, seed + 1, second_half=mode == "second_half")
        finally:
            for w, t in zip(wrappers, saved):
                w.tokens = t
        for w in wrappers:
            w.threshold = _cats_threshold(w, rows[w.name], s, calibrate_threshold)
    return _report("cats", wrappers, s, model_s)


def _cats_threshold(w: BaselineMLP, rows: torch.Tensor, s: float, calibrate_threshold) -> float:
    dev = w.gate_proj.weight.device
    out = []
    for chunk in rows.split(1024):
        out.append(w.act_fn(w.gate_proj(chunk.to(dev, w.gate_proj.weight.dtype))).abs().float().cpu())
    return calibrate_threshold(torch.cat(out), 1.0 - s)


@torch.no_grad()
def apply_baseline_(model: nn.Module, method: str, sparsity: float | None = None, **kwargs) -> dict:
    """Dispatch to apply_cats_ / apply_griffin_ / apply_relu_."""
    if method == "cats":
        return apply_cats_(model, sparsity, **kwargs)
    if method == "griffin":
        kwargs.pop("calibration", None)
        for k in ("refine", "max_rows_per_layer", "seed", "threshold"):
            kwargs.pop(k, None)
        return apply_griffin_(model, sparsity, **kwargs)
    if method == "relu":
        return apply_relu_(model, tokens=kwargs.get("tokens", "decode"))
    raise ValueError(f"unknown baseline {method!r}; expected one of {BASELINES}")


# -- measured sparsity --------------------------------------------------------------------------

def _skippable_bytes(w: BaselineMLP) -> int:
    return sum(getattr(w, p).weight.numel() * getattr(w, p).weight.element_size() for p in SKIPPED_PROJ[w.method])


def reset_baseline_stats(model: nn.Module, track: bool = True) -> None:
    for w in baseline_layers(model):
        w.track_stats = track
        w.reset_stats()


def measured_baseline_sparsity(model: nn.Module) -> dict:
    """Achieved sparsity from the wrappers' statistics: MLP-level (fraction of neurons skipped per
    sparsified token) and model-level (skipped bytes / all 7 projections' bytes). NaN if no
    token was sparsified. ReLUfication: achieved 0 (no weight is skipped), module_sparsity = the
    zero fraction of ReLU(gate(x)), skippable_sparsity = the model-level share CATS-style
    skipping of those zeros would save."""
    layers = baseline_layers(model)
    if not layers:
        return {"achieved_sparsity": 0.0, "module_sparsity": 0.0, "layers": {}}
    total = linear_bytes(model)["total"]
    skipped = 0.0
    per_layer = {}
    module = []
    for w in layers:
        if w.stat_tokens == 0:
            return {"achieved_sparsity": math.nan, "module_sparsity": math.nan, "layers": {}}
        frac = 1.0 - float(w.stat_kept) / (w.stat_tokens * w.intermediate_size)
        per_layer[w.name] = frac
        module.append(frac)
        skipped += frac * _skippable_bytes(w)
    out = {"achieved_sparsity": skipped / total, "module_sparsity": sum(module) / len(module), "layers": per_layer}
    if layers[0].method == "relu":
        # ReLUfication reads every weight; what CATS-style skipping of its zeros would save is
        # reported separately, and module_sparsity is the zero fraction of ReLU(gate(x)).
        out["skippable_sparsity"] = out["achieved_sparsity"]
        out["achieved_sparsity"] = 0.0
    return out
