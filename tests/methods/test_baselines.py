"""CATS, GRIFFIN and ReLUfication on a tiny random Llama (GQA): budgets, definitions, token
modes, lossless restore, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from rsparse import CatsConfig, GriffinConfig, ReluConfig, RSparseConfig, restore_, sparsify_, token_mode
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import UnreachableSparsityError
from rsparse.methods import method_config
from rsparse.methods.mlp import (BaselineMLP, baseline_layers, linear_bytes, measured_baseline_sparsity, mlp_modules,
                                 mlp_sparsity_for, model_sparsity_for, skippable_share)


pytestmark = pytest.mark.usefixtures("one_thread")


def _measure(model, ev, tokens="all"):
    with token_mode(model, tokens, track=True), torch.no_grad():
        model(ev)
        return measured_baseline_sparsity(model)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_budget_formulas_give_the_papers_model_level_figures():
    # Llama-2-7B shapes (2 blocks suffice: the fractions are per block), on the meta device.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    b = linear_bytes(llama)
    assert b["total"] == 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008) * 4
    # The paper: CATS at 50% MLP sparsity = 22% model-level, GRIFFIN at 50% = 33%.
    assert model_sparsity_for(llama, "cats", 0.5) == pytest.approx(0.2228, abs=1e-4)
    assert model_sparsity_for(llama, "griffin", 0.5) == pytest.approx(0.3342, abs=1e-4)
    assert mlp_sparsity_for(llama, "cats", 0.4) == pytest.approx(0.4 / 0.44560, abs=1e-4)
    assert mlp_sparsity_for(llama, "griffin", 0.5) == pytest.approx(0.5 / 0.66840, abs=1e-4)
    with pytest.raises(UnreachableSparsityError, match=r"CATS sparsifies only the MLP \(up\+down = 44.6%.*below 44.6%"):
        mlp_sparsity_for(llama, "cats", 0.5)
    with pytest.raises(UnreachableSparsityError, match=r"GRIFFIN .*66.8%"):
        mlp_sparsity_for(llama, "griffin", 0.7)


def test_tiny_model_budget_shares(model):
    # q 64x64, k/v 32x64 (GQA), o 64x64, gate/up/down 160x64
    assert skippable_share(model, "cats") == pytest.approx(2 * 10240 / 43008)
    assert skippable_share(model, "griffin") == pytest.approx(3 * 10240 / 43008)
    assert [n for n, _ in mlp_modules(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("tokens", ["all", "second_half"])
def test_cats_reaches_its_model_level_target(model, data, tokens):
    cal, ev = data
    report = sparsify_(model, CatsConfig(sparsity=0.3, tokens=tokens, max_rows_per_layer=512), cal)
    assert report["target_sparsity"] == pytest.approx(0.3)
    assert report["mlp_sparsity"] == pytest.approx(0.3 / skippable_share(model, "cats"))
    m = _measure(model, ev, tokens)
    assert abs(m["achieved_sparsity"] - 0.3) < 0.03
    assert abs(m["module_sparsity"] - report["mlp_sparsity"]) < 0.06


def test_griffin_reaches_its_model_level_target(model, data):
    _, ev = data
    report = sparsify_(model, GriffinConfig(sparsity=0.5, tokens="all"))
    assert report["exact_sparsity"] == pytest.approx(0.5, abs=0.72 / 160)  # keep rounds to whole neurons
    assert {w.keep for w in baseline_layers(model)} == {round((1 - 0.5 / (30720 / 43008)) * 160)}
    m = _measure(model, ev)
    assert m["achieved_sparsity"] == pytest.approx(report["exact_sparsity"])
    # by MLP sparsity instead: the methods' own setting
    report = sparsify_(model, GriffinConfig(mlp_sparsity=0.5, tokens="all"))
    assert report["target_sparsity"] == pytest.approx(0.5 * 30720 / 43008)


def test_griffin_prunes_gate_up_rows_and_down_columns_of_the_prompts_top_neurons(model):
    sparsify_(model, GriffinConfig(mlp_sparsity=0.6, tokens="all"))
    w: BaselineMLP = baseline_layers(model)[0]
    torch.manual_seed(1)
    prompt, x = torch.randn(2, 7, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        z = F.silu(w.gate_proj(prompt)) * w.up_proj(prompt)
        score = (z / z.norm(dim=-1, keepdim=True)).norm(dim=1)
        for b in range(2):
            idx = score[b].topk(w.keep).indices
            g, u, d = w.gate_proj.weight[idx], w.up_proj.weight[idx], w.down_proj.weight[:, idx]
            expected = (F.silu(x[b] @ g.T) * (x[b] @ u.T)) @ d.T
            got = w._sparse(x[b:b + 1], prompt=prompt[b:b + 1])[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unreachable_targets_and_bad_input_are_clear_errors(model, data):
    cal, _ = data
    with pytest.raises(UnreachableSparsityError, match="choose a target below 47.6%"):
        sparsify_(model, CatsConfig(sparsity=0.5), cal)
    with pytest.raises(UnreachableSparsityError, match="GRIFFIN"):
        sparsify_(model, GriffinConfig(sparsity=0.72))
    with pytest.raises(ValueError, match="sparsity must be in"):
        GriffinConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="MLP sparsity must be in"):
        CatsConfig(mlp_sparsity=-0.1)
    with pytest.raises(ValueError, match="give a sparsity"):
        GriffinConfig(sparsity=None)
    with pytest.raises(ValueError, match="calibration"):
        sparsify_(model, CatsConfig(sparsity=0.3))
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        method_config("magic", 0.3)
    with pytest.raises(ValueError, match="takes an RSparseConfig, CatsConfig"):
        sparsify_(model, {"method": "cats"})
    with pytest.raises(ValueError, match="unknown token mode"):
        ReluConfig(tokens="every")
    assert baseline_layers(model) == []  # nothing was touched


def test_cats_with_zero_threshold_equals_dense(model, data):
    _, ev = data
    dense = model(ev).logits
    sparsify_(model, CatsConfig(threshold=0.0, tokens="all"))
    assert torch.equal(model(ev).logits, dense)


def test_relu_changes_only_the_activation(model, data):
    _, ev = data
    before = _snapshot(model)
    dense = model(ev).logits
    sparsify_(model, ReluConfig(tokens="all"))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    w = baseline_layers(model)[1]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        manual = w.down_proj(F.relu(w.gate_proj(x)) * w.up_proj(x))
        assert torch.equal(w(x), manual)
        assert not torch.allclose(model(ev).logits, dense)
    m = _measure(model, ev)
    assert m["achieved_sparsity"] == 0.0 and 0.2 < m["module_sparsity"] < 0.8 and m["skippable_sparsity"] > 0


@pytest.mark.parametrize("method", ["cats", "griffin", "relu"])
def test_second_half_protocol_keeps_the_first_half_dense(model, data, method):
    cal, ev = data
    dense = model(ev).logits
    sparsify_(model, method_config(method, 0.3, tokens="second_half"), cal)
    logits = model(ev).logits
    assert torch.equal(logits[:, :32], dense[:, :32])
    assert not torch.allclose(logits[:, 32:], dense[:, 32:])
    set_token_mode(model, "none")
    assert torch.equal(model(ev).logits, dense)


@pytest.mark.parametrize("method", ["cats", "griffin", "relu"])
def test_restore_is_lossless(model, data, method):
    cal, ev = data
    before = _snapshot(model)
    mlps = [m for _, m in mlp_modules(model)]
    dense = model(ev).logits
    sparsify_(model, method_config(method, 0.4, tokens="all"), cal)
    assert len(baseline_layers(model)) == 2
    assert not torch.allclose(model(ev).logits, dense)
    restore_(model)
    assert baseline_layers(model) == [] and [m for _, m in mlp_modules(model)] == mlps
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(ev).logits, dense)


def test_decode_mode_prefill_dense_generation_sparse(model, data):
    cal, ev = data
    prompt = ev[:1, :20]
    dense_prefill = model(prompt).logits
    dense_gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
    for method in ("cats", "griffin"):
        sparsify_(model, method_config(method, 0.45, tokens="decode"), cal)
        assert torch.equal(model(prompt).logits, dense_prefill)  # prefill stays dense
        with token_mode(model, "decode", track=True):
            out = model.generate(prompt, max_new_tokens=6, do_sample=False)
            assert out.shape == dense_gen.shape
            w = baseline_layers(model)[0]
            assert w.stat_tokens == 5  # the 5 single-token decode steps after the prefill were sparse
            if method == "griffin":
                assert w._selected.shape == (1, 1, 160) and int(w._selected.sum()) == w.keep


def test_baselines_and_rsparse_layers_restore_from_any_mix(model, data):
    cal, ev = data
    dense = model(ev).logits
    sparsify_(model, RSparseConfig(sparsity=0.5, tokens="all"), cal)
    sparsify_(model, CatsConfig(sparsity=0.3, tokens="all"), cal)  # applying a method undoes any other first
    assert rsparse_layers(model) == [] and len(baseline_layers(model)) == 2
    sparsify_(model, RSparseConfig(sparsity=0.5, tokens="all"), cal)
    assert len(rsparse_layers(model)) == 14 and baseline_layers(model) == []
    restore_(model)
    assert torch.equal(model(ev).logits, dense)


def test_other_llama_family_architectures(data):
    cal, ev = data
    for arch in ("mistral", "qwen2"):
        m = tiny_model(arch)
        dense = m(ev).logits
        sparsify_(m, CatsConfig(sparsity=0.3, tokens="all", max_rows_per_layer=256), cal)
        with torch.no_grad():
            sparse = m(ev).logits
        assert math.isfinite(float(sparse.sum())) and not torch.allclose(sparse, dense)
        restore_(m)
        assert torch.equal(m(ev).logits, dense)
