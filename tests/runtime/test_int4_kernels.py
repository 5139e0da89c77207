"""Tests of the 4-bit weight format (rsparse/core/int4.py), the 4-bit decode kernel
(rsparse/runtime/kernels/triton_int4.py) and the dense 4-bit path (int4_dense.py).

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported); with CUDA the same tests run natively. Shapes are tiny: every call is interpreted.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402,F401  (a missing Triton fails here, never skips)

from rsparse.core import int4  # noqa: E402
from rsparse.runtime import int4_ops  # noqa: E402,F401  (registers torch.ops.rsparse.int4_*)
from rsparse.runtime.kernels import int4_dense  # noqa: E402
from rsparse.runtime.kernels import triton_int4 as T  # noqa: E402
from rsparse.runtime.kernels import triton_rsparse as K16  # noqa: E402

pytestmark = pytest.mark.kernel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # vs fp64, relative
# small tiles: several column tiles and chunks per group on tiny shapes
FMA = dict(BLOCK_N=32, CH=32, G=8, BLOCK_KR=16, BLOCK_R=16, BLOCK_KP=16, LR_BN=32, BLOCK_E=32)
DOT = dict(FMA, BLOCK_N=128, G=16)


def _layer(N, Kin, r, group=64, seed=0, dtype=torch.float32, bias=False):
    """A 4-bit layer on DEV: (Int4Weight, score scale, lr_down, lr_up, bias)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, Kin, generator=g) / Kin ** 0.5
    p = int4.quantize(w, group).to(DEV)
    s = (torch.rand(Kin, generator=g) + 0.5).to(DEV)
    d = (torch.randn(Kin, r, generator=g) / Kin ** 0.5).to(DEV, dtype) if r else None
    u = torch.randn(r, N, generator=g).to(DEV, dtype) if r else None
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    return p, s, d, u, b


def _x(M, Kin, dtype, seed=0):
    """Heavy-tailed (Laplace) activations: an exponential magnitude with a random sign."""
    g = torch.Generator().manual_seed(1000 + seed)
    mag = torch.empty(M, Kin).exponential_(1.0, generator=g)
    sign = torch.randint(0, 2, (M, Kin), generator=g) * 2 - 1
    return (mag * sign).to(DEV, dtype)


def _thr(x, s, keep):
    if keep in (0.0, 1.0):
        return float("inf") if keep == 0.0 else float("-inf")
    score = x.float().abs() * (1 if s is None else s)
    return float(torch.quantile(score.flatten().cpu(), 1.0 - keep))


def _fp64(x, p, thr, s, d, u, b):
    """The formula in float64 on the dequantized weight."""
    xd = x.double().reshape(-1, x.shape[-1])
    score = x.float().abs().reshape(xd.shape) * (1 if s is None else s.float())
    m = score > torch.tensor(thr, dtype=torch.float32)
    y = (xd * m) @ int4.dequantize(p, torch.float64).t()
    if d is not None:
        y = y + ((xd * ~m) @ d.double()) @ u.double()
    return y if b is None else y + b.double()


def _relerr(y, ref):
    y = y.double().reshape(ref.shape)
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(y, x, p, thr, s, d, u, b):
    assert y.dtype == x.dtype and torch.isfinite(y).all(), "unwritten or non-finite output"
    assert _relerr(y, _fp64(x, p, thr, s, d, u, b)) < TOL[x.dtype]


def _scratch_clean():
    for key, ent in K16._SCRATCH.items():
        if "ws" in ent and not ent["det"]:
            assert not ent["ws"].any() and not ent["z"].any(), key


# ------------------------------------------------------------------------------ the format

def test_pack_unpack_round_trip_and_int32_view():
    codes = torch.randint(0, 16, (5, 24), dtype=torch.uint8)
    packed = int4.pack_nibbles(codes)
    assert packed.shape == (5, 12) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack_nibbles(packed), codes)
    # read as little-endian int32 (what the kernel reads), nibble k of word i is output
    # k * out / 8 + i: 8 contiguous planes of 3 outputs here
    words = packed.view(torch.int32)
    for k in range(8):
        assert torch.equal(((words >> (4 * k)) & 0xF).to(torch.uint8), codes[:, 3 * k:3 * k + 3])
    with pytest.raises(ValueError):
        int4.pack_nibbles(torch.full((2, 4), 16))


