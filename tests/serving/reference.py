"""rsparse's own CPU reference for the vLLM tier: transformers' greedy decoding of the loaded
rsparse directory (prefill dense, decode steps sparse: the saved tokens="decode"), and the
teacher-forced agreement of rsparse.runtime.bench.agreement for where float order parts them."""

from __future__ import annotations

import torch

from rsparse.io.checkpoint import load
from rsparse.runtime.bench.agreement import _agreement, hf_forced, hf_greedy

# vLLM's dense path differs from transformers' by float order: about 1e-6 of a log-probability
# (median, measured on the embedded model, fp32). An R-Sparse mask turns such a difference into a
# different token whenever a channel's score sits that close to its threshold.
PERTURBATION = 1e-6


def load_reference(directory):
    model, tok = load(directory, device="cpu", dtype=torch.float32)
    return model.eval(), tok


def vllm_greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    """vLLM's greedy continuations of token-id prompts, n tokens each (end-of-sequence ignored)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def compare(model, prompt: list[int], served: list[int]) -> dict:
    """served vs rsparse's greedy tokens: identical? Else, teacher-forced along the served tokens,
    how often rsparse chooses the same (forced), beside how often rsparse with eager attention
    agrees with its own SDPA run (yardstick: equally valid numerics)."""
    ref, _ = hf_greedy(model, prompt, len(served))
    row = {"identical": served == ref, "served": served, "reference": ref}
    if not row["identical"]:
        row["forced"] = _agreement(hf_forced(model, prompt, served[:-1], "sdpa"), served)
        row["yardstick"] = _agreement(hf_forced(model, prompt, ref[:-1], "eager"), ref)
    return row


@torch.no_grad()
def perturbed(model, seed: int = 0):
    """A copy of the model whose weights are scaled by 1 + PERTURBATION * N(0, 1)."""
    import copy

    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in twin.parameters():
        if p.is_floating_point() and p.dim() == 2:
            p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return twin


@torch.no_grad()
def perturbed_agreement(model, twin, prompt: list[int], n: int) -> float:
    """rsparse against itself under float-order-sized noise: the twin's (perturbed) greedy tokens,
    teacher-forced through the model: how often the model picks them."""
    tokens, _ = hf_greedy(twin, prompt, n)
    return _agreement(hf_forced(model, prompt, tokens[:-1], "sdpa"), tokens)


def shut_down(llm) -> None:
    """Stop the engine's processes: an idle vLLM engine core still polls, and the reference
    computed after it would share the CPU with it."""
    llm.llm_engine.engine_core.shutdown()
