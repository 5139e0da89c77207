"""Results on disk (JSON, markdown) and on screen (the same markdown table)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path


def versions() -> dict:
    import torch
    import transformers

    import rsparse

    return {"rsparse": rsparse.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


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


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (a temp file renamed over the target), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a results file is a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
