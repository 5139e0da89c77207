"""rsparse analyze on a tiny model: contribution heatmaps, bias-matrix rank, multi-phase ReLU,
kept-channel distributions, and the CLI end to end."""

import math

import pytest
import torch

from conftest import tiny_model
from rsparse import collect_activations, evaluate_perplexity
from rsparse.analysis.kept import analyze_kept
from rsparse.analysis.measures import (analyze_bias_rank, analyze_contributions, bias_matrices, contribution_matrix,
                                       mass_fractions, pick_blocks, sort_contributions, spectrum_stats,
                                       two_phase_thresholds)
from rsparse.analysis.multiphase import PhaseHooks, analyze_multiphase, multiphase, phase_levels, phase_site_values
from rsparse.core.data import calibration_windows, perplexity_windows
from rsparse.core.factors import weight_svd
from rsparse.core.models import decoder_linears


@pytest.fixture(scope="module")
def setup(windows):
    model = tiny_model()
    cal = calibration_windows(windows, 32, 8, seed=0)  # 256 tokens
    held = perplexity_windows(windows[3000:], 32, 3)
    acts = collect_activations(model, cal, max_rows_per_layer=256)
    return model, acts, held


def test_contribution_matrix_is_the_token_mean_of_abs_contributions(setup):
    model, acts, _ = setup
    for lin in decoder_linears(model)[:7]:
        w, rows = lin.module.weight, acts.rows[lin.name]
        u, s, vh = weight_svd(w)
        c = contribution_matrix(w, rows)
        r = min(w.shape)
        assert c.shape == (r, w.shape[1]) and torch.isfinite(c).all() and (c >= 0).all()
        # brute force: per-token |x_j s_i V[j, i]|, averaged over tokens
        x = rows[:50].double()
        brute = (x[:, None, :] * s[None, :, None] * vh[None]).abs().mean(0)
        torch.testing.assert_close(contribution_matrix(w, rows[:50]), brute)
        # the components and channels rebuild W: sum_i s_i U[:, i] V[j, i] = W[:, j]
        torch.testing.assert_close((u * s) @ vh, w.double(), atol=1e-5, rtol=1e-5)


def test_sorted_heatmap_totals_are_monotone_and_masses_are_consistent(setup):
    model, acts, _ = setup
    contrib, heatmaps = analyze_contributions(model, acts, pick_blocks(2))
    assert len(contrib["layers"]) == 14 and len(heatmaps) == 14  # both blocks of the tiny model are shown
    for (block, kind), h in heatmaps.items():
        rows, cols = h.double().sum(1), h.double().sum(0)
        assert (rows[1:] >= rows[:-1] - 1e-9 * rows.max()).all() and (cols[1:] >= cols[:-1] - 1e-9 * cols.max()).all()
    for m in contrib["layers"]:
        for key in ("bottom_right", "sparse_only", "lowrank_only", "sparse_only_eq", "lowrank_only_eq",
                    "top_cells_eq", "top_left"):
            assert 0.0 <= m[key] <= 1.0 + 1e-12
        # a sub-block never holds more than the half-grids containing it; the best cells bound
        # every selection of the same area; the four quadrants of the 50/50 split add up
        assert m["bottom_right"] <= min(m["sparse_only"], m["lowrank_only"]) + 1e-12
        assert m["top_cells_eq"] >= max(m["bottom_right"], m["sparse_only_eq"], m["lowrank_only_eq"]) - 1e-12
        assert m["sparse_only"] + m["lowrank_only"] - m["bottom_right"] + m["top_left"] == pytest.approx(1.0)
    # sorting only permutes
    c = torch.rand(5, 7, dtype=torch.float64)
    sc, ro, co = sort_contributions(c)
    torch.testing.assert_close(sc, c[ro][:, co])
    assert mass_fractions(torch.ones(4, 4))["bottom_right"] == pytest.approx(0.25)


