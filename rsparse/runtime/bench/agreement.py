"""Engine vs transformers on a real model: identical greedy tokens, and both speeds.

    rsparse bench agreement --model CHECKPOINT_OR_MODEL [--device cuda] [--new-tokens 64] [--out DIR]

For a few chat prompts, one at a time, the model continues greedily for exactly `--new-tokens`
tokens (end-of-sequence ignored, so every row is compared at full length) with the decode engine
and with transformers' `generate` (twice: is the reference itself reproducible?); then the engine
is teacher-forced along transformers' tokens and its choices counted, beside those of transformers
itself with eager attention instead of SDPA (a free-running continuation parts for good at the
first changed token, e.g. an R-Sparse channel that sits at its threshold and flips on a last-bit
difference; forced, the engine should agree with transformers as often as transformers agrees
with itself under other, equally valid numerics). A checkpoint runs as saved (R-Sparse: prefill dense,
decode steps sparse) and then with its dense layers restored. Prints a table and writes
DIR/agreement.json; exits 1 if any prompt's tokens differ.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from rsparse.runtime.bench import flags

PROMPTS = [
    "What is the capital of France?",
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a river.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation (n tokens, EOS ignored) and its tokens/s."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        _sync(dev)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(dev)
        sec = time.perf_counter() - t0
    finally:
        model.generation_config.eos_token_id = eos
    return out[0, len(ids):].tolist(), n / sec


@torch.no_grad()
def hf_forced(model, ids: list[int], forced: list[int], attention: str) -> list[int]:
    """transformers' greedy choices along `forced` (teacher forcing: the prompt, then one token
    per forward pass with the cache, as generate decodes) with another attention implementation."""
    dev = next(model.parameters()).device
    before = model.config._attn_implementation
    model.set_attn_implementation(attention)
    try:
        out = model(torch.tensor([ids], device=dev), use_cache=True)
        choices = [int(out.logits[0, -1].argmax())]
        for tok in forced:
            out = model(torch.tensor([[tok]], device=dev), past_key_values=out.past_key_values, use_cache=True)
            choices.append(int(out.logits[0, -1].argmax()))
    finally:
        model.set_attn_implementation(before)
    return choices


def compare(model, prompts: list[list[int]], n: int) -> dict:
    """Per prompt: engine vs transformers free-running (identical tokens?), transformers run twice
    (is the reference itself reproducible?), and teacher-forced along transformers' tokens: the
    engine's choices, and as a yardstick those of transformers with eager attention instead of
    SDPA (the same model, other last bits): a wrong step would disagree far more than that."""
    from rsparse.runtime.engine import Engine

    engine = Engine(model, max_seq_len=-(-(max(map(len, prompts)) + n) // 128) * 128)
    rows = []
    for ids in prompts:
        got = engine.generate([ids], n)
        ref, hf_tps = hf_greedy(model, ids, n)
        again, _ = hf_greedy(model, ids, n)
        forced = engine.forced_choices(ids, ref[:-1])
        eager = hf_forced(model, ids, ref[:-1], "eager")
        rows.append({"prompt_tokens": len(ids), "identical": got.tokens[0] == ref,
                     "first_difference": _first_difference(got.tokens[0], ref),
                     "hf_reproducible": again == ref, "hf_first_difference": _first_difference(again, ref),
                     "forced_agreement": _agreement(forced, ref), "hf_eager_forced_agreement": _agreement(eager, ref),
                     "engine_tokens_per_s": got.decode_tokens_per_s, "hf_tokens_per_s": hf_tps,
                     "engine_tokens": got.tokens[0], "hf_tokens": ref, "hf_tokens_again": again})
    median = lambda key: sorted(r[key] for r in rows)[len(rows) // 2]  # noqa: E731
    return {"rows": rows, "identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "hf_reproducible": sum(r["hf_reproducible"] for r in rows),
            "forced_agreement": sum(r["forced_agreement"] for r in rows) / len(rows),
            "hf_eager_forced_agreement": sum(r["hf_eager_forced_agreement"] for r in rows) / len(rows),
            "engine_tokens_per_s": median("engine_tokens_per_s"), "hf_tokens_per_s": median("hf_tokens_per_s")}


def _agreement(choices: list[int], ref: list[int]) -> float:
    return sum(a == b for a, b in zip(choices, ref)) / len(ref)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv=None) -> int:
    args = flags.agreement().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspaces
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: index_copy_ has no such kernel
    from rsparse.core.layer import rsparse_layers
    from rsparse.io.checkpoint import load_any
    from rsparse.methods import restore_

    model, tok = load_any(args.model, device=args.device, dtype=args.dtype)
    for layer in rsparse_layers(model):
        layer.kernel = args.kernel
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               if getattr(tok, "chat_template", None) else tok(q).input_ids for q in PROMPTS[: args.prompts]]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    results = {"model": args.model, "device": args.device, "dtype": str(next(model.parameters()).dtype),
               "kernel": args.kernel, "deterministic": args.deterministic,
               "new_tokens": args.new_tokens, "runs": {}}
    if rsparse_layers(model):
        results["runs"]["as saved"] = compare(model, prompts, args.new_tokens)
        restore_(model)
    results["runs"]["dense"] = compare(model, prompts, args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.model or 'embedded model'} on {args.device}, {results['dtype']}, {args.new_tokens} new tokens, greedy, "
          f"kernel {args.kernel}" + (", deterministic" if args.deterministic else ""))
    print("| layers | identical prompts | transformers reproducible | teacher-forced agreement %: engine | "
          "transformers eager attention | engine tok/s (median) | transformers tok/s (median) |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['identical']}/{r['prompts']} | {r['hf_reproducible']}/{r['prompts']} | "
              f"{100 * r['forced_agreement']:.1f} | {100 * r['hf_eager_forced_agreement']:.1f} | "
              f"{r['engine_tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} |")
    return 0 if all(r["identical"] == r["prompts"] for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
