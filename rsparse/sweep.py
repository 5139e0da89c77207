"""`rsparse eval`: the paper's Table 1 (zero-shot accuracy of every method at equal model-level
budgets) and Figure 5 (accuracy and perplexity against model-level sparsity), on one model.

    rsparse eval --methods dense,relu,cats,griffin,rsparse --sparsities 0.4,0.5 --limit 100
    rsparse eval --methods dense,cats,griffin,sparse,rsparse --sweep 0.3,0.4,0.5,0.6,0.7
    rsparse eval --merge rows/*/results.json --out out/eval      # rows evaluated apart (one per GPU)

Writes results.json (every number, the split of every task, versions, settings), results.md (a
markdown table in the layout of the paper's Table 1, and a table of target / achieved
sparsity, perplexity and Rouge-L) and, with --sweep, sweep.png.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from rsparse.baselines import BASELINES, LABELS as BASELINE_LABELS
from rsparse.evaluate import METHODS, SCORED_MODES
from rsparse.tasks import PAPER_TASKS, TASK_LABELS

METHOD_LABELS = {"dense": "Dense", "sparse": "Sparse", "lowrank": "Low-Rank", "rsparse": "R-Sparse", **BASELINE_LABELS}
# Row order inside one sparsity level (the paper lists the baselines before R-Sparse).
METHOD_ORDER = {m: i for i, m in enumerate(("dense", "relu", "cats", "griffin", "sparse", "lowrank", "rsparse"))}
DEFAULT_METHODS = "dense,relu,cats,griffin,rsparse"


# -- argument parsing ----------------------------------------------------------------------------

def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
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
    p.add_argument("--tokens", default="second_half", choices=list(SCORED_MODES),
                   help="which positions are sparse while scoring (second_half: the paper's protocol)")
    p.add_argument("--hub-tasks", action="store_true",
                   help="lm-eval's built-in tasks from the hub (its splits) instead of the offline validation copies")
    p.add_argument("--weights", default="fp",
                   help="weight formats, comma-separated: fp (as loaded) and/or int4 (HQQ, group-wise; also int2, "
                        "int3, int8); every method row is evaluated on each (the paper's Table 2: --weights fp,int4)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (input channels per group)")
    p.add_argument("--ratio", type=float, default=0.95, help="uniform rho for rsparse")
    p.add_argument("--recipe", default=None, help="per-layer recipe JSON for rsparse (overrides --ratio)")
    p.add_argument("--calib-corpus", default="coqa", help="coqa (default, offline), boolq, sciq, wikitext2, c4 or a text file")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and perplexity window")
    p.add_argument("--ppl-corpus", default="wikitext2",
                   help="perplexity corpus: wikitext2 (default; skipped when the hub is unreachable), c4, an "
                        "offline corpus (boolq, coqa, sciq), a text file, or none")
    p.add_argument("--ppl-windows", type=int, default=0, help="perplexity windows (0 = the whole corpus)")
    p.add_argument("--xsum-samples", type=int, default=100,
                   help="XSUM test documents for Rouge-L (0 = skip; skipped when the hub is unreachable)")
    p.add_argument("--xsum-max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/eval", help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT/results.json from a run with the same settings and "
                        "evaluate only the missing ones")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="evaluate nothing: combine the rows of these results.json files (runs with the same "
                        "settings, e.g. one per GPU or one per row) into OUT's results.json, results.md and, when "
                        "the rows span several sparsities, sweep.png")


def register(subparsers) -> None:
    """Add `rsparse eval` to the `rsparse` command's subparsers."""
    p = subparsers.add_parser("eval", help="zero-shot accuracy (lm-eval), perplexity and Rouge-L of R-Sparse "
                                           "and the baselines at equal budgets; Table 1 and Figure 5")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)


def _floats(text: str | None, what: str) -> list[float]:
    from rsparse.budget import check_sparsity

    out = []
    for t in [t.strip() for t in (text or "").split(",") if t.strip()]:
        try:
            out.append(check_sparsity(float(t), what))
        except ValueError as e:
            raise SystemExit(f"error: {e}" if "must be in" in str(e) else f"error: {what} {t!r} is not a number") from None
    return sorted(set(out))


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
    from rsparse.baselines import UnreachableSparsityError, mlp_sparsity_for, model_sparsity_for

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
            raise SystemExit(f"error: {msg}")
    return keep, skipped


