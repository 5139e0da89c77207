"""Tables and plots of results: the `rsparse eval` tables (the paper's Table 1 layout, a summary
of sparsity / perplexity / Rouge-L), its sweep plot (Figure 5), the `rsparse compare-recipes`
table (Table 4) and the plot of a recipe's rho per layer."""

from __future__ import annotations

import math
from pathlib import Path

from rsparse.eval.tasks import TASK_LABELS
from rsparse.methods.mlp import BASELINES, LABELS as BASELINE_LABELS

METHOD_LABELS = {"dense": "Dense", "sparse": "Sparse", "lowrank": "Low-Rank", "rsparse": "R-Sparse", **BASELINE_LABELS}

# Row order inside one sparsity level (the paper lists the baselines before R-Sparse).
METHOD_ORDER = {m: i for i, m in enumerate(("dense", "relu", "cats", "griffin", "sparse", "lowrank", "rsparse"))}

def weight_label(fmt: str) -> str:
    return "" if fmt == "fp" else f"{fmt.upper()} "

def row_label(method: str, model_sparsity: float | None, by: str | None = None) -> str:
    label = METHOD_LABELS[method]
    if method in ("dense", "relu") or model_sparsity is None:
        return label
    v = 100 * model_sparsity
    return f"{label} {round(v)}%" if abs(v - round(v)) < 0.05 else f"{label} {v:.1f}%"

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

def _num(v, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{scale * v:.{digits}f}"


def recipes_markdown(results: dict) -> str:
    """One row per (sparsity, recipe): calibration fitness, held-out perplexity, task accuracies, average."""
    tasks = results["tasks"]
    head = ["sparsity %", "recipe", "achieved %", "calibration ppl", "held-out ppl"] + [TASK_LABELS.get(t, t) for t in tasks]
    head += ["Average"] if tasks else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for block in results["sparsities"]:
        for r in block["rows"]:
            cells = [f"{100 * r['target_sparsity']:.0f}", r["recipe"], _num(r.get("achieved_sparsity"), 100.0),
                     _num(r.get("calibration_fitness"), digits=3),
                     _num(r.get("ppl"), digits=3)]
            cells += [_num(r.get("tasks", {}).get(t, {}).get("acc"), 100.0) for t in tasks]
            cells += [_num(r.get("average"), 100.0)] if tasks else []
            lines.append("| " + " | ".join(cells) + " |")
    notes = (f"\nCalibration: {results['calibration']['corpus']}, {results['calibration']['windows']} windows of "
             f"{results['calibration']['seq_len']} tokens (the search objective, {results['perplexity']['tokens']} sparse). Held-out "
             f"perplexity: {results['perplexity']['corpus']}, {results['perplexity']['windows']} windows of "
             f"{results['perplexity']['seq_len']} ({results['perplexity']['tokens']}). Tasks: "
             + ("not run" if not tasks else "lm-eval, " + (f"first {results['limit']} examples per task"
                                                            if results.get("limit") else "full validation sets")) + ".")
    return "\n".join(lines) + "\n" + notes + "\n"


def plot_recipe(recipe: dict, path: str | Path) -> None:
    """rho per layer, one line per projection type, against the block index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type: dict[str, list[tuple[int, float]]] = {}
    for entry in recipe["layers"]:
        parts = entry["name"].split(".")
        block = next(int(p) for p in parts if p.isdigit())
        by_type.setdefault(parts[-1], []).append((block, entry["rho"]))
    fig, ax = plt.subplots(figsize=(9, 4))
    for kind, points in by_type.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, label=kind)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("rho (sparse share of the layer budget)")
    ax.set_title(f"searched recipe at {100 * recipe['sparsity']:.0f}% model-level sparsity")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