def test_bias_matrix_columns_sum_to_the_two_phase_residual_and_rank_bounds(setup):
    model, acts, _ = setup
    lin = next(l for l in decoder_linears(model) if l.block == 1 and l.kind == "down_proj")
    rows = acts.rows[lin.name]
    t0, t1 = two_phase_thresholds(rows.abs(), 0.7)
    assert (rows.abs() > t0).double().mean() == pytest.approx(0.3, abs=0.01) and t1 <= t0
    m, r = bias_matrices(lin.module.weight, rows[:100], t0, t1)
    assert m.shape == (64, 200) and r.shape == (64, 100)
    h = rows[:100].double()
    tau = multiphase(h, t0, (t0 + t1) / 2, signed=False)
    dropped_part = torch.where(h.abs() <= t0, tau, torch.zeros_like(h))  # kept channels contribute nothing here
    torch.testing.assert_close(m[:, 0::2] + m[:, 1::2], lin.module.weight.double() @ dropped_part.t())
    # the analysis works on U^T M (diag(s) V^T in place of W): same singular values
    u, s, vh = weight_svd(lin.module.weight)
    m_red, r_red = bias_matrices(s[:, None] * vh, rows[:100], t0, t1)
    for full, red in ((m, m_red), (r, r_red)):
        torch.testing.assert_close(torch.linalg.svdvals(full), torch.linalg.svdvals(red))
        a, b = spectrum_stats(full), spectrum_stats(red)
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-6)
        assert (a["rank_90"], a["rank_99"]) == (b["rank_90"], b["rank_99"])
    bias = analyze_bias_rank(model, acts, block=1, sparsities=[0.5, 0.9], n_tokens=120)
    assert bias["tokens"] == 120 and len(bias["layers"]) == 7
    for layer in bias["layers"]:
        n_out, n_in = layer["shape"]
        for e in layer["by_sparsity"]:
            assert e["bias"]["shape"] == [n_out, 240] and e["residual"]["shape"] == [n_out, 120]
            for key in ("bias", "bias_centered", "residual"):
                st = e[key]
                assert st["max_rank"] == min(n_out, n_in, st["shape"][1])
                assert 1.0 - 1e-9 <= st["stable_rank"] <= st["max_rank"] + 1e-9
                assert 1 <= st["rank_90"] <= st["rank_99"] <= st["max_rank"]
        assert 1.0 <= layer["weight"]["stable_rank"] <= layer["weight"]["max_rank"]
    one = spectrum_stats(torch.outer(torch.arange(1.0, 5), torch.ones(3)))  # rank one
    assert one["stable_rank"] == pytest.approx(1.0) and one["rank_99"] == 1
    eye = spectrum_stats(torch.eye(6))
    assert eye["stable_rank"] == pytest.approx(6.0) and eye["rank_90"] == 6 and eye["rank_99"] == 6


def test_multiphase_function_and_levels():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.2, 0.9, 2.0])
    assert multiphase(x, -math.inf, 0.0, signed=False) is x
    torch.testing.assert_close(multiphase(x, 1.0, 0.0, signed=False), torch.tensor([-3.0, 0, 0, 0, 0, 2.0]))
    torch.testing.assert_close(multiphase(x, 1.0, 0.5, signed=False), torch.tensor([-3.0, -0.5, 0, 0.5, 0.5, 2.0]))
    torch.testing.assert_close(multiphase(x, 0.5, 0.0, signed=True), torch.tensor([0.0, 0, 0, 0, 0.9, 2.0]))
    torch.testing.assert_close(multiphase(x, 0.5, -1.25, signed=True), torch.tensor([-1.25] * 4 + [0.9, 2.0]))
    v = torch.arange(1.0, 11.0)  # 1..10: at sparsity 0.7, T0 = 7 (3 values strictly above), T1 = 1
    assert phase_levels(v, 0.7, "1", signed=False) == (7.0, 0.0)
    assert phase_levels(v, 0.7, "2", signed=False) == (7.0, 4.0)
    assert phase_levels(v, 0.7, "2mean", signed=False) == (7.0, 4.0)  # mean of 1..7
    assert phase_levels(v ** 2, 0.7, "2mean", signed=False) == (49.0, 20.0)  # mean of 1, 4, ..., 49
    assert phase_levels(v, 0.0, "2", signed=False) == (-math.inf, 0.0)
    with pytest.raises(ValueError):
        phase_levels(v, 0.5, "3", signed=False)


def test_one_phase_at_sparsity_zero_is_dense_and_sparsity_hurts(setup):
    model, acts, held = setup
    dense = evaluate_perplexity(model, held, tokens="all")["ppl"]
    for site in ("down_input", "act"):
        values = phase_site_values(model, acts, site)
        assert len(values) == 2
        levels = {n: phase_levels(v, 0.0, "1", signed=site == "act") for n, v in values.items()}
        with PhaseHooks(model, site, levels) as hooks:
            assert evaluate_perplexity(model, held, tokens="all")["ppl"] == dense
        assert hooks.replaced == 0 and hooks.total > 0
    phase = analyze_multiphase(model, acts, held, [0.5, 0.9], sites=("down_input", "act"))
    assert phase["dense_ppl"] == dense and list(phase["variants"]) == ["1", "2", "2mean"]
    for site, rows in phase["sites"].items():
        assert [(r["sparsity"], r["variant"]) for r in rows] == [(s, v) for s in (0.5, 0.9) for v in ("1", "2", "2mean")]
        for r in rows:
            assert math.isfinite(r["ppl"]) and r["ppl"] != dense
            assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=0.15)  # held-out text, tiny model
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # hooks removed


def test_kept_fractions_match_the_layer_statistics(setup):
    model, acts, held = setup
    kept, fractions = analyze_kept(model, acts, held, sparsity=0.5, ratio=0.8)
    assert len(kept["layers"]) == 14 and len(fractions) == 14
    assert math.isfinite(kept["ppl"]) and 0.3 < kept["achieved_sparsity"] < 0.7
    for l in kept["layers"]:
        v = fractions[l["name"]]
        assert v.shape == (held.numel(),) and ((0 <= v) & (v <= 1)).all()
        assert l["mean"] == pytest.approx(l["stat_kept"], abs=1e-6)  # per-token masks == the layer's own counts
        assert l["p5"] <= l["p50"] <= l["p95"]
    assert not [m for m in model.modules() if type(m).__name__ == "RSparseLinear"]  # restored