# -- the command ---------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from rsparse.budget import check_ratio
    from rsparse.config import RSparseConfig, layer_budgets, load_recipe
    from rsparse.evaluate import (EvaluationError, apply_method, check_hub_for_tasks, evaluate_tasks, load_xsum,
                                  lm_eval_version, perplexity, perplexity_windows, resolve_tasks, restore_all,
                                  xsum_rouge)
    from rsparse.models import DEFAULT_MODEL_NAME, decoder_linears, load_model
    from rsparse.report import versions, write_json

    if args.merge:
        return cmd_merge(args.merge, Path(args.out))
    # Validate everything cheap before loading anything.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"error: unknown method(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise SystemExit("error: a method is given twice in --methods")
    sweep = args.sweep is not None
    sparsities = _floats(args.sweep if sweep else args.sparsities, "sparsity")
    mlp_text = args.mlp_sparsities if args.mlp_sparsities is not None else ("" if sweep else "0.5")
    mlp_sparsities = [] if mlp_text.strip().lower() == "none" else _floats(mlp_text, "MLP sparsity")
    needs_target = [m for m in methods if m not in ("dense", "relu")]
    if needs_target and not sparsities and not mlp_sparsities:
        raise SystemExit("error: no target sparsity given (--sparsities or --sweep)")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be >= 1, got {args.limit}")
    if args.batch_size < 1 or args.calib_samples < 1 or args.seq_len < 4 or args.ppl_windows < 0 or args.xsum_samples < 0:
        raise SystemExit("error: --batch-size, --calib-samples must be >= 1, --seq-len >= 4, --ppl-windows and "
                         "--xsum-samples >= 0")
    try:
        formats = weight_formats(args.weights, args.group_size)
        check_ratio(args.ratio)
        recipe = load_recipe(args.recipe) if args.recipe else None
        specs = resolve_tasks(args.tasks, args.hub_tasks)
        if args.hub_tasks:
            check_hub_for_tasks()
    except (ValueError, EvaluationError) as e:
        raise SystemExit(f"error: {e}") from None

    previous = read_previous(Path(args.out) / "results.json") if args.resume else None

    start = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    model_name = args.model or DEFAULT_MODEL_NAME
    if recipe is not None and "rsparse" in methods:
        try:
            layer_budgets(RSparseConfig(sparsity=sparsities[0] if sparsities else 0.5, recipe=recipe), decoder_linears(model))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    plan, skipped = check_budgets(model, plan_rows(methods, sparsities, mlp_sparsities))
    for s in skipped:
        print(f"skipped {s['method']} at {100 * s['target_sparsity']:.0f}%: {s['reason']}", file=sys.stderr)
    print(f"model: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); "
          f"{len(plan)} rows x {len(specs)} tasks", file=sys.stderr)

    needs_calib = any(r["method"] in ("sparse", "lowrank", "rsparse", "cats") for r in plan)
    calib = None
    if needs_calib:
        from rsparse.data import load_windows

        calib = load_windows(tokenizer, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    ppl_windows, ppl_skip = perplexity_windows(tokenizer, args.ppl_corpus, args.seq_len, args.ppl_windows)
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
        "calibration": {"corpus": args.calib_corpus, "windows": args.calib_samples, "seq_len": args.seq_len} if calib is not None else None,
        "perplexity": {"corpus": args.ppl_corpus, "seq_len": args.seq_len,
                       "windows": int(ppl_windows.shape[0]) if ppl_windows is not None else 0,
                       "scored": "second half of each window" if args.tokens == "second_half" else "all positions",
                       "skipped": ppl_skip},
        "xsum": {"documents": len(xsum_docs) if xsum_docs else 0, "skipped": xsum_skip,
                 "max_new_tokens": args.xsum_max_new_tokens},
        "weights": {"formats": list(formats), "group_size": args.group_size if any(formats.values()) else None,
                    "quantizer": quantizer_version() if any(formats.values()) else None, "relative_error": {}},
        "sweep": sparsities if sweep else None,
        "rows": [], "skipped": skipped,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
    }

    done = previous_rows(out / "results.json", previous, results) if args.resume else {}
    activations, quantized, current = None, None, "fp"
    jobs = [(fmt, row) for fmt in formats for row in plan]
    for fmt, row in tqdm(jobs, desc="methods", unit="row"):
        m = row["method"]
        t0 = time.time()
        key = (m, weight_label(fmt) + row_label(m, row["sparsity"], row.get("by")))
        if key in done:
            results["rows"].append(done[key])
            print(f"{key[1]}: kept from the previous run", file=sys.stderr)
            continue
        if fmt != current:  # switch weights; calibration is redone on the new weights
            restore_all(model)
            if quantized is not None:
                quantized.restore()
                quantized = None
            if formats[fmt] is not None:
                from rsparse.quantize import quantize_weights_

                quantized = quantize_weights_(model, formats[fmt])
                results["weights"]["relative_error"][fmt] = quantized.mean_relative_error
            current, activations = fmt, None
        if m in ("sparse", "lowrank", "rsparse", "cats") and activations is None:
            from rsparse.calibrate import collect_activations

            restore_all(model)
            activations = collect_activations(model, calib, seed=args.seed)
        info = apply_method(model, m, row["sparsity"] if row.get("by") != "mlp" and m not in ("dense", "relu") else None,
                            mlp_sparsity=row["mlp_sparsity"] if row.get("by") == "mlp" else None,
                            calibration=activations, ratio=args.ratio, recipe=recipe, tokens=args.tokens, seed=args.seed)
        ev = evaluate_tasks(model, tokenizer, specs_names(specs), limit=args.limit, batch_size=args.batch_size,
                            tokens=args.tokens, hub_tasks=args.hub_tasks, seed=args.seed)
        for name, r in ev["tasks"].items():  # hub tasks: the split lm-eval used
            results["tasks"].setdefault(name, {}).update(split=r["split"], source=r["source"], examples=r["examples"])
        entry = {
            "method": m, "label": weight_label(fmt) + row_label(m, info.get("target_sparsity"), row.get("by")),
            "weights": fmt,
            "target_sparsity": None if m == "relu" else info.get("target_sparsity"),
            "achieved_sparsity": ev["achieved_sparsity"],
            "tasks": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "acc_stderr": r["acc_stderr"]}
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
            p = perplexity(model, ppl_windows, tokens=args.tokens, desc=f"perplexity ({m})")
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
    restore_all(model)
    if quantized is not None:
        quantized.restore()

    results["wall_seconds"] = time.time() - start
    write_reports(results, out, plot=sweep)
    print(f"({time.time() - start:.0f} s)")
    return 0


