"""End-to-end decode benchmark: tokens/s, dense vs R-Sparse, in the same graph-captured loop.

    rsparse bench decode --out DIR [--models llama2-7b,llama3-8b] [--prompt 2048] [--gens 128,512,2048]

Models are Llama-2-7B- and Llama-3-8B-shaped LlamaForCausalLM with random weights (bf16 by
default): speed depends on shapes and the kept fraction, not on trained values. The R-Sparse
model is built as sparsify_ would (true-shape budgets at `--sparsity`, uniform `--ratio`,
thresholds calibrated on the model's own activations over random-token windows, so decode keeps
the target fraction), except that the rank-r factors are random matrices of the right shape
instead of an SVD of random weights (same bytes, no 224 float64 SVDs on the lease).

For every model and generation length, dense and R-Sparse run in rsparse.runtime.decode.StaticDecoder
(static KV cache, each decode step one CUDA graph replay), timed with CUDA events around the
whole decode, median of `--repeats`; Hugging Face eager `generate` (default cache) is timed on
the dense model as the reference a user has. The kept fraction during decode is measured in an
untimed pass. Raw numbers go to DIR/decode_bench.json; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def build_model(name: str, dtype: torch.dtype, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(MODELS[name])
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


@torch.no_grad()
def make_rsparse(model, sparsity: float, ratio: float, calib_tokens: int = 256) -> dict:
    """Convert to R-Sparse in place (random factors, calibrated thresholds); returns a summary."""
    from rsparse.budget import layer_budget
    from rsparse.calibrate import calibrate_threshold, collect_activations
    from rsparse.layer import RSparseLinear
    from rsparse.models import decoder_linears, replace_module

    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    windows = torch.randint(0, vocab, (2, calib_tokens), generator=torch.Generator().manual_seed(1))
    acts = collect_activations(model, windows, max_rows_per_layer=2 * calib_tokens)
    gen = torch.Generator(device=device).manual_seed(2)
    for lin in decoder_linears(model):
        m = lin.module
        b = layer_budget(m.out_features, m.in_features, sparsity, ratio)
        scale = m.weight.float().norm(dim=0) if b.rank else None
        scores = acts.rows[lin.name].abs() * (scale.cpu() if scale is not None else 1.0)
        layer = RSparseLinear.from_linear(m, name=lin.name)
        down = up = None
        if b.rank:
            down = torch.randn(m.in_features, b.rank, device=device, generator=gen, dtype=m.weight.dtype) * 0.02
            up = torch.randn(b.rank, m.out_features, device=device, generator=gen, dtype=m.weight.dtype) * 0.02
        method = "rsparse" if b.rank and b.keep_fraction else ("sparse" if not b.rank else "lowrank")
        layer.configure(method, calibrate_threshold(scores, b.keep_fraction), b.keep_fraction, scale, down, up)
        layer.tokens = "decode"
        replace_module(model, lin.name, layer)
        del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"sparsity": sparsity, "ratio": ratio}


def measure_kept(model, prompt, n: int = 8) -> float:
    """Model-level achieved sparsity over n eager decode steps (untimed; stats need host syncs)."""
    from rsparse.runtime.decode import StaticDecoder
    from rsparse.layer import rsparse_layers
    from rsparse.perplexity import measured_read

    layers = rsparse_layers(model)
    for l in layers:
        l.reset_stats()
        l.track_stats = True
    dec = StaticDecoder(model, prompt.shape[1] + n + 1, use_graph=False)
    dec.prefill(prompt)
    dec.decode(n)
    result = measured_read(model)["achieved_sparsity"]
    for l in layers:
        l.track_stats = False
    return result


def time_decode(model, prompt, gen: int, repeats: int) -> dict:
    from rsparse.runtime.decode import StaticDecoder

    dec = StaticDecoder(model, prompt.shape[1] + gen + 1)
    dec.prefill(prompt)
    dec.decode(8)  # captures the graph, compiles the kernels
    times = []
    for _ in range(repeats):
        dec.prefill(prompt)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dec.decode(gen)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    med = statistics.median(times)
    tokens = dec.out[:, prompt.shape[1]: prompt.shape[1] + 9].tolist()
    del dec
    return {"gen": gen, "seconds": med, "tokens_per_s": gen / med, "all_seconds": times, "first_tokens": tokens}


def time_hf_generate(model, prompt, gen: int) -> dict:
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"gen": gen, "seconds": sec, "tokens_per_s": gen / sec, "first_tokens": out[:, prompt.shape[1]:][:, :8].tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rsparse bench decode", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--prompts", default="512,2048", help="prompt lengths")
    p.add_argument("--gens", default="128,512,2048", help="generated tokens (with the longest prompt; 128 with the others)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--ratio", type=float, default=0.9)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf-tokens", type=int, default=32, help="tokens for the HF eager generate reference (0: skip)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick checks)")
    p.add_argument("--out", default="out/bench")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: rsparse bench decode needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    prompts = [int(x) for x in args.prompts.split(",")]
    gens = [int(x) for x in args.gens.split(",")]
    from rsparse.report import versions

    results = {"device": torch.cuda.get_device_name(), "versions": versions(), "settings": vars(args), "runs": []}
    for name in args.models.split(","):
        model = build_model(name, dtype, args.layers)
        plan = [(pl, g) for pl in prompts for g in (gens if pl == max(prompts) else [min(gens)])]
        prompt_ids = {pl: torch.randint(0, model.config.vocab_size, (1, pl), device="cuda",
                                        generator=torch.Generator(device="cuda").manual_seed(pl)) for pl in prompts}
        dense = {(pl, g): time_decode(model, prompt_ids[pl], g, args.repeats) for pl, g in plan}
        hf = time_hf_generate(model, prompt_ids[min(prompts)], args.hf_tokens) if args.hf_tokens else None
        make_rsparse(model, args.sparsity, args.ratio)
        achieved = measure_kept(model, prompt_ids[min(prompts)])
        sparse = {(pl, g): time_decode(model, prompt_ids[pl], g, args.repeats) for pl, g in plan}
        for pl, g in plan:
            results["runs"].append({
                "model": name, "prompt": pl, "gen": g, "dense": dense[(pl, g)], "rsparse": sparse[(pl, g)],
                "speedup": sparse[(pl, g)]["tokens_per_s"] / dense[(pl, g)]["tokens_per_s"],
                "achieved_sparsity": achieved, "hf_eager_dense": hf if pl == min(prompts) else None})
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_bench.json").write_text(json.dumps(results, indent=2))
    print(f"\ndevice: {results['device']}, {args.dtype}, batch 1, R-Sparse s={args.sparsity} rho={args.ratio}")
    print("| model | prompt | gen | HF eager tok/s | dense graph tok/s | R-Sparse tok/s | speed-up | achieved sparsity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        hf_s = f"{r['hf_eager_dense']['tokens_per_s']:.1f}" if r["hf_eager_dense"] else "-"
        print(f"| {r['model']} | {r['prompt']} | {r['gen']} | {hf_s} | {r['dense']['tokens_per_s']:.1f} | "
              f"{r['rsparse']['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {100 * r['achieved_sparsity']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
