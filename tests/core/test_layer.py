"""Layer math, budgets and threshold calibration on small random layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import read_fraction
from rsparse.core.budget import layer_budget
from rsparse.core.calibrate import calibrate_threshold
from rsparse.core.factors import lowrank_factors
from rsparse.core.layer import RSparseLinear
from rsparse.core.sparse_modules import set_token_mode


def make_layer(out=48, inp=40, rank=0, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    return lin, RSparseLinear.from_linear(lin, name="test")


def heavy_tailed(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[-1], generator=g) * 3 + 0.1  # per-channel scales, like LLM activations
    return torch.distributions.StudentT(3.0).sample(shape) * scale


def test_keep_all_is_exact():
    lin, layer = make_layer(bias=True)
    layer.configure("sparse", -math.inf, 1.0)
    layer.tokens = "all"
    x = torch.randn(3, 5, 40)
    assert torch.equal(layer(x), lin(x))


def test_sparse_only_equals_masked_gemv():
    lin, layer = make_layer()
    layer.configure("sparse", 0.7, 0.5)
    layer.tokens = "all"
    x = heavy_tailed(4, 40)
    expected = (x * (x.abs() > 0.7)) @ lin.weight.t()
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(expected, lin(x))  # the mask really dropped something


def test_lowrank_only_is_lowrank_product_on_all_channels():
    lin, layer = make_layer()
    down, up = lowrank_factors(lin.weight, 6)
    layer.configure("lowrank", math.inf, 0.0, lr_down=down, lr_up=up)
    layer.tokens = "all"
    x = torch.randn(7, 40)
    u, s, vh = torch.linalg.svd(lin.weight.double())
    w6 = (u[:, :6] * s[:6]) @ vh[:6]
    torch.testing.assert_close(layer(x).double(), x.double() @ w6.t(), rtol=1e-4, atol=1e-5)
    # full rank reproduces the dense layer
    down, up = lowrank_factors(lin.weight, 40)
    layer.configure("lowrank", math.inf, 0.0, lr_down=down, lr_up=up)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-4, atol=1e-5)


def test_rsparse_combines_kept_channels_and_lowrank_residual():
    lin, layer = make_layer()
    down, up = lowrank_factors(lin.weight, 5)
    scale = lin.weight.norm(dim=0)
    layer.configure("rsparse", 1.0, 0.5, score_scale=scale, lr_down=down, lr_up=up)
    layer.tokens = "all"
    x = heavy_tailed(6, 40)
    m = (x.abs() * scale) > 1.0
    expected = (x * m) @ lin.weight.t() + (x * ~m) @ down.float() @ up.float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_token_modes():
    lin, layer = make_layer()
    layer.configure("sparse", 0.8, 0.5)
    x = heavy_tailed(2, 6, 40)
    dense, sparse = lin(x), (x * (x.abs() > 0.8)) @ lin.weight.t()
    layer.tokens = "decode"
    assert torch.equal(layer(x), dense)  # prefill (6 tokens per sequence): dense
    torch.testing.assert_close(layer(x[:, :1]), sparse[:, :1])  # one decode step: sparse
    layer.tokens = "second_half"
    y = layer(x)
    assert torch.equal(y[:, :3], dense[:, :3])
    torch.testing.assert_close(y[:, 3:], sparse[:, 3:])
    layer.tokens = "none"
    assert torch.equal(layer(x), dense)
    with pytest.raises(ValueError, match="token mode"):
        set_token_mode(nn.Sequential(layer), "sometimes")


def test_weight_is_column_major_and_restorable():
    lin, layer = make_layer()
    assert layer.weight.t().is_contiguous()  # a kept input channel is one contiguous row
    assert torch.equal(layer.to_linear().weight, lin.weight)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (1024, 4096)])
@pytest.mark.parametrize("s,rho", [(0.5, 0.95), (0.5, 0.0), (0.3, 0.5), (0.7, 1.0)])
def test_budget_true_shapes(shape, s, rho):
    out, inp = shape
    b = layer_budget(out, inp, s, rho)
    assert b.keep_fraction == pytest.approx((1 - s) * rho)
    assert b.rank == math.floor((1 - s) * (1 - rho) * out * inp / (out + inp) + 1e-9)
    assert b.read_fraction() <= 1 - s + 1e-12  # never reads more than its budget
    assert b.read_fraction() > 1 - s - (out + inp) / (out * inp) - 1e-12  # loses less than one rank


def test_budget_gqa_differs_from_hidden_square():
    kv = layer_budget(192, 576, 0.5, 0.5)
    q = layer_budget(576, 576, 0.5, 0.5)
    assert kv.rank == 36 and q.rank == 72
    # the reference code's hidden x hidden rank would read more than the whole k/v layer's budget
    assert (q.rank * (192 + 576)) / (192 * 576) + kv.keep_fraction > 0.5
    assert read_fraction([kv, q]) <= 0.5


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_budget_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity must be in"):
        layer_budget(8, 8, bad, 0.5)


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("inf")])
def test_budget_rejects_bad_ratio(bad):
    with pytest.raises(ValueError, match="ratio"):
        layer_budget(8, 8, 0.5, bad)


@pytest.mark.parametrize("keep", [0.05, 0.25, 0.475, 0.7, 0.95])
def test_threshold_hits_target_on_held_out(keep):
    scale = torch.rand(256) + 0.5
    calib = heavy_tailed(2000, 256, seed=2).abs() * scale
    held_out = heavy_tailed(2000, 256, seed=3).abs() * scale
    t = calibrate_threshold(calib, keep)
    assert abs((held_out > t).float().mean().item() - keep) < 0.02
    assert calibrate_threshold(calib, 0.0) == math.inf and calibrate_threshold(calib, 1.0) == -math.inf


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_factors_match_float64_svd(shape):
    w = torch.randn(*shape)
    full = min(shape)
    down, up = lowrank_factors(w, full)
    assert down.shape == (shape[1], full) and up.shape == (full, shape[0])
    torch.testing.assert_close((down @ up).t(), w.double(), rtol=1e-9, atol=1e-9)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    down, up = lowrank_factors(w, 5)
    torch.testing.assert_close((down @ up).t(), (u[:, :5] * s[:5]) @ vh[:5], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank", [0, 5])
def test_layer_kernel_path_matches_reference(rank):
    """The layer's Triton path (interpreter on CPU, native on GPU) computes the reference function."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lin, layer = make_layer(out=70, inp=90, bias=True)
    down, up = lowrank_factors(lin.weight, rank) if rank else (None, None)
    layer.configure("rsparse" if rank else "sparse", 0.9, 0.5, score_scale=torch.rand(90) + 0.5, lr_down=down, lr_up=up)
    layer.to(dev)
    x = heavy_tailed(3, 90).to(dev)
    layer.tokens, layer.kernel = "all", "never"
    reference = layer(x)
    layer.kernel = "always"
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)


