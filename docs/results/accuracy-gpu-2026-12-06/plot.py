"""#27's full-set rows side by side: task average against held-out perplexity, per sparsity.

    .venv/bin/python docs/results/accuracy-gpu-2026-12-06/plot.py    # writes comparison.json and comparison.png here

Reads every `run*/**/results.json` of this directory whose row name is one of run.sh's #27 rows
(`<kind>-s<S>-seed<N>`), and plots, at each sparsity, the 8-task average (top) and the 7-task
average without BoolQ (bottom) against BoolQ held-out perplexity, one marker per row kind, filled
for seed 0 and open for seed 1.
"""

import json
import re
from pathlib import Path

from rsparse.io.results import write_json

HERE = Path(__file__).resolve().parent

KINDS = {  # run.sh row kind -> label, marker
    "sparse-uniform": ("sparse-only, uniform", "s"),
    "sparse-greedy": ("sparse-only, greedy", "D"),
    "rsparse-uniform-rholayer": ("R-Sparse, per-layer rho, uniform", "^"),
    "rsparse-uniform-rholayer-holdout": ("R-Sparse, per-layer rho, uniform, early stop", "v"),
    "rsparse-greedy-rholayer": ("R-Sparse joint (greedy + per-layer rho)", "o"),
    "rsparse-greedy-rholayer-holdout": ("R-Sparse joint, early stop", "*"),
}
NAME = re.compile(r"^(?P<kind>[a-z-]+)-s(?P<s>\d+)-seed(?P<seed>\d)$")


def rows() -> list[dict]:
    out = []
    for f in sorted(HERE.glob("run*/**/results.json")):
        m = NAME.match(f.parent.name)
        if not m or m["kind"] not in KINDS:
            continue
        r = json.loads(f.read_text(encoding="utf-8"))["rows"][0]
        accs = {t: v["acc"] for t, v in r["tasks"].items()}
        out.append({"row": f.parent.name, "kind": m["kind"], "sparsity": int(m["s"]), "seed": int(m["seed"]),
                    "average": 100 * r["average"], "average_no_boolq": 100 * sum(v for t, v in accs.items() if t != "boolq") / 7,
                    "boolq": 100 * accs["boolq"], "ppl": r["ppl"], "achieved_sparsity": 100 * r["achieved_sparsity"],
                    "file": str(f.relative_to(HERE))})
    return out


def plot(data: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({d["sparsity"] for d in data}, reverse=True)
    fig, axes = plt.subplots(2, len(levels), figsize=(5.5 * len(levels), 8), squeeze=False)
    colors = dict(zip(KINDS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, s in enumerate(levels):
        for i, (key, title) in enumerate((("average", "8-task average"), ("average_no_boolq", "7 tasks, no BoolQ"))):
            ax = axes[i][j]
            for d in (d for d in data if d["sparsity"] == s):
                label, marker = KINDS[d["kind"]]
                ax.scatter(d["ppl"], d[key], marker=marker, s=90, color=colors[d["kind"]],
                           facecolors=colors[d["kind"]] if d["seed"] == 0 else "none",
                           label=f"{label}, seed {d['seed']}")
            ax.set_xlabel("held-out BoolQ perplexity (64 x 512)")
            ax.set_ylabel(f"{title}, acc %")
            ax.set_title(f"{s}% target: {title}")
            ax.grid(alpha=0.3)
    seen = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    order = [f"{label}, seed {n}" for label, _ in KINDS.values() for n in (0, 1)]
    labels = [lab for lab in order if lab in seen]
    fig.legend([seen[lab] for lab in labels], labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, full validation sets: filled = seed 0, open = seed 1")
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    data = rows()
    write_json(HERE / "comparison.json", data)
    plot(data, HERE / "comparison.png")
    print(f"{len(data)} rows -> {HERE / 'comparison.json'}, {HERE / 'comparison.png'}")
