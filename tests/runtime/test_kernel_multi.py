"""The R-Sparse decode kernel on fused groups of layers that share x
(rsparse_decode_linear_multi: q/k/v with grouped-query shapes, gate/up): each part against the
fp64 formula, edge masks, one part as a single call, back-to-back calls on the same scratch
(replayed in a CUDA graph on a GPU), and deterministic sums. Shared cases: kernel_cases.py."""

import pytest
import torch

from kernel_cases import (DEV, SMALL, TOL64, TOL_CUBLAS, assert_scratch_clean, cfg_for, check,
                          check_parts, make_case, make_parts, quantile_thr, relerr)
from rsparse.runtime.kernels import triton_rsparse as K


@pytest.mark.parametrize("kind", ["qkv", "gate_up"])
@pytest.mark.parametrize("variant", ["compact_g8_dyn", "compact_g8_lr_last", "plain_dot", "cublas"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (3, torch.float16),
                                     (8, torch.float32)])
def test_multi_matches_fp64(kind, variant, M, dtype):
    x, parts = make_parts(kind, M, dtype, seed=300 + M)
    tol = TOL_CUBLAS if variant == "cublas" else TOL64
    cfg = cfg_for(variant, M)
    outs = [torch.full((M, p[0].shape[1]), float("nan"), dtype=dtype, device=DEV) for p in parts]
    ys = K.rsparse_decode_linear_multi(x, parts, outs=outs, _config=cfg)
    assert all(y.data_ptr() == o.data_ptr() for y, o in zip(ys, outs))
    check_parts(ys, x, parts, dtype, tol)
    # the reference of the multi call is the per-part reference
    for y_ref, p in zip(K.rsparse_decode_linear_multi_reference(x, parts), parts):
        assert torch.equal(y_ref, K.rsparse_decode_linear_reference(x, *p))
    assert_scratch_clean()


def test_multi_empty_full_masks_default_config_and_repeats():
    # part 0 keeps everything, part 1 nothing (low-rank term only), part 2 nothing and no
    # factors (bias only); default configs; repeated calls with changing masks, fresh outputs
    dtype = torch.bfloat16
    x, parts = make_parts("qkv", 2, dtype, seed=400)
    g = torch.Generator().manual_seed(401)
    d1 = (torch.randn(64, 5, generator=g) / 8).to(DEV, dtype)
    u1 = torch.randn(5, 16, generator=g).to(DEV, dtype)
    p0, p1, p2 = parts
    edge = [(p0[0], float("-inf"), p0[2], p0[3], p0[4], p0[5]),
            (p1[0], float("inf"), p1[2], d1, u1, p1[5]),
            (p2[0], torch.tensor(float("inf"), device=DEV), p2[2], None, None, p2[5])]
    ys = K.rsparse_decode_linear_multi(x, edge)
    check_parts(ys, x, edge, dtype, TOL64)
    assert torch.equal(ys[2], p2[5].expand(2, 16))  # nothing kept, no factors: y = bias
    prev = None
    for keep in (0.2, 0.6, 0.9):
        ps = [(p[0], quantile_thr(x, p[2], keep)) + tuple(p[2:]) for p in parts]
        ys = K.rsparse_decode_linear_multi(x.reshape(1, 2, 64), ps)
        assert ys[0].shape == (1, 2, 48)
        check_parts([y.reshape(2, -1) for y in ys], x, ps, dtype, TOL64)
        if prev is not None:
            assert ys[0].data_ptr() != prev  # a fresh output per call
        prev = ys[0].data_ptr()
    assert_scratch_clean()


def test_multi_one_part_equals_single_call():
    dtype = torch.float32
    x, w_t, s, d, u, b = make_case(4, 100, 77, 5, dtype, seed=500, bias=True)
    thr = quantile_thr(x, s, 0.5)
    (y_multi,) = K.rsparse_decode_linear_multi(x, [(w_t, thr, s, d, u, b)], _config=SMALL)
    y_single = K.rsparse_decode_linear(x, w_t, thr, s, d, u, b, _config=SMALL)
    torch.testing.assert_close(y_multi, y_single, rtol=1e-5, atol=1e-5)
    (y_short,) = K.rsparse_decode_linear_multi(x, [(w_t, thr)], _config=SMALL)  # 2-tuple part
    check(y_short, x, w_t, thr, None, None, None, None, dtype)


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
                p[1].fill_(quantile_thr(x[:1], p[2], 0.4) * (1 + 0.1 * i))
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
                assert torch.equal(y_p, r_p) or relerr(y_p, r_p.double()) < 1e-2, (rep, j)
        assert_scratch_clean()


def test_deterministic_algorithms_give_the_same_bits_every_call():
    # torch.use_deterministic_algorithms(True) switches the kernel to per-program slots summed
    # in a fixed order: repeated calls (fused q/k/v groups and single layers, batch 1 and 3,
    # R-Sparse and sparse-only parts) give identical bits, and the same values as the default
    # atomic sums up to rounding. (The atomics' order varies from run to run on a GPU only.)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    before = torch.are_deterministic_algorithms_enabled()
    for M in (1, 3):
        x, parts = make_parts("qkv", M, dtype, seed=950 + M)
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
        check_parts(runs[0], x, parts, dtype, TOL64)
        for a, b in zip(runs[0], default):
            assert relerr(a, b.double()) < TOL64[dtype]
    assert any(ent.get("det") for ent in K._SCRATCH.values())  # the slotted scratch was used
    assert_scratch_clean()  # and the default calls still leave theirs clean
