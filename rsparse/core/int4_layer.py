"""R-Sparse layers on 4-bit weights (issue #26): the layer, and the two steps that make a model's
layers 4-bit.

    quantize_int4_(model, group_size)   round each decoder projection's weight to the 4-bit grid
                                        (rsparse.core.int4, RTN or HQQ), kept in its float dtype: calibration,
                                        thresholds and low-rank factors then fit the 4-bit weights
    pack_int4_(model)                   each RSparseLinear becomes an Int4RSparseLinear holding the
                                        codes (exact: the weights are on the grid already)

`sparsify_` runs both when `RSparseConfig.weight_bits == 4`. The low-rank factors, threshold,
score scale and bias stay as they were (factors in the model's dtype: at rank ~0.05 of the layer
they are small next to the 4-bit codes).

Where the layer runs what:
  dense calls (prefill, dense layers, tokens "none")  torch.ops.rsparse.int4_linear: tinygemm on
                                                      CUDA (bf16/fp16), torch's CPU int4 op, else
                                                      dequantize and multiply
  sparse calls, kernel allowed (RSparseLinear rules)  torch.ops.rsparse.int4_decode_linear
  other sparse calls (eager, CPU, many rows)          the dense 4-bit product of the kept channels,
                                                      plus the low-rank term
"""

from __future__ import annotations

import torch
from torch import nn

from rsparse.core.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, Int4Weight, dequantize, quantize
from rsparse.core.layer import RSparseLinear, rsparse_layers
from rsparse.core.models import decoder_linears, replace_module
from rsparse.errors import BadInputError

SCALES_DTYPE = torch.bfloat16  # scales_zeros' dtype (the kernels' and tinygemm's)


def layer_group_size(in_features: int, requested: int = DEFAULT_GROUP_SIZE) -> int:
    """The group size a layer of in_features inputs gets: `requested` where it divides the width,
    else the largest smaller one that does (SmolLM2's 576 = 4.5 x 128 -> 64)."""
    if requested not in GROUP_SIZES:
        raise BadInputError(f"group size must be one of {GROUP_SIZES}, got {requested!r}")
    for g in sorted((g for g in GROUP_SIZES if g <= requested), reverse=True):
        if in_features % g == 0:
            return g
    raise BadInputError(f"a layer of {in_features} input channels has no 4-bit group size "
                        f"<= {requested} that divides it ({GROUP_SIZES})")


