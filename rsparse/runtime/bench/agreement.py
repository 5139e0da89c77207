"""Engine vs transformers on a real model: identical greedy tokens, and both speeds.

    rsparse bench agreement --model CHECKPOINT_OR_MODEL [--device cuda] [--new-tokens 64] [--out DIR]

For a few chat prompts, one at a time, the model continues greedily for exactly `--new-tokens`
tokens (end-of-sequence ignored, so every row is compared at full length) twice: with the decode
engine and with transformers' `generate`. A checkpoint runs as saved (R-Sparse: prefill dense,
decode steps sparse) and then with its dense layers restored. Prints a table and writes
DIR/agreement.json; exits 1 if any prompt's tokens differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

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


def compare(model, prompts: list[list[int]], n: int) -> dict:
    from rsparse.runtime.engine import Engine

    engine = Engine(model, max_seq_len=-(-(max(map(len, prompts)) + n) // 128) * 128)
    rows = []
    for ids in prompts:
        got = engine.generate([ids], n)
        ref, hf_tps = hf_greedy(model, ids, n)
        rows.append({"prompt_tokens": len(ids), "identical": got.tokens[0] == ref,
                     "first_difference": next((i for i, (a, b) in enumerate(zip(got.tokens[0], ref)) if a != b), None),
                     "engine_tokens_per_s": got.decode_tokens_per_s, "hf_tokens_per_s": hf_tps,
                     "engine_tokens": got.tokens[0], "hf_tokens": ref})
    return {"rows": rows, "identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "engine_tokens_per_s": sorted(r["engine_tokens_per_s"] for r in rows)[len(rows) // 2],
            "hf_tokens_per_s": sorted(r["hf_tokens_per_s"] for r in rows)[len(rows) // 2]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rsparse bench agreement", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="rsparse checkpoint or model (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--out", default="out/agreement")
    args = p.parse_args(argv)
    from rsparse.core.layer import rsparse_layers
    from rsparse.io.checkpoint import load_any
    from rsparse.methods import restore_

    model, tok = load_any(args.model, device=args.device, dtype=args.dtype)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               if getattr(tok, "chat_template", None) else tok(q).input_ids for q in PROMPTS[: args.prompts]]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    results = {"model": args.model, "device": args.device, "dtype": str(next(model.parameters()).dtype),
               "new_tokens": args.new_tokens, "runs": {}}
    if rsparse_layers(model):
        results["runs"]["as saved"] = compare(model, prompts, args.new_tokens)
        restore_(model)
    results["runs"]["dense"] = compare(model, prompts, args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.model or 'embedded model'} on {args.device}, {results['dtype']}, {args.new_tokens} new tokens, greedy")
    print("| layers | identical prompts | engine tok/s (median) | transformers tok/s (median) |\n|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['identical']}/{r['prompts']} | {r['engine_tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} |")
    return 0 if all(r["identical"] == r["prompts"] for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
