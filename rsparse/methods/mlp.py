"""The MLP wrapper of the paper's training-free baselines (CATS, GRIFFIN, ReLUfication), their
budgets and their measured sparsity; rsparse.methods.baselines applies them.

Each baseline wraps the gated MLP of every decoder block (the module holding gate_proj,
up_proj, down_proj, found by structure as in rsparse.core.models) in a `BaselineMLP`. The wrapper
registers the same three projection modules under the same names, so parameter names, the
state dict and `decoder_linears` are unchanged; `rsparse.restore_` puts the original MLP
modules back (lossless: the weights are never touched). One method at a time: applying a
baseline first undoes any R-Sparse layers and other baseline, and vice versa.

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
(the budget of rsparse.core.budget). CATS can reach at most (up+down)/all and GRIFFIN
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
In a right-padded batch whose row lengths the evaluator declares (rsparse.core.layer.scored_lengths),
the halves and GRIFFIN's selection are those of each real row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsparse.core.budget import check_sparsity
from rsparse.core.config import BASELINES
from rsparse.core.layer import gather_rows, padded_positions, scatter_rows_
from rsparse.core.models import MLP_PROJ, _find_child_with, decoder_blocks, decoder_linears
from rsparse.core.sparse_modules import SparseModule
from rsparse.errors import BadInputError, UnreachableSparsityError, UnsupportedModelError

# Projections whose bytes each method can skip.
SKIPPED_PROJ = {"cats": ("up_proj", "down_proj"), "griffin": ("gate_proj", "up_proj", "down_proj"),
                "relu": ("up_proj", "down_proj")}
LABELS = {"cats": "CATS", "griffin": "GRIFFIN", "relu": "ReLUfication"}


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
        raise BadInputError(f"unknown baseline {method!r}; expected one of {BASELINES}")
    b = linear_bytes(model)
    return sum(b[k] for k in SKIPPED_PROJ[method]) / b["total"]


def model_sparsity_for(model: nn.Module, method: str, mlp_sparsity: float) -> float:
    """Model-level sparsity of an MLP sparsity s: s * (skipped projections' bytes) / (all 7)."""
    return check_sparsity(mlp_sparsity, f"{method} MLP sparsity") * skippable_share(model, method)


def mlp_sparsity_for(model: nn.Module, method: str, target: float) -> float:
    """The MLP sparsity that gives a model-level target; UnreachableSparsityError if it is >= 1."""
    target = check_sparsity(target, "target sparsity")
    if method == "relu":
        raise BadInputError("ReLUfication has no sparsity target (it only swaps the activation)")
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

class BaselineMLP(SparseModule, nn.Module):
    """Wraps a gated MLP; see the module docstring. Keeps the original module for the dense
    path (bit-identical outputs) and to put back (`dense_module`, rsparse.restore_)."""

    def __init__(self, mlp: nn.Module, method: str, name: str = ""):
        super().__init__()
        if method not in BASELINES:
            raise BadInputError(f"unknown baseline {method!r}; expected one of {BASELINES}")
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

    def forget_prompt(self) -> None:
        self._selected = None

    def dense_module(self) -> nn.Module:
        """The original MLP, holding the projections (any swapped in while wrapped)."""
        for proj in MLP_PROJ:
            setattr(self._orig, proj, getattr(self, proj))
        self._selected = None
        return self._orig

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


# -- finding ------------------------------------------------------------------------------------

def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, gated MLP module) of every decoder block (a BaselineMLP if one is applied)."""
    decoder_linears(model)  # UnsupportedModelError for anything that is not a Llama-family decoder
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(mlp)], mlp) for mlp in (_find_child_with(b, MLP_PROJ) for b in decoder_blocks(model))]


def baseline_layers(model: nn.Module) -> list[BaselineMLP]:
    return [m for m in model.modules() if isinstance(m, BaselineMLP)]


# -- measured sparsity --------------------------------------------------------------------------

def _skippable_bytes(w: BaselineMLP) -> int:
    return sum(getattr(w, p).weight.numel() * getattr(w, p).weight.element_size() for p in SKIPPED_PROJ[w.method])


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