def write_reports(results: dict, out: Path, plot: bool) -> list[Path]:
    """results.json, results.md and (plot=True) sweep.png under `out`; prints the markdown."""
    from rsparse.report import write_json

    write_json(out / "results.json", results)
    md = results_markdown(results)
    (out / "results.md").write_text(md, encoding="utf-8")
    written = [out / "results.json", out / "results.md"]
    if plot:
        plot_sweep(results, out / "sweep.png")
        written.append(out / "sweep.png")
    print(md)
    print(f"\nwrote {', '.join(map(str, written))}")
    return written


def merge_results(paths: list[str | Path]) -> dict:
    """One results dict holding the rows of several `rsparse eval` results.json files.

    The runs must agree on everything that makes rows comparable (RESUME_KEYS and
    RESUME_SETTINGS; a run that needed no calibration, e.g. dense only, fits any); otherwise
    SystemExit names the file and the settings. A row present in several files is taken from
    the first. The header is the first file's, with "merged_from" listing the files."""
    runs = []
    for path in map(Path, paths):
        try:
            runs.append((path, read_previous(path)))
        except SystemExit:
            raise SystemExit(f"error: --merge: cannot read {path} as JSON") from None
        if runs[-1][1] is None:
            raise SystemExit(f"error: --merge: {path} not found")
        if not isinstance(runs[-1][1], dict) or not isinstance(runs[-1][1].get("rows"), list):
            raise SystemExit(f"error: --merge: {path} is not an rsparse eval results.json (no 'rows' list)")
    base_path, base = runs[0]
    merged = {k: v for k, v in base.items() if k not in ("rows", "skipped", "wall_seconds")}
    if merged.get("calibration") is None:
        merged["calibration"] = next((r["calibration"] for _, r in runs if r.get("calibration")), None)
    rows, skipped = {}, {}
    for path, run in runs:
        diff = settings_diff(run, merged, any_calibration=True)
        if diff:
            raise SystemExit(f"error: --merge: {path} was made with other settings than {base_path} "
                             f"({', '.join(diff)}); its rows are not comparable")
        for r in run["rows"]:
            rows.setdefault((r["method"], r["label"]), r)
        for sk in run.get("skipped", []):
            skipped.setdefault((sk["method"], sk.get("target_sparsity")), sk)
        for name, info in run.get("tasks", {}).items():
            merged["tasks"].setdefault(name, {}).update(info)
        weights = merged.setdefault("weights", {})
        for fmt in run.get("weights", {}).get("formats", []):
            if fmt not in weights.setdefault("formats", []):
                weights["formats"].append(fmt)
        for fmt, err in run.get("weights", {}).get("relative_error", {}).items():
            weights.setdefault("relative_error", {})[fmt] = err
    labels = {r["label"] for r in rows.values()}
    merged["rows"] = sorted_rows(list(rows.values()))
    # a target a baseline could not reach in one run stays skipped unless another run has it
    merged["skipped"] = [sk for sk in skipped.values()
                         if row_label(sk["method"], sk.get("target_sparsity")) not in labels]
    levels = sorted({r["target_sparsity"] for r in merged["rows"] if r.get("target_sparsity")})
    merged["sweep"] = levels if len(levels) > 1 else None
    merged["merged_from"] = [str(p) for p, _ in runs]
    merged["row_seconds"] = sum(r.get("seconds", 0.0) for r in merged["rows"])
    return merged


