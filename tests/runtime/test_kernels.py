"""Tests of the fused R-Sparse decode kernel (rsparse/runtime/kernels/triton_rsparse.py).

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
below before triton is imported, as tests/conftest.py does: triton decides interpreter vs
compiled at decoration time); with CUDA the same tests run natively.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402,F401  (installed by scripts/setup.sh: a missing Triton fails here, never skips)

from rsparse.runtime.kernels import rsparse_configs  # noqa: E402
from rsparse.runtime.kernels import triton_rsparse as K  # noqa: E402

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
        if "ws" in ent and not ent["det"]:  # (row lists and DET slots: rewritten by every call)
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
    import rsparse.runtime.kernels as package

    assert K.triton_available()
    for name in ("rsparse_decode_linear", "rsparse_decode_linear_reference", "triton_available",
                 "rsparse_decode_linear_multi", "rsparse_decode_linear_multi_reference",
                 "MAX_PARTS", "MAX_BATCH_ROWS"):
        assert name in package.__all__ and hasattr(package, name) and hasattr(K, name)


def test_imports_without_triton(monkeypatch):
    # fresh copies of the kernel package while triton cannot be imported; monkeypatch puts the
    # original modules (and rsparse.runtime's attribute, which the import rebinds) back
    # afterwards, so later tests use the real ones
    import rsparse.runtime

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setattr(rsparse.runtime, "kernels", rsparse.runtime.kernels)
    pkg = "rsparse.runtime.kernels"
    for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
        monkeypatch.delitem(sys.modules, name)
    mod = importlib.import_module("rsparse.runtime.kernels.triton_rsparse")
    assert mod is not K and not mod._HAS_TRITON
    assert not mod.triton_available()
    assert not importlib.import_module("rsparse.runtime.kernels").triton_available()
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


def test_config_choice(monkeypatch):
    # batch 1, large layer in the table: compacted rows
    assert K._pick_config(1, 4096, 11008, 2, None)["COMPACT"]
    # heuristic for unlisted shapes (SmolLM2 576 <-> 1536 and a large one)
    assert K._pick_config(1, 8192, 8192, 2, None)["COMPACT"]
    small = K._pick_config(1, 576, 1536, 2, None)
    assert not small["COMPACT"] and small["PATH"] == "triton"
    assert K._pick_config(3, 1536, 576, 2, None)["PATH"] == "triton"
    assert not K._pick_config(1, 4096, 11008, 4, None)["COMPACT"]  # fp32: plain mode
    # class and "+lr" keys (the table is read by _pick_config in rsparse_configs)
    monkeypatch.setattr(rsparse_configs, "_CONFIG_TABLE", {("m4", 64, 32): dict(PATH="cublas"),
                                                            ("m4+lr", 64, 32): dict(BLOCK_N=64)})
    assert K._pick_config(3, 64, 32, 2, None)["PATH"] == "cublas"
    assert K._pick_config(4, 64, 32, 2, None, has_lr=False)["PATH"] == "cublas"
    lr = K._pick_config(4, 64, 32, 2, None, has_lr=True)
    assert lr["PATH"] == "triton" and lr["BLOCK_N"] == 64
    assert K._pick_config(2, 64, 32, 2, None)["PATH"] == "triton"  # other class: default
    assert [K._batch_class(m) for m in range(1, 9)] == ["m1", "m2", "m4", "m4"] + ["m8"] * 4
    with pytest.raises(ValueError, match="unknown"):
        K._pick_config(1, 64, 64, 2, {"BLOCK_Q": 1})
    with pytest.raises(ValueError, match="PATH"):
        K._pick_config(1, 64, 64, 2, {"PATH": "magic"})
    with pytest.raises(ValueError, match="unknown.*EPI"):  # the v5 in-kernel epilogue is gone
        K._pick_config(1, 64, 64, 2, {"EPI": "tile"})
    with pytest.raises(ValueError, match="unknown.*REGIDX"):  # and v4's REGIDX walk (v7)
        K._pick_config(1, 64, 64, 2, {"REGIDX": True})


# --------------------------------------------------------------------------------------------
# v4: every variant, multi-part calls (q/k/v with grouped-query shapes, gate/up), batch paths
# --------------------------------------------------------------------------------------------

VARIANTS = {
    "plain": dict(SMALL),
    "plain_dot": dict(SMALL, M1_DOT=True, K_ITERS=2),
    "compact": dict(SMALL, COMPACT=True, CH=32, G=16),
    "compact_g8_dyn": dict(SMALL, COMPACT=True, CH=32, G=8, DYN=True),
    "compact_dot": dict(SMALL, COMPACT=True, CH=32, G=16, M1_DOT=True),
    "compact_g8_lr_last": dict(SMALL, COMPACT=True, CH=32, G=8, LR_G=4, LR_LAST=True),
    "compact_g8_dyn_lr_g": dict(SMALL, COMPACT=True, CH=32, G=8, DYN=True, LR_G=8),
    "lr_fused": dict(SMALL, COMPACT=True, CH=32, G=16, LR_FUSED=True, LR_KS=32, LR_NG=3,
                     BLOCK_NL=16),
    "cublas": dict(PATH="cublas"),
    # deterministic sums: per-program slots added in a fixed order (LR_FUSED is then off)
    "plain_det": dict(SMALL, DET=True),
    "compact_g8_dyn_det": dict(SMALL, COMPACT=True, CH=32, G=8, DYN=True, DET=True),
    "compact_g8_lr_last_det": dict(SMALL, COMPACT=True, CH=32, G=8, LR_G=4, LR_LAST=True,
                                   DET=True),
    "lr_fused_det": dict(SMALL, COMPACT=True, CH=32, G=16, LR_FUSED=True, DET=True),
}
# the cuBLAS path rounds the sparse product and the low-rank product to 16 bits separately
TOL_CUBLAS = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _cfg_for(variant, M):
    cfg = dict(VARIANTS[variant])
    if M > 1 and cfg.get("COMPACT") and cfg.get("G", 16) < 16:
        cfg["G"] = 16  # the batched (tl.dot) path needs G >= 16
    return cfg


def _check_tol(y, x, w_t, thr, s, d, u, b, dtype, tol):
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite output"
    assert _relerr(y, _fp64(x, w_t, thr, s, d, u, b)) < tol[dtype]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("M,dtype", [(1, torch.float16), (2, torch.bfloat16),
                                     (8, torch.float32)])
def test_variant_matches_fp64(variant, M, dtype):
    # R-Sparse with bias, tensor threshold, poisoned output; then sparse-only, float threshold
    x, w_t, s, d, u, b = _make(M, 100, 77, 9, dtype, seed=200 + M, bias=True)
    tol = TOL_CUBLAS if variant == "cublas" else TOL64
    cfg = _cfg_for(variant, M)
    thr = _quantile_thr(x, s, 0.45)
    out = torch.full((M, 77), float("nan"), dtype=dtype, device=DEV)
    y = K.rsparse_decode_linear(x, w_t, torch.tensor(thr, device=DEV), s, d, u, b, out=out,
                                _config=cfg)
    assert y.data_ptr() == out.data_ptr()
    _check_tol(y, x, w_t, thr, s, d, u, b, dtype, tol)
    thr2 = _quantile_thr(x, None, 0.5)
    y2 = K.rsparse_decode_linear(x, w_t, thr2, _config=cfg)
    _check_tol(y2, x, w_t, thr2, None, None, None, None, dtype, tol)
    _assert_scratch_clean()


def _make_parts(kind, M, dtype, seed):
    """x and parts for a q/k/v call with grouped-query shapes (64 -> 48 + 16 + 16) or a gate/up
    call (64 -> 40 + 40); each part with its own threshold (float or tensor), score scale,
    factors (or none) and bias (or none)."""
    g = torch.Generator().manual_seed(seed)
    Kin = 64
    outs = (48, 16, 16) if kind == "qkv" else (40, 40)
    ranks = (6, 0, 3) if kind == "qkv" else (5, 4)
    x = torch.distributions.Laplace(0.0, 1.0).sample((M, Kin)).to(DEV, dtype)
    parts = []
    for i, (N, r) in enumerate(zip(outs, ranks)):
        w_t = (torch.randn(Kin, N, generator=g) / Kin ** 0.5).to(DEV, dtype)
        sc = (torch.rand(Kin, generator=g) + 0.5).to(DEV) if i != 1 else None
        d = (torch.randn(Kin, r, generator=g) / Kin ** 0.5).to(DEV, dtype) if r else None
        u = torch.randn(r, N, generator=g).to(DEV, dtype) if r else None
        b = torch.randn(N, generator=g).to(DEV, dtype) if i != 0 else None
        thr = _quantile_thr(x, sc, 0.3 + 0.2 * i)
        parts.append((w_t, torch.tensor([thr], device=DEV) if i % 2 == 0 else thr, sc, d, u, b))
    return x, parts


def _check_parts(ys, x, parts, dtype, tol):
    assert len(ys) == len(parts)
    for y, (w_t, thr, sc, d, u, b) in zip(ys, parts):
        assert y.shape == (*x.shape[:-1], w_t.shape[1])
        _check_tol(y, x, w_t, float(thr), sc, d, u, b, dtype, tol)


@pytest.mark.parametrize("kind", ["qkv", "gate_up"])
@pytest.mark.parametrize("variant", ["compact_g8_dyn", "compact_g8_lr_last", "plain_dot", "cublas"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (3, torch.float16),
                                     (8, torch.float32)])
def test_multi_matches_fp64(kind, variant, M, dtype):
    x, parts = _make_parts(kind, M, dtype, seed=300 + M)
    tol = TOL_CUBLAS if variant == "cublas" else TOL64
    cfg = _cfg_for(variant, M)
    outs = [torch.full((M, p[0].shape[1]), float("nan"), dtype=dtype, device=DEV) for p in parts]
    ys = K.rsparse_decode_linear_multi(x, parts, outs=outs, _config=cfg)
    assert all(y.data_ptr() == o.data_ptr() for y, o in zip(ys, outs))
    _check_parts(ys, x, parts, dtype, tol)
    # the reference of the multi call is the per-part reference
    for y_ref, p in zip(K.rsparse_decode_linear_multi_reference(x, parts), parts):
        assert torch.equal(y_ref, K.rsparse_decode_linear_reference(x, *p))
    _assert_scratch_clean()


def test_multi_empty_full_masks_default_config_and_repeats():
    # part 0 keeps everything, part 1 nothing (low-rank term only), part 2 nothing and no
    # factors (bias only); default configs; repeated calls with changing masks, fresh outputs
    dtype = torch.bfloat16
    x, parts = _make_parts("qkv", 2, dtype, seed=400)
    g = torch.Generator().manual_seed(401)
    d1 = (torch.randn(64, 5, generator=g) / 8).to(DEV, dtype)
    u1 = torch.randn(5, 16, generator=g).to(DEV, dtype)
    p0, p1, p2 = parts
    edge = [(p0[0], float("-inf"), p0[2], p0[3], p0[4], p0[5]),
            (p1[0], float("inf"), p1[2], d1, u1, p1[5]),
            (p2[0], torch.tensor(float("inf"), device=DEV), p2[2], None, None, p2[5])]
    ys = K.rsparse_decode_linear_multi(x, edge)
    _check_parts(ys, x, edge, dtype, TOL64)
    assert torch.equal(ys[2], p2[5].expand(2, 16))  # nothing kept, no factors: y = bias
    prev = None
    for keep in (0.2, 0.6, 0.9):
        ps = [(p[0], _quantile_thr(x, p[2], keep)) + tuple(p[2:]) for p in parts]
        ys = K.rsparse_decode_linear_multi(x.reshape(1, 2, 64), ps)
        assert ys[0].shape == (1, 2, 48)
        _check_parts([y.reshape(2, -1) for y in ys], x, ps, dtype, TOL64)
        if prev is not None:
            assert ys[0].data_ptr() != prev  # a fresh output per call
        prev = ys[0].data_ptr()
    _assert_scratch_clean()


def test_multi_one_part_equals_single_call():
    dtype = torch.float32
    x, w_t, s, d, u, b = _make(4, 100, 77, 5, dtype, seed=500, bias=True)
    thr = _quantile_thr(x, s, 0.5)
    (y_multi,) = K.rsparse_decode_linear_multi(x, [(w_t, thr, s, d, u, b)], _config=SMALL)
    y_single = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b, _config=SMALL)
    torch.testing.assert_close(y_multi, y_single, rtol=1e-5, atol=1e-5)
    (y_short,) = K.rsparse_decode_linear_multi(x, [(w_t, thr)], _config=SMALL)  # 2-tuple part
    _check(y_short, x, w_t, thr, None, None, None, None, dtype)


def test_batch_dispatch_follows_table(monkeypatch):
    # a batch class marked "cublas" in the table runs the cuBLAS path, others the kernel
    dtype = torch.bfloat16
    x, w_t, s, d, u, b = _make(3, 64, 32, 4, dtype, seed=600, bias=True)
    thr = _quantile_thr(x, s, 0.5)
    calls = []
    real_cublas, real_triton = K._run_cublas, K._run_triton
    monkeypatch.setattr(K, "_run_cublas", lambda *a: (calls.append("cublas"), real_cublas(*a)))
    monkeypatch.setattr(K, "_run_triton", lambda *a: (calls.append("triton"), real_triton(*a)))
    monkeypatch.setattr(rsparse_configs, "_CONFIG_TABLE",
                        {("m4", 64, 32): dict(PATH="cublas"),
                         ("m4+lr", 64, 32): dict(BLOCK_N=16, BLOCK_K=16)})
    y_sp = K.rsparse_decode_linear(x, w_t, thr, s, None, None, b)          # m4, sparse-only
    y_lr = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b)                # m4, "+lr" entry
    y_m1 = K.rsparse_decode_linear(x[:1], w_t, thr, s, d, u, b)             # m1: default
    assert calls == ["cublas", "triton", "triton"]
    _check_tol(y_sp, x, w_t, thr, s, None, None, b, dtype, TOL_CUBLAS)
    _check_tol(y_lr, x, w_t, thr, s, d, u, b, dtype, TOL64)
    _check_tol(y_m1, x[:1], w_t, thr, s, d, u, b, dtype, TOL64)
    _assert_scratch_clean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_smollm2_shapes_default_config(dtype):
    # SmolLM2-135M's MLP shapes (576 -> 1536 -> 576) with the default configs (no override)
    for M, (Kin, N) in ((1, (576, 1536)), (2, (1536, 576))):
        x, w_t, s, d, u, b = _make(M, Kin, N, 16, dtype, seed=700 + M, bias=True)
        thr = _quantile_thr(x, s, 0.45)
        y = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b)
        _check(y, x, w_t, thr, s, d, u, b, dtype)
    _assert_scratch_clean()


def test_bad_inputs_multi():
    dtype = torch.float32
    x, w_t, s, d, u, _ = _make(1, 32, 16, 4, dtype, seed=800)
    with pytest.raises(ValueError, match="1 to 3 parts"):
        K.rsparse_decode_linear_multi(x, [])
    with pytest.raises(ValueError, match="1 to 3 parts"):
        K.rsparse_decode_linear_multi(x, [(w_t, 0.5)] * 4)
    with pytest.raises(ValueError, match="in-dim"):
        K.rsparse_decode_linear_multi(x, [(w_t, 0.5), (w_t[:31], 0.5)])
    with pytest.raises(ValueError, match="one entry per part"):
        K.rsparse_decode_linear_multi(x, [(w_t, 0.5), (w_t, 0.5)], outs=[None])
    with pytest.raises(ValueError, match="each part"):
        K.rsparse_decode_linear_multi(x, [(w_t,)])
    with pytest.raises(ValueError, match="at most 8"):
        K.rsparse_decode_linear_multi(torch.randn(9, 32, device=DEV), [(w_t, 0.5)])


def test_back_to_back_calls_replayed_stay_exact():
    # Calls that share scratch (same shapes), back to back, batch 1 and 3: every output equals
    # the reference on every replay, and the scratch (ws, z) is zero after. On the GPU the calls
    # are captured in a CUDA graph and replayed with new inputs, so each call's kernels really
    # chain under PDL into the next call's, which reuses the same ws and z (a partial sum that
    # lands after the epilogue read or zeroed ws shows as a wrong output); the interpreter runs
    # the same calls eagerly.
    gpu = DEV == "cuda"
    Kin, outs, ranks = (2048, (2048, 512, 512), (96, 0, 32)) if gpu else (64, (48, 16, 16), (6, 0, 3))
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(900)
    parts = []
    for N, r in zip(outs, ranks):
        w_t = (torch.randn(Kin, N, generator=g) / Kin ** 0.5).to(DEV, dtype)
        d = (torch.randn(Kin, r, generator=g) / Kin ** 0.5).to(DEV, dtype) if r else None
        u = torch.randn(r, N, generator=g).to(DEV, dtype) if r else None
        parts.append((w_t, torch.zeros(1, device=DEV), (torch.rand(Kin, generator=g) + 0.5).to(DEV),
                      d, u, torch.randn(N, generator=g).to(DEV, dtype)))
    small = None if gpu else dict(SMALL, COMPACT=True, CH=32, G=16)
    xs = {M: torch.zeros(M, Kin, device=DEV, dtype=dtype) for M in (1, 3)}

    def calls():  # 6 (GPU: 24 calls in the graph) or 3 x 2 x 2 calls into the same scratch
        return [fn(M, small) for _ in range(6 if gpu else 3) for M in (1, 3)
                for fn in (lambda M, c: K.rsparse_decode_linear_multi(xs[M], parts, _config=c),
                           lambda M, c: K.rsparse_decode_linear(xs[M], *parts[0], _config=c))]

    def new_inputs(seed):
        gi = torch.Generator().manual_seed(seed)
        for M, x in xs.items():
            x.copy_(torch.distributions.Laplace(0.0, 1.0).sample((M, Kin)).to(dtype))
            for i, p in enumerate(parts):  # threshold: keep ~40% of the channels of row 0
                p[1].fill_(_quantile_thr(x[:1], p[2], 0.4) * (1 + 0.1 * i))
        return [K.rsparse_decode_linear_multi_reference(xs[M], parts) for M in (1, 3)]

    new_inputs(901)
    if gpu:
        calls()  # scratch allocated outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = calls()
    for rep in range(20 if gpu else 2):
        refs = new_inputs(1000 + rep)
        if gpu:
            graph.replay()
            torch.cuda.synchronize()
        else:
            ys = calls()
        for j, y in enumerate(ys):
            M = 1 if (j // 2) % 2 == 0 else 3
            ref = refs[0 if M == 1 else 1]
            got = y if isinstance(y, tuple) else (y,)
            for y_p, r_p in zip(got, ref):
                assert torch.equal(y_p, r_p) or _relerr(y_p, r_p.double()) < 1e-2, (rep, j)
        _assert_scratch_clean()


def test_deterministic_algorithms_give_the_same_bits_every_call():
    # torch.use_deterministic_algorithms(True) switches the kernel to per-program slots summed
    # in a fixed order: repeated calls (fused q/k/v groups and single layers, batch 1 and 3,
    # R-Sparse and sparse-only parts) give identical bits, and the same values as the default
    # atomic sums up to rounding. (The atomics' order varies from run to run on a GPU only.)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    before = torch.are_deterministic_algorithms_enabled()
    for M in (1, 3):
        x, parts = _make_parts("qkv", M, dtype, seed=950 + M)
        default = K.rsparse_decode_linear_multi(x, parts)
        try:
            torch.use_deterministic_algorithms(True, warn_only=True)
            runs = [K.rsparse_decode_linear_multi(x, parts) for _ in range(3)]
            singles = [K.rsparse_decode_linear(x, *parts[0]) for _ in range(2)]
        finally:
            torch.use_deterministic_algorithms(before)
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
        assert torch.equal(singles[0], singles[1])
        _check_parts(runs[0], x, parts, dtype, TOL64)
        for a, b in zip(runs[0], default):
            assert _relerr(a, b.double()) < TOL64[dtype]
    assert any(ent.get("det") for ent in K._SCRATCH.values())  # the slotted scratch was used
    _assert_scratch_clean()  # and the default calls still leave theirs clean


# --------------------------------------------------------------------------------------------
# fused epilogues: SiLU x up after gate/up, residual add + RMSNorm after o_proj / down_proj
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["compact_g8_lr_last", "compact_g8_dyn", "plain_det", "cublas"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (3, torch.float16),
                                     (8, torch.float32)])
def test_silu_mul_epilogue_matches_fp64(variant, M, dtype):
    x, parts = _make_parts("gate_up", M, dtype, seed=1100 + M)
    g, u = (_fp64(x, w_t, float(thr), sc, d, up, b) for w_t, thr, sc, d, up, b in parts)
    ref = torch.nn.functional.silu(g) * u
    h = K.rsparse_decode_linear_silu_mul(x, parts[0], parts[1], _config=_cfg_for(variant, M))
    assert h.dtype == dtype and h.shape == (M, 40)
    # gate and up are rounded to the model dtype before the product, as separate layers'
    assert _relerr(h, ref) < 2 * (TOL_CUBLAS if variant == "cublas" else TOL64)[dtype]
    _assert_scratch_clean()


@pytest.mark.parametrize("variant", ["compact_g8_lr_last", "compact_g8_dyn_lr_g", "plain_det",
                                     "cublas"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (3, torch.float16),
                                     (8, torch.float32)])
def test_add_rmsnorm_epilogue_matches_fp64(variant, M, dtype):
    x, w_t, s, d, u, b = _make(M, 100, 77, 9, dtype, seed=1200 + M, bias=True, lead=(M, 1))
    thr = _quantile_thr(x.reshape(M, -1), s, 0.45)
    g = torch.Generator().manual_seed(1300 + M)
    residual = (4 * torch.randn(M, 1, 77, generator=g)).to(DEV, dtype)
    weight = (torch.rand(77, generator=g) + 0.5).to(DEV, dtype)
    h, xn = K.rsparse_decode_linear_add_rmsnorm(x, (w_t, thr, s, d, u, b), residual, weight, 1e-5,
                                                _config=_cfg_for(variant, M))
    assert h.shape == xn.shape == (M, 1, 77) and h.dtype == xn.dtype == dtype
    h_ref = residual.double().reshape(M, 77) + _fp64(x, w_t, thr, s, d, u, b)
    xn_ref = weight.double() * h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = (TOL_CUBLAS if variant == "cublas" else TOL64)[dtype]
    assert _relerr(h, h_ref) < tol and _relerr(xn, xn_ref) < 2 * tol
    _assert_scratch_clean()


def test_fused_epilogues_equal_the_unfused_steps():
    # bit-exact against the separate calls followed by the same steps in torch (bf16 rounding
    # of every intermediate the separate path rounds); and input checks
    dtype = torch.bfloat16
    x, parts = _make_parts("gate_up", 1, dtype, seed=1400)
    cfg = _cfg_for("compact_g8_lr_last", 1)
    ys = K.rsparse_decode_linear_multi(x, parts, _config=cfg)
    (h_ref,) = K.apply_epilogue_torch(K.Epilogue("silu_mul"), ys)
    assert torch.equal(K.rsparse_decode_linear_silu_mul(x, *parts, _config=cfg), h_ref)
    residual = torch.randn(1, 40).to(DEV, dtype)
    weight = (torch.rand(40) + 0.5).to(DEV, dtype)
    y = K.rsparse_decode_linear(x, *parts[1], _config=cfg)
    want = K.apply_epilogue_torch(K.Epilogue("add_rmsnorm", residual, weight, 1e-6), [y])
    got = K.rsparse_decode_linear_add_rmsnorm(x, parts[1], residual, weight, 1e-6, _config=cfg)
    assert torch.equal(got[0], want[0])
    assert _relerr(got[1], want[1].double()) < 1e-2  # rsqrt: last-bit differences
    with pytest.raises(ValueError, match="residual must be"):
        K.rsparse_decode_linear_add_rmsnorm(x, parts[1], residual[:, :30], weight, 1e-6)
    with pytest.raises(ValueError, match="same width"):
        K.rsparse_decode_linear_silu_mul(x, parts[0], (parts[0][0][:, :30],) + parts[0][1:2])
    _assert_scratch_clean()
