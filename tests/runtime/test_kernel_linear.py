"""The R-Sparse decode kernel on one layer (rsparse/runtime/kernels/triton_rsparse.py): every
kernel mode and config variant, batch 1 to 8, each dtype, against the torch reference and the
fp64 formula; edge masks (all kept, none kept), threshold tensors, repeated calls on the same
scratch, and the default configs at real shapes. Shared cases: kernel_cases.py."""

import pytest
import torch

from kernel_cases import (DEV, SMALL, TOL64, TOL_CUBLAS, VARIANTS, assert_scratch_clean, cfg_for,
                          check, check_tol, fp64, make_case, quantile_thr, relerr)
from rsparse.runtime.kernels import triton_rsparse as K


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_mixed(M, dtype):
    x, w_t, s, d, u, _ = make_case(M, 100, 77, 5, dtype, seed=M)
    thr = quantile_thr(x, s, 0.45)
    out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
    y = K.rsparse_decode_linear(x, w_t, thr, s, d, u, out=out, _config=SMALL)
    assert y.data_ptr() == out.data_ptr()
    check(y, x, w_t, thr, s, d, u, None, dtype)
    assert_scratch_clean()


MODES = {
    "compact": dict(SMALL, COMPACT=True, CH=32, G=8),
    "compact_dot": dict(SMALL, COMPACT=True, CH=32, G=16, M1_DOT=True),
    "dot": dict(SMALL, M1_DOT=True),
    "compact_dyn": dict(SMALL, COMPACT=True, CH=32, G=8, DYN=True),
    # low-rank tiles 4 factor rows per step (rank 5: 2 steps), scheduled after the sparse tiles
    "compact_lr_last": dict(SMALL, COMPACT=True, CH=32, G=8, LR_G=4, LR_LAST=True),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("M,dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_modes(mode, M, dtype):
    cfg = dict(MODES[mode])
    if M > 1 and cfg.get("G", 16) < 16:
        cfg["G"] = 16
    x, w_t, s, d, u, b = make_case(M, 100, 77, 5, dtype, seed=100 + M, bias=True)
    for keep, lr in ((0.45, True), (0.5, False), (1.0, True), (0.0, True)):
        thr = quantile_thr(x, s, keep) if 0 < keep < 1 else float("-inf" if keep else "inf")
        out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
        y = K.rsparse_decode_linear(x, w_t, thr, s, d if lr else None, u if lr else None, b,
                                    out=out, _config=cfg)
        check(y, x, w_t, thr, s, d if lr else None, u if lr else None, b, dtype)
    assert_scratch_clean()


@pytest.mark.parametrize("M", [1, 3])
def test_default_config_larger_rank_and_bias(M):
    # default tiles, r = 40 > one low-rank chunk, bias, 3-D input
    dtype = torch.bfloat16
    x, w_t, s, d, u, b = make_case(M, 150, 300, 40, dtype, seed=10 + M, bias=True, lead=(1, M))
    thr = quantile_thr(x, s, 0.5)
    y = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b)
    assert y.shape == (1, M, 300)
    check(y, x, w_t, thr, s, d, u, b, dtype)
    assert_scratch_clean()


@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_only(M, dtype):
    x, w_t, _, _, _, _ = make_case(M, 100, 77, 0, dtype, seed=20 + M, scale=False)
    thr = quantile_thr(x, None, 0.5)
    y_none = K.rsparse_decode_linear(x, w_t, thr, _config=SMALL)
    empty_d = torch.empty(100, 0, dtype=dtype, device=DEV)
    empty_u = torch.empty(0, 77, dtype=dtype, device=DEV)
    y_empty = K.rsparse_decode_linear(x, w_t, thr, None, empty_d, empty_u, _config=SMALL)
    check(y_none, x, w_t, thr, None, None, None, None, dtype)
    # fp32 atomics: the summation order may differ between runs
    torch.testing.assert_close(y_none, y_empty, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("M", [1, 3])
def test_all_kept_and_none_kept(M):
    dtype = torch.float32
    x, w_t, s, d, u, _ = make_case(M, 100, 77, 5, dtype, seed=30 + M)
    # everything kept: dense product, low-rank term sees nothing
    y_all = K.rsparse_decode_linear(x, w_t, float("-inf"), s, d, u, _config=SMALL)
    torch.testing.assert_close(y_all, x @ w_t, rtol=1e-5, atol=1e-5)
    # nothing kept: y = (x @ lr_down) @ lr_up
    y_none = K.rsparse_decode_linear(x, w_t, float("inf"), s, d, u, _config=SMALL)
    torch.testing.assert_close(y_none, (x @ d) @ u, rtol=1e-5, atol=1e-5)
    # nothing kept and no low-rank term: exact zeros (and every element written)
    out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
    y0 = K.rsparse_decode_linear(x, w_t, float("inf"), out=out, _config=SMALL)
    assert torch.equal(y0, torch.zeros_like(y0))
    assert_scratch_clean()


def test_threshold_tensor_and_repeated_calls():
    dtype = torch.bfloat16
    x, w_t, s, d, u, _ = make_case(2, 100, 77, 5, dtype, seed=40)
    for keep in (0.2, 0.7):  # scratch is reused between calls with other masks
        thr = quantile_thr(x, s, keep)
        y_f = K.rsparse_decode_linear(x, w_t, thr, s, d, u, _config=SMALL)
        y_0d = K.rsparse_decode_linear(x, w_t, torch.tensor(thr, device=DEV), s, d, u,
                                       _config=SMALL)
        y_1 = K.rsparse_decode_linear(x, w_t, torch.tensor([thr], dtype=torch.float64),
                                      s, d, u, _config=SMALL)
        check(y_f, x, w_t, thr, s, d, u, None, dtype)
        for y_other in (y_0d, y_1):  # same mask; atomics may sum in another order
            assert relerr(y_other, y_f.double()) < TOL64[dtype]
    assert_scratch_clean()


def test_score_scale_changes_mask():
    dtype = torch.float32
    x, w_t, _, d, u, _ = make_case(1, 64, 40, 4, dtype, seed=50, scale=False)
    s = torch.zeros(64, device=DEV)
    s[:8] = 1.0  # only the first 8 channels can pass
    y = K.rsparse_decode_linear(x, w_t, 0.0, s, d, u, _config=SMALL)
    m = torch.zeros(64, dtype=torch.bool, device=DEV)
    m[:8] = x[0, :8].abs() > 0
    ref = (x * m) @ w_t + ((x * ~m) @ d) @ u
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_reference_matches_fp64():
    x, w_t, s, d, u, b = make_case(3, 50, 30, 4, torch.float32, seed=60, bias=True)
    thr = quantile_thr(x, s, 0.5)
    ref = K.rsparse_decode_linear_reference(x, w_t, thr, s, d, u, b)
    assert relerr(ref, fp64(x, w_t, thr, s, d, u, b)) < 1e-6


def test_many_calls_stay_consistent():
    # scratch reuse across calls with changing masks; on a GPU this also exercises real
    # concurrency between the split-k programs (shapes large enough to fill the device)
    on_gpu = DEV == "cuda"
    n_calls = 20 if on_gpu else 3
    Kin, N, r = (4096, 1536, 64) if on_gpu else (100, 77, 5)
    for M, dtype in ((1, torch.bfloat16), (4, torch.float16)):
        x, w_t, s, d, u, b = make_case(M, Kin, N, r, dtype, seed=90 + M, bias=True)
        cfg = None if on_gpu else SMALL
        for i in range(n_calls):
            keep = 0.1 + 0.8 * i / max(1, n_calls - 1)
            thr = torch.tensor(quantile_thr(x, s, keep), device=DEV)
            use_lr = i % 3 != 2
            y = K.rsparse_decode_linear(x, w_t, thr, s, d if use_lr else None,
                                        u if use_lr else None, b, _config=cfg)
            check(y, x, w_t, float(thr), s, d if use_lr else None, u if use_lr else None, b,
                   dtype)
    assert_scratch_clean()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("M,dtype", [(1, torch.float16), (2, torch.bfloat16),
                                     (8, torch.float32)])
def test_variant_matches_fp64(variant, M, dtype):
    # R-Sparse with bias, tensor threshold, poisoned output; then sparse-only, float threshold
    x, w_t, s, d, u, b = make_case(M, 100, 77, 9, dtype, seed=200 + M, bias=True)
    tol = TOL_CUBLAS if variant == "cublas" else TOL64
    cfg = cfg_for(variant, M)
    thr = quantile_thr(x, s, 0.45)
    out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
    y = K.rsparse_decode_linear(x, w_t, torch.tensor(thr, device=DEV), s, d, u, b, out=out,
                                _config=cfg)
    assert y.data_ptr() == out.data_ptr()
    check_tol(y, x, w_t, thr, s, d, u, b, dtype, tol)
    thr2 = quantile_thr(x, None, 0.5)
    y2 = K.rsparse_decode_linear(x, w_t, thr2, _config=cfg)
    check_tol(y2, x, w_t, thr2, None, None, None, None, dtype, tol)
    assert_scratch_clean()



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_smollm2_shapes_default_config(dtype):
    # SmolLM2-135M's MLP shapes (576 -> 1536 -> 576) with the default configs (no override)
    for M, (Kin, N) in ((1, (576, 1536)), (2, (1536, 576))):
        x, w_t, s, d, u, b = make_case(M, Kin, N, 16, dtype, seed=700 + M, bias=True)
        thr = quantile_thr(x, s, 0.45)
        y = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b)
        check(y, x, w_t, thr, s, d, u, b, dtype)
    assert_scratch_clean()
