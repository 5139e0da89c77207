"""`rsparse analyze`: the paper's analysis figures (rsparse.analysis) and analysis.json."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rsparse.analysis import PARTS, PHASE_SITES, PHASE_VARIANTS
from rsparse.cli import common
from rsparse.core.budget import check_ratio, check_sparsity


def _floats(text: str, what: str) -> list[float]:
    vals = common.parse_floats(text, what)
    common.require(bool(vals) and all(0.0 < v < 1.0 for v in vals), f"{what} must be in (0, 1), got {text!r}")
    return sorted(set(vals))


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if text.strip() == "all":
        return list(allowed)
    bad = [v for v in vals if v not in allowed]
    common.require(not bad and bool(vals), f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return [v for v in allowed if v in vals]


def cmd_analyze(args) -> int:
    import torch

    parts = _names(args.parts, PARTS, "part(s)")
    sites = _names(args.phase_sites, PHASE_SITES, "phase site(s)")
    variants = _names(args.phase_variants, tuple(PHASE_VARIANTS), "phase variant(s)")
    sparsities = _floats(args.phase_sparsities, "--phase-sparsities")
    check_sparsity(args.sparsity)
    check_ratio(args.ratio)
    common.require(args.seq_len >= 4 and min(args.samples, args.ppl_windows, args.bias_tokens, args.max_rows) >= 1,
                   "--seq-len must be >= 4 and --samples, --ppl-windows, --bias-tokens, --max-rows >= 1")
    common.require(args.threads >= 0, "--threads must be >= 0")
    common.check_corpora(args.corpus, args.ppl_corpus)
    common.check_device(getattr(args, "device", "cpu"))
    from rsparse.io.outdir import check_writable

    check_writable(args.out)  # a file or an unwritable place: now, not after the analysis
    common.check_model(args.model, args.seq_len)  # the context, before the weights load
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _analyze(args, parts, sites, variants, sparsities)
    finally:
        torch.set_num_threads(threads)


def _analyze(args, parts: list[str], sites: list[str], variants: list[str], sparsities: list[float]) -> int:
    import torch

    from rsparse.analysis.kept import analyze_kept
    from rsparse.analysis.measures import analyze_bias_rank, analyze_contributions, pick_blocks
    from rsparse.analysis.multiphase import analyze_multiphase
    from rsparse.analysis.plots import plot_bias, plot_heatmaps, plot_kept, plot_masses, plot_multiphase
    from rsparse.core.calibrate import collect_activations
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, PROJ_TYPES, decoder_linears, load_model
    from rsparse.core.sparse_modules import restore_
    from rsparse.io.results import versions, write_json

    start = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    n_blocks = len({l.block for l in decoder_linears(model)})
    blocks = pick_blocks(n_blocks)
    calib = load_windows(tok, args.corpus, args.seq_len, args.samples, "calibration", args.seed)
    held_out = load_windows(tok, args.ppl_corpus, args.seq_len, args.ppl_windows, "perplexity") \
        if {"phase", "kept"} & set(parts) else None
    timings = {}
    t0 = time.time()
    activations = collect_activations(model, calib, max_rows_per_layer=args.max_rows, seed=args.seed)
    timings["collect_activations"] = time.time() - t0
    results = {"model": model_name, "settings": common.settings(args),
               "calibration": {"corpus": args.corpus, "windows": args.samples, "seq_len": args.seq_len,
                               "rows_per_layer": int(next(iter(activations.rows.values())).shape[0])},
               "blocks": blocks}
    if held_out is not None:
        results["held_out"] = {"corpus": args.ppl_corpus, "windows": int(held_out.shape[0]), "seq_len": args.seq_len}
    written = []
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731

    if "heatmap" in parts:
        t0 = time.time()
        contrib, heatmaps = analyze_contributions(model, activations, blocks)
        masses = {(l["block"], l["type"]): l for l in contrib["layers"]}
        plot_heatmaps(heatmaps, blocks, masses, out / "contributions.png", model_name)
        plot_masses(contrib, out / "contribution_mass.png")
        written += ["contributions.png", "contribution_mass.png"]
        results["contributions"] = contrib
        timings["heatmap"] = time.time() - t0
        for label, b in blocks.items():
            line = ", ".join(f"{k} {100 * masses[(b, k)]['bottom_right']:.0f}%" for k in PROJ_TYPES)
            log(f"bottom-right mass, block {b} ({label}): {line}")
    if "bias" in parts:
        t0 = time.time()
        bias = analyze_bias_rank(model, activations, blocks["middle"], sparsities, args.bias_tokens)
        plot_bias(bias, out / "bias_rank.png")
        written.append("bias_rank.png")
        results["bias_rank"] = bias
        timings["bias"] = time.time() - t0
        for l in bias["layers"]:
            line = ", ".join(f"s={e['sparsity']}: {e['bias']['stable_rank']:.1f}" for e in l["by_sparsity"])
            log(f"bias stable rank {l['name']} (max {l['by_sparsity'][0]['bias']['max_rank']}): {line}")
    if "phase" in parts:
        t0 = time.time()
        phase = analyze_multiphase(model, activations, held_out, sparsities, sites, variants)
        plot_multiphase(phase, out / "multiphase_relu.png")
        written.append("multiphase_relu.png")
        results["multiphase"] = phase
        timings["phase"] = time.time() - t0
        for site, rows in phase["sites"].items():
            log(f"multi-phase ({site}), dense {phase['dense_ppl']:.2f}: " +
                ", ".join(f"{r['variant']} s={r['sparsity']}: {r['ppl']:.4g}" for r in rows))
    if "kept" in parts:
        t0 = time.time()
        kept, fractions = analyze_kept(model, activations, held_out, args.sparsity, args.ratio, args.seed)
        plot_kept(kept, fractions, out / "kept_channels.png", blocks)
        written.append("kept_channels.png")
        results["kept"] = kept
        timings["kept"] = time.time() - t0
        log(f"sparsified (s={args.sparsity}, rho={args.ratio}, all tokens): ppl {kept['ppl']:.2f}, "
            f"achieved sparsity {100 * kept['achieved_sparsity']:.1f}%")
    restore_(model)
    timings["total"] = time.time() - start
    results["timings_s"] = timings
    results["versions"] = versions()
    write_json(out / "analysis.json", results)
    written.append("analysis.json")
    print(f"wrote {', '.join(str(out / w) for w in written)} ({timings['total']:.0f} s)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="the paper's analyses (Figures 1-3): contribution heatmaps, bias-matrix "
                                              "rank, multi-phase ReLU, kept-channel distributions")
    common.add_model(p)
    common.add_calibration(p, seq_len=256, corpus_flag="--corpus", samples_flag="--samples", samples=8)
    p.add_argument("--max-rows", type=int, default=common.RSPARSE.max_rows_per_layer, help="sampled input rows kept per layer")
    p.add_argument("--ppl-corpus", default=common.DATA.perplexity_corpus,
                   help="held-out corpus for perplexity and kept-channel counts")
    p.add_argument("--ppl-windows", type=int, default=4, help="held-out windows (first N of the corpus)")
    p.add_argument("--phase-sparsities", default="0.5,0.7,0.9",
                   help="sparsities for the multi-phase ReLU curve and the bias-matrix rank")
    p.add_argument("--phase-sites", default="down_input,act",
                   help="where the multi-phase function acts: down_input (the down_proj input, |h| thresholded), "
                        "act (the SiLU output, signed, the paper's literal setting), or both comma-separated")
    p.add_argument("--phase-variants", default="1,2,2mean",
                   help="1 (dropped values -> 0), 2 (-> the midpoint (T0+T1)/2, the paper's 2-phase tau), "
                        "2mean (-> the calibration mean of the dropped values); comma-separated")
    p.add_argument("--bias-tokens", type=int, default=2000, help="tokens (bias-matrix column pairs) for the rank")
    p.add_argument("--sparsity", type=float, default=common.RSPARSE.sparsity,
                   help="sparsity of the model whose kept channels are counted")
    p.add_argument("--ratio", type=float, default=common.RSPARSE.ratio, help="uniform rho of that model")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {', '.join(PARTS)} (default all)")
    p.add_argument("--dtype", default="float32", choices=common.DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads oversubscribe and "
                        "run several times slower; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/analyze", help="output directory for the PNGs and analysis.json")
    p.set_defaults(func=cmd_analyze)
