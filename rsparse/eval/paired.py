"""Paired comparison of two evaluated rows on the same examples: is a difference in accuracy noise?

    a, b = load_row("out/a/results.json"), load_row("out/b/results.json::Sparse 70%")
    d = paired_difference(a, b)
    d["average"], d["se"], d["p"]        # difference of the task-average accuracy (a - b), its standard error

Two recipes scored on the same examples mostly get the same examples right; the unpaired standard
error of each row's average (lm-eval's `acc_stderr`) ignores that and overstates the noise of their
difference. Per task, the difference of the two accuracies is the mean of the per-example
differences d_i = a_i - b_i (each -1, 0 or 1), with standard error sd(d) / sqrt(n); the task average's
difference is the mean over tasks, its standard error sqrt(sum of the tasks' squared errors) / T
(tasks are independent samples). `p` is the two-sided normal p-value. Rows carry their examples'
0/1 outcomes ("correct") and a digest of the examples ("docs") since rsparse.eval.harness logs them
(`rsparse eval` and `rsparse compare-recipes` rows alike).
"""

from __future__ import annotations

import math
from pathlib import Path

from rsparse.errors import BadInputError
from rsparse.io.results import read_results

LABEL_SEP = "::"


def load_row(spec: str | Path) -> dict:
    """One row of an `rsparse eval` or `rsparse compare-recipes` results.json: `PATH` (a file with
    one row) or `PATH::LABEL` (compare-recipes labels: "RECIPE S%", e.g. "searched 70%")."""
    text = str(spec)
    path, _, label = text.partition(LABEL_SEP)
    data = read_results(path, recipes=True)
    if data is None:
        raise BadInputError(f"{path}: not found")
    rows = data["rows"]
    if not rows:
        raise BadInputError(f"{path} has no rows")
    labels = [r.get("label") for r in rows]
    if label:
        hits = [r for r in rows if r.get("label") == label]
        if len(hits) != 1:
            raise BadInputError(f"{path} has {len(hits)} rows labelled {label!r}; its rows: {', '.join(map(str, labels))}")
        return hits[0]
    if len(rows) > 1:
        raise BadInputError(f"{path} has {len(rows)} rows; name one as {path}{LABEL_SEP}LABEL, from: "
                            f"{', '.join(map(str, labels))}")
    return rows[0]


def _outcomes(row: dict, task: str) -> str:
    r = row["tasks"][task]
    correct = r.get("correct")
    if not isinstance(correct, str) or not correct or set(correct) - {"0", "1"}:
        raise BadInputError(f"row {row.get('label')!r} has no per-example outcomes for {task} "
                            "(rows evaluated before rsparse logged them); evaluate it again")
    return correct


def paired_difference(a: dict, b: dict) -> dict:
    """Row a minus row b, example by example, on every task both rows scored.

    Returns {"tasks": {task: {"n", "a", "b", "diff", "se", "a_only", "b_only"}}, "average" (a - b
    of the task-average accuracy), "se" (paired), "se_unpaired" (from the rows' own acc_stderr, for
    comparison), "z", "p"}. Accuracies as fractions; a_only / b_only count the examples only one row
    got right.
    """
    tasks = [t for t in a.get("tasks", {}) if t in b.get("tasks", {})]
    if not tasks:
        raise BadInputError(f"rows {a.get('label')!r} and {b.get('label')!r} share no task")
    out = {}
    for t in tasks:
        ca, cb = _outcomes(a, t), _outcomes(b, t)
        da, db = a["tasks"][t].get("docs"), b["tasks"][t].get("docs")
        if len(ca) != len(cb) or da != db:
            raise BadInputError(f"{t}: the rows were scored on different examples ({len(ca)} and {len(cb)}, "
                                f"digests {da} and {db}); compare rows evaluated with the same --tasks and --limit")
        n = len(ca)
        a_only = sum(x == "1" and y == "0" for x, y in zip(ca, cb))
        b_only = sum(x == "0" and y == "1" for x, y in zip(ca, cb))
        mean = (a_only - b_only) / n
        var = ((a_only + b_only) - n * mean * mean) / (n - 1) if n > 1 else 0.0  # sample variance of d
        out[t] = {"n": n, "a": ca.count("1") / n, "b": cb.count("1") / n, "diff": mean,
                  "se": math.sqrt(var / n), "a_only": a_only, "b_only": b_only}
    T = len(out)
    diff = sum(r["diff"] for r in out.values()) / T
    se = math.sqrt(sum(r["se"] ** 2 for r in out.values())) / T
    errs = [(a["tasks"][t].get("acc_stderr"), b["tasks"][t].get("acc_stderr")) for t in out]
    unpaired = (math.sqrt(sum(x * x + y * y for x, y in errs)) / T
                if all(x is not None and y is not None for x, y in errs) else None)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"a": a.get("label"), "b": b.get("label"), "tasks": out, "average": diff, "se": se,
            "se_unpaired": unpaired, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def paired_markdown(d: dict) -> str:
    """The comparison as a markdown table, in points (%)."""
    lines = [f"{d['a']} minus {d['b']}, paired on the same examples (points):", "",
             "| task | n | a | b | a - b | s.e. | only a right | only b right |", "|---|---|---|---|---|---|---|---|"]
    for t, r in d["tasks"].items():
        lines.append(f"| {t} | {r['n']} | {100 * r['a']:.2f} | {100 * r['b']:.2f} | {100 * r['diff']:+.2f} | "
                     f"{100 * r['se']:.2f} | {r['a_only']} | {r['b_only']} |")
    unpaired = "-" if d["se_unpaired"] is None else f"{100 * d['se_unpaired']:.2f}"
    lines += ["", f"task average: {100 * d['average']:+.2f} points, paired s.e. {100 * d['se']:.2f} "
                  f"(unpaired {unpaired}), z = {d['z']:.2f}, p = {d['p']:.3g}"]
    return "\n".join(lines) + "\n"
