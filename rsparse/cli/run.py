"""`rsparse run`: sparsify a model with each method and print perplexity and achieved sparsity (`make run`)."""

from __future__ import annotations

import argparse
import sys
import time

from rsparse.cli import common
from rsparse.core.config import FACTORS, LAYER_METHODS, SCORED_MODES

RUN_COLUMNS = [("method", "method"), ("target_sparsity", "target sparsity %"),
               ("achieved_sparsity", "achieved sparsity %"), ("ppl", "perplexity")]


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="sparsify a model and compare perplexity and achieved sparsity")
    common.add_model(p)
    p.add_argument("--methods", default="dense,sparse,rsparse",
                   help=f"comma-separated, from {', '.join(LAYER_METHODS)} (sparse = rho 1, lowrank = rho 0)")
    common.add_sparsify(p)
    p.add_argument("--factors", default=common.RSPARSE.factors, choices=list(FACTORS),
                   help="low-rank factors: fitted to the inputs reaching the low-rank path (whitened), or top-r SVD of W")
    common.add_calibration(p)
    common.add_refine_mix(p)
    p.add_argument("--ppl-corpus", default=common.DATA.perplexity_corpus, help=f"perplexity corpus: {common.CORPORA_HELP}")
    p.add_argument("--ppl-windows", type=int, default=common.DATA.perplexity_windows,
                   help="perplexity windows (first N of the corpus)")
    p.add_argument("--tokens", default=SCORED_MODES[0], choices=list(SCORED_MODES),
                   help="which tokens are sparsified while scoring (second_half: the paper's protocol)")
    common.add_device(p)
    p.add_argument("--out", default="out/run", help="output directory for results.json and results.md")
    p.add_argument("--overwrite", action="store_true", help="replace the results an earlier run left in --out")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from rsparse.core.calibrate import collect_activations
    from rsparse.core.config import RSparseConfig, load_recipe
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, load_model
    from rsparse.eval.perplexity import evaluate_perplexity
    from rsparse.io.outdir import check_out, staged
    from rsparse.io.results import markdown_table, versions, write_json
    from rsparse.methods import restore_, sparsify_

    # Validate everything cheap before loading anything.
    methods = common.parse_names(args.methods, LAYER_METHODS, "method")
    RSparseConfig(sparsity=args.sparsity, ratio=args.ratio, factors=args.factors)  # checks the values
    recipe = load_recipe(args.recipe) if args.recipe else None
    common.check_corpora(args.calib_corpus, args.ppl_corpus)
    common.check_refine_mix(args)
    common.require(args.seq_len >= 4 and args.calib_samples >= 1 and args.ppl_windows >= 1,
                   "--seq-len must be >= 4 and --calib-samples, --ppl-windows >= 1")
    out = check_out(args.out, results=("results.json", "results.md", "layers_*.json"), overwrite=args.overwrite)
    common.check_device(args.device)
    # the recipe and --seq-len against the model's config: before the weights load
    common.check_model(args.model, args.seq_len, RSparseConfig(sparsity=args.sparsity, recipe=recipe))

    start = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    print(f"model: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)", file=sys.stderr)
    calib = load_windows(tokenizer, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    evalw = load_windows(tokenizer, args.ppl_corpus, args.seq_len, args.ppl_windows, "perplexity")
    mix = common.refine_mix(tokenizer, args, calib)

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
            if mix is not None:
                from rsparse.methods.rsparse import refine_on_mix_

                refine_on_mix_(model, config, calib, mix, layer_reports[method])
        result = evaluate_perplexity(model, evalw, tokens=args.tokens, desc=f"perplexity ({method})")
        rows.append({"method": method, "target_sparsity": 0.0 if method == "dense" else args.sparsity,
                     "achieved_sparsity": result["achieved_sparsity"], "ppl": result["ppl"],
                     "ratio": None if method != "rsparse" or recipe else args.ratio,
                     "recipe": args.recipe if method == "rsparse" else None,
                     "scored_tokens": result["scored_tokens"], "seconds": time.time() - t0})
        print(f"{method}: ppl {result['ppl']:.3f}, achieved sparsity {100 * result['achieved_sparsity']:.1f}%",
              file=sys.stderr)
    restore_(model)

    table = markdown_table(rows, RUN_COLUMNS)
    results = {
        "model": model_name, "rows": rows,
        "settings": common.settings(args),
        "calibration": {"corpus": args.calib_corpus, "windows": args.calib_samples, "seq_len": args.seq_len},
        "perplexity": {"corpus": args.ppl_corpus, "windows": int(evalw.shape[0]), "seq_len": args.seq_len,
                       "tokens": args.tokens,
                       "scored": "second half of each window" if args.tokens == "second_half" else "all positions"},
        "versions": versions(), "machine": common.machine(), "wall_seconds": time.time() - start,
        "peak_memory_mb": common.peak_memory_mb(),
    }
    with staged(out) as tmp:  # written aside, then swapped in: no earlier run's layers_*.json stays
        write_json(tmp / "results.json", results)
        for method, report in layer_reports.items():
            write_json(tmp / f"layers_{method}.json", report)
        (tmp / "results.md").write_text(
        f"# rsparse run: {model_name}\n\nPerplexity on {args.ppl_corpus} ({int(evalw.shape[0])} windows of "
        f"{args.seq_len} tokens, {results['perplexity']['scored']} scored); calibration on "
            f"{args.calib_samples} {args.calib_corpus} windows.\n\n{table}\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({time.time() - start:.0f} s, "
          f"peak memory {results['peak_memory_mb']:.0f} MB)")
    return 0
