"""A tiny random Llama-family model (GQA) end to end: sparsify_, perplexity, CLI, bad inputs."""

import json
import math

import pytest
import torch

from conftest import tiny_model
from rsparse import RSparseConfig, collect_activations, evaluate_perplexity, restore_, sparsify_
from rsparse.core.layer import rsparse_layers
from rsparse.core.models import decoder_linears
from rsparse.errors import RecipeError, UnsupportedModelError
from rsparse.core.data import calibration_windows, perplexity_windows, tokenize_corpus


def test_finds_seven_projections_per_block_with_true_shapes(model):
    linears = decoder_linears(model)
    assert [l.kind for l in linears[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(linears) == 14
    shapes = {l.kind: (l.module.out_features, l.module.in_features) for l in linears}
    assert shapes["k_proj"] == (32, 64) and shapes["q_proj"] == (64, 64)  # GQA: 2 of 4 heads


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_family_architectures(arch, data):
    model = tiny_model(arch)
    cal, ev = data
    x = ev[:2]
    dense = model(x).logits
    report = sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8, tokens="all", seq_len=64), cal)
    assert len(report) == 14
    sparse = model(x).logits
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense)
    restore_(model)
    torch.testing.assert_close(model(x).logits, dense)


def test_sparsify_end_to_end(model, data):
    cal, ev = data
    dense = evaluate_perplexity(model, ev, tokens="all")
    assert dense["achieved_sparsity"] == 0.0
    report = sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8, tokens="all"), cal)
    assert len(report) == 14 and len(rsparse_layers(model)) == 14
    kv = next(r for r in report if r["type"] == "k_proj")
    assert kv["shape"] == [32, 64] and kv["rank"] == math.floor(0.5 * 0.2 * 32 * 64 / 96)
    assert all(r["read_fraction"] <= 0.5 + 1e-9 for r in report)
    assert all(abs(r["calibration_kept"] - r["keep"]) < 0.03 for r in report)
    sparse = evaluate_perplexity(model, ev, tokens="all")
    assert math.isfinite(sparse["ppl"]) and sparse["ppl"] > dense["ppl"] * 0.99
    assert abs(sparse["achieved_sparsity"] - 0.5) < 0.06  # tiny model, 6 windows: loose
    assert set(sparse["layers"]) == {r["name"] for r in report}


def test_zero_sparsity_is_exact_and_restore_is_lossless(model, data):
    cal, ev = data
    dense = model(ev).logits
    sparsify_(model, RSparseConfig(sparsity=0.0, ratio=0.9, tokens="all"), cal)
    assert torch.equal(model(ev).logits, dense)
    sparsify_(model, RSparseConfig(sparsity=0.6, tokens="all"), cal)
    assert not torch.allclose(model(ev).logits, dense)
    restore_(model)
    assert torch.equal(model(ev).logits, dense)


def test_methods_share_calibration_and_differ(model, data):
    cal, ev = data
    acts = collect_activations(model, cal, max_rows_per_layer=256)
    ppl = {}
    for method in ("sparse", "lowrank", "rsparse"):
        report = sparsify_(model, RSparseConfig(sparsity=0.5, method=method, ratio=0.8, tokens="all"), acts)
        assert {r["method"] for r in report} == {method}
        ppl[method] = evaluate_perplexity(model, ev, tokens="all")["ppl"]
    assert len(set(ppl.values())) == 3


def test_second_half_protocol_keeps_first_half_dense(model, data):
    cal, ev = data
    dense = model(ev).logits
    sparsify_(model, RSparseConfig(sparsity=0.5, tokens="second_half"), cal)
    logits = model(ev).logits
    assert torch.equal(logits[:, :32], dense[:, :32])
    assert not torch.allclose(logits[:, 32:], dense[:, 32:])


