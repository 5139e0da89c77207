"""The R-Sparse decode kernel's fused epilogues (rsparse/runtime/kernels/fused_epilogues.py):
SiLU x up after gate/up, residual add + RMSNorm after o_proj / down_proj, against the fp64
formula and bit for bit against the unfused steps. Shared cases: kernel_cases.py."""

import pytest
import torch

from kernel_cases import (DEV, TOL64, TOL_CUBLAS, assert_scratch_clean, cfg_for, fp64, make_case,
                          make_parts, quantile_thr, relerr)
from rsparse.runtime.kernels import triton_rsparse as K


@pytest.mark.parametrize("variant", ["compact_g8_lr_last", "compact_g8_dyn", "plain_det", "cublas"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (3, torch.float16),
                                     (8, torch.float32)])
def test_silu_mul_epilogue_matches_fp64(variant, M, dtype):
    x, parts = make_parts("gate_up", M, dtype, seed=1100 + M)
    g, u = (fp64(x, w_t, float(thr), sc, d, up, b) for w_t, thr, sc, d, up, b in parts)
    ref = torch.nn.functional.silu(g) * u
    h = K.rsparse_decode_linear_silu_mul(x, parts[0], parts[1], _config=cfg_for(variant, M))
    assert h.dtype == dtype and h.shape == (M, 40)
    # gate and up are rounded to the model dtype before the product, as separate layers'
    assert relerr(h, ref) < 2 * (TOL_CUBLAS if variant == "cublas" else TOL64)[dtype]
    assert_scratch_clean()


@pytest.mark.parametrize("variant", ["compact_g8_lr_last", "compact_g8_dyn_lr_g", "plain_det",
                                     "cublas"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (3, torch.float16),
                                     (8, torch.float32)])
def test_add_rmsnorm_epilogue_matches_fp64(variant, M, dtype):
    x, w_t, s, d, u, b = make_case(M, 100, 77, 9, dtype, seed=1200 + M, bias=True, lead=(M, 1))
    thr = quantile_thr(x.reshape(M, -1), s, 0.45)
    g = torch.Generator().manual_seed(1300 + M)
    residual = (4 * torch.randn(M, 1, 77, generator=g)).to(DEV, dtype)
    weight = (torch.rand(77, generator=g) + 0.5).to(DEV, dtype)
    h, xn = K.rsparse_decode_linear_add_rmsnorm(x, (w_t, thr, s, d, u, b), residual, weight, 1e-5,
                                                _config=cfg_for(variant, M))
    assert h.shape == xn.shape == (M, 1, 77) and h.dtype == xn.dtype == dtype
    h_ref = residual.double().reshape(M, 77) + fp64(x, w_t, thr, s, d, u, b)
    xn_ref = weight.double() * h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = (TOL_CUBLAS if variant == "cublas" else TOL64)[dtype]
    assert relerr(h, h_ref) < tol and relerr(xn, xn_ref) < 2 * tol
    assert_scratch_clean()


def test_fused_epilogues_equal_the_unfused_steps():
    # bit-exact against the separate calls followed by the same steps in torch (bf16 rounding
    # of every intermediate the separate path rounds); and input checks
    dtype = torch.bfloat16
    x, parts = make_parts("gate_up", 1, dtype, seed=1400)
    cfg = cfg_for("compact_g8_lr_last", 1)
    ys = K.rsparse_decode_linear_multi(x, parts, _config=cfg)
    (h_ref,) = K.apply_epilogue_torch(K.Epilogue("silu_mul"), ys)
    assert torch.equal(K.rsparse_decode_linear_silu_mul(x, *parts, _config=cfg), h_ref)
    residual = torch.randn(1, 40).to(DEV, dtype)
    weight = (torch.rand(40) + 0.5).to(DEV, dtype)
    y = K.rsparse_decode_linear(x, *parts[1], _config=cfg)
    want = K.apply_epilogue_torch(K.Epilogue("add_rmsnorm", residual, weight, 1e-6), [y])
    got = K.rsparse_decode_linear_add_rmsnorm(x, parts[1], residual, weight, 1e-6, _config=cfg)
    assert torch.equal(got[0], want[0])
    assert relerr(got[1], want[1].double()) < 1e-2  # rsqrt: last-bit differences
    with pytest.raises(ValueError, match="residual must be"):
        K.rsparse_decode_linear_add_rmsnorm(x, parts[1], residual[:, :30], weight, 1e-6)
    with pytest.raises(ValueError, match="same width"):
        K.rsparse_decode_linear_silu_mul(x, parts[0], (parts[0][0][:, :30],) + parts[0][1:2])
    assert_scratch_clean()