def test_whitened_factors_beat_plain_svd_on_their_inputs():
    from rsparse.core.factors import whitened_factors

    torch.manual_seed(0)
    w = torch.randn(48, 40)
    x = heavy_tailed(4000, 40, seed=4)  # anisotropic inputs: channel scales differ 30x
    plain = lowrank_factors(w, 6)
    data = whitened_factors(w, x, 6, damp=1e-6)
    err = lambda f: ((x.double() @ w.double().t() - x.double() @ f[0] @ f[1]) ** 2).mean()  # noqa: E731
    assert err(data) < 0.9 * err(plain)
    full = whitened_factors(w, x, 40, damp=1e-6)  # full rank: exact
    torch.testing.assert_close((full[0] @ full[1]).t(), w.double(), rtol=1e-6, atol=1e-6)


def test_one_threshold_rule_for_one_or_many_keep_fractions():
    scores = torch.rand(4, 250, generator=torch.Generator().manual_seed(0))
    keeps = [0.0, 0.1, 0.37, 0.5, 0.999, 1.0]
    assert calibrate_threshold(scores, keeps) == [calibrate_threshold(scores, k) for k in keeps]


@pytest.mark.parametrize("factors", ["svd", "whitened"])
def test_planner_plans_the_same_with_or_without_its_caches(factors):
    from rsparse.core.calibrate import LayerPlanner

    torch.manual_seed(0)
    weight, rows = torch.randn(24, 40), torch.randn(300, 40)
    plain = LayerPlanner(weight, rows, factors=factors)
    cached = LayerPlanner(weight, rows, factors=factors, cache=True)
    keeps = [(1 - 0.5) * (g / 10) for g in range(11)]  # layer_budget's keep fractions
    table = cached.threshold_table(keeps)
    for g in (10, 0, 6, 3):  # largest rank first or last: the cache serves every rank
        budget = layer_budget(24, 40, 0.5, g / 10)
        a = plain.plan(budget)
        b = cached.plan(budget, thresholds={w: t[g] for w, t in table.items()})
        assert (a.method, a.threshold, a.weighted) == (b.method, b.threshold, b.weighted)
        if budget.rank:
            torch.testing.assert_close(a.lr_down.to(b.lr_down.dtype), b.lr_down)
            torch.testing.assert_close(a.lr_up.to(b.lr_up.dtype), b.lr_up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_equals_the_formula_bit_for_bit(dtype):
    """The eager reference computes y = m(x) W^T + (x - m(x)) A B exactly as written out with a
    boolean mask and its complement, in the layer's dtype (the kernel is checked against it)."""
    lin, layer = make_layer()
    down, up = lowrank_factors(lin.weight, 5)
    scale = lin.weight.norm(dim=0)
    layer.configure("rsparse", 1.0, 0.5, score_scale=scale, lr_down=down, lr_up=up)
    layer = layer.to(dtype)
    layer.tokens = "all"
    x = heavy_tailed(3, 40).to(dtype)
    m = (x.abs().float() * layer.score_scale) > layer.threshold
    assert 0 < m.sum() < m.numel()
    expected = F.linear(x * m, layer.weight, layer.bias) + ((x * ~m) @ layer.lr_down) @ layer.lr_up
    assert torch.equal(layer.mask(x), m)
    assert torch.equal(layer(x), expected)