def test_decode_mode_generate_prefill_dense(model, data):
    cal, ev = data
    prompt = ev[:1, :20]
    dense_first = model(prompt).logits
    dense_gen = model.generate(prompt, max_new_tokens=8, do_sample=False)
    sparsify_(model, RSparseConfig(sparsity=0.7, tokens="decode"), cal)
    assert torch.equal(model(prompt).logits, dense_first)  # prefill stays dense
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)  # HF generate still works
    assert out.shape == dense_gen.shape
    layer = rsparse_layers(model)[0]
    layer.track_stats = True
    model(prompt[:, :1])  # a one-token step is sparsified
    assert layer.stat_tokens == 1


def test_recipe_validation(model, data, tmp_path):
    cal, _ = data
    names = [l.name for l in decoder_linears(model)]
    good = {"layers": [{"name": n, "rho": 0.5 + 0.5 * (i % 2)} for i, n in enumerate(names)]}
    report = sparsify_(model, RSparseConfig(sparsity=0.5, recipe=good), cal)
    assert [r["rho"] for r in report] == [l["rho"] for l in good["layers"]]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(good))
    sparsify_(model, RSparseConfig(sparsity=0.5, recipe=str(path)), cal)

    cases = {
        "has 13 layers": {"layers": good["layers"][:-1]},
        "not in the model": {"layers": good["layers"][:-1] + [{"name": "model.layers.9.mlp.up_proj", "rho": 1}]},
        "shape": {"layers": [dict(l, shape=[1, 1]) if i == 0 else l for i, l in enumerate(good["layers"])]},
        "rho": {"layers": [dict(l, rho=2.0) if i == 3 else l for i, l in enumerate(good["layers"])]},
        "twice": {"layers": good["layers"][:-1] + [good["layers"][0]]},
    }
    restore_(model)
    for message, recipe in cases.items():
        with pytest.raises(RecipeError, match=message):
            sparsify_(model, RSparseConfig(sparsity=0.5, recipe=recipe), cal)
        assert rsparse_layers(model) == []  # nothing touched
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        sparsify_(model, RSparseConfig(sparsity=0.5, recipe=str(bad)), cal)


def test_bad_config_values():
    with pytest.raises(ValueError, match="sparsity must be in"):
        RSparseConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        RSparseConfig(sparsity=-0.2)
    with pytest.raises(ValueError, match="ratio"):
        RSparseConfig(ratio=1.2)
    with pytest.raises(ValueError, match="method"):
        RSparseConfig(method="magic")


def test_non_decoder_models_are_rejected():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="no q/k/v/o projections"):
        decoder_linears(gpt2)
    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    with pytest.raises(UnsupportedModelError):
        sparsify_(bert, RSparseConfig(), torch.zeros(1, 8, dtype=torch.long))
    t5 = T5ForConditionalGeneration(T5Config(num_layers=1, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        decoder_linears(t5)


def test_bad_calibration_text(tokenizer, model):
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus(tokenizer, ["   "])
    stream = tokenize_corpus(tokenizer, ["only a few words here"])
    with pytest.raises(ValueError, match="too short"):
        calibration_windows(stream, 64, 16)
    with pytest.raises(ValueError, match="too short"):
        perplexity_windows(stream, 512, 4)
    with pytest.raises(ValueError, match="LongTensor"):
        sparsify_(model, RSparseConfig(), torch.randn(2, 8))


def test_whitened_factors_option(model, data):
    cal, ev = data
    report = sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.5, factors="whitened", tokens="all"), cal)
    assert all(r["rank"] > 0 for r in report)
    assert math.isfinite(evaluate_perplexity(model, ev, tokens="all")["ppl"])
    with pytest.raises(ValueError, match="factors"):
        RSparseConfig(factors="magic")


def test_write_json_is_atomic_and_readable_by_others(tmp_path):
    import json
    import os
    import stat

    from rsparse.io.results import write_json

    path = tmp_path / "sub" / "results.json"
    write_json(path, {"a": 1, "nan": float("nan")})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert json.loads(path.read_text())["a"] == 1 and list(path.parent.iterdir()) == [path]
