"""A compressed directory never loads as a dense model, and lm-eval's own command line and API run
on it: transformers without `import rsparse` refuses it (fresh processes), `rsparse-lm-eval` is
lm-eval's CLI with the model `rsparse`, and its scores equal rsparse.evaluate_tasks on the same
directory, tasks and limit."""

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_model
from rsparse import RSparseConfig, evaluate_tasks, save_pretrained, sparsify_
from rsparse.core.data import calibration_windows
from rsparse.io.checkpoint import load

pytestmark = pytest.mark.cli
TASKS = ["piqa", "arc_easy"]


@pytest.fixture(scope="module")
def directory(tokenizer, windows, tmp_path_factory):
    model = tiny_model()
    sparsify_(model, RSparseConfig(sparsity=0.5, seq_len=64, calibration_samples=2, max_rows_per_layer=128),
              calibration_windows(windows, 64, 2, seed=0))
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("m") / "compressed")


@pytest.fixture(scope="module")
def directory4(tokenizer, windows, tmp_path_factory):
    """The same with 4-bit weights (rsparse compress --weights int4)."""
    model = tiny_model()
    sparsify_(model, RSparseConfig(sparsity=0.5, seq_len=64, calibration_samples=2, max_rows_per_layer=128,
                                   weight_bits=4), calibration_windows(windows, 64, 2, seed=0))
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("m") / "compressed4")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from rsparse.eval.tasks import write_offline_tasks

    return write_offline_tasks(tmp_path_factory.mktemp("tasks"), TASKS)


def fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def test_transformers_without_rsparse_refuses_the_directory(directory):
    code = ("import sys\n"
            "from transformers import AutoModelForCausalLM, LlamaForCausalLM\n"
            "try:\n"
            "    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n"
            "    print('refused:', str(e).splitlines()[0])\n"
            "else:\n"
            "    print('loaded', type(model).__name__)\n"
            "print('rsparse imported:', any(m == 'rsparse' or m.startswith('rsparse.') for m in sys.modules))\n")
    out = fresh_python(code, str(directory))
    assert out.returncode == 0, out.stderr
    assert "refused: The checkpoint you are trying to load has model type `rsparse`" in out.stdout
    assert "loaded" not in out.stdout and "rsparse imported: False" in out.stdout
    # and with rsparse imported, the same call gives the R-Sparse model
    out = fresh_python("import sys, rsparse\nfrom transformers import AutoModelForCausalLM\n"
                       "from rsparse.core.layer import rsparse_layers\n"
                       "print(len(rsparse_layers(AutoModelForCausalLM.from_pretrained(sys.argv[1]))))", str(directory))
    assert out.returncode == 0 and out.stdout.strip() == "14", out.stderr


def test_lm_evals_own_cli_stops_on_the_directory(directory, tasks):
    out = fresh_python("import sys\nfrom lm_eval.__main__ import cli_evaluate\nsys.argv[0] = 'lm-eval'\ncli_evaluate()",
                       "run", "--model", "hf", "--model_args", f"pretrained={directory}", "--include_path",
                       str(tasks["piqa"].parent), "--tasks", "piqa", "--limit", "2", "--device", "cpu")
    assert out.returncode != 0 and "model type `rsparse`" in out.stderr
    assert "acc" not in out.stdout  # nothing was scored


def test_rsparse_lm_eval_refuses_hf_on_the_directory(directory, capsys):
    from rsparse.eval.lm_eval_plugin import main

    assert main(["run", "--model", "hf", "--model_args", f"pretrained={directory},dtype=float32", "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model hf scores an rsparse directory as a dense model")
    assert main(["run", "--model", "rsparse", "--model_args", f"pretrained={directory},tokens=decode",
                 "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # lm-eval's own log lines first, then ours
    assert err[-1].startswith("error: tokens='decode'") and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("which", ["directory", "directory4"])
def test_rsparse_lm_eval_scores_equal_evaluate_tasks(which, tasks, tmp_path, request):
    """The harness's CLI (in process, as `rsparse-lm-eval run ...`) against the function behind `rsparse
    eval`, on a 16-bit and a 4-bit directory."""
    from rsparse.core.int4_layer import int4_layers
    from rsparse.eval.lm_eval_plugin import main

    directory = request.getfixturevalue(which)

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = ["run", "--model", "rsparse", "--model_args", f"pretrained={directory}", "--include_path",
            str(tasks["piqa"].parent), "--tasks", ",".join(TASKS), "--limit", "4", "--batch_size", "2",
            "--device", "cpu", "--output_path", str(tmp_path / "out")]
    assert main(argv) == 0
    cli = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    model, tok = load(directory)
    assert bool(int4_layers(model)) == (which == "directory4")
    ours = evaluate_tasks(model, tok, TASKS, limit=4, batch_size=2)
    for task in TASKS:
        assert cli[task]["acc,none"] == ours["tasks"][task]["acc"]
        assert cli[task]["acc_norm,none"] == ours["tasks"][task]["acc_norm"]


def test_lm_eval_python_api_with_the_registered_model(directory, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import rsparse.eval.lm_eval_plugin  # noqa: F401 (registers the model "rsparse")
    from rsparse.eval.hub import datasets_offline

    with datasets_offline():
        out = lm_eval.simple_evaluate(model="rsparse", model_args=f"pretrained={directory},tokens=all",
                                      tasks=[str(tasks["piqa"])], limit=3, task_manager=TaskManager(include_defaults=False),
                                      bootstrap_iters=0, device="cpu")
    assert isinstance(out["results"]["piqa"]["acc,none"], float)
