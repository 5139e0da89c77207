"""lm-eval integration on the offline task copies, the paper's protocol, `rsparse eval`, bad input.

Tiny random models and --limit 2-4: these check wiring and bookkeeping, not accuracy.
"""

import os
import time

import pytest
import torch

from rsparse import evaluate_perplexity, restore_, sparsify_
from rsparse.errors import EvaluationError
from rsparse.eval.harness import evaluate_tasks, resolve_tasks
from rsparse.eval.hub import datasets_offline, hub_status
from rsparse.eval.tasks import OFFLINE_TASKS, PAPER_TASKS, write_offline_tasks
from rsparse.eval.xsum import load_xsum
from rsparse.methods import method_config

import lm_eval  # noqa: E402,F401  (installed by scripts/setup.sh: a missing harness fails here, never skips)


pytestmark = pytest.mark.usefixtures("one_thread")


def apply(model, method, sparsity=None, calibration=None, tokens="second_half") -> dict:
    """One method's state, as `rsparse eval` sets it: its config by name, then sparsify_."""
    config = method_config(method, sparsity, tokens=tokens)
    if config is None:
        restore_(model)
        return {"target_sparsity": 0.0}
    report = sparsify_(model, config, calibration)
    return {"target_sparsity": sparsity} if isinstance(report, list) else report


def test_every_offline_task_config_builds_and_loads(tmp_path):
    from lm_eval.tasks import TaskManager

    paths = write_offline_tasks(tmp_path)
    assert set(PAPER_TASKS) <= set(paths) and set(paths) == set(OFFLINE_TASKS)
    manager = TaskManager(include_defaults=False)
    with datasets_offline():
        loaded = manager.load([str(p) for p in paths.values()])["tasks"]
    assert set(loaded) == set(paths)
    for name, task in loaded.items():
        assert task.config.test_split is None and task.config.validation_split == "validation"
        docs = list(task.eval_docs)
        assert len(docs) == OFFLINE_TASKS[name].examples, name
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert isinstance(task.doc_to_text(doc), (str, int)) and len(choices) >= 2
        assert (0 <= target < len(choices)) if isinstance(target, int) else target in choices or isinstance(target, str)
    # the shipped BoolQ (google/boolq, answer: bool) maps onto lm-eval's super_glue labels: False -> "no"
    boolq = list(loaded["boolq"].eval_docs)
    assert all(loaded["boolq"].doc_to_target(d) == int(d["answer"]) for d in boolq[:50])


def test_evaluate_tasks_scores_a_few_examples(model, tokenizer):
    res = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy", "boolq"], limit=3, batch_size=2, tokens="all")
    assert list(res["tasks"]) == ["piqa", "arc_easy", "boolq"]
    for name, r in res["tasks"].items():
        assert r["split"] == "validation" and r["source"] == "offline" and r["examples"] == 3
        assert 0.0 <= r["acc"] <= 1.0
        # each example's outcome, for paired comparisons: they make up acc
        assert len(r["correct"]) == 3 and set(r["correct"]) <= {"0", "1"}
        assert r["correct"].count("1") / 3 == pytest.approx(r["acc"]) and len(r["docs"]) == 16
    assert len({r["docs"] for r in res["tasks"].values()}) == 3  # a digest of each task's own examples
    assert res["tasks"]["boolq"]["acc_norm"] is None and res["tasks"]["piqa"]["acc_norm"] is not None
    assert res["average"] == pytest.approx(sum(r["acc"] for r in res["tasks"].values()) / 3)
    assert res["achieved_sparsity"] == 0.0 and res["batch_size"] == 2 and res["limit"] == 3


@pytest.mark.parametrize("method,target", [("rsparse", 0.5), ("cats", 0.3), ("griffin", 0.4)])
def test_protocol_mode_scores_batched_and_measures_sparsity(model, tokenizer, data, method, target):
    cal, _ = data
    info = apply(model, method, target, calibration=cal, tokens="second_half")
    assert info["target_sparsity"] == pytest.approx(target)
    res = evaluate_tasks(model, tokenizer, ["arc_easy"], limit=2, batch_size=8, tokens="second_half")
    assert res["batch_size"] == 8
    assert abs(res["achieved_sparsity"] - target) < 0.08  # tiny model, 2 questions: loose
    if method != "rsparse":
        assert res["module_sparsity"] > 0
    restore_(model)


