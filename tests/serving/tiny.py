"""A tiny random GQA Llama compressed with rsparse and saved as an rsparse directory (no vLLM)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Rivers flow to the sea, "
        "and clouds carry the water back to the mountains. ") * 60


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_rsparse_dir(directory: Path, sparsity: float = 0.5, seed: int = 0) -> Path:
    """A 2-layer Llama (4 query heads, 2 key/value heads of 64 dims: GQA) with R-Sparse layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rsparse import RSparseConfig, save_pretrained, sparsify_
    from rsparse.core.data import calibration_windows, tokenize_corpus

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # heavier-tailed weights than the default init: activations more like an LLM's
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    stream = tokenize_corpus(tok, [TEXT])
    sparsify_(model, RSparseConfig(sparsity=sparsity, seq_len=64, calibration_samples=4, max_rows_per_layer=256),
              calibration_windows(stream, 64, 4, seed=seed))
    return save_pretrained(model, tok, directory)
