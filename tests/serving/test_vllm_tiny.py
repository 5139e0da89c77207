"""vLLM serves a tiny random GQA rsparse directory through the plugin: greedy tokens equal
rsparse's own (prompt dense, decode steps sparse), also when a batch mixes prompt chunks and
decode rows; what it cannot serve it refuses in one line."""

import json
import os
import subprocess
import sys

import pytest

from tiny import tiny_rsparse_dir
from reference import shut_down, compare, load_reference, vllm_greedy

pytestmark = pytest.mark.vllm
NEW = 20


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tiny_rsparse_dir(tmp_path_factory.mktemp("tiny") / "rsparse")


@pytest.fixture(scope="module")
def llm(directory):
    from vllm import LLM

    # no engine flags beyond an ordinary user's: dtype, and memory for a 2-core CI machine.
    # max_num_batched_tokens 64 splits long prompts into chunks that share steps with decode rows.
    llm = LLM(model=str(directory), dtype="float32", max_model_len=256, max_num_batched_tokens=64,
              gpu_memory_utilization=0.1, seed=0)
    yield llm
    shut_down(llm)


@pytest.fixture(scope="module")
def reference(directory):
    return load_reference(directory)


def prompts(tok) -> list[list[int]]:
    texts = ["The quick brown", "Rivers flow to the sea, and clouds",
             "A stitch in time saves nine. The quick brown fox jumps over the lazy dog. " * 3]
    return [tok(t)["input_ids"] for t in texts]


def test_greedy_tokens_equal_rsparse_decode_semantics(llm, reference):
    model, tok = reference
    ids = prompts(tok)
    assert len(ids[2]) > 64  # the long prompt runs in chunks beside the others' decode steps
    served = vllm_greedy(llm, ids, NEW)
    rows = [compare(model, p, s) for p, s in zip(ids, served)]
    assert all(r["identical"] for r in rows), rows


def test_decode_steps_are_sparse_and_the_prompt_dense(llm, reference, directory):
    """vLLM's output is not the dense model's: its first token (the prompt's, dense) is, the
    continuation parts from it (decode steps sparse)."""
    from rsparse import restore_

    model, tok = reference
    ids = prompts(tok)
    served = vllm_greedy(llm, ids, NEW)
    dense, _ = load_reference(directory)
    restore_(dense)
    from rsparse.runtime.bench.agreement import hf_greedy

    dense_tokens = [hf_greedy(dense, p, NEW)[0] for p in ids]
    assert [s[0] for s in served] == [d[0] for d in dense_tokens]
    assert served != dense_tokens


def test_refuses_what_it_cannot_serve():
    from rsparse.serving.vllm_method import RSparseServingError, RSparseVllmConfig, _token_mode
    from rsparse.io.hf_checks import TransformersFormatError

    with pytest.raises(TransformersFormatError, match="upgrade rsparse"):
        RSparseVllmConfig.from_config({"quant_method": "rsparse", "format_version": 99, "layers": {}})
    config = RSparseVllmConfig.from_config({"quant_method": "rsparse", "format_version": 1, "layers": {}})

    class Gpt2:
        architectures = ["GPT2LMHeadModel"]

    with pytest.raises(RSparseServingError, match="serves LlamaForCausalLM"):
        config.maybe_update_config("m", Gpt2())
    entry = {"method": "rsparse", "tokens": "second_half", "rank": 4, "keep_fraction": 0.5, "shape": [8, 8]}
    with pytest.raises(RSparseServingError, match="scoring mode"):
        _token_mode([entry], ["model.layers.0.self_attn.q_proj"])
    entry = {**entry, "tokens": "decode", "weight_bits": 4, "group_size": 32}
    with pytest.raises(RSparseServingError, match="4-bit weights"):
        _token_mode([entry], ["model.layers.0.self_attn.q_proj"])


def test_without_the_plugin_vllm_refuses_the_directory(directory):
    """With vLLM's plugins off (as where rsparse is not installed) the directory never loads dense."""
    code = "import sys; from vllm import LLM; LLM(model=sys.argv[1], gpu_memory_utilization=0.1)"
    env = {**os.environ, "VLLM_PLUGINS": "none"}
    run = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode != 0
    assert "has model type `rsparse` but Transformers does not recognize" in run.stderr, run.stderr[-2000:]
    assert json.loads((directory / "config.json").read_text())["model_type"] == "rsparse"