def test_quantize_layout_error_and_grid_round_trip():
    w = torch.randn(16, 256) / 16
    p = int4.quantize(w, 64)
    assert p.qweight.shape == (256, 8) and p.scales_zeros.shape == (4, 16, 2)
    assert (p.in_features, p.out_features, p.group_size) == (256, 16, 64)
    deq = int4.dequantize(p)
    # round to nearest: every weight within half a step, plus what the bf16 scale and zero move
    # the grid's ends by (at most 15 / 256 + 8 / 256 of a step; the zero point is an integer)
    step = p.scales_zeros[..., 0].float().repeat_interleave(64, 0).t()
    assert ((deq - w).abs() <= (0.5 + 23 / 256) * step + 1e-6).all()
    # a kept input channel's weights are one contiguous row: row j of qweight is column j of W
    j = 77
    assert torch.equal(int4.unpack_nibbles(p.qweight[j:j + 1])[0].float() - 8,
                       ((deq[:, j] - p.scales_zeros[j // 64, :, 1].float())
                        / p.scales_zeros[j // 64, :, 0].float()).round())
    # an integer zero point: each group's zero value (8 - z) * scale with z in 0..15, so a weight
    # of 0 comes back as (nearly: the zero is stored in bf16) 0
    sz = p.scales_zeros.float()
    z = 8 - sz[..., 1] / sz[..., 0]
    assert ((z - z.round()).abs() < 0.02).all() and z.min() >= 0 and z.max() <= 15
    w0 = w.clone()
    w0[:, ::5] = 0
    p0 = int4.quantize(w0, 64)
    step0 = p0.scales_zeros[..., 0].float().repeat_interleave(64, 0).t()
    assert (int4.dequantize(p0)[:, ::5].abs() <= 0.02 * step0[:, ::5]).all()
    with pytest.raises(ValueError):
        int4.quantize(torch.randn(12, 256), 64)  # out not a multiple of 8
    with pytest.raises(ValueError):
        int4.quantize(torch.randn(16, 100), 64)  # in not a multiple of the group


def test_hqq_rounding_is_hqq_in_the_same_format():
    """rounding="hqq" stores HQQ's scales and zeros in the same format: it dequantizes to what HQQ
    itself gives (up to the bf16 scale and zero), and on heavy-tailed weights its mean absolute
    error (what HQQ's l_p<1 objective favours) is below RTN's."""
    from hqq.core.quantize import Quantizer

    torch.manual_seed(0)
    w = torch.distributions.StudentT(5.0).sample((32, 256)) * 0.02
    p, r = int4.quantize(w, 64, "hqq"), int4.quantize(w, 64)
    assert p.qweight.shape == r.qweight.shape and p.scales_zeros.shape == r.scales_zeros.shape
    codes, meta = Quantizer.quantize(w, nbits=4, group_size=64, optimize=True, round_zero=True, axis=1,
                                     bitpack=False, device="cpu")
    meta["compute_dtype"] = torch.float32
    ref = Quantizer.dequantize(codes, meta)
    step = p.scales_zeros[..., 0].float().repeat_interleave(64, 0).t()
    diff = (int4.dequantize(p) - ref).abs()
    assert (diff <= step * 1.02).all() and float((diff / step).mean()) < 0.02  # a code moves where bf16 shifts a boundary
    err_hqq = (int4.dequantize(p) - w).abs().mean()
    err_rtn = (int4.dequantize(r) - w).abs().mean()
    assert err_hqq < 0.99 * err_rtn
    with pytest.raises(ValueError, match="rounding must be one of"):
        int4.quantize(w, 64, "gptq")


# ------------------------------------------------------------------------------ the kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_rsparse_matches_dequantized_reference(M, dtype):
    p, s, d, u, b = _layer(48, 128, 5, group=64, seed=M, dtype=dtype, bias=M == 3)
    x = _x(M, 128, dtype, seed=M)
    thr = _thr(x, s, 0.45)
    out = torch.full((M, 48), float("nan"), dtype=dtype, device=DEV)
    y = T.int4_decode_linear(x, p.qweight, p.scales_zeros, thr, s, d, u, b, out=out,
                             _config=FMA if M == 1 else DOT)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, p, thr, s, d, u, b)
    _scratch_clean()


@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (4, torch.float32)])
def test_empty_and_full_masks(M, dtype):
    p, s, d, u, _ = _layer(32, 64, 3, group=32, seed=7, dtype=dtype)
    x = _x(M, 64, dtype, seed=7)
    cfg = FMA if M == 1 else DOT
    for keep in (0.0, 1.0):
        thr = _thr(x, s, keep)
        y = T.int4_decode_linear(x, p.qweight, p.scales_zeros, thr, s, d, u, _config=cfg)
        _check(y, x, p, thr, s, d, u, None)
    # nothing kept, no low-rank term: exact zeros, every element written
    out = torch.full((M, 32), float("nan"), dtype=dtype, device=DEV)
    y0 = T.int4_decode_linear(x, p.qweight, p.scales_zeros, float("inf"), out=out, _config=cfg)
    assert torch.equal(y0, torch.zeros_like(y0))
    _scratch_clean()


VARIANTS = {
    "lr_dot": dict(FMA, LR_DOT=True),  # batch 1: low-rank path on the tensor-core tiles
    "walk2d": dict(FMA, ROWS1D=False),  # (G, BLOCK_N) tiles of kept rows, one group ahead
    "shift_mask": dict(FMA, MANT=0),  # codes to floats by shift and mask, not byte permutes
    "m1_dot": dict(DOT, M1_DOT=True),  # batch 1 on the tensor-core path
    "dot_plain": dict(DOT, COMPACT=False, CH=32),  # batch: the chunk's rows in order, masked
    "lr_last_g4": dict(FMA, LR_G=4, LR_LAST=True, CH=16),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants(variant):
    M = 2 if variant == "dot_plain" else 1
    dtype = torch.bfloat16
    p, s, d, u, b = _layer(64, 128, 6, group=64, seed=11, dtype=dtype, bias=True)
    x = _x(M, 128, dtype, seed=11)
    thr = _thr(x, s, 0.4)
    y = T.int4_decode_linear(x, p.qweight, p.scales_zeros, thr, s, d, u, b,
                             _config=VARIANTS[variant])
    _check(y, x, p, thr, s, d, u, b)
    _scratch_clean()


@pytest.mark.parametrize("M", [1, 5])
def test_fused_group_of_three_unequal_widths(M):
    # q/k/v-like: 64 + 16 + 16 outputs (grouped-query k/v), own thresholds, factors and bias
    dtype = torch.float16
    x = _x(M, 128, dtype, seed=20 + M)
    layers = [_layer(n, 128, r, group=64, seed=20 + i, dtype=dtype, bias=i == 1)
              for i, (n, r) in enumerate(((64, 4), (16, 0), (16, 3)))]
    parts, refs = [], []
    for i, (p, s, d, u, b) in enumerate(layers):
        thr = torch.tensor([_thr(x, s, 0.3 + 0.2 * i)], device=DEV)  # read on the device
        parts.append((p.qweight, p.scales_zeros, thr, s, d, u, b))
        refs.append((p, thr.item(), s, d, u, b))
    ys = T.int4_decode_linear_multi(x, parts, _config=FMA if M == 1 else DOT)
    assert [tuple(y.shape) for y in ys] == [(M, 64), (M, 16), (M, 16)]
    for y, (p, thr, s, d, u, b) in zip(ys, refs):
        _check(y, x, p, thr, s, d, u, b)
    # the custom op computes the same
    cols = [list(c) for c in zip(*[pt + (None,) for pt in parts])]
    ys_op = torch.ops.rsparse.int4_decode_linear_multi(x, *cols)
    for y, y_op in zip(ys, ys_op):
        assert _relerr(y_op, y.double()) < TOL[dtype]
    _scratch_clean()


def test_silu_mul_epilogue():
    dtype = torch.bfloat16
    x = _x(1, 64, dtype, seed=30)
    (pg, sg, dg, ug, _), (pu, su, du, uu, _) = [_layer(32, 64, 2, 32, 30 + i, dtype)
                                                for i in range(2)]
    tg, tu = _thr(x, sg, 0.5), _thr(x, su, 0.5)
    h = T.int4_decode_linear_silu_mul(x, (pg.qweight, pg.scales_zeros, tg, sg, dg, ug),
                                      (pu.qweight, pu.scales_zeros, tu, su, du, uu), _config=FMA)
    g, up = _fp64(x, pg, tg, sg, dg, ug, None), _fp64(x, pu, tu, su, du, uu, None)
    assert _relerr(h, torch.nn.functional.silu(g) * up) < 2e-2
    _scratch_clean()


def test_op_matches_reference_and_fake_shape():
    dtype = torch.float32
    p, s, d, u, b = _layer(24, 64, 2, group=32, seed=40, dtype=dtype, bias=True)
    x = _x(2, 64, dtype, seed=40).reshape(1, 2, 64)
    thr = torch.tensor(_thr(x, s, 0.5), device=DEV)
    y = torch.ops.rsparse.int4_decode_linear(x, p.qweight, p.scales_zeros, thr, s, d, u, b, None)
    assert y.shape == (1, 2, 24)
    _check(y, x, p, thr.item(), s, d, u, b)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fy = torch.ops.rsparse.int4_decode_linear(fx, *[mode.from_tensor(t) if t is not None
                                                         else None for t in
                                                         (p.qweight, p.scales_zeros, thr, s, d,
                                                          u, b, None)])
        assert fy.shape == (1, 2, 24) and fy.dtype == dtype


# ------------------------------------------------------------------------------ dense path

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_matches_dequantized_matmul(dtype):
    p, _, _, _, b = _layer(64, 256, 0, group=128, seed=50, dtype=dtype, bias=True)
    packed = int4_dense.tinygemm_pack(p)
    x = _x(6, 256, dtype, seed=50)
    ref = x.double() @ int4.dequantize(p, torch.float64).t() + b.double()
    for pk in (packed, None):  # the library op (where torch has one here), then the fallback
        y = torch.ops.rsparse.int4_linear(x, p.qweight, p.scales_zeros, pk, b)
        assert y.dtype == dtype and _relerr(y, ref) < TOL[dtype]


def test_dense_dispatch_of_a_batch():
    # PATH "dense" (what the per-shape table picks where the kernel loses): split, then the
    # dense 4-bit product and the low-rank products; same function as the kernel
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    p, s, d, u, b = _layer(64, 256, 4, group=128, seed=60, dtype=dtype, bias=True)
    packed = int4_dense.tinygemm_pack(p)
    x = _x(4, 256, dtype, seed=60)
    thr = _thr(x, s, 0.45)
    y = T.int4_decode_linear(x, p.qweight, p.scales_zeros, thr, s, d, u, b, packed,
                             _config=dict(DOT, PATH="dense"))
    _check(y, x, p, thr, s, d, u, b)
