"""Shared cases and checks of the R-Sparse decode kernel tests (test_kernel_*.py): random
layers and fused groups, the fp64 formula, tolerances, the kernel configs the tests sweep, and the
check that every call leaves the scratch clean.

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
below before triton is imported, as tests/conftest.py does: triton decides interpreter vs
compiled at decoration time); with CUDA the same tests run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402,F401  (installed by scripts/setup.sh: a missing Triton fails here, never skips)

from rsparse.runtime.kernels import triton_rsparse as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# small tiles: several column tiles, row chunks, producers and low-rank chunks on tiny shapes
SMALL = dict(BLOCK_N=32, BLOCK_K=16, BLOCK_KR=16, BLOCK_R=16, BLOCK_KP=16, BLOCK_E=32)
# relative (Frobenius) error against the fp64 formula, per dtype
TOL64 = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_case(M, Kin, N, r, dtype, seed=0, scale=True, bias=False, lead=None):
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


def quantile_thr(x, s, keep_frac):
    score = x.float().abs().reshape(-1, x.shape[-1])
    if s is not None:
        score = score * s
    return float(torch.quantile(score.flatten().cpu(), 1.0 - keep_frac))


def fp64(x, w_t, thr, s, d, u, b):
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


def relerr(a, ref):
    a = a.double().reshape(ref.shape)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(y, x, w_t, thr, s, d, u, b, dtype):
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite output"
    ref = K.rsparse_decode_linear_reference(x, w_t, thr, s, d, u, b)
    ref64 = fp64(x, w_t, thr, s, d, u, b)
    assert relerr(y, ref64) < TOL64[dtype]
    # same fp32 sums, rounded once: at most rounding-level differences to the reference
    assert relerr(y, ref.double().reshape(ref64.shape)) < TOL64[dtype]


def assert_scratch_clean():
    for key, ent in K._SCRATCH.items():
        if "ws" in ent and not ent["det"]:  # (row lists and DET slots: rewritten by every call)
            assert not ent["ws"].any() and not ent["z"].any(), key


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


def cfg_for(variant, M):
    cfg = dict(VARIANTS[variant])
    if M > 1 and cfg.get("COMPACT") and cfg.get("G", 16) < 16:
        cfg["G"] = 16  # the batched (tl.dot) path needs G >= 16
    return cfg


def check_tol(y, x, w_t, thr, s, d, u, b, dtype, tol):
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite output"
    assert relerr(y, fp64(x, w_t, thr, s, d, u, b)) < tol[dtype]


def make_parts(kind, M, dtype, seed):
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
        thr = quantile_thr(x, sc, 0.3 + 0.2 * i)
        parts.append((w_t, torch.tensor([thr], device=DEV) if i % 2 == 0 else thr, sc, d, u, b))
    return x, parts


def check_parts(ys, x, parts, dtype, tol):
    assert len(ys) == len(parts)
    for y, (w_t, thr, sc, d, u, b) in zip(ys, parts):
        assert y.shape == (*x.shape[:-1], w_t.shape[1])
        check_tol(y, x, w_t, float(thr), sc, d, u, b, dtype, tol)
