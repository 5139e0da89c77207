"""4-bit weights for sparse layers, laid out for the sparse decode kernel (issue #26).

A layer W (out, in) is stored as an :class:`Int4Weight`:

    qweight       (in, out // 2) uint8  row j = input channel j, all its output rows, read as
                                        out // 8 little-endian int32 words: nibble k (bits 4k..4k+3)
                                        of word i is output k * out // 8 + i
    scales_zeros  (in // group, out, 2) bf16  (scale, zero) of group g for every output row
    W[n, j] = (q[j, n] - 8) * scale[g, n] + zero[g, n],   g = j // group_size,  q in 0..15

Why this layout. The sparse kernel reads only the input channels a token keeps, so what one kept
channel needs is contiguous: its row of qweight (out / 2 bytes) and its group's row of
scales_zeros (4 * out bytes, shared by the group's channels). Packing runs along the OUTPUT
dimension, never across input channels, so skipping a channel never drags a neighbour's nibbles
in. The row is read in 4-byte words (measured faster than reading bytes:
docs/int4-kernel.md), and the 8 nibbles of a word belong to 8 "planes" of out / 8 consecutive
outputs: a kernel tile of words i0 .. i1 yields 8 contiguous runs of outputs, so its scale/zero
loads and its output adds are contiguous (with outputs 8i .. 8i + 7 in one word they would be
8-way strided).

Groups run along the input dimension (one scale and zero per output row and 128 consecutive input
channels by default). Two costs set the size: the scale/zero bytes per weight (4 bytes per group
and output: 0.25 bits per weight at 128, 1 bit at 32) and the granularity of skipping: the kernel
can skip weights channel by channel, but a group's scale/zero row is read whenever any of its
channels is kept, which at 50% sparsity is nearly every group. At 128 the scales stay 1/8 of the
kept 4-bit bytes at 50% density; group 32 would make them half, for a relative quantisation error
only 22% lower (RTN, Gaussian weights: 0.078 against 0.100; Student-t(5): 0.090 against 0.132).
128 is also the usual size of tinygemm and gemlite.

Quantisation: asymmetric round-to-nearest per (output row, input group) with an integer zero
point (GPTQ's and AWQ's convention): the range [min(w, 0), max(w, 0)] gives scale = range / 15 and
the zero point z = round(-min / scale), so W = (q - z) * scale and 0 is on the grid; stored as
zero = (8 - z) * scale in bf16. The codes are rounded against the stored (bf16) scale and zero,
so dequantize() is the value the kernels multiply by. Measured on the embedded SmolLM2 (groups
of 128, `rsparse eval --weights int4 --quantizer rtn`, BoolQ perplexity, 16 windows of 512;
16-bit: 18.68): 24.50 with the integer zero point against 27.25 with the float zero at the group's
minimum that this module used first (zero = min + 8 * scale; same stored format, other values);
full validation sets, 8 tasks: 43.66 against 42.89 (docs/int4-kernel.md). The
(q - 8) * scale + zero convention and the (groups, out, 2) bf16 tensor are exactly what torch's
tinygemm op (`aten._weight_int4pack_mm`) takes, so the dense 4-bit path (prefill, dense rows)
shares scales_zeros with the sparse kernel and only repacks the codes
(rsparse.runtime.kernels.int4_dense).

`rounding="hqq"` takes each group's scale and (float) zero from HQQ instead, in the same format;
on the CPU protocol above it lowers BoolQ perplexity by 4.5-4.9% against RTN (dense 24.50 ->
23.40, sparse-only 50% 37.12 -> 35.31, R-Sparse 50% 41.76 -> 39.75; docs/int4-kernel.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes tinygemm (the dense path) accepts
DEFAULT_GROUP_SIZE = 128
MIDPOINT = 8  # code of the zero: W = (q - MIDPOINT) * scale + zero
ROUNDINGS = ("rtn", "hqq")  # how quantize() picks scales and zeros (the format is the same)


class Int4Weight(NamedTuple):
    """A 4-bit (out, in) weight in the sparse kernel's layout (module docstring)."""
    qweight: torch.Tensor  # (in, out // 2) uint8
    scales_zeros: torch.Tensor  # (in // group_size, out, 2) bf16

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales_zeros.shape[1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales_zeros.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size()

    def to(self, device) -> "Int4Weight":
        return Int4Weight(self.qweight.to(device), self.scales_zeros.to(device))


def check_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    if out_features % 8:  # whole int32 words per row (and tinygemm's N % 8)
        raise ValueError(f"out_features {out_features} is not a multiple of 8")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(in, out) integer codes 0..15 -> (in, out // 2) uint8 in the planar word order of the
    module docstring (out % 8 == 0)."""
    rows, out = codes.shape
    if out % 8:
        raise ValueError(f"out {out} is not a multiple of 8 (whole int32 words per row)")
    if bool(((codes > 15) | (codes < 0)).any()):
        raise ValueError("codes must lie in 0..15")
    c = codes.to(torch.uint8).reshape(rows, 8, out // 8).transpose(1, 2)  # [j, word i, nibble k]
    return (c[..., 0::2] | (c[..., 1::2] << 4)).reshape(rows, out // 2)  # byte b: nibbles 2b, 2b+1


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """(in, out // 2) uint8 -> (in, out) uint8 codes 0..15 (inverse of pack_nibbles)."""
    rows, half = qweight.shape
    b = qweight.reshape(rows, half // 4, 4)  # [j, word i, byte]
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(rows, half // 4, 8)  # [j, i, nibble k]
    return nib.transpose(1, 2).reshape(rows, half * 2)


def quantize(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, rounding: str = "rtn") -> Int4Weight:
    """4-bit quantisation of weight (out, in) in groups of group_size input channels per output row
    (computed in fp32 on weight's device). rounding picks each group's scale and zero: "rtn" (an
    integer zero point, module docstring) or "hqq" (HQQ's half-quadratic optimisation of the zero;
    the `hqq` package, `rsparse[quant]`). Either way the codes are then rounded to nearest against
    the stored bf16 scale and zero."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    out_f, in_f = weight.shape
    check_shape(out_f, in_f, group_size)
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    scale, zero = (_rtn_scale_zero if rounding == "rtn" else _hqq_scale_zero)(w)  # (out, groups) bf16
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.round((w - z) / s + MIDPOINT).clamp_(0, 15).reshape(out_f, in_f)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # (groups, out, 2)
    return Int4Weight(pack_nibbles(codes.t()).contiguous(), scales_zeros)


def _rtn_scale_zero(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, groups, group) fp32 -> bf16 scale and stored zero with an integer zero point."""
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # (out, groups); the range holds 0
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(torch.bfloat16)
    zero_code = torch.round(-lo / scale.float()).clamp_(0, 15)  # integer zero point: 0 is on the grid
    return scale, ((MIDPOINT - zero_code) * scale.float()).to(torch.bfloat16)


def _hqq_scale_zero(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, groups, group) fp32 -> bf16 scale and stored zero from HQQ (calibration-free; it
    minimises an l_p<1 norm of the rounding error, so outliers cost less than with RTN's range).
    HQQ's W = (q - z) * s is our (q - 8) * s + (8 - z) * s."""
    from hqq.core.quantize import Quantizer

    out_f, groups, group = w.shape
    _, meta = Quantizer.quantize(w.reshape(out_f, groups * group), nbits=4, group_size=group, optimize=True,
                                 round_zero=True, axis=1, bitpack=False, device=str(w.device))
    s = meta["scale"].float().reshape(out_f, groups)  # one row per (output, group), in that order
    z = meta["zero"].float().reshape(out_f, groups)
    return s.to(torch.bfloat16), ((MIDPOINT - z) * s).to(torch.bfloat16)


def dequantize(p: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight the kernels compute with: (q - 8) * scale + zero, in fp32, then
    cast to dtype."""
    codes = unpack_nibbles(p.qweight).float()  # (in, out)
    sz = p.scales_zeros.float().repeat_interleave(p.group_size, dim=0)  # (in, out, 2)
    return ((codes - MIDPOINT) * sz[..., 0] + sz[..., 1]).t().to(dtype)
