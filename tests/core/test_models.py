"""rsparse.core.models.model_spec: a model's config and decoder projections without its weights."""

import time

import pytest
import torch

from conftest import tiny_model
from rsparse import RSparseConfig, save_pretrained, sparsify_
from rsparse.core.data import calibration_windows
from rsparse.core.models import decoder_linears, default_model_file, load_model, model_spec
from rsparse.errors import BadInputError, MissingDataError, UnsupportedModelError


def names_and_shapes(linears):
    return [(l.name, l.module.out_features, l.module.in_features) for l in linears]


def test_spec_of_a_directory_is_the_loaded_model(tiny_model_dir):
    spec = model_spec(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    assert names_and_shapes(spec.linears) == names_and_shapes(decoder_linears(model))
    assert all(l.module.weight.is_meta for l in spec.linears)  # nothing allocated, nothing read
    assert spec.config.max_position_embeddings == model.config.max_position_embeddings == 256


def test_spec_of_a_checkpoint_has_its_context_and_no_projections(tokenizer, windows, tmp_path):
    model = tiny_model()
    config = RSparseConfig(sparsity=0.5, seq_len=64, calibration_samples=2, max_rows_per_layer=128)
    report = sparsify_(model, config, calibration_windows(windows, 64, 2, seed=0))
    save_pretrained(model, tokenizer, tmp_path / "hf", report=report, config=config)
    spec = model_spec(tmp_path / "hf")
    assert spec.linears is None  # already sparsified: a recipe does not apply
    assert spec.config.max_position_embeddings == 256 and spec.config.model_type == "llama"


def test_spec_of_the_embedded_gguf_reads_only_its_header(monkeypatch):
    import transformers
    from transformers.integrations.gguf.reader import GgufHeader

    # transformers' config reader parses the whole vocabulary (seconds); the header is enough
    def slow_reader(*args, **kwargs):
        raise AssertionError("AutoConfig read the GGUF file")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", slow_reader)
    start = time.perf_counter()
    spec = model_spec()
    seconds = time.perf_counter() - start
    assert type(spec.config).__name__ == "LlamaConfig" and spec.config.max_position_embeddings == 8192
    assert len(spec.linears) == 30 * 7 and spec.config.tie_word_embeddings
    # the file's own tensor table (torch order), block 0 and the last block
    stored = {t.name: t.shape for t in GgufHeader.from_file(str(default_model_file())).tensors}
    gguf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for l in spec.linears:
        assert stored[f"blk.{l.block}.{gguf[l.kind]}.weight"] == (l.module.out_features, l.module.in_features), l.name
    assert seconds < 10, f"{seconds:.1f} s"  # about 0.05 s once transformers' Llama is imported


def test_spec_raises_load_models_errors(tmp_path):
    with pytest.raises(MissingDataError, match="GGUF file not found"):
        model_spec(tmp_path / "nope.gguf")
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(BadInputError, match="not a readable GGUF file"):
        model_spec(damaged)
    with pytest.raises(MissingDataError, match="no such model"):
        model_spec(tmp_path / "no-such-dir")
    with pytest.raises(MissingDataError, match="offline"):
        model_spec("nobody-xyz/not-cached-model")  # conftest sets HF_HUB_OFFLINE


def test_spec_refuses_what_load_model_refuses(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="no q/k/v/o projections"):
        model_spec(tmp_path / "gpt2")
