"""`rsparse eval`: the paper's Table 1 (zero-shot accuracy of every method at equal model-level
budgets) and Figure 5 (accuracy and perplexity against model-level sparsity), on one model.

    rsparse eval --methods dense,relu,cats,griffin,rsparse --sparsities 0.4,0.5 --limit 100
    rsparse eval --methods dense,cats,griffin,sparse,rsparse --sweep 0.3,0.4,0.5,0.6,0.7
    rsparse eval --merge rows/*/results.json --out out/eval      # rows evaluated apart (one per GPU)
    rsparse eval --paired a/results.json b/results.json --out out/ab   # a - b, example by example

Writes results.json (every number, the split of every task, versions, settings), results.md (a
markdown table in the layout of the paper's Table 1, and a table of target / achieved
sparsity, perplexity and Rouge-L) and, with --sweep, sweep.png; every row keeps each example's 0/1
outcome, for --paired (paired.json, paired.md: is a difference noise?). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rsparse.cli import common
from rsparse.core.budget import check_sparsity
from rsparse.core.config import BASELINES, METHODS, SCORED_MODES
from rsparse.errors import BadInputError
from rsparse.eval.tasks import PAPER_TASKS

DEFAULT_METHODS = "dense,relu,cats,griffin,rsparse"


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {DEFAULT_METHODS})")
    p.add_argument("--sparsities", default="0.4,0.5",
                   help="model-level target sparsities of the sparse methods (fraction of all 7 linear layers' bytes)")
    p.add_argument("--mlp-sparsities", default=None,
                   help="extra CATS/GRIFFIN rows at these MLP-level sparsities, the methods' own reported "
                        "setting (default 0.5 for a table, none with --sweep); 'none' for none")
    p.add_argument("--sweep", default=None,
                   help="model-level sparsities for the accuracy/perplexity plot, e.g. 0.3,0.4,0.5,0.6,0.7 "
                        "(replaces --sparsities; targets a baseline cannot reach are skipped)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lm-eval task names (default: the 8 of Table 1)")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (default: the full sets)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="lm-eval batch size (padding-aware: every method scores as at batch size 1)")
    p.add_argument("--tokens", default=SCORED_MODES[0], choices=list(SCORED_MODES),
                   help="which positions are sparse while scoring (second_half: the paper's protocol)")
    p.add_argument("--hub-tasks", action="store_true",
                   help="lm-eval's built-in tasks from the hub (its splits) instead of the offline validation copies")
    p.add_argument("--weights", default="fp",
                   help="weight formats, comma-separated: fp (as loaded) and/or int4 (HQQ, group-wise; also int2, "
                        "int3, int8); every method row is evaluated on each (the paper's Table 2: --weights fp,int4)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (input channels per group)")
    p.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn", "hqq-int4"],
                   help="hqq: HQQ (any --weights intN); rtn / hqq-int4: the 4-bit format of rsparse compress "
                        "--weights int4 with --rounding rtn / hqq (what the 4-bit kernels run; int4 only)")
    common.add_sparsify(p, sparsity=False)
    common.add_calibration(p)
    common.add_refine_mix(p)
    p.add_argument("--ppl-corpus", default="wikitext2",
                   help="perplexity corpus: wikitext2 (default; skipped when the hub is unreachable), c4, an "
                        "offline corpus (boolq, coqa, sciq), a text file, or none")
    p.add_argument("--ppl-windows", type=int, default=0, help="perplexity windows (0 = the whole corpus)")
    p.add_argument("--xsum-samples", type=int, default=100,
                   help="XSUM test documents for Rouge-L (0 = skip; skipped when the hub is unreachable)")
    p.add_argument("--xsum-max-new-tokens", type=int, default=64)
    common.add_device(p)
    p.add_argument("--out", default="out/eval", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace the results an earlier run left in --out")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT/results.json from a run with the same settings and "
                        "evaluate only the missing ones")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="evaluate nothing: combine the rows of these results.json files (runs with the same "
                        "settings, e.g. one per GPU or one per row) into OUT's results.json, results.md and, when "
                        "the rows span several sparsities, sweep.png")
    p.add_argument("--paired", nargs=2, default=None, metavar=("A", "B"),
                   help="evaluate nothing: row A minus row B on the same examples, per task and on the average, "
                        "with its paired standard error, into OUT's paired.json and paired.md; each a "
                        "results.json with one row, or results.json::LABEL")


def register(subparsers) -> None:
    """Add `rsparse eval` to the `rsparse` command's subparsers."""
    p = subparsers.add_parser("eval", help="zero-shot accuracy (lm-eval), perplexity and Rouge-L of R-Sparse "
                                           "and the baselines at equal budgets; Table 1 and Figure 5")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)