def cmd_merge(paths: list[str], out: Path) -> int:
    merged = merge_results(paths)
    print(f"merged {len(merged['rows'])} rows from {len(paths)} files", file=sys.stderr)
    write_reports(merged, out, plot=merged["sweep"] is not None)
    return 0


def weight_formats(text: str, group_size: int) -> dict:
    """{"fp": None, "int4": QuantConfig(4, group_size), ...} from --weights, in the given order."""
    from rsparse.quantize import QuantConfig

    out = {}
    for t in [t.strip().lower() for t in (text or "").split(",") if t.strip()]:
        if t in out:
            raise ValueError(f"weight format {t!r} given twice")
        if t == "fp":
            out[t] = None
        elif t.startswith("int") and t[3:].isdigit():
            out[t] = QuantConfig(bits=int(t[3:]), group_size=group_size)
            try:
                import hqq  # noqa: F401
            except ImportError:
                raise ValueError(f"--weights {t} needs HQQ: pip install 'rsparse[quant]' (hqq==0.2.8.post1)") from None
        else:
            raise ValueError(f"unknown weight format {t!r}; expected fp or int<bits> (int2, int3, int4, int8)")
    if not out:
        raise ValueError("no weight format given (--weights)")
    return out


def weight_label(fmt: str) -> str:
    return "" if fmt == "fp" else f"{fmt.upper()} "


def quantizer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"hqq {version('hqq')}"
    except PackageNotFoundError:
        return "hqq (not installed)"


# Settings that must match for --resume to keep a previous run's rows.
RESUME_KEYS = ("model", "seed", "limit", "tasks", "calibration", "perplexity")
# (the weight formats may differ: rows are keyed by their label, which names the format)
RESUME_SETTINGS = ("tokens", "ratio", "recipe", "dtype", "hub_tasks", "xsum_samples", "xsum_max_new_tokens",
                   "group_size")


def read_previous(path: Path) -> dict | None:
    """A previous run's results.json for --resume (None if there is none); a file that cannot be
    read is an error, raised before the model is loaded."""
    import json

    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --resume: cannot read {path} ({e})") from None


def previous_rows(path: Path, old: dict | None, results: dict) -> dict:
    """{(method, label): row} of the previous run `old` (read from `path`) if it was made with the
    same settings; {} if none. Other settings are an error (its rows would not be comparable)."""
    if old is None:
        return {}
    diff = settings_diff(old, results)
    if diff:
        raise SystemExit(f"error: --resume: {path} was made with other settings ({', '.join(diff)}); "
                         "use another --out or the same settings")
    return {(r["method"], r["label"]): r for r in old.get("rows", [])}


