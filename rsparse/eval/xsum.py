"""Zero-shot XSUM summaries, Rouge-L F1 against the references (generation: prefill dense, decode sparse)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rsparse.core.sparse_modules import token_mode
from rsparse.errors import EvaluationError
from rsparse.eval.hub import hub_status
from rsparse.eval.perplexity import measured_sparsity


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return "rouge-score", lambda pred, ref: scorer.score(ref, pred)["rougeL"].fmeasure
    except ImportError:
        pass
    try:
        import evaluate as hf_evaluate

        rouge = hf_evaluate.load("rouge")
        return "evaluate", lambda pred, ref: rouge.compute(predictions=[pred], references=[ref])["rougeL"]
    except Exception as e:  # not installed, or its metric script cannot be fetched
        raise EvaluationError(f"no Rouge implementation: install rouge-score ({e})") from e


def load_xsum(samples: int, dataset: str = "EdinburghNLP/xsum", split: str = "test"):
    """(list of {"document", "summary"}, None) or (None, reason skipped); quick when offline."""
    if samples < 1:
        return None, "XSUM not requested"
    ok, why = hub_status()
    if not ok:
        return None, f"XSUM Rouge-L skipped: the Hugging Face hub is not reachable ({why})"
    from datasets import load_dataset

    errors = []
    for kwargs in ({}, {"revision": "refs/convert/parquet"}):
        try:
            ds = load_dataset(dataset, split=split, **kwargs)
            ds = ds.select(range(min(samples, len(ds))))
            return [{"document": d["document"], "summary": d["summary"]} for d in ds], None
        except Exception as e:  # noqa: BLE001 - any loading failure means "skip, with the reason"
            errors.append(f"{type(e).__name__}: {e}")
    return None, f"XSUM Rouge-L skipped: could not load {dataset} ({'; '.join(errors)[:300]})"


@torch.no_grad()
def xsum_rouge(model: nn.Module, tokenizer, docs: list[dict], *, tokens: str = "second_half",
               max_new_tokens: int = 64, max_prompt_tokens: int = 1024, desc: str = "xsum") -> dict:
    """Zero-shot XSUM: greedy one-sentence summaries, Rouge-L F1 against the references.

    Generation is the real decode setting: the article (prompt) is prefilled dense and the
    generated tokens are sparse (token mode "decode"; GRIFFIN selects its neurons from the
    article); with tokens="all" every position is sparse. One document at a time (no padding).
    """
    from rsparse.progress import progress

    backend, score = _rouge_scorer()
    mode = "all" if tokens == "all" else "decode"
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    with token_mode(model, mode, track=True):
        for d in progress(docs, desc=desc, unit="doc", leave=False):
            article_ids = tokenizer(d["document"], add_special_tokens=False)["input_ids"][: max_prompt_tokens - 32]
            prompt = f"Article: {tokenizer.decode(article_ids)}\nSummarize the article above in one sentence.\nSummary:"
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            text = text.split("\n")[0].strip()
            scores.append(score(text, d["summary"]))
        sparsity = measured_sparsity(model)
    return {"rougeL": sum(scores) / len(scores) if scores else math.nan, "documents": len(scores),
            "rouge_backend": backend, "token_mode": mode, **{f"generation_{k}": v for k, v in sparsity.items()}}
