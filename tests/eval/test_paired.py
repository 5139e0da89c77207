"""rsparse.eval.paired: the paired difference of two rows on the same examples, and its errors."""

import json
import math

import pytest

from rsparse.errors import BadInputError
from rsparse.eval.paired import load_row, paired_difference, paired_markdown


def row(label, **tasks):
    """A results.json row whose tasks carry per-example outcomes and lm-eval's unpaired acc_stderr."""
    out = {}
    for name, correct in tasks.items():
        p, n = correct.count("1") / len(correct), len(correct)
        out[name] = {"acc": p, "acc_stderr": math.sqrt(p * (1 - p) / (n - 1)), "correct": correct, "docs": f"d-{name}-{n}"}
    return {"label": label, "tasks": out}


def test_paired_difference_by_hand():
    a = row("A", t1="1101", t2="10")
    b = row("B", t1="1001", t2="11")
    d = paired_difference(a, b)
    t1, t2 = d["tasks"]["t1"], d["tasks"]["t2"]
    # t1: d = (0, 1, 0, 0): mean 0.25, sample variance (1 - 4 * 0.0625) / 3 = 0.25, se sqrt(0.25 / 4)
    assert (t1["a_only"], t1["b_only"], t1["diff"]) == (1, 0, 0.25) and t1["se"] == pytest.approx(0.25)
    # t2: d = (0, -1): mean -0.5, variance (1 - 2 * 0.25) / 1 = 0.5, se sqrt(0.5 / 2) = 0.5
    assert (t2["a_only"], t2["b_only"], t2["diff"]) == (0, 1, -0.5) and t2["se"] == pytest.approx(0.5)
    assert d["average"] == pytest.approx(-0.125) and d["se"] == pytest.approx(math.sqrt(0.25 ** 2 + 0.5 ** 2) / 2)
    assert d["z"] == pytest.approx(d["average"] / d["se"])
    assert d["p"] == pytest.approx(math.erfc(abs(d["z"]) / math.sqrt(2)))
    assert (t1["a"], t1["b"], t1["n"]) == (0.75, 0.5, 4)
    md = paired_markdown(d)
    assert "| t1 | 4 | 75.00 | 50.00 | +25.00 | 25.00 | 1 | 0 |" in md and "task average: -12.50 points" in md


def test_paired_error_is_smaller_than_unpaired_for_correlated_rows():
    """Two rows that agree on most examples: their difference is far less noisy than either row."""
    base = ("1101001110" * 50)
    flipped = "0" + base[1:-1] + "1"  # two examples change, one each way
    d = paired_difference(row("A", t=base), row("B", t=flipped))
    assert d["average"] == 0.0 and d["se"] < d["se_unpaired"] / 5 and d["p"] == 1.0


def test_identical_rows_differ_by_zero_with_p_one():
    d = paired_difference(row("A", t="1010"), row("B", t="1010"))
    assert d["average"] == 0.0 and d["se"] == 0.0 and d["z"] == 0.0 and d["p"] == 1.0


def test_rows_on_other_examples_or_without_outcomes_are_refused():
    with pytest.raises(BadInputError, match="t: the rows were scored on different examples"):
        paired_difference(row("A", t="1010"), row("B", t="101"))
    b = row("B", t="1010")
    b["tasks"]["t"]["docs"] = "other"
    with pytest.raises(BadInputError, match="different examples"):
        paired_difference(row("A", t="1010"), b)
    old = row("B", t="1010")
    del old["tasks"]["t"]["correct"]
    with pytest.raises(BadInputError, match="row 'B' has no per-example outcomes for t"):
        paired_difference(row("A", t="1010"), old)
    with pytest.raises(BadInputError, match="share no task"):
        paired_difference(row("A", t="1010"), row("B", u="1010"))


def test_load_row_by_file_and_label(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"rows": [row("Dense", t="10")]}), encoding="utf-8")
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"rows": [row("Dense", t="10"), row("Sparse 50%", t="11")]}), encoding="utf-8")
    assert load_row(one)["label"] == "Dense"
    assert load_row(f"{two}::Sparse 50%")["tasks"]["t"]["correct"] == "11"
    with pytest.raises(BadInputError, match=r"has 2 rows; name one as .*two.json::LABEL, from: Dense, Sparse 50%"):
        load_row(two)
    with pytest.raises(BadInputError, match="has 0 rows labelled 'R-Sparse'"):
        load_row(f"{two}::R-Sparse")
    with pytest.raises(BadInputError, match="not found"):
        load_row(tmp_path / "nope.json")
    (tmp_path / "cut.json").write_text('{"rows": [', encoding="utf-8")
    with pytest.raises(BadInputError, match="cannot read .*cut.json as JSON"):
        load_row(tmp_path / "cut.json")
    (tmp_path / "lm.json").write_text('{"results": {}}', encoding="utf-8")
    with pytest.raises(BadInputError, match="not an rsparse eval or compare-recipes results.json"):
        load_row(tmp_path / "lm.json")


def test_load_row_from_compare_recipes(tmp_path):
    """compare-recipes keeps one list of rows per sparsity; its rows are named "RECIPE S%"."""
    blocks = [{"sparsity": s, "rows": [row(None, t="10") | {"recipe": rc, "target_sparsity": s}
                                       for rc in ("sparse-only", "searched")]} for s in (0.5, 0.7)]
    path = tmp_path / "cr.json"
    path.write_text(json.dumps({"sparsities": blocks}), encoding="utf-8")
    r = load_row(f"{path}::searched 70%")
    assert (r["recipe"], r["target_sparsity"], r["label"]) == ("searched", 0.7, "searched 70%")
    with pytest.raises(BadInputError, match="has 4 rows; name one .* from: sparse-only 50%, searched 50%"):
        load_row(path)
    path.write_text(json.dumps({"sparsities": [{"sparsity": 0.5, "rows": [{"average": 0.4}]}]}), encoding="utf-8")
    with pytest.raises(BadInputError, match="has no rows"):  # a row without its recipe name is not one
        load_row(path)
