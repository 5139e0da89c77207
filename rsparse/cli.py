"""Command-line interface: `rsparse run` (the main job) and the benchmarks of rsparse.runtime.bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rsparse.layer import METHODS

RUN_COLUMNS = [("method", "method"), ("target_sparsity", "target sparsity %"),
               ("achieved_sparsity", "achieved sparsity %"), ("ppl", "perplexity")]


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default="dense,sparse,rsparse",
                   help=f"comma-separated, from {', '.join(METHODS)} (sparse = rho 1, lowrank = rho 0)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target model-level sparsity in [0, 1)")
    p.add_argument("--ratio", type=float, default=0.95, help="uniform rho for rsparse: sparse share of each layer's budget")
    p.add_argument("--recipe", default=None, help="per-layer recipe JSON for rsparse (overrides --ratio)")
    p.add_argument("--factors", default="whitened", choices=["svd", "whitened"],
                   help="low-rank factors: fitted to the inputs reaching the low-rank path (default), or top-r SVD of W")
    p.add_argument("--calib-corpus", default="coqa", help="coqa (default, offline), boolq, sciq, wikitext2, c4 or a text file")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--ppl-corpus", default="boolq", help="boolq (default, offline), coqa, sciq, wikitext2, c4 or a text file")
    p.add_argument("--ppl-windows", type=int, default=32, help="perplexity windows (first N of the corpus)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and perplexity window")
    p.add_argument("--tokens", default="second_half", choices=["second_half", "all"],
                   help="which tokens are sparsified while scoring (second_half: the paper's protocol)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/run", help="output directory for results.json and results.md")


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from rsparse.budget import check_ratio, check_sparsity
    from rsparse.calibrate import collect_activations, restore_, sparsify_
    from rsparse.config import RSparseConfig, layer_budgets, load_recipe
    from rsparse.data import load_windows
    from rsparse.models import DEFAULT_MODEL_NAME, decoder_linears, load_model
    from rsparse.perplexity import evaluate_perplexity
    from rsparse.report import markdown_table, versions, write_json

    # Validate everything cheap before loading anything.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"error: unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    try:
        check_sparsity(args.sparsity)
        check_ratio(args.ratio)
        recipe = load_recipe(args.recipe) if args.recipe else None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.seq_len < 4 or args.calib_samples < 1 or args.ppl_windows < 1:
        raise SystemExit("error: --seq-len must be >= 4 and --calib-samples, --ppl-windows >= 1")

    start = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    if recipe is not None:  # fail before calibrating if the recipe does not fit this model
        layer_budgets(RSparseConfig(sparsity=args.sparsity, recipe=recipe), decoder_linears(model))
    print(f"model: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)", file=sys.stderr)
    calib = load_windows(tokenizer, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    evalw = load_windows(tokenizer, args.ppl_corpus, args.seq_len, args.ppl_windows, "perplexity")

    rows, layer_reports = [], {}
    activations = None
    for method in methods:
        t0 = time.time()
        if method == "dense":
            restore_(model)
        else:
            if activations is None:
                activations = collect_activations(model, calib, seed=args.seed)
                # two methods with low-rank paths share one SVD per layer
                activations.cache_svd = sum(m in ("lowrank", "rsparse") for m in methods) > 1
            config = RSparseConfig(sparsity=args.sparsity, ratio=args.ratio, method=method,
                                   recipe=recipe if method == "rsparse" else None,
                                   tokens=args.tokens, factors=args.factors, calibration_samples=args.calib_samples,
                                   seq_len=args.seq_len, seed=args.seed)
            layer_reports[method] = sparsify_(model, config, activations)
        result = evaluate_perplexity(model, evalw, tokens=args.tokens, desc=f"perplexity ({method})")
        rows.append({"method": method, "target_sparsity": 0.0 if method == "dense" else args.sparsity,
                     "achieved_sparsity": result["achieved_sparsity"], "ppl": result["ppl"],
                     "ratio": None if method != "rsparse" or recipe else args.ratio,
                     "recipe": args.recipe if method == "rsparse" else None,
                     "scored_tokens": result["scored_tokens"], "seconds": time.time() - t0})
        print(f"{method}: ppl {result['ppl']:.3f}, achieved sparsity {100 * result['achieved_sparsity']:.1f}%",
              file=sys.stderr)
    restore_(model)

    out = Path(args.out)
    table = markdown_table(rows, RUN_COLUMNS)
    results = {
        "model": model_name, "rows": rows,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "calibration": {"corpus": args.calib_corpus, "windows": args.calib_samples, "seq_len": args.seq_len},
        "perplexity": {"corpus": args.ppl_corpus, "windows": int(evalw.shape[0]), "seq_len": args.seq_len,
                       "tokens": args.tokens,
                       "scored": "second half of each window" if args.tokens == "second_half" else "all positions"},
        "versions": versions(), "wall_seconds": time.time() - start,
    }
    write_json(out / "results.json", results)
    for method, report in layer_reports.items():
        write_json(out / f"layers_{method}.json", report)
    (out / "results.md").write_text(
        f"# rsparse run: {model_name}\n\nPerplexity on {args.ppl_corpus} ({int(evalw.shape[0])} windows of "
        f"{args.seq_len} tokens, {results['perplexity']['scored']} scored); calibration on "
        f"{args.calib_samples} {args.calib_corpus} windows.\n\n{table}\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({time.time() - start:.0f} s)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"rsparse.runtime.bench.{args.what}").main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rsparse", description="Rank-aware activation sparsity (R-Sparse) for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="sparsify a model and compare perplexity and achieved sparsity")
    _add_run_args(run)
    run.set_defaults(func=cmd_run)
    bench = sub.add_parser("bench", help="GPU benchmarks: `kernel` (one layer) or `decode` (tokens/s); --help for each")
    bench.add_argument("what", choices=["kernel", "decode"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    from rsparse import analyze, checkpoint, compare_recipes, generate, search, sweep

    analyze.register(sub)  # rsparse analyze (the paper's analysis figures)
    checkpoint.register(sub)  # rsparse compress
    generate.register(sub)  # rsparse generate, rsparse chat
    search.register(sub)  # rsparse search
    compare_recipes.register(sub)  # rsparse compare-recipes (uniform vs searched, Table 4)
    sweep.register(sub)  # rsparse eval (lm-evaluation-harness, baselines, Table 1 / Figure 5)
    args = parser.parse_args(argv)
    from rsparse.checkpoint import CheckpointError

    try:
        return args.func(args) or 0
    except CheckpointError as e:  # a bad model directory (any verb's --model): one line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
