"""CPU decode throughput of vLLM: the dense model vs the same model served with the rsparse plugin.

    .venv-vllm/bin/python scripts/vllm_throughput.py RSPARSE_DIR [--requests 8] [--new-tokens 64]

RSPARSE_DIR is an rsparse directory (`rsparse compress --out DIR`); the dense model is the same
directory with its R-Sparse layers restored (written once to RSPARSE_DIR-dense). Each model is
served by vLLM in turn (offline LLM, default engine settings, greedy, end-of-sequence ignored) on
the same chat prompts; prints generated tokens per second (wall time of one generate call after a
warm-up call) for each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def dense_copy(directory: Path) -> Path:
    """The rsparse directory with its dense layers restored, as a plain transformers directory."""
    out = directory.with_name(directory.name + "-dense")
    if not (out / "config.json").is_file():
        from rsparse import restore_
        from rsparse.io.checkpoint import load

        model, tok = load(directory, device="cpu", dtype=None)
        restore_(model)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def measure(model: Path, prompts: list[str], new: int, dtype: str) -> float:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.1, seed=0)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(chats[:2], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.chat(chats, params, use_tqdm=False)
    sec = time.perf_counter() - t0
    llm.llm_engine.engine_core.shutdown()
    return sum(len(o.outputs[0].token_ids) for o in outs) / sec


def main(argv=None) -> int:
    from rsparse.runtime.bench.agreement import PROMPTS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--requests", type=int, default=8, help="concurrent requests (prompts cycled)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    dense = measure(dense_copy(args.directory), prompts, args.new_tokens, args.dtype)
    sparse = measure(args.directory, prompts, args.new_tokens, args.dtype)
    print(json.dumps({"requests": args.requests, "new_tokens": args.new_tokens, "dtype": args.dtype,
                      "dense_tokens_per_s": round(dense, 1), "rsparse_tokens_per_s": round(sparse, 1),
                      "rsparse_over_dense": round(sparse / dense, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