def settings_diff(run: dict, reference: dict, any_calibration: bool = False) -> list[str]:
    """What makes the rows of `run` not comparable with those of `reference`: the RESUME_KEYS and
    --RESUME_SETTINGS that differ. any_calibration: a run that needed no calibration (None) fits."""
    diff = [k for k in RESUME_KEYS if not (any_calibration and k == "calibration" and run.get(k) is None)
            and _comparable(k, run.get(k)) != _comparable(k, reference.get(k))]
    return diff + [f"--{k.replace('_', '-')}" for k in RESUME_SETTINGS
                   if run.get("settings", {}).get(k) != reference.get("settings", {}).get(k)]


def _comparable(key: str, v):
    import json

    if key == "tasks":  # the run adds each task's example count; the names are what must match
        return list(v or {})
    return json.loads(json.dumps(v))  # tuples vs lists, int vs float keys: as stored


def specs_names(specs) -> list[str]:
    return [s.name for s in specs]


def row_label(method: str, model_sparsity: float | None, by: str | None = None) -> str:
    label = METHOD_LABELS[method]
    if method in ("dense", "relu") or model_sparsity is None:
        return label
    v = 100 * model_sparsity
    return f"{label} {round(v)}%" if abs(v - round(v)) < 0.05 else f"{label} {v:.1f}%"


# -- tables and plot -----------------------------------------------------------------------------

