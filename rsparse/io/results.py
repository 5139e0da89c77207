"""Results on disk (JSON, markdown) and on screen (the same markdown table); reading back,
resuming and merging the results of `rsparse eval` runs."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path

from rsparse.errors import BadInputError, MissingDataError


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:
        ours = version("rsparse")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        ours = "unknown"
    return {"rsparse": ours, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def json_safe(value):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"; paths, dtypes and
    one-element tensors their text or value; anything else its str()."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, bool, float)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if type(value).__name__ == "dtype" and str(value).startswith("torch."):
        return str(value).removeprefix("torch.")
    if type(value).__name__ == "Tensor" and value.numel() == 1:
        return json_safe(value.item())
    return str(value)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header) pairs. Percent columns are given as fractions and shown as %."""
    header = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, sep]
    for row in rows:
        cells = []
        for key, head in columns:
            v = row.get(key)
            cells.append(f"{100 * v:.1f}" if "%" in head and isinstance(v, float) else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (a temp file renamed over the target), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a results file is a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (write_text)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


# Settings that must match for --resume to keep a previous run's rows.
RESUME_KEYS = ("model", "seed", "limit", "tasks", "calibration", "perplexity")

# (the weight formats may differ: rows are keyed by their label, which names the format)
RESUME_SETTINGS = ("tokens", "ratio", "recipe", "dtype", "hub_tasks", "xsum_samples", "xsum_max_new_tokens",
                   "group_size")

def previous_rows(path: Path, old: dict | None, results: dict) -> dict:
    """{(method, label): row} of the previous run `old` (read from `path` by read_results) if it was made with the
    same settings; {} if none. Other settings are an error (its rows would not be comparable)."""
    if old is None:
        return {}
    diff = settings_diff(old, results)
    if diff:
        raise BadInputError(f"--resume: {path} was made with other settings ({', '.join(diff)}); "
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

def read_results(path: str | Path, what: str = "", recipes: bool = False) -> dict | None:
    """An `rsparse eval` results.json (None if there is none); a file that is not JSON, or not
    one with a "rows" list, is a BadInputError (prefixed by `what`, e.g. the option).

    recipes=True also reads an `rsparse compare-recipes` results.json, its rows (one list per
    sparsity) gathered into "rows", each labelled "RECIPE S%" (e.g. "searched 70%")."""
    path, prefix = Path(path), f"{what}: " if what else ""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInputError(f"{prefix}cannot read {path} as JSON ({e})") from None
    if recipes and isinstance(data, dict) and isinstance(data.get("sparsities"), list) and "rows" not in data:
        data = data | {"rows": [r | {"label": f"{r['recipe']} {100 * r['target_sparsity']:.0f}%"}
                                for block in data["sparsities"] if isinstance(block, dict)
                                for r in block.get("rows", []) if isinstance(r, dict)
                                and isinstance(r.get("recipe"), str) and isinstance(r.get("target_sparsity"), (int, float))]}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        kind = "an rsparse eval or compare-recipes" if recipes else "an rsparse eval"
        raise BadInputError(f"{prefix}{path} is not {kind} results.json (no rows)")
    return data


def merge_results(paths: list[str | Path]) -> dict:
    """One results dict holding the rows of several `rsparse eval` results.json files.

    The runs must agree on everything that makes rows comparable (RESUME_KEYS and
    RESUME_SETTINGS; a run that needed no calibration, e.g. dense only, fits any); otherwise
    BadInputError names the file and the settings. A row present in several files is taken from
    the first. The header is the first file's, with "merged_from" listing the files."""
    from rsparse.io.tables import row_label, sorted_rows

    runs = []
    for path in map(Path, paths):
        run = read_results(path, "--merge")
        if run is None:
            raise MissingDataError(f"--merge: {path} not found")
        runs.append((path, run))
    base_path, base = runs[0]
    merged = {k: v for k, v in base.items() if k not in ("rows", "skipped", "wall_seconds")}
    if merged.get("calibration") is None:
        merged["calibration"] = next((r["calibration"] for _, r in runs if r.get("calibration")), None)
    rows, skipped = {}, {}
    for path, run in runs:
        diff = settings_diff(run, merged, any_calibration=True)
        if diff:
            raise BadInputError(f"--merge: {path} was made with other settings than {base_path} "
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


def write_reports(results: dict, out: Path, plot: bool) -> list[Path]:
    """results.json, results.md and (plot=True) sweep.png under `out`; prints the markdown."""
    from rsparse.io.tables import plot_sweep, results_markdown

    write_json(out / "results.json", results)
    md = results_markdown(results)
    write_text(out / "results.md", md)
    written = [out / "results.json", out / "results.md"]
    if plot:
        plot_sweep(results, out / "sweep.png")
        written.append(out / "sweep.png")
    print(md)
    print(f"\nwrote {', '.join(map(str, written))}")
    return written
