"""vLLM serves the compressed embedded model (SmolLM2-135M-Instruct, `rsparse compress --sparsity
0.5`; `make test-vllm` writes it and names it in RSPARSE_VLLM_MODEL) with the plugin: greedy
tokens equal rsparse's own CPU reference, or, where float order parts them, agree teacher-forced
as often as rsparse agrees with itself under float-order-sized noise.

Why that yardstick and not transformers' eager vs SDPA attention (which agree on every token
here): vLLM's dense path differs from transformers' by ~1e-6 of a log-probability (its CPU
attention and oneDNN GEMMs), and an R-Sparse mask turns that into a different token whenever a
channel's score sits that close to its threshold (a kept channel becomes low-rank or back).
rsparse itself does the same under the same noise: a copy with weights scaled by 1 + 1e-6 N(0,1)
(reference.PERTURBATION)."""

import os
from pathlib import Path

import pytest

from reference import shut_down, compare, load_reference, perturbed, perturbed_agreement, vllm_greedy
from rsparse.runtime.bench.agreement import PROMPTS

pytestmark = pytest.mark.vllm
NEW = 24


@pytest.fixture(scope="module")
def directory() -> Path:
    path = os.environ.get("RSPARSE_VLLM_MODEL")
    assert path and (Path(path) / "config.json").is_file(), (
        "RSPARSE_VLLM_MODEL must name a compressed embedded model: run `make test-vllm`, which writes it")
    return Path(path)


@pytest.fixture(scope="module")
def rows(directory):
    from vllm import LLM

    model, tok = load_reference(directory)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for p in PROMPTS]
    llm = LLM(model=str(directory), dtype="float32", max_model_len=512, gpu_memory_utilization=0.1, seed=0)
    served = vllm_greedy(llm, ids, NEW)
    shut_down(llm)
    twin = perturbed(model)
    return [{**compare(model, p, s), "perturbed": perturbed_agreement(model, twin, p, NEW)} for p, s in zip(ids, served)]


def test_served_as_an_rsparse_model(directory):
    import json

    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "rsparse" and config["quantization_config"]["base_model_type"] == "llama"
    assert config["quantization_config"]["layers"]


def test_greedy_tokens_agree_with_rsparse_reference(rows):
    forced = [1.0 if r["identical"] else r["forced"] for r in rows]
    eager = [1.0 if r["identical"] else r["yardstick"] for r in rows]
    noise = [r["perturbed"] for r in rows]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"\nvLLM vs rsparse: identical {sum(r['identical'] for r in rows)}/{len(rows)} prompts of {NEW} tokens; "
          f"teacher-forced agreement {mean(forced):.3f}; yardsticks: rsparse vs rsparse+1e-6 noise {mean(noise):.3f}, "
          f"eager vs SDPA {mean(eager):.3f}")
    assert mean(forced) >= mean(noise) - 1 / NEW, rows
    assert any(r["identical"] for r in rows), rows