def _pct(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def sorted_rows(rows: list[dict]) -> list[dict]:
    """Dense rows first (one per weight format), then per weight format by sparsity, baselines
    before R-Sparse: the order of the paper's Tables 1 and 2."""
    formats = list(dict.fromkeys(r.get("weights", "fp") for r in rows))

    def key(r):
        s = r.get("target_sparsity")
        dense = r["method"] in ("dense", "relu")
        fmt = formats.index(r.get("weights", "fp"))
        return (not dense, fmt, -1.0 if dense else (s if s is not None else 0.0), METHOD_ORDER.get(r["method"], 99))
    return sorted(rows, key=key)


def table1_markdown(results: dict, metric: str = "acc") -> str:
    """Accuracy (%) per task in the paper's Table 1 layout: WG PIQA SciQ OBQA HS BoolQ Arc-E Arc-C Average."""
    tasks = list(results["tasks"])
    heads = [TASK_LABELS.get(t, t) for t in tasks]
    lines = ["| Method | " + " | ".join(heads) + " | Average |", "|---|" + "---|" * (len(tasks) + 1)]
    for r in sorted_rows(results["rows"]):
        vals = []
        for t in tasks:
            cell = r["tasks"].get(t, {})
            v = cell.get(metric) if cell.get(metric) is not None else cell.get("acc")
            vals.append(_pct(v))
        avg = r["average"] if metric == "acc" else r.get("average_acc_norm")
        lines.append(f"| {r['label']} | " + " | ".join(vals) + f" | {_pct(avg)} |")
    return "\n".join(lines)


def summary_markdown(results: dict) -> str:
    lines = ["| Method | target sparsity % (model) | achieved % (model) | MLP sparsity % (target / achieved) | "
             "perplexity | Rouge-L |", "|---|---|---|---|---|---|"]
    for r in sorted_rows(results["rows"]):
        mlp = "-"
        if r["method"] in BASELINES:
            mlp = f"{_pct(r.get('target_module_sparsity'), 1)} / {_pct(r.get('module_sparsity'), 1)}"
        ppl = r.get("ppl")
        lines.append(f"| {r['label']} | {_pct(r.get('target_sparsity'), 1)} | {_pct(r.get('achieved_sparsity'), 1)} | "
                     f"{mlp} | {'-' if ppl is None else f'{ppl:.3f}'} | {_pct(r.get('rougeL'))} |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    proto = results["protocol"]
    splits = ", ".join(f"{TASK_LABELS.get(t, t)}: {v.get('split')}" + ("" if v.get("source") == "offline" else " (hub)")
                       for t, v in results["tasks"].items())
    limit = f"first {results['limit']} examples per task" if results.get("limit") else "full sets"
    ppl = results["perplexity"]
    ppl_note = (ppl["skipped"] or "not requested") if not ppl["windows"] else \
        f"{ppl['corpus']}, {ppl['windows']} windows of {ppl['seq_len']} tokens, {ppl['scored']} scored"
    xs = results["xsum"]
    xsum_note = f"{xs['documents']} XSUM test documents, greedy, Rouge-L F1" if xs["documents"] else (xs["skipped"] or "not requested")
    parts = [
        f"# rsparse eval: {results['model']}",
        "",
        f"Zero-shot accuracy (lm-eval {results['versions'].get('lm_eval')}, `acc`, %), {limit}; "
        f"sparsity on {'the second half of each scored sequence' if proto['tokens'] == 'second_half' else 'every position'}"
        f" ({proto['note']}). Splits: {splits}. Sparsity % is model-level: the fraction of the weight bytes of "
        "all 7 linear layers of every block that is not read.",
        "",
        table1_markdown(results),
        "",
        f"Perplexity: {ppl_note}. XSUM: {xsum_note}.",
        "",
        summary_markdown(results),
    ]
    if results.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(
            f"{BASELINE_LABELS.get(s['method'], s['method'])} {_pct(s['target_sparsity'], 0)}% (MLP-only sparsity "
            "cannot reach it)" for s in results["skipped"])]
    return "\n".join(parts) + "\n"


def plot_sweep(results: dict, path: str | Path) -> Path:
    """Average accuracy, perplexity (and Rouge-L if measured) against model-level sparsity per method,
    like the paper's Figure 5; the dense model as a dashed line. x = achieved sparsity where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    panels = [("average", "average accuracy (%)", 100.0, False)]
    ppls = [r["ppl"] for r in rows if r.get("ppl") is not None]
    if ppls:
        corpus = Path(str(results["perplexity"]["corpus"])).name
        panels.append(("ppl", f"perplexity ({corpus})", 1.0, max(ppls) / max(min(ppls), 1e-9) > 3))
    if any(r.get("rougeL") is not None for r in rows):
        panels.append(("rougeL", "XSUM Rouge-L (%)", 100.0, False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    formats = list(dict.fromkeys(r.get("weights", "fp") for r in rows))
    dense = {f: next((r for r in rows if r["method"] == "dense" and r.get("weights", "fp") == f), None) for f in formats}
    lines = [(f, m) for f in formats for m in METHOD_ORDER
             if m not in ("dense", "relu") and any(r["method"] == m and r.get("weights", "fp") == f for r in rows)]
    for ax, (key, label, scale, log) in zip(axes[0], panels):
        for fmt, m in lines:
            pts = []
            for r in rows:
                if r["method"] != m or r.get("weights", "fp") != fmt or r.get(key) is None:
                    continue
                x = r.get("achieved_sparsity")
                if x is None or (isinstance(x, float) and math.isnan(x)):
                    x = r.get("target_sparsity") or 0.0
                pts.append((100 * x, scale * r[key]))
            if not pts:
                continue
            pts.sort()
            style = "o" if len(pts) == 1 else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=weight_label(fmt) + METHOD_LABELS[m])
        for i, (fmt, d) in enumerate(dense.items()):
            if d is not None and d.get(key) is not None:
                ax.axhline(scale * d[key], color="black" if i == 0 else "gray", linestyle="--" if i == 0 else ":",
                           linewidth=1, label=weight_label(fmt) + "Dense")
        ax.set_xlabel("model-level sparsity (%)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if results["perplexity"].get("skipped") and len(panels) == 1:
        axes[0][0].text(0.02, 0.02, "perplexity: " + results["perplexity"]["skipped"][:80], transform=axes[0][0].transAxes,
                        fontsize=6, alpha=0.7)
    axes[0][0].legend(fontsize=8)
    model = str(results["model"])
    model = Path(model).name if model.endswith(".gguf") else model  # a local file: its name, not the path
    fig.suptitle(model + (f" (limit {results['limit']})" if results.get("limit") else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m rsparse.sweep ...`: the same as `rsparse eval ...`."""
    parser = argparse.ArgumentParser(prog="rsparse")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