@pytest.mark.parametrize("method,tokens", [("rsparse", "second_half"), ("cats", "second_half"),
                                           ("griffin", "second_half"), ("griffin", "all")])
def test_batched_scoring_equals_one_sequence_at_a_time(model, tokenizer, data, method, tokens):
    # lm-eval right-pads a batch; the halves (and GRIFFIN's per-sequence selection) must be those
    # of each real sequence, so the log-likelihoods match batch size 1.
    from rsparse import token_mode
    from rsparse.eval.harness import _row_length_hflm, declared_row_lengths

    cal, _ = data
    apply(model, method, 0.4, calibration=cal, tokens=tokens)
    texts = [("Rivers flow to the sea,", " and clouds carry the water back"), ("A stitch", " in time saves nine."),
             ("The quick brown fox jumps over the lazy dog. The quick", " brown fox"),
             ("Clouds", " carry the water back to the mountains. Rivers flow")]
    scores = {}
    for bs in (1, 8):
        with token_mode(model, tokens), declared_row_lengths():
            lm = _row_length_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=bs, device="cpu")
            reqs = [((c, x), lm.tok_encode(c), tokenizer(x, add_special_tokens=False)["input_ids"]) for c, x in texts]
            assert len({len(r[1]) + len(r[2]) for r in reqs}) == len(reqs)  # all lengths differ: padding
            scores[bs] = [ll for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    assert scores[8] == pytest.approx(scores[1], abs=1e-4)
    restore_(model)
    with declared_row_lengths():
        dense = [ll for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(dense, scores[1])) > 1e-3  # the method did change the scores


def test_sparse_scoring_equals_manual_second_half_loglikelihood(model, tokenizer, data):
    # lm-eval's loglikelihood of one continuation == the model called on that exact sequence
    # with its second half sparse.
    from lm_eval.models.huggingface import HFLM

    cal, _ = data
    apply(model, "rsparse", 0.5, calibration=cal, tokens="second_half")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    ctx, cont = "Rivers flow to the sea, and clouds", " carry the water back"
    ctx_ids, cont_ids = lm.tok_encode(ctx), tokenizer(cont, add_special_tokens=False)["input_ids"]
    [(ll, _)] = lm._loglikelihood_tokens([((ctx, cont), ctx_ids, cont_ids)], disable_tqdm=True)
    seq = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = model(seq[:, :-1]).logits.log_softmax(-1)[0, -len(cont_ids):]
    manual = logp.gather(-1, torch.tensor(cont_ids)[:, None]).sum()
    assert ll == pytest.approx(float(manual), abs=1e-4)
    restore_(model)
    [(dense_ll, _)] = lm._loglikelihood_tokens([((ctx, cont), ctx_ids, cont_ids)], disable_tqdm=True)
    assert abs(dense_ll - ll) > 1e-3  # the sparse second half did change the score


def test_perplexity_for_baselines_uses_the_same_protocol(model, data):
    cal, ev = data
    dense = evaluate_perplexity(model, ev, tokens="second_half")
    apply(model, "griffin", 0.4, tokens="second_half")
    sparse = evaluate_perplexity(model, ev, tokens="second_half")
    assert dense["scored_tokens"] == sparse["scored_tokens"] == ev.shape[0] * 31
    assert sparse["achieved_sparsity"] == pytest.approx(0.40178, abs=1e-3) and sparse["ppl"] != dense["ppl"]
    restore_(model)


def test_bad_input_gives_clear_errors(model, tokenizer, data):
    cal, _ = data
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        apply(model, "magic", 0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        apply(model, "rsparse", 1.2, calibration=cal)
    with pytest.raises(ValueError, match="choose a target below"):
        apply(model, "cats", 0.6, calibration=cal)
    with pytest.raises(ValueError, match="tokens must be one of"):
        evaluate_tasks(model, tokenizer, ["piqa"], tokens="decode")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        evaluate_tasks(model, tokenizer, ["piqa"], limit=0)
    with pytest.raises(ValueError, match="given twice"):
        resolve_tasks(["piqa", "piqa"])
    t0 = time.time()
    with pytest.raises(ValueError, match="unknown task.*no_such_task"):
        resolve_tasks("piqa,no_such_task")
    assert time.time() - t0 < 60


def test_hub_extras_are_skipped_quickly_offline(tokenizer):
    from rsparse.eval.hub import perplexity_windows_or_skip as ppl_windows

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    t0 = time.time()
    ok, why = hub_status()
    windows, reason = ppl_windows(tokenizer, "wikitext2", 64, 4)
    docs, xreason = load_xsum(5)
    assert not ok and windows is None and docs is None and time.time() - t0 < 5
    assert "not reachable" in reason and "--ppl-corpus boolq" in reason and "XSUM Rouge-L skipped" in xreason


def test_datasets_offline_restores_the_flags():
    import datasets

    before = (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE)
    os.environ.pop("HF_DATASETS_OFFLINE", None)
    datasets.config.HF_HUB_OFFLINE = False
    try:
        with datasets_offline():
            assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE is True
        assert "HF_DATASETS_OFFLINE" not in os.environ and datasets.config.HF_HUB_OFFLINE is False
    finally:
        if before[0] is not None:
            os.environ["HF_DATASETS_OFFLINE"] = before[0]
        datasets.config.HF_HUB_OFFLINE = before[1]


def test_results_markdown_has_the_papers_table1_layout():
    from rsparse.io.tables import table1_markdown

    def row(method, label, s, acc):
        return {"method": method, "label": label, "target_sparsity": s, "average": acc,
                "tasks": {t: {"acc": acc, "acc_norm": None} for t in PAPER_TASKS}}

    results = {"tasks": {t: {} for t in PAPER_TASKS},
               "rows": [row("rsparse", "R-Sparse 50%", 0.5, 0.64), row("cats", "CATS 40%", 0.4, 0.46),
                        row("dense", "Dense", 0.0, 0.66), row("griffin", "GRIFFIN 50%", 0.5, 0.45),
                        row("relu", "ReLUfication", None, 0.35), row("rsparse", "R-Sparse 40%", 0.4, 0.65),
                        row("cats", "CATS 22%", 0.2228, 0.64)]}
    lines = table1_markdown(results).splitlines()
    assert lines[0] == "| Method | WG | PIQA | SciQ | OBQA | HS | BoolQ | Arc-E | Arc-C | Average |"
    assert [l.split(" | ")[0][2:] for l in lines[2:]] == [
        "Dense", "ReLUfication", "CATS 22%", "CATS 40%", "R-Sparse 40%", "GRIFFIN 50%", "R-Sparse 50%"]
    assert lines[2].endswith("| 66.00 |")


def test_unknown_hub_only_task_offline_is_a_clear_error(model, tokenizer):
    # lambada_openai is an lm-eval task without an offline copy: offline it must fail clearly.
    with pytest.raises(EvaluationError, match="no offline copy.*--hub-tasks"):
        evaluate_tasks(model, tokenizer, ["lambada_openai"], limit=1)


def test_xsum_rouge_generation_path_on_given_documents(model, tokenizer):
    # The hub is unreachable here; the generation + Rouge-L path runs on documents given directly.
    from conftest import TEXT
    from rsparse.eval.xsum import xsum_rouge

    docs = [{"document": TEXT[:400], "summary": "The fox jumps over the dog."},
            {"document": TEXT[400:900], "summary": "Rivers flow to the sea."}]
    apply(model, "griffin", 0.4, tokens="decode")
    res = xsum_rouge(model, tokenizer, docs, max_new_tokens=4)
    assert res["documents"] == 2 and 0.0 <= res["rougeL"] <= 1.0 and res["token_mode"] == "decode"
    assert res["generation_achieved_sparsity"] == pytest.approx(0.40178, abs=1e-3)  # decode steps only
    restore_(model)
