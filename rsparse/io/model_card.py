"""The model card (README.md) of a transformers-format rsparse directory: what was sparsified, how
(the recipe summary, ranks, token modes) and, when measured, its perplexity."""

from __future__ import annotations

import os

from torch import nn


def _pct(x) -> str:
    return "-" if not isinstance(x, (int, float)) or x != x else f"{100 * x:.1f}%"


def model_card(model: nn.Module, qc, name: str) -> str:
    s = qc.summary
    cfg = qc.rsparse_config or {}
    source = s.get("source") or getattr(model.config, "_name_or_path", "") or ""
    hub_like = bool(source) and "/" in source and not os.path.exists(source) and not source.startswith((".", "/"))
    front = ["---", "library_name: transformers", "tags:", "- rsparse", "- activation-sparsity", "- r-sparse"]
    if hub_like:
        front.append(f"base_model: {source}")
    front.append("---")
    layers = qc.layers
    tokens = sorted({e["tokens"] for e in layers.values()})
    ranks = [e["rank"] for e in layers.values() if e["method"] in ("lowrank", "rsparse")]
    ppl = s.get("perplexity") or {}
    lines = front + [
        "", f"# {name}", "",
        f"An R-Sparse (rank-aware activation sparsity) version of `{source or type(model).__name__}`, written by "
        f"rsparse {qc.versions.get('rsparse', '?')} (format version {qc.format_version}). Every listed decoder "
        "projection keeps only the input channels whose score passes a calibrated threshold and sends the dropped "
        "channels through rank-r factors of its weight"
        + ("; prefill stays dense, decoding is sparse." if tokens == ["decode"] else "."), "",
        "| | |", "|---|---|",
        f"| architecture | {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{qc.tensors.get('dtype', '?')}) |",
        f"| R-Sparse layers | {len(layers)} ({', '.join(f'{m}: {n}' for m, n in (s.get('methods') or {}).items()) or 'none'}) |",
        f"| target sparsity | {_pct(s.get('target_sparsity'))} |",
        f"| weights read per decode step | {_pct(s.get('read_fraction'))} of the decoder projections (targets) |",
        f"| sparsified tokens | {', '.join(tokens) or '-'} |",
        f"| rank of the low-rank paths | {f'{min(ranks)}-{max(ranks)}' if ranks else '-'} |",
    ]
    if cfg:
        recipe = cfg.get("recipe")
        lines.append(f"| recipe | method {cfg.get('method', '?')}, "
                     + (f"per-layer recipe {recipe}" if recipe else f"uniform rho {cfg.get('ratio', '?')}")
                     + f", {cfg.get('factors', '?')} factors, score {cfg.get('score', '?')} |")
        lines.append(f"| calibration | {cfg.get('calibration_samples', '?')} windows of {cfg.get('seq_len', '?')} tokens"
                     + (f" of {s['calibration_corpus']}" if s.get("calibration_corpus") else "")
                     + f", seed {cfg.get('seed', '?')} |")
    if isinstance(ppl.get("ppl"), (int, float)):
        lines.append(f"| perplexity | {ppl['ppl']:.2f} on {ppl.get('windows', '?')} windows of {ppl.get('seq_len', '?')} "
                     f"tokens of {ppl.get('corpus', '?')} ({ppl.get('tokens', '?')} sparse"
                     + (f"; dense {ppl['dense_ppl']:.2f}" if isinstance(ppl.get("dense_ppl"), (int, float)) else "")
                     + (f"; achieved sparsity {_pct(ppl.get('achieved_sparsity'))}"
                        if isinstance(ppl.get("achieved_sparsity"), (int, float)) else "") + ") |")
    else:
        lines.append("| perplexity | not measured |")
    lines += [
        "", "## Use", "", "```python", "import rsparse  # registers quant_method \"rsparse\" with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto")',
        f'tok = AutoTokenizer.from_pretrained("{name}")', "```", "",
        f"or `rsparse generate --model {name} --prompt \"...\"`. This directory needs rsparse (`pip install "
        "rsparse`, then `import rsparse`): without it transformers refuses it (model type `rsparse`) rather than "
        "loading a dense model. lm-eval: `rsparse-lm-eval run --model rsparse --model_args pretrained=DIR ...`. The R-Sparse layout, "
        "recipe and tensor hashes are in `config.json` (`quantization_config`).", "",
    ]
    return "\n".join(lines)