class Int4RSparseLinear(RSparseLinear):
    """RSparseLinear whose weight is stored as 4-bit codes (rsparse.core.int4): buffers `qweight`
    (in, out/2) uint8 and `scales_zeros` (in/group, out, 2) bf16 instead of the `weight`
    parameter. `weight` still reads as the (out, in) dequantized matrix, computed on each access
    (for inspection, statistics and undoing; no forward path reads it)."""

    weight_bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int, rank: int = 0,
                 bias: bool = False, device=None, dtype=None, name: str = ""):
        super().__init__(in_features, out_features, rank=rank, bias=bias, device=device, dtype=dtype, name=name)
        del self._parameters["weight"]  # the codes replace it (see `weight`)
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                         dtype=SCALES_DTYPE, device=device))
        # tinygemm's packing of the codes for the device they are on (int4_dense.tinygemm_pack),
        # derived: rebuilt whenever the module moves (_apply), never saved
        self.register_buffer("packed", None, persistent=False)

    @classmethod
    def from_rsparse(cls, layer: RSparseLinear, group_size: int, codes: Int4Weight | None = None) -> "Int4RSparseLinear":
        """The same layer with its weight in 4 bits: `codes` where they hold the layer's weight
        exactly (what quantize_int4_ rounded it to), else quantized here (RTN, `group_size` inputs
        per group). Re-quantizing rounded weights is not exact in general (a group whose top code
        went unused gets a finer grid), hence the codes are handed over, not recomputed."""
        w = layer.weight
        if codes is None or codes.group_size != group_size or not torch.equal(dequantize(codes, w.dtype), w):
            codes = quantize(w.detach(), group_size)
        q = codes
        new = cls(layer.in_features, layer.out_features, group_size, rank=layer.rank,
                  bias=layer.bias is not None, device="meta", dtype=w.dtype, name=layer.name)
        new.method, new.tokens, new.keep_fraction, new.kernel = layer.method, layer.tokens, layer.keep_fraction, layer.kernel
        new.qweight, new.scales_zeros = q.qweight, q.scales_zeros
        for buf in ("threshold", "score_scale", "lr_down", "lr_up"):
            setattr(new, buf, getattr(layer, buf))
        if layer.bias is not None:
            new.bias = layer.bias
        new.compute_dtype = w.dtype
        new.repack()
        return new

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales_zeros.shape[0]

    @property
    def int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales_zeros)

    @property
    def weight(self) -> torch.Tensor:  # noqa: D401 - see the class docstring
        return dequantize(self.int4, self.compute_dtype)

    def repack(self) -> None:
        """(Re)build the tinygemm packing for the codes' device (None where torch has no int4 op)."""
        from rsparse.runtime.kernels.int4_dense import tinygemm_pack

        self.packed = None if self.qweight.device.type == "meta" else tinygemm_pack(self.int4)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.settle()
        return self

    def settle(self) -> None:
        """After a move, a cast or a load: model.to(dtype) (and a load in another dtype) casts
        every floating buffer, but the scales stay bf16 (exact: they were bf16); the compute dtype
        follows the factors; on a new device the codes are repacked for tinygemm."""
        if self.scales_zeros.dtype != SCALES_DTYPE:
            self.scales_zeros = self.scales_zeros.to(SCALES_DTYPE)
        self.compute_dtype = self.lr_down.dtype
        if self.packed is None or self.packed.device != self.qweight.device:
            self.repack()

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with the dequantized weight (what this layer computes densely)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=self.compute_dtype)
        linear.weight = nn.Parameter(self.weight.contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear

    def configure(self, *args, **kwargs) -> None:
        raise RuntimeError(f"{self.name}: a 4-bit layer is packed after calibration; configure the 16-bit layer, "
                           "then pack it (Int4RSparseLinear.from_rsparse)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int4 group={self.group_size}"

    # -- forward ------------------------------------------------------------------------
    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        # the plain function, not its custom op: torch.compile traces it as it is (aten ops), and
        # an op's output could not be written into in place (the second_half path does that)
        from rsparse.runtime.kernels.int4_dense import int4_linear

        return int4_linear(x, self.qweight, self.scales_zeros, self.packed, self.bias)

    def kernel_args(self) -> tuple:
        """(qweight, scales_zeros, threshold, score_scale, lr_down, lr_up, bias, packed): this
        layer as the 4-bit kernel ops take it."""
        return (self.qweight, self.scales_zeros, self.threshold, self.score_scale,
                self.lr_down if self.rank else None, self.lr_up if self.rank else None, self.bias, self.packed)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        from rsparse.runtime import int4_ops
        from rsparse.runtime.ops import kernel_runs_on

        keep = None
        if self.track_stats:
            keep = self.mask(x)
            self.stat_tokens += keep.numel() // self.in_features
            self.stat_kept = self.stat_kept + keep.sum()
        if self._kernel_allowed(x):
            if kernel_runs_on(x.device):
                return int4_ops.int4_decode_linear(x, *self.kernel_args())
            if self.kernel == "always":
                raise RuntimeError("kernel='always' but Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
        # the same function through the dense 4-bit product of the kept channels (tinygemm where
        # it pays; dequantizing the whole layer per call cost CPU decoding 7x)
        kept = x * (self.mask(x) if keep is None else keep)
        y = self._dense(kept)
        if self.rank:
            y = y + (x - kept) @ self.lr_down @ self.lr_up
        return y


def int4_layers(model: nn.Module) -> list[Int4RSparseLinear]:
    return [m for m in model.modules() if isinstance(m, Int4RSparseLinear)]


PENDING_CODES = "_rsparse_int4_codes"  # model attribute: quantize_int4_'s codes, until pack_int4_ takes them


@torch.no_grad()
def quantize_int4_(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE, rounding: str = "rtn") -> list[dict]:
    """Round the weight of each decoder projection (nn.Linear or RSparseLinear) to the 4-bit grid in
    place (rsparse.core.int4.quantize with `rounding`; its float dtype kept), keeping the codes on the model
    for pack_int4_. Returns one {"name", "group_size", "relative_error"} per layer."""
    report, codes = [], {}
    for lin in decoder_linears(model):
        w = lin.module.weight
        if isinstance(lin.module, Int4RSparseLinear):
            continue  # already 4-bit
        g = layer_group_size(w.shape[1], group_size)
        codes[lin.name] = quantize(w, g, rounding)
        q = dequantize(codes[lin.name], w.dtype)
        err = float((q.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        w.copy_(q)  # copy_ keeps R-Sparse layers' column-major storage
        report.append({"name": lin.name, "group_size": g, "relative_error": err})
    model.__dict__[PENDING_CODES] = codes
    return report


@torch.no_grad()
def pack_int4_(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> list[Int4RSparseLinear]:
    """Replace every RSparseLinear of the model by its Int4RSparseLinear (see the module docstring);
    after a rounding pass (quantize_int4_) the layers take its codes, so this is exact."""
    names = {id(m): n for n, m in model.named_modules()}
    pending = model.__dict__.pop(PENDING_CODES, {})
    packed = []
    for layer in rsparse_layers(model):
        if isinstance(layer, Int4RSparseLinear):
            continue
        new = Int4RSparseLinear.from_rsparse(layer, layer_group_size(layer.in_features, group_size),
                                             pending.get(names[id(layer)]))
        replace_module(model, names[id(layer)], new)
        packed.append(new)
    return packed
