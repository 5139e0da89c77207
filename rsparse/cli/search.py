"""`rsparse search`: evolutionary search of per-layer ratios (rsparse.search); writes a recipe,
its plot, and a held-out comparison with sparse-only and the uniform ratio."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rsparse.cli import common
from rsparse.core.budget import check_sparsity
from rsparse.core.config import FACTORS, SCORED_MODES
from rsparse.errors import BadInputError
from rsparse.search.config import ALLOCATIONS, RHO_BY, SHARES, AllocationConfig, BlockRhoConfig, SearchConfig

SEARCH = SearchConfig()
BLOCK_RHO = BlockRhoConfig()
# Scaled for 2 CPU cores (SearchConfig holds the paper's 32 and 5), see README.
POPULATION, GENERATIONS, SEQ_LEN = 16, 3, 128


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="evolutionary search of per-layer ratios; writes a recipe")
    common.add_model(p)
    p.add_argument("--sparsity", type=float, default=SEARCH.sparsity)
    p.add_argument("--init-ratio", type=float, default=SEARCH.init_ratio, help="centre of the initial population")
    p.add_argument("--init-spread", type=float, default=SEARCH.init_spread,
                   help="standard deviation of the initial population around its centre (wider: more exploration)")
    add_search_args(p)
    p.add_argument("--allocate", default="uniform", choices=list(ALLOCATIONS),
                   help="per-layer sparsity: uniform, greedy (TEAL-style, sparse-only, then the rho search on top) "
                        "or evolve (searched with rho)")
    common.add_allocation(p)
    p.add_argument("--allocation-from", default=None, metavar="RECIPE",
                   help="per-layer sparsity read from a recipe (e.g. a shipped greedy one) instead of computed; the "
                        "rho search runs on top of it (not with --allocate evolve)")
    p.add_argument("--rho-by", default="search", choices=list(RHO_BY),
                   help="how each projection's rho is chosen: search (evolutionary, calibration perplexity; the "
                        "paper) or block (the --rho-grid value with the least block output error on the calibration "
                        "windows, with the final model's factors; no search, minutes)")
    p.add_argument("--rho-grid", default=",".join(str(r) for r in BLOCK_RHO.grid),
                   help="--rho-by block: the rho values tried per projection")
    p.add_argument("--min-gain", type=float, default=BLOCK_RHO.min_gain,
                   help="--rho-by block: keep a rank only where it lowers its block's sparse-only error by more "
                        "than this share of it")
    p.add_argument("--holdout", type=float, default=SEARCH.holdout,
                   help="share of the calibration windows held out of the fitness, for the early stop")
    p.add_argument("--patience", type=int, default=SEARCH.patience,
                   help="stop after this many generations without a held-out gain (0: never; needs --holdout)")
    p.add_argument("--cache-mb", type=int, default=SEARCH.cache_mb,
                   help="bound of the search's caches of sorted scores and whitened factors (MB)")
    p.add_argument("--tokens", default=SEARCH.tokens, choices=list(SCORED_MODES),
                   help="sparse positions in the search objective and the held-out perplexity (second_half: the "
                        "paper's protocol)")
    common.add_device(p, dtype=False)
    p.add_argument("--out", default="out/search", help="directory: recipe.json, search_state.json (resume), plots")
    p.set_defaults(func=cmd_search)


def add_search_args(p) -> None:
    """The search and data flags shared by `rsparse search` and `rsparse compare-recipes`."""
    p.add_argument("--population", type=int, default=POPULATION, help="paper: 32 (see README: scaled for 2 CPU cores)")
    p.add_argument("--generations", type=int, default=GENERATIONS, help="generations per group (paper: 5)")
    p.add_argument("--group-size", type=int, default=SEARCH.group_size, help="genes per group (paper: 28 layers)")
    p.add_argument("--share", default=SEARCH.share, choices=list(SHARES),
                   help="one rho per projection (layer, the paper) or per projection type, shared by all blocks (type)")
    p.add_argument("--mutation", type=float, default=SEARCH.mutation, help="differential weight F")
    p.add_argument("--crossover", type=float, default=SEARCH.crossover, help="crossover rate CR")
    p.add_argument("--factors", default=SEARCH.factors, choices=list(FACTORS),
                   help="low-rank factors the objective scores candidates with: svd (slices of one SVD per layer, "
                        "cheap) or whitened (the final model's factors; one fit per layer and rho value, use a "
                        "coarser --rho-step)")
    p.add_argument("--rho-step", type=float, default=SEARCH.rho_step, help="grid step of the searched rho values")
    p.add_argument("--search-batch-size", type=int, default=4,
                   help="calibration windows per forward pass when scoring a candidate (larger on a GPU)")
    common.add_calibration(p, seq_len=SEQ_LEN)
    p.add_argument("--ppl-corpus", default=common.DATA.perplexity_corpus, help="held-out perplexity corpus")
    p.add_argument("--ppl-windows", type=int, default=common.DATA.perplexity_windows,
                   help="held-out windows for the final comparison (0: skip)")
    p.add_argument("--ppl-seq-len", type=int, default=common.RSPARSE.seq_len)


def check_batch_size(n: int) -> int:
    if n < 1:
        raise BadInputError(f"--search-batch-size must be >= 1, got {n}")
    return n


def check_state(out_dir) -> Path:
    """The --out directory, writable, and its search_state.json (a resume) readable: both before
    the model loads. Whether the state fits these settings is checked by `search` itself."""
    import json

    from rsparse.io.outdir import check_writable, remove_stale_temps

    out = check_writable(out_dir)
    state = out / "search_state.json"
    if state.is_file():
        try:
            if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInputError(f"search state {state} is damaged ({e}; a run killed while writing it?): delete it "
                                "to start the search again, or use another --out") from None
    remove_stale_temps(out)
    return out


def cmd_search(args) -> int:
    from rsparse.core.calibrate import collect_activations
    from rsparse.core.config import RSparseConfig
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, check_seq_len, load_model
    from rsparse.eval.perplexity import evaluate_perplexity
    from rsparse.io.results import markdown_table, versions, write_json
    from rsparse.io.tables import plot_recipe
    from rsparse.methods import restore_, sparsify_
    from rsparse.search.evolution import recipe_from_search, search

    cfg = SearchConfig(sparsity=args.sparsity, population=args.population, generations=args.generations,
                       group_size=args.group_size, mutation=args.mutation, crossover=args.crossover,
                       init_ratio=args.init_ratio, init_spread=args.init_spread, share=args.share, tokens=args.tokens,
                       factors=args.factors, rho_step=args.rho_step, seed=args.seed,
                       allocation=AllocationConfig(args.allocate, args.alloc_step, args.max_sparsity, args.sparsity_spread),
                       holdout=args.holdout, patience=args.patience, cache_mb=args.cache_mb)
    cfg.validate()
    block_cfg = BlockRhoConfig(grid=parse_grid(args.rho_grid), min_gain=args.min_gain).validate()
    if args.rho_by == "block" and (args.allocate == "evolve" or args.holdout or args.patience):
        raise BadInputError("--rho-by block chooses rho on a fixed allocation without a search: --allocate evolve, "
                            "--holdout and --patience apply to --rho-by search")
    check_batch_size(args.search_batch_size)
    given = fixed_allocation(args.allocation_from, args.allocate) if args.allocation_from else None
    common.check_corpora(args.calib_corpus, args.ppl_corpus)
    common.check_device(args.device)
    out = check_state(args.out)
    spec = common.check_model(args.model, args.seq_len)  # the context, before the weights load
    if args.ppl_windows:
        check_seq_len(spec, args.ppl_seq_len, "--ppl-seq-len")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load_model(args.model, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    windows = load_windows(tok, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    activations = collect_activations(model, windows, seed=args.seed)
    fixed = None
    if given is not None:
        fixed = allocation_of(given, model, args.allocation_from, cfg.sparsity)
    elif args.allocate == "greedy":
        from rsparse.search.allocate import greedy_allocation

        greedy = greedy_allocation(model, windows, [cfg.sparsity], activations, cfg.allocation, tokens=args.tokens,
                                   batch_size=args.search_batch_size, cache_mb=cfg.cache_mb)
        fixed = greedy["sparsity"][cfg.sparsity]
        restore_(model)
    if args.rho_by == "block":
        state = block_state(model, windows, cfg, block_cfg, activations, fixed, args)
        restore_(model)
    else:
        state = search(model, windows, cfg, checkpoint=out / "search_state.json", activations=activations,
                       log=lambda m: print(m, file=sys.stderr), batch_size=args.search_batch_size, sparsities=fixed)
    search_seconds = time.time() - start

    # The final model: the searched recipe through the standard calibration (with refinement).
    names = state["names"]
    per_layer = state["best"].get("sparsity")
    recipe = {"layers": [{"name": n, "rho": r, **({} if per_layer is None else {"sparsity": per_layer[i]})}
                         for i, (n, r) in enumerate(zip(names, state["best"]["rho"]))]}
    report = sparsify_(model, RSparseConfig(sparsity=cfg.sparsity, recipe=recipe, seq_len=args.seq_len), activations)
    data = recipe_from_search(state, cfg.sparsity, report, model=model_name,
                              calibration={"corpus": args.calib_corpus, "windows": args.calib_samples,
                                           "seq_len": args.seq_len, "seed": args.seed},
                              allocation=args.allocate if given is None else
                              {"from": str(args.allocation_from), "allocation": given.get("allocation")},
                              versions=versions())
    data["search"]["wall_seconds"] = search_seconds
    write_json(out / "recipe.json", data)
    plot_recipe(data, out / "recipe_rho.png")
    fitness = state["best"]["fitness"]
    print(f"{args.rho_by}: {state['evaluations']} evaluations in {search_seconds / 60:.1f} min"
          + ("" if fitness is None else f"; best calibration fitness {fitness:.3f}"), file=sys.stderr)

    rows = []
    if args.ppl_windows:
        evalw = load_windows(tok, args.ppl_corpus, args.ppl_seq_len, args.ppl_windows, "perplexity")
        variants = [("sparse-only", RSparseConfig(sparsity=cfg.sparsity, method="sparse")),
                    (f"uniform rho={cfg.init_ratio}", RSparseConfig(sparsity=cfg.sparsity, ratio=cfg.init_ratio)),
                    ("searched" if args.rho_by == "search" else "block rho",
                     RSparseConfig(sparsity=cfg.sparsity, recipe=recipe))]
        if fixed is not None:
            label = "sparse-only greedy" if given is None else "sparse-only, given allocation"
            variants.insert(2, (label, RSparseConfig(sparsity=cfg.sparsity, recipe={"layers": [
                {"name": n, "rho": 1.0, "sparsity": x} for n, x in zip(names, fixed)]})))
        for label, config in variants:
            sparsify_(model, config, activations)
            r = evaluate_perplexity(model, evalw, tokens=args.tokens, desc=f"perplexity ({label})")
            rows.append({"recipe": label, "target_sparsity": cfg.sparsity,
                         "achieved_sparsity": r["achieved_sparsity"], "ppl": r["ppl"]})
        restore_(model)
        write_json(out / "search_eval.json", {"model": model_name, "rows": rows,
                                              "perplexity": {"corpus": args.ppl_corpus, "windows": int(evalw.shape[0]),
                                                             "seq_len": args.ppl_seq_len, "tokens": args.tokens}})
        table = markdown_table(rows, [("recipe", "recipe"), ("target_sparsity", "target sparsity %"),
                                      ("achieved_sparsity", "achieved sparsity %"), ("ppl", "held-out perplexity")])
        (out / "search_eval.md").write_text(table + "\n")
        print(table)
    print(f"wrote {out / 'recipe.json'} and {out / 'recipe_rho.png'}")
    return 0


def parse_grid(text: str) -> tuple:
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise BadInputError(f"--rho-grid must be a comma list of numbers, got {text!r}") from None


def block_state(model, windows, cfg: SearchConfig, block_cfg: BlockRhoConfig, activations, fixed, args) -> dict:
    """rho by block output error (rsparse.search.allocate.block_rho) on the fixed allocation (or the
    uniform one), in the shape of a search's state, so that the recipe and its report are written
    alike."""
    from rsparse.core.config import RSparseConfig
    from rsparse.core.models import decoder_linears
    from rsparse.search.allocate import block_rho

    start = time.time()
    shapes = [[l.module.out_features, l.module.in_features] for l in decoder_linears(model)]
    s = fixed if fixed is not None else [cfg.sparsity] * len(shapes)
    got = block_rho(model, windows, s, activations, block_cfg, tokens=cfg.tokens, factors=RSparseConfig.factors,
                    batch_size=args.search_batch_size, cache_mb=cfg.cache_mb)
    settings = {"rho_by": "block", "grid": got["grid"], "min_gain": got["min_gain"], "tokens": cfg.tokens,
                "factors": RSparseConfig.factors, "seed": cfg.seed}
    return {"names": got["names"], "shapes": shapes, "settings": settings, "evaluations": got["evaluations"],
            "seconds": time.time() - start, "history": [{"block_error": got["error"]}],
            "best": {"rho": got["rho"], "sparsity": None if fixed is None else list(fixed), "fitness": None}}


def fixed_allocation(path, allocate: str) -> dict:
    """The recipe of --allocation-from, read before the model loads: every layer with a sparsity."""
    from rsparse.core.config import load_recipe

    if allocate == "evolve":
        raise BadInputError("--allocation-from fixes the per-layer sparsity, --allocate evolve searches it: "
                            "give one of them")
    recipe = load_recipe(path)
    missing = [i for i, e in enumerate(recipe["layers"]) if not isinstance(e, dict) or "sparsity" not in e]
    if missing:
        raise BadInputError(f"--allocation-from {path}: layer {missing[0]} has no 'sparsity' (a recipe written with "
                            "--allocate greedy or evolve has one per layer)")
    for i, e in enumerate(recipe["layers"]):
        e["sparsity"] = check_sparsity(e["sparsity"], f"--allocation-from {path}: sparsity of layer {i}")
    return recipe


def allocation_of(recipe: dict, model, path, sparsity: float) -> list[float]:
    """The recipe's per-layer sparsity in the model's projection order, checked against the budget."""
    from rsparse.core.models import decoder_linears
    from rsparse.search.allocate import layer_sizes, model_sparsity

    linears = decoder_linears(model)
    names = [l.name for l in linears]
    by_name = {e.get("name"): e["sparsity"] for e in recipe["layers"]}
    if sorted(map(str, by_name)) != sorted(names):
        raise BadInputError(f"--allocation-from {path} names other layers than the model's {len(names)} decoder "
                            "projections: a recipe of another model?")
    s = [float(by_name[n]) for n in names]
    if abs(model_sparsity(s, layer_sizes(linears)) - sparsity) > 1e-6:
        raise BadInputError(f"--allocation-from {path}: its per-layer sparsities do not meet the budget {sparsity} "
                            f"(they average {model_sparsity(s, layer_sizes(linears)):.4f}); give its --sparsity")
    return s
