"""The R-Sparse linear layer.

    y = m(x) W^T + (x - m(x)) (A B)^T

m(x) keeps the input channels whose score exceeds a per-layer threshold calibrated offline:
score_j = |x_j| * c_j, with c_j = ||W[:, j]||_2 when the layer mixes in a low-rank path (a
dropped channel then costs what its weight column would have contributed) and c_j = 1 for pure
sparse layers. A (out, r) and B (r, in) are rank-r factors of W; the dropped channels go
through them instead of being lost.

Storage is laid out for decoding: the weight is kept column-major (its transpose is contiguous,
so a kept input channel is one contiguous row in memory) and the factors are stored as
lr_down = B^T (in, r) and lr_up = A^T (r, out). On CUDA, single-token decode steps that are
compiled or captured in a CUDA graph (the decode engine's) use the fused Triton kernel of
rsparse.runtime.kernels; everywhere else, eager calls included, a torch reference path computes
the same function with masked dense math.

Which tokens are sparsified is a per-layer setting (`tokens`, rsparse.core.sparse_modules):
decode steps only, the second half of each sequence, all or none. In a right-padded batch
(lm-eval's), the evaluator declares each row's real length L with `scored_lengths`, and the
"second_half" positions are L//2 <= t < L.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from rsparse.runtime import ops
from rsparse.runtime.ops import MAX_BATCH_ROWS, kernel_runs_on
from rsparse.core.config import LAYER_METHODS  # noqa: F401 (re-exported) what one layer does at a sparse token
from rsparse.core.sparse_modules import TOKEN_MODES, SparseModule  # noqa: F401 (TOKEN_MODES re-exported)
from rsparse.errors import BadInputError


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """Same (out, in) tensor, stored so that weight.t() is contiguous."""
    return weight.detach().t().contiguous().t()


# {"lengths": (B,) real lengths of the rows of a right-padded batch, "masks": the halves built from
# them} declared by the evaluator around one forward pass; None for unpadded input.
_SCORED_LENGTHS: contextvars.ContextVar = contextvars.ContextVar("rsparse_scored_lengths", default=None)


@contextlib.contextmanager
def scored_lengths(lengths):
    """Declare the real length of each row of a right-padded batch for the forward calls in the
    block, so that "second_half" sparsifies the second half of each real sequence."""
    declared = None if lengths is None else {"lengths": torch.as_tensor(lengths, dtype=torch.long), "masks": {}}
    token = _SCORED_LENGTHS.set(declared)
    try:
        yield
    finally:
        _SCORED_LENGTHS.reset(token)


def padded_positions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(first_half, second_half, second_index) for a right-padded batch x (B, T, ...) whose row
    lengths are declared: (B, T) bool masks of each real row's halves (t < L//2 and
    L//2 <= t < L), and the flat indices (into B*T) of the second-half positions, in row-major
    order; None when no lengths are declared for a batch of x's size. Built once per batch and
    shared by every layer of the forward pass: gathering with the index, unlike boolean
    indexing, does not stop each layer to wait for the GPU."""
    declared = _SCORED_LENGTHS.get()
    if declared is None or x.dim() != 3 or declared["lengths"].numel() != x.shape[0]:
        return None
    key = (x.shape[1], x.device)
    if key not in declared["masks"]:
        t = torch.arange(x.shape[1], device=x.device)
        n = declared["lengths"].to(x.device)[:, None]
        first, second = t < n // 2, (t >= n // 2) & (t < n)
        declared["masks"][key] = (first, second, second.reshape(-1).nonzero()[:, 0])
    return declared["masks"][key]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of x (B, T, C) at flat positions `index` (same as x[mask] for the mask the
    index came from)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def scatter_rows_(y: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """y[mask] = rows, in place, for the mask `index` came from; y (B, T, C) contiguous."""
    y.view(-1, y.shape[-1]).index_copy_(0, index, rows.to(y.dtype))
    return y


class RSparseLinear(SparseModule, nn.Linear):
    """Drop-in replacement of nn.Linear; see the module docstring for the math."""

    weight_bits = 16  # a 16-bit (or fp32) weight: the 16-bit kernel (4: Int4RSparseLinear)

    def __init__(self, in_features: int, out_features: int, rank: int = 0, bias: bool = False,
                 device=None, dtype=None, name: str = ""):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.name = name
        self.rank = int(rank)
        self.method = "dense"
        self.tokens = "decode"
        self.keep_fraction = 1.0  # target kept-channel fraction this layer was calibrated for
        self.register_buffer("threshold", torch.tensor(-math.inf, device=device, dtype=torch.float32))
        self.register_buffer("score_scale", torch.ones(in_features, device=device, dtype=torch.float32))
        self.register_buffer("lr_down", torch.zeros(in_features, self.rank, device=device, dtype=dtype))
        self.register_buffer("lr_up", torch.zeros(self.rank, out_features, device=device, dtype=dtype))
        # "auto": the Triton kernel for sparse calls of <= 8 rows on CUDA when compiled or
        # captured in a CUDA graph (rsparse.runtime.ops.kernel_pays), the torch reference
        # elsewhere (eager calls included: there it costs less host time); "always": the kernel
        # wherever Triton runs (on CPU only under TRITON_INTERPRET=1, for tests); "never": the
        # torch reference.
        self.kernel = "auto"
        self.track_stats = False
        self.reset_stats()

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "RSparseLinear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank=0, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype, name=name)
        layer.weight = nn.Parameter(column_major(w), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        for buf, value in (("threshold", torch.tensor(-math.inf)), ("score_scale", torch.ones(linear.in_features)),
                           ("lr_down", torch.zeros(linear.in_features, 0)), ("lr_up", torch.zeros(0, linear.out_features))):
            dtype = torch.float32 if buf in ("threshold", "score_scale") else w.dtype
            setattr(layer, buf, value.to(device=w.device, dtype=dtype))
        return layer

    def to_linear(self) -> nn.Linear:
        """The original dense layer (same weight values), e.g. to undo sparsification."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = nn.Parameter(self.weight.detach().contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear

    # -- configuration ------------------------------------------------------------------
    def configure(self, method: str, threshold: float, keep_fraction: float,
                  score_scale: torch.Tensor | None = None, lr_down: torch.Tensor | None = None,
                  lr_up: torch.Tensor | None = None) -> None:
        if method not in LAYER_METHODS:
            raise BadInputError(f"unknown method {method!r}; expected one of {LAYER_METHODS}")
        dev, dt = self.weight.device, self.weight.dtype
        self.method = method
        self.keep_fraction = float(keep_fraction)
        self.threshold = torch.tensor(float(threshold), device=dev, dtype=torch.float32)
        self.score_scale = (torch.ones(self.in_features) if score_scale is None else score_scale).to(dev, torch.float32)
        if lr_down is None:
            lr_down = torch.zeros(self.in_features, 0)
            lr_up = torch.zeros(0, self.out_features)
        if lr_down.shape[0] != self.in_features or lr_up.shape[1] != self.out_features or lr_down.shape[1] != lr_up.shape[0]:
            raise ValueError(f"{self.name}: low-rank factors {tuple(lr_down.shape)} x {tuple(lr_up.shape)} do not fit "
                             f"a layer of shape ({self.out_features}, {self.in_features})")
        self.rank = lr_down.shape[1]
        self.lr_down = lr_down.to(dev, dt).contiguous()
        self.lr_up = lr_up.to(dev, dt).contiguous()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, method={self.method}, keep={self.keep_fraction:.3f}, "
                f"rank={self.rank}, tokens={self.tokens}")

    # -- statistics ---------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stat_tokens = 0  # sparsified tokens seen
        self.stat_kept = 0  # kept channels summed over those tokens (int or 0-dim tensor: read with float())

    def dense_module(self) -> nn.Linear:
        return self.to_linear()

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "dense" or self.tokens == "none":
            return self._dense(x)
        one_token = x.dim() == 1 or x.shape[-2] == 1  # a decode step: one token per sequence
        if self.tokens == "all" or (self.tokens == "decode" and one_token):
            return self._sparse(x)
        if self.tokens == "second_half" and x.dim() >= 2 and x.shape[-2] > 1:
            # Dense over the whole sequence, then the second half replaced: the first half is
            # then bit-identical to the dense model's (same GEMM shapes), not just close.
            y = self._dense(x)
            halves = padded_positions(x)
            if halves is None:
                half = x.shape[-2] // 2
                y[..., half:, :] = self._sparse(x[..., half:, :])
            else:  # the second half of each real row of a right-padded batch
                at = halves[2]
                scatter_rows_(y, at, self._sparse(gather_rows(x, at)))
            return y
        return self._dense(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Kept-channel mask m for inputs x (..., in)."""
        # bf16/fp16 |x| times the fp32 scale is computed in fp32 (type promotion): no cast of its own
        return (x.abs() * self.score_scale) > self.threshold

    def runs_kernel(self, x: torch.Tensor) -> bool:
        """Whether forward(x) is one call of the fused kernel op (a sparse step, kernel allowed
        and able to run here, statistics off): then decoders may fuse it with its siblings."""
        one_token = x.dim() == 1 or x.shape[-2] == 1
        sparse = self.method != "dense" and (self.tokens == "all" or self.tokens == "decode" and one_token)
        return sparse and not self.track_stats and self._kernel_allowed(x) and kernel_runs_on(x.device)

    def _kernel_allowed(self, x: torch.Tensor) -> bool:
        """The `kernel` setting applied to a sparse call on x (see __init__)."""
        return self.kernel == "always" or (self.kernel == "auto" and x.is_cuda
                                           and x.numel() // self.in_features <= MAX_BATCH_ROWS and ops.kernel_pays(x))

    def kernel_args(self) -> tuple:
        """(w_t, threshold, score_scale, lr_down, lr_up, bias): this layer as the kernel op takes it."""
        return (self.weight.t(), self.threshold, self.score_scale, self.lr_down if self.rank else None,
                self.lr_up if self.rank else None, self.bias)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        keep = None
        if self.track_stats:  # for measurement, never inside a CUDA graph; summed on device (no sync)
            keep = self.mask(x)
            self.stat_tokens += keep.numel() // self.in_features
            self.stat_kept = self.stat_kept + keep.sum()
        if self._kernel_allowed(x):
            if kernel_runs_on(x.device):  # a torch.library op: torch.compile traces through it
                return ops.decode_linear(x, *self.kernel_args())
            if self.kernel == "always":
                raise RuntimeError("kernel='always' but Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
        # as few ops as the math allows: an eager decode step is host-bound, ~10 us per op
        kept = x * (self.mask(x) if keep is None else keep)
        y = F.linear(kept, self.weight, self.bias)
        if self.rank:
            y = y + (x - kept) @ self.lr_down @ self.lr_up  # x * ~keep, one op fewer
        return y


def rsparse_layers(model: nn.Module) -> list[RSparseLinear]:
    return [m for m in model.modules() if isinstance(m, RSparseLinear)]