def _sparsities(text: str | None, what: str) -> list[float]:
    return sorted(set(common.parse_floats(text, what, check_sparsity)))


def plan_rows(methods, sparsities, mlp_sparsities) -> list[dict]:
    """The (method, target) rows to evaluate, before budgets are checked against the model."""
    rows = []
    for m in methods:
        if m in ("dense", "relu"):
            rows.append({"method": m, "sparsity": None, "mlp_sparsity": None})
            continue
        rows += [{"method": m, "sparsity": s, "mlp_sparsity": None} for s in sparsities]
        if m in ("cats", "griffin"):
            rows += [{"method": m, "sparsity": None, "mlp_sparsity": s} for s in mlp_sparsities]
    return rows


def check_budgets(model, plan: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split the plan into rows the model can run and skipped ones (CATS/GRIFFIN targets beyond
    what MLP-only sparsity reaches). A method left with no row at all is an error."""
    from rsparse.errors import UnreachableSparsityError
    from rsparse.methods.mlp import mlp_sparsity_for, model_sparsity_for

    keep, skipped, errors = [], [], {}
    for row in plan:
        m = row["method"]
        if m in ("cats", "griffin"):
            try:
                if row["sparsity"] is not None:
                    row = dict(row, mlp_sparsity=mlp_sparsity_for(model, m, row["sparsity"]), by="model")
                else:
                    row = dict(row, sparsity=model_sparsity_for(model, m, row["mlp_sparsity"]), by="mlp")
            except UnreachableSparsityError as e:
                skipped.append({"method": m, "target_sparsity": row["sparsity"], "reason": str(e)})
                errors[m] = str(e)
                continue
        keep.append(row)
    for m, msg in errors.items():
        if not any(r["method"] == m for r in keep):
            raise BadInputError(f"{msg}")
    return keep, skipped


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rsparse.core.budget import check_ratio
    from rsparse.core.config import RSparseConfig, load_recipe
    from rsparse.core.models import DEFAULT_MODEL_NAME, load_model
    from rsparse.eval.harness import evaluate_tasks, lm_eval_version, resolve_tasks
    from rsparse.eval.hub import check_hub_for_tasks, perplexity_windows_or_skip
    from rsparse.eval.perplexity import evaluate_perplexity
    from rsparse.eval.xsum import load_xsum, xsum_rouge
    from rsparse.io.results import previous_rows, read_results, versions, write_json, write_reports
    from rsparse.io.tables import row_label, weight_label
    from rsparse.methods import restore_
    from rsparse.progress import progress

    from rsparse.io.outdir import check_out

    def check_target():  # before any work: an --out that is a file, unwritable or holding results
        check_out(args.out, results=("results.json", "results.md"), overwrite=args.overwrite, resume=args.resume)

    if args.merge:
        check_target()
        return cmd_merge(args.merge, Path(args.out))
    if args.paired:
        check_out(args.out, results=("paired.json", "paired.md"), overwrite=args.overwrite)
        return cmd_paired(*args.paired, Path(args.out))
    # Validate everything cheap before loading anything.
    methods = common.parse_names(args.methods, METHODS, "method")
    sweep = args.sweep is not None
    sparsities = _sparsities(args.sweep if sweep else args.sparsities, "sparsity")
    mlp_text = args.mlp_sparsities if args.mlp_sparsities is not None else ("" if sweep else "0.5")
    mlp_sparsities = [] if mlp_text.strip().lower() == "none" else _sparsities(mlp_text, "MLP sparsity")
    needs_target = [m for m in methods if m not in ("dense", "relu")]
    common.require(not needs_target or sparsities or mlp_sparsities, "no target sparsity given (--sparsities or --sweep)")
    common.require(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}")
    common.require(args.batch_size >= 1 and args.calib_samples >= 1 and args.seq_len >= 4 and args.ppl_windows >= 0
                   and args.xsum_samples >= 0, "--batch-size, --calib-samples must be >= 1, --seq-len >= 4, "
                   "--ppl-windows and --xsum-samples >= 0")
    common.check_corpora(args.calib_corpus)
    common.check_refine_mix(args)
    common.check_device(args.device)
    formats = weight_formats(args.weights, args.group_size, args.quantizer)
    check_ratio(args.ratio)
    recipe = load_recipe(args.recipe) if args.recipe else None
    specs = resolve_tasks(args.tasks, args.hub_tasks)
    if args.hub_tasks:
        check_hub_for_tasks()

    check_target()
    previous = read_results(Path(args.out) / "results.json", "--resume") if args.resume else None
    # the recipe (when rsparse is evaluated) and --seq-len against the model's config, before it loads
    checked = RSparseConfig(sparsity=sparsities[0] if sparsities else 0.5, recipe=recipe) if "rsparse" in methods else None
    common.check_model(args.model, args.seq_len, checked)

    start = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    plan, skipped = check_budgets(model, plan_rows(methods, sparsities, mlp_sparsities))
    for s in skipped:
        print(f"skipped {s['method']} at {100 * s['target_sparsity']:.0f}%: {s['reason']}", file=sys.stderr)
    print(f"model: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); "
          f"{len(plan)} rows x {len(specs)} tasks", file=sys.stderr)

    needs_calib = any(r["method"] in ("sparse", "lowrank", "rsparse", "cats") for r in plan)
    calib = mix = None
    if needs_calib:
        from rsparse.core.data import load_windows

        calib = load_windows(tokenizer, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
        mix = common.refine_mix(tokenizer, args, calib)
    ppl_windows, ppl_skip = perplexity_windows_or_skip(tokenizer, args.ppl_corpus, args.seq_len, args.ppl_windows)
    if ppl_skip and args.ppl_corpus not in ("none", ""):
        print(ppl_skip, file=sys.stderr)
    xsum_docs, xsum_skip = load_xsum(args.xsum_samples)
    if xsum_skip and args.xsum_samples:
        print(xsum_skip, file=sys.stderr)

    out = Path(args.out)
    results = {
        "model": model_name, "seed": args.seed, "limit": args.limit,
        "versions": {**versions(), "lm_eval": lm_eval_version()},
        "protocol": {"tokens": args.tokens, "num_fewshot": 0, "table_metric": "acc",
                     "batch_size": args.batch_size,
                     "note": ("batched; each padded row declares its real length, so the halves (and GRIFFIN's "
                              "selection) are those of each real sequence, as at batch size 1"
                              if args.tokens == "second_half" else "every position sparse")},
        "tasks": {s.name: {"split": s.split, "source": s.source} for s in specs},
        "calibration": {"corpus": args.calib_corpus, "windows": args.calib_samples, "seq_len": args.seq_len,
                        "refine_mix": {"corpus": args.refine_corpus, "windows": args.refine_windows} if mix is not None
                        else None} if calib is not None else None,
        "perplexity": {"corpus": args.ppl_corpus, "seq_len": args.seq_len,
                       "windows": int(ppl_windows.shape[0]) if ppl_windows is not None else 0,
                       "scored": "second half of each window" if args.tokens == "second_half" else "all positions",
                       "skipped": ppl_skip},
        "xsum": {"documents": len(xsum_docs) if xsum_docs else 0, "skipped": xsum_skip,
                 "max_new_tokens": args.xsum_max_new_tokens},
        "weights": {"formats": list(formats), "group_size": args.group_size if any(formats.values()) else None,
                    "quantizer": {"hqq": quantizer_version(), "rtn": "rtn (rsparse.core.int4)",
                                  "hqq-int4": f"{quantizer_version()} rounding, rsparse.core.int4 format"}[args.quantizer]
                    if any(formats.values()) else None, "relative_error": {}},
        "sweep": sparsities if sweep else None,
        "rows": [], "skipped": skipped,
        "settings": common.settings(args),
    }

    done = previous_rows(out / "results.json", previous, results) if args.resume else {}
    activations, quantized, current = None, None, "fp"
    jobs = [(fmt, row) for fmt in formats for row in plan]
    for fmt, row in progress(jobs, desc="methods", unit="row"):
        m = row["method"]
        t0 = time.time()
        key = (m, weight_label(fmt) + row_label(m, row["sparsity"], row.get("by")))
        if key in done:
            results["rows"].append(done[key])
            print(f"{key[1]}: kept from the previous run", file=sys.stderr)
            continue
        if fmt != current:  # switch weights; calibration is redone on the new weights
            restore_(model)
            if quantized is not None:
                quantized.restore()
                quantized = None
            if formats[fmt] is not None:
                from rsparse.methods.quantize import quantize_weights_

                quantized = quantize_weights_(model, formats[fmt])
                results["weights"]["relative_error"][fmt] = quantized.mean_relative_error
            current, activations = fmt, None
        if m in ("sparse", "lowrank", "rsparse", "cats") and activations is None:
            from rsparse.core.calibrate import collect_activations

            restore_(model)
            activations = collect_activations(model, calib, seed=args.seed)
        info = apply_row(model, row, activations, args, recipe, calib, mix)
        ev = evaluate_tasks(model, tokenizer, specs_names(specs), limit=args.limit, batch_size=args.batch_size,
                            tokens=args.tokens, hub_tasks=args.hub_tasks, seed=args.seed)
        for name, r in ev["tasks"].items():  # hub tasks: the split lm-eval used
            results["tasks"].setdefault(name, {}).update(split=r["split"], source=r["source"], examples=r["examples"])
        entry = {
            "method": m, "label": weight_label(fmt) + row_label(m, info.get("target_sparsity"), row.get("by")),
            "weights": fmt,
            "target_sparsity": None if m == "relu" else info.get("target_sparsity"),
            "achieved_sparsity": ev["achieved_sparsity"],
            "tasks": {t: {k: r.get(k) for k in ("acc", "acc_norm", "acc_stderr", "correct", "docs")}
                      for t, r in ev["tasks"].items()},
            "average": ev["average"], "average_acc_norm": ev["average_acc_norm"], "batch_size": ev["batch_size"],
        }
        if m in BASELINES:
            entry["module_sparsity"] = ev.get("module_sparsity")
            if m == "relu":
                entry["skippable_sparsity"] = ev.get("skippable_sparsity")
            entry["target_module_sparsity"] = None if m == "relu" else info.get("mlp_sparsity")
            entry["target_by"] = row.get("by")
        if m == "rsparse":
            entry["ratio"] = None if recipe else args.ratio
            entry["recipe"] = args.recipe
        if ppl_windows is not None:
            p = evaluate_perplexity(model, ppl_windows, tokens=args.tokens, desc=f"perplexity ({m})")
            entry["ppl"] = p["ppl"]
            entry["ppl_achieved_sparsity"] = p["achieved_sparsity"]
        if xsum_docs:
            x = xsum_rouge(model, tokenizer, xsum_docs, tokens=args.tokens, max_new_tokens=args.xsum_max_new_tokens,
                           desc=f"xsum ({m})")
            entry["rougeL"] = x["rougeL"]
            entry["xsum_achieved_sparsity"] = x.get("generation_achieved_sparsity")
        entry["seconds"] = time.time() - t0
        results["rows"].append(entry)
        write_json(out / "results.json", results)  # after every row: a long run can be inspected
        print(f"{entry['label']}: average acc {100 * entry['average']:.2f}, achieved sparsity "
              f"{100 * entry['achieved_sparsity']:.1f}%" + (f", ppl {entry['ppl']:.3f}" if "ppl" in entry else ""),
              file=sys.stderr)
    restore_(model)
    if quantized is not None:
        quantized.restore()

    results["wall_seconds"] = time.time() - start
    write_reports(results, out, plot=sweep)
    print(f"({time.time() - start:.0f} s)")
    return 0


def apply_row(model, row: dict, activations, args: argparse.Namespace, recipe, calib=None, mix=None) -> dict:
    """Put the model in the state of one row's method (first undoing any other); returns
    {"target_sparsity", "mlp_sparsity" (baselines)}. With `mix` (--refine-corpus), the thresholds of
    sparse and rsparse are re-set on the calibration windows plus those windows."""
    from rsparse.methods import method_config, restore_, sparsify_

    m = row["method"]
    sparsity = row["sparsity"] if row.get("by") != "mlp" and m not in ("dense", "relu") else None
    mlp = row["mlp_sparsity"] if row.get("by") == "mlp" else None
    config = method_config(m, sparsity, mlp_sparsity=mlp, tokens=args.tokens, seed=args.seed, ratio=args.ratio,
                           recipe=recipe)
    if config is None:  # dense
        restore_(model)
        return {"target_sparsity": 0.0}
    report = sparsify_(model, config, activations)
    if mix is not None and m in ("sparse", "rsparse"):
        from rsparse.methods.rsparse import refine_on_mix_

        refine_on_mix_(model, config, calib, mix)
    return {"target_sparsity": float(sparsity)} if isinstance(report, list) else report


def cmd_merge(paths: list[str], out: Path) -> int:
    from rsparse.io.results import merge_results, write_reports

    merged = merge_results(paths)
    print(f"merged {len(merged['rows'])} rows from {len(paths)} files", file=sys.stderr)
    write_reports(merged, out, plot=merged["sweep"] is not None)
    return 0


def cmd_paired(a: str, b: str, out: Path) -> int:
    from rsparse.eval.paired import load_row, paired_difference, paired_markdown
    from rsparse.io.results import write_json, write_text

    d = paired_difference(load_row(a), load_row(b))
    if d["a"] == d["b"]:  # e.g. two runs' "R-Sparse 70%" rows (two recipes): name them by file
        d |= {"a": a, "b": b}
    md = paired_markdown(d)
    write_json(out / "paired.json", d | {"files": [a, b]})
    write_text(out / "paired.md", md)
    print(md, end="")
    return 0


def weight_formats(text: str, group_size: int, quantizer: str = "hqq") -> dict:
    """{"fp": None, "int4": QuantConfig(4, group_size), ...} from --weights, in the given order."""
    from rsparse.methods.quantize import QuantConfig

    out = {}
    for t in [t.strip().lower() for t in (text or "").split(",") if t.strip()]:
        if t in out:
            raise BadInputError(f"weight format {t!r} given twice")
        if t == "fp":
            out[t] = None
        elif t.startswith("int") and t[3:].isdigit():
            out[t] = QuantConfig(bits=int(t[3:]), group_size=group_size, quantizer=quantizer)
            if quantizer != "rtn":  # rtn is rsparse's own rounding: no HQQ needed
                common.require_hqq(f"--weights {t} --quantizer {quantizer}")
        else:
            raise BadInputError(f"unknown weight format {t!r}; expected fp or int<bits> (int2, int3, int4, int8)")
    if not out:
        raise BadInputError("no weight format given (--weights)")
    return out


def quantizer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"hqq {version('hqq')}"
    except PackageNotFoundError:
        return "hqq (not installed)"


def specs_names(specs) -> list[str]:
    return [s.name for s in specs]
