"""The R-Sparse decode kernel's contract (rsparse/runtime/kernels/triton_rsparse.py): input
checks of the single and multi-part calls, the package's exports, importing without triton, the
config choice (rsparse_configs.py) and the batch dispatch between the Triton and cuBLAS paths.
Shared cases: kernel_cases.py."""

import importlib
import sys

import pytest
import torch

from kernel_cases import (DEV, TOL64, TOL_CUBLAS, assert_scratch_clean, check_tol, make_case,
                          quantile_thr)
from rsparse.runtime.kernels import rsparse_configs
from rsparse.runtime.kernels import triton_rsparse as K


def test_bad_inputs():
    dtype = torch.float32
    x, w_t, s, d, u, _ = make_case(1, 32, 16, 4, dtype, seed=70)
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
    x, w_t, s, d, u, _ = make_case(1, 16, 8, 2, torch.float32, seed=80)
    assert mod.rsparse_decode_linear_reference(x, w_t, 0.5, s, d, u).shape == (1, 8)
    with pytest.raises(RuntimeError, match="triton"):
        mod.rsparse_decode_linear(x, w_t, 0.5)


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


def test_batch_dispatch_follows_table(monkeypatch):
    # a batch class marked "cublas" in the table runs the cuBLAS path, others the kernel
    dtype = torch.bfloat16
    x, w_t, s, d, u, b = make_case(3, 64, 32, 4, dtype, seed=600, bias=True)
    thr = quantile_thr(x, s, 0.5)
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
    check_tol(y_sp, x, w_t, thr, s, None, None, b, dtype, TOL_CUBLAS)
    check_tol(y_lr, x, w_t, thr, s, d, u, b, dtype, TOL64)
    check_tol(y_m1, x[:1], w_t, thr, s, d, u, b, dtype, TOL64)
    assert_scratch_clean()


def test_bad_inputs_multi():
    dtype = torch.float32
    x, w_t, s, d, u, _ = make_case(1, 32, 16, 4, dtype, seed=800)
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
