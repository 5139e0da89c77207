"""The analysis figures (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import torch

from rsparse.core.models import PROJ_TYPES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(heatmaps: dict, blocks: dict[str, int], masses: dict, path: Path, model_name: str = "") -> None:
    plt = _plt()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    rows = sorted(set(blocks.values()))
    labels = {b: "/".join(k for k, v in blocks.items() if v == b) for b in rows}
    fig, axes = plt.subplots(len(rows), len(PROJ_TYPES), figsize=(2.6 * len(PROJ_TYPES), 2.5 * len(rows) + 0.8),
                             squeeze=False)
    norm = LogNorm(vmin=1e-2, vmax=1e2)
    im = None
    for r, block in enumerate(rows):
        for c, kind in enumerate(PROJ_TYPES):
            ax = axes[r][c]
            h = heatmaps[(block, kind)]
            img = (h / h.mean()).clamp_min(1e-6).numpy()
            im = ax.imshow(img, aspect="auto", norm=norm, cmap="magma", interpolation="antialiased")
            n_comp, n_chan = img.shape
            ax.add_patch(Rectangle((n_chan / 2 - 0.5, n_comp / 2 - 0.5), n_chan / 2, n_comp / 2, fill=False,
                                   ec="cyan", lw=0.8, ls="--"))
            m = masses[(block, kind)]
            ax.set_title(f"{kind} {n_comp}x{n_chan}\nBR {100 * m['bottom_right']:.0f}% | TL {100 * m['top_left']:.1f}%",
                         fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"block {block} ({labels[block]})\ncomponent (sorted)", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("input channel (sorted)", fontsize=8)
    fig.suptitle(f"{model_name}: C[i,j] = mean_t |x_j s_i V[j,i]| relative to the panel mean; rows (components) "
                 "and columns (channels) sorted ascending by total;\ndashed: top-50% channels x top-50% components "
                 "(BR = its share of the mass, 25% if uniform; TL = share of the opposite, top-left block)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.95))
    cax = fig.add_axes((0.94, 0.1, 0.012, 0.8))
    fig.colorbar(im, cax=cax, label="cell / panel mean")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_masses(contrib: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5), sharey=True)
    series = [("bottom_right", "top-50% ch x top-50% comp (25% cells)", "C3", "-"),
              ("sparse_only_eq", "sparse-only: top-25% channels", "C0", "--"),
              ("lowrank_only_eq", "low-rank-only: top-25% components", "C2", "--"),
              ("top_cells_eq", "best 25% of cells", "0.5", ":")]
    for ax, kind in zip(axes.flat, PROJ_TYPES):
        layers = sorted((l for l in contrib["layers"] if l["type"] == kind), key=lambda l: l["block"])
        xs = [l["block"] for l in layers]
        for key, label, color, ls in series:
            ax.plot(xs, [l[key] for l in layers], color=color, ls=ls, marker="o", ms=2.5, label=label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of contribution mass")
    axes[1][0].set_ylabel("share of contribution mass")
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=9, title="same area: 25% of the grid")
    fig.suptitle("Contribution mass kept by selections of equal area of the (component x channel) grid", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bias(bias: dict, path: Path) -> None:
    plt = _plt()
    layers = bias["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.8))
    down = next((l for l in layers if l["type"] == "down_proj"), layers[0])
    ax = axes[0]

    def cum(values):
        e = torch.tensor(values, dtype=torch.float64).square()
        return (e.cumsum(0) / e.sum()).numpy()

    for k, e in enumerate(down["by_sparsity"]):
        c = cum(e["bias_singular_values"])
        ax.plot(range(1, len(c) + 1), c, color=f"C{k}",
                label=f"M, s={e['sparsity']:.2f}: stable rank {e['bias']['stable_rank']:.1f}, "
                      f"90%/99% at {e['bias']['rank_90']}/{e['bias']['rank_99']}")
        c = cum(e["bias_centered_singular_values"])
        ax.plot(range(1, len(c) + 1), c, color=f"C{k}", ls=":",
                label=f"M centred: stable rank {e['bias_centered']['stable_rank']:.1f}, "
                      f"90%/99% at {e['bias_centered']['rank_90']}/{e['bias_centered']['rank_99']}")
    c = cum(down["weight_singular_values"])
    w = down["weight"]
    ax.plot(range(1, len(c) + 1), c, "k--", label=f"W: stable rank {w['stable_rank']:.1f}, 90%/99% at "
                                                 f"{w['rank_90']}/{w['rank_99']}")
    for q in (0.9, 0.99):
        ax.axhline(q, color="0.6", lw=0.6)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("number of singular components")
    ax.set_ylabel("cumulative energy (sum of sigma^2)")
    ax.set_title(f"{down['name']} ({down['shape'][0]}x{down['shape'][1]}): bias matrix M of {bias['tokens']} tokens "
                 f"({2 * bias['tokens']} columns)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[1]
    kinds = [l["type"] for l in layers]
    sparsities = [e["sparsity"] for e in layers[0]["by_sparsity"]]
    width = 0.8 / (len(sparsities) + 1)
    for k, s in enumerate(sparsities):
        ax.bar([i + k * width for i in range(len(kinds))],
               [l["by_sparsity"][k]["bias"]["rank_90"] / l["by_sparsity"][k]["bias"]["max_rank"] for l in layers],
               width, color=f"C{k}", label=f"M, s={s:.2f}")
        ax.plot([i + k * width for i in range(len(kinds))],
                [l["by_sparsity"][k]["bias"]["stable_rank"] / l["by_sparsity"][k]["bias"]["max_rank"] for l in layers],
                "v", color="k", ms=4, label="stable rank / dim" if k == 0 else None)
    ax.bar([i + len(sparsities) * width for i in range(len(kinds))],
           [l["weight"]["rank_90"] / l["weight"]["max_rank"] for l in layers], width, color="0.5", label="W")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rank at 90% energy / max rank")
    ax.set_title(f"block {bias['block']}: 90%-energy rank (bars) and stable rank (triangles) over the max rank",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multiphase(phase: dict, path: Path) -> None:
    plt = _plt()
    sites = list(phase["sites"])
    fig, axes = plt.subplots(1, len(sites), figsize=(6 * len(sites), 4.6), squeeze=False)
    titles = {"down_input": "on the down_proj input h (|h| <= T0 replaced, sign kept)",
              "act": "on the SiLU output (values <= T0 replaced)"}
    styles = {"1": ("o-", "C0"), "2": ("s-", "C1"), "2mean": ("^--", "C2")}
    for ax, site in zip(axes[0], sites):
        rows = phase["sites"][site]
        for k, (v, label) in enumerate(phase["variants"].items()):
            pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["variant"] == v)
            if not pts:
                continue
            style, color = styles.get(v, (".-", None))
            ax.plot([100 * a for a, _ in pts], [b for _, b in pts], style, color=color, label=label)
            for a, b in pts:  # values stacked right of the points, one row per variant
                ax.annotate(f"{b:.4g}" if b < 1e5 else f"{b:.1e}", (100 * a, b), textcoords="offset points",
                            xytext=(6, 11 * (len(phase["variants"]) - 1 - k) + 2), fontsize=7, color=color)
        ax.axhline(phase["dense_ppl"], color="k", ls=":", label=f"dense ({phase['dense_ppl']:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity % (values replaced)")
        ax.set_ylabel("perplexity (all positions)")
        ax.set_title(titles.get(site, site), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Multi-phase ReLU on every MLP block, {phase['windows'][0]} held-out windows x "
                 f"{phase['windows'][1]} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kept(kept: dict, fractions: dict[str, torch.Tensor], path: Path, blocks: dict[str, int]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(4, 2, figsize=(14, 13))
    layers = kept["layers"]
    for ax, kind in zip(axes.flat, PROJ_TYPES):
        ls = sorted((l for l in layers if l["type"] == kind), key=lambda l: l["block"])
        data = [fractions[l["name"]].numpy() for l in ls]
        ax.boxplot(data, positions=[l["block"] for l in ls], widths=0.6, whis=(5, 95), showfliers=False,
                   medianprops={"color": "C3"})
        ax.plot([l["block"] for l in ls], [l["mean"] for l in ls], "x", color="C0", ms=4, label="mean over tokens")
        ax.plot([l["block"] for l in ls], [l["target_keep"] for l in ls], "_", color="k", ms=10,
                label="target keep fraction")
        ax.set_title(f"{kind} (box: quartiles, whiskers: 5-95%)", fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylabel("kept-channel fraction", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[-1]
    bins = torch.linspace(0, 1, 51).numpy()
    for label, b in blocks.items():
        name = next((l["name"] for l in layers if l["block"] == b and l["type"] == "down_proj"), None)
        if name is not None:
            ax.hist(fractions[name].numpy(), bins=bins, histtype="step", density=True, label=f"down_proj, block {b} ({label})")
    ax.set_xlabel("kept-channel fraction per token", fontsize=8)
    ax.set_title("per-token distribution, down_proj", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"Kept channels per token on held-out text: sparsity {kept['sparsity']}, rho {kept['ratio']}, every "
                 f"token sparsified (ppl {kept['ppl']:.2f}, achieved sparsity {100 * kept['achieved_sparsity']:.1f}%)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
