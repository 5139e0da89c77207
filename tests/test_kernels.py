"""Tests of the fused R-Sparse decode kernel (rsparse/runtime/kernels/triton_rsparse.py).

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
below before triton is imported); with CUDA the same tests run natively. The kernel module is
loaded from its file, so these tests need neither the rest of the package nor a fresh import
order (triton decides interpreter vs compiled at decoration time).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402,F401  (installed by scripts/setup.sh: a missing Triton fails here, never skips)

_PATH = Path(__file__).resolve().parents[1] / "rsparse" / "runtime" / "kernels" / "triton_rsparse.py"
_spec = importlib.util.spec_from_file_location("_rsparse_triton_under_test", _PATH)
K = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(K)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# small tiles: several column tiles, row chunks, producers and low-rank chunks on tiny shapes
SMALL = dict(BLOCK_N=32, BLOCK_K=16, BLOCK_KR=16, BLOCK_R=16, BLOCK_KP=16, BLOCK_E=32)
# relative (Frobenius) error against the fp64 formula, per dtype
TOL64 = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _make(M, Kin, N, r, dtype, seed=0, scale=True, bias=False, lead=None):
    g = torch.Generator().manual_seed(seed)
    lap = torch.distributions.Laplace(0.0, 1.0)
    x = lap.sample((M, Kin)) if lead is None else lap.sample((*lead, Kin))
    w_t = torch.randn(Kin, N, generator=g) / Kin ** 0.5
    d = torch.randn(Kin, r, generator=g) / Kin ** 0.5 if r else None
    u = torch.randn(r, N, generator=g) if r else None
    s = (torch.rand(Kin, generator=g) + 0.5) if scale else None
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(DEV, dtype).contiguous()  # noqa: E731
    return (cast(x), cast(w_t), None if s is None else s.to(DEV), cast(d), cast(u),
            None if b is None else b.to(DEV, dtype))


def _quantile_thr(x, s, keep_frac):
    score = x.float().abs().reshape(-1, x.shape[-1])
    if s is not None:
        score = score * s
    return float(torch.quantile(score.flatten().cpu(), 1.0 - keep_frac))


def _fp64(x, w_t, thr, s, d, u, b):
    xd = x.double().reshape(-1, x.shape[-1])
    score = x.float().abs().reshape(-1, x.shape[-1])
    if s is not None:
        score = score * s.float()
    m = score > torch.tensor(thr, dtype=torch.float32)
    y = (xd * m) @ w_t.double()
    if d is not None:
        y = y + ((xd * ~m) @ d.double()) @ u.double()
    if b is not None:
        y = y + b.double()
    return y


def _relerr(a, ref):
    a = a.double().reshape(ref.shape)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(y, x, w_t, thr, s, d, u, b, dtype):
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite output"
    ref = K.rsparse_decode_linear_reference(x, w_t, thr, s, d, u, b)
    ref64 = _fp64(x, w_t, thr, s, d, u, b)
    assert _relerr(y, ref64) < TOL64[dtype]
    # same fp32 sums, rounded once: at most rounding-level differences to the reference
    assert _relerr(y, ref.double().reshape(ref64.shape)) < TOL64[dtype]


def _assert_scratch_clean():
    for key, ent in K._SCRATCH.items():
        if "ws" in ent:  # (the compacted row lists are rewritten by every call)
            assert not ent["ws"].any() and not ent["z"].any(), key


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_mixed(M, dtype):
    x, w_t, s, d, u, _ = _make(M, 100, 77, 5, dtype, seed=M)
    thr = _quantile_thr(x, s, 0.45)
    out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
    y = K.rsparse_decode_linear(x, w_t, thr, s, d, u, out=out, _config=SMALL)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, w_t, thr, s, d, u, None, dtype)
    _assert_scratch_clean()


MODES = {
    "compact": dict(SMALL, COMPACT=True, CH=32, G=8),
    "compact_dot": dict(SMALL, COMPACT=True, CH=32, G=16, M1_DOT=True),
    "dot": dict(SMALL, M1_DOT=True),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modes(mode, M, dtype):
    cfg = dict(MODES[mode])
    if M > 1 and cfg.get("G", 16) < 16:
        cfg["G"] = 16
    x, w_t, s, d, u, b = _make(M, 100, 77, 5, dtype, seed=100 + M, bias=True)
    for keep, lr in ((0.45, True), (0.5, False), (1.0, True), (0.0, True)):
        thr = _quantile_thr(x, s, keep) if 0 < keep < 1 else float("-inf" if keep else "inf")
        out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
        y = K.rsparse_decode_linear(x, w_t, thr, s, d if lr else None, u if lr else None, b,
                                    out=out, _config=cfg)
        _check(y, x, w_t, thr, s, d if lr else None, u if lr else None, b, dtype)
    _assert_scratch_clean()


@pytest.mark.parametrize("M", [1, 3])
def test_default_config_larger_rank_and_bias(M):
    # default tiles, r = 40 > one low-rank chunk, bias, 3-D input
    dtype = torch.bfloat16
    x, w_t, s, d, u, b = _make(M, 150, 300, 40, dtype, seed=10 + M, bias=True, lead=(1, M))
    thr = _quantile_thr(x, s, 0.5)
    y = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b)
    assert y.shape == (1, M, 300)
    _check(y, x, w_t, thr, s, d, u, b, dtype)
    _assert_scratch_clean()


@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_only(M, dtype):
    x, w_t, _, _, _, _ = _make(M, 100, 77, 0, dtype, seed=20 + M, scale=False)
    thr = _quantile_thr(x, None, 0.5)
    y_none = K.rsparse_decode_linear(x, w_t, thr, _config=SMALL)
    empty_d = torch.empty(100, 0, dtype=dtype, device=DEV)
    empty_u = torch.empty(0, 77, dtype=dtype, device=DEV)
    y_empty = K.rsparse_decode_linear(x, w_t, thr, None, empty_d, empty_u, _config=SMALL)
    _check(y_none, x, w_t, thr, None, None, None, None, dtype)
    # fp32 atomics: the summation order may differ between runs
    torch.testing.assert_close(y_none, y_empty, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("M", [1, 3])
def test_all_kept_and_none_kept(M):
    dtype = torch.float32
    x, w_t, s, d, u, _ = _make(M, 100, 77, 5, dtype, seed=30 + M)
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
    _assert_scratch_clean()


def test_threshold_tensor_and_repeated_calls():
    dtype = torch.bfloat16
    x, w_t, s, d, u, _ = _make(2, 100, 77, 5, dtype, seed=40)
    for keep in (0.2, 0.7):  # scratch is reused between calls with other masks
        thr = _quantile_thr(x, s, keep)
        y_f = K.rsparse_decode_linear(x, w_t, thr, s, d, u, _config=SMALL)
        y_0d = K.rsparse_decode_linear(x, w_t, torch.tensor(thr, device=DEV), s, d, u,
                                       _config=SMALL)
        y_1 = K.rsparse_decode_linear(x, w_t, torch.tensor([thr], dtype=torch.float64),
                                      s, d, u, _config=SMALL)
        _check(y_f, x, w_t, thr, s, d, u, None, dtype)
        for y_other in (y_0d, y_1):  # same mask; atomics may sum in another order
            assert _relerr(y_other, y_f.double()) < TOL64[dtype]
    _assert_scratch_clean()


def test_score_scale_changes_mask():
    dtype = torch.float32
    x, w_t, _, d, u, _ = _make(1, 64, 40, 4, dtype, seed=50, scale=False)
    s = torch.zeros(64, device=DEV)
    s[:8] = 1.0  # only the first 8 channels can pass
    y = K.rsparse_decode_linear(x, w_t, 0.0, s, d, u, _config=SMALL)
    m = torch.zeros(64, dtype=torch.bool, device=DEV)
    m[:8] = x[0, :8].abs() > 0
    ref = (x * m) @ w_t + ((x * ~m) @ d) @ u
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_reference_matches_fp64():
    x, w_t, s, d, u, b = _make(3, 50, 30, 4, torch.float32, seed=60, bias=True)
    thr = _quantile_thr(x, s, 0.5)
    ref = K.rsparse_decode_linear_reference(x, w_t, thr, s, d, u, b)
    assert _relerr(ref, _fp64(x, w_t, thr, s, d, u, b)) < 1e-6


def test_bad_inputs():
    dtype = torch.float32
    x, w_t, s, d, u, _ = _make(1, 32, 16, 4, dtype, seed=70)
    x9 = torch.randn(9, 32, device=DEV)
    with pytest.raises(ValueError, match="at most 8"):
        K.rsparse_decode_linear(x9, w_t, 0.5)
    with pytest.raises(ValueError, match="at most 8"):
        K.rsparse_decode_linear(torch.randn(3, 3, 32, device=DEV), w_t, 0.5)
    with pytest.raises(ValueError, match="in-dim"):
        K.rsparse_decode_linear(torch.randn(1, 31, device=DEV), w_t, 0.5)
    with pytest.raises(ValueError, match="lr_up"):
        K.rsparse_decode_linear(x, w_t, 0.5, s, d, u[:, :15])
    with pytest.raises(ValueError, match="lr_down"):
        K.rsparse_decode_linear(x, w_t, 0.5, s, d[:31], u)
    with pytest.raises(ValueError, match="both"):
        K.rsparse_decode_linear(x, w_t, 0.5, s, d, None)
    with pytest.raises(ValueError, match="score_scale"):
        K.rsparse_decode_linear(x, w_t, 0.5, s[:31], d, u)
    with pytest.raises(ValueError, match="dtype"):
        K.rsparse_decode_linear(x, w_t.half(), 0.5)
    with pytest.raises(ValueError, match="row-contiguous"):
        K.rsparse_decode_linear(x, w_t.t().contiguous().t(), 0.5)
    with pytest.raises(ValueError, match="out"):
        K.rsparse_decode_linear(x, w_t, 0.5, out=torch.empty(1, 15, device=DEV))


def test_triton_available_and_reexports():
    assert K.triton_available()
    src = (_PATH.parent / "__init__.py").read_text()
    for name in ("rsparse_decode_linear", "rsparse_decode_linear_reference", "triton_available"):
        assert name in src and callable(getattr(K, name))


def test_imports_without_triton(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_rsparse_triton_no_triton", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.triton_available()
    x, w_t, s, d, u, _ = _make(1, 16, 8, 2, torch.float32, seed=80)
    assert mod.rsparse_decode_linear_reference(x, w_t, 0.5, s, d, u).shape == (1, 8)
    with pytest.raises(RuntimeError, match="triton"):
        mod.rsparse_decode_linear(x, w_t, 0.5)


def test_many_calls_stay_consistent():
    # scratch reuse across calls with changing masks; on a GPU this also exercises real
    # concurrency between the split-k programs (shapes large enough to fill the device)
    on_gpu = DEV == "cuda"
    n_calls = 20 if on_gpu else 3
    Kin, N, r = (4096, 1536, 64) if on_gpu else (100, 77, 5)
    for M, dtype in ((1, torch.bfloat16), (4, torch.float16)):
        x, w_t, s, d, u, b = _make(M, Kin, N, r, dtype, seed=90 + M, bias=True)
        cfg = None if on_gpu else SMALL
        for i in range(n_calls):
            keep = 0.1 + 0.8 * i / max(1, n_calls - 1)
            thr = torch.tensor(_quantile_thr(x, s, keep), device=DEV)
            use_lr = i % 3 != 2
            y = K.rsparse_decode_linear(x, w_t, thr, s, d if use_lr else None,
                                        u if use_lr else None, b, _config=cfg)
            _check(y, x, w_t, float(thr), s, d if use_lr else None, u if use_lr else None, b,
                   dtype)
    _assert_scratch_clean()


def test_config_choice():
    big = K._pick_config(1, 4096, 11008, 2, None)
    assert big["COMPACT"] and big["M1_DOT"]
    assert K._pick_config(1, 11008, 4096, 2, None)["BLOCK_N"] == 512
    assert K._pick_config(3, 8192, 8192, 2, None)["COMPACT"]  # heuristic for unlisted shapes
    assert not K._pick_config(1, 4096, 11008, 4, None)["COMPACT"]  # fp32: plain mode
    with pytest.raises(ValueError, match="unknown"):
        K._pick_config(1, 64, 64, 2, {"BLOCK_Q": 1})
