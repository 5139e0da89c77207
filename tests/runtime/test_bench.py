"""The benchmarks' harnesses run end to end on the CPU (tiny shapes; every op is checked against
the torch reference inside the bench, so a wrong kernel or a broken harness fails here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("how", ["script", "cli"])
def test_bench_kernel_smoke_runs_and_checks_every_op(how, tmp_path):
    """As a script (how the device runs it), and through the CLI, which re-runs the package
    module under the interpreter (`python -m rsparse.runtime.bench.kernel`)."""
    cmd = {"script": [sys.executable, str(ROOT / "rsparse/runtime/bench/kernel.py")],
           "cli": [sys.executable, "-m", "rsparse.cli", "bench", "kernel"]}[how]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    if how == "cli":  # `rsparse bench kernel --smoke` sets the interpreter up itself
        env.pop("TRITON_INTERPRET")
    args = ["--smoke", "--dtypes", "fp32", "--batches", "1,2", "--out", str(tmp_path)]
    done = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert records and isinstance(records, (list, dict))
    assert "smoke qkv" in (tmp_path / "kernel_bench.txt").read_text()


def test_bench_kernel_int4_smoke_checks_every_op(tmp_path):
    """`rsparse bench kernel-int4 --smoke`: the 4-bit kernels beside cuBLAS and tinygemm, each op
    checked against the dequantized reference (interpreted on CPU; the timings mean nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "rsparse.cli", "bench", "kernel-int4", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "int4_bench.json").read_text())
    assert result["records"] and result["summary"]
    assert {"cublas", "tinygemm", "sparse", "rsparse"} <= set(next(iter(result["summary"].values())))
    assert "CHECK FAILED" not in (tmp_path / "int4_bench.txt").read_text()


def test_bench_attention_smoke_checks_sdpa_and_every_split(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "rsparse.cli", "bench", "attention", "--smoke", "--tune",
                           "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "attention_bench.json").read_text())["records"]
    ops = {r["op"] for r in records}
    assert ops == {"sdpa", "kernel"} | {f"kernel split {s}" for s in (16, 32, 64, 128, 256)}
    assert all(r["rel_err"] < 2e-2 and r["us"] > 0 for r in records)
    assert "| smoke | 2 | 64 | 40 |" in done.stdout


@pytest.mark.cli
@pytest.mark.parametrize("deterministic", [False, True])
def test_bench_agreement_on_a_checkpoint(tokenizer, windows, tmp_path, monkeypatch, deterministic):
    """Engine vs transformers on a saved R-Sparse checkpoint (CPU): both runs reported, the dense
    run identical, transformers reproducible, the teacher-forced engine agreeing; the same with
    --deterministic (the kernel's fixed-order sums)."""
    import torch
    from conftest import tiny_model
    from rsparse import RSparseConfig, save_pretrained, sparsify_
    from rsparse.core.data import calibration_windows
    from rsparse.runtime.bench import agreement

    model = tiny_model()
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.8), calibration_windows(windows, 64, 4))
    save_pretrained(model, tokenizer, tmp_path / "ck")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # restored after the test
    try:
        code = agreement.main(["--model", str(tmp_path / "ck"), "--device", "cpu", "--new-tokens", "8",
                               "--prompts", "3", "--out", str(tmp_path / "out")]
                              + ["--deterministic"] * deterministic)
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    finally:
        torch.use_deterministic_algorithms(False)
    results = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert results["deterministic"] == deterministic and results["dtype"] == "torch.float32"
    runs = results["runs"]
    assert set(runs) == {"as saved", "dense"}
    assert runs["dense"]["identical"] == runs["dense"]["hf_reproducible"] == 3
    assert runs["dense"]["forced_agreement"] == 1.0
    saved = runs["as saved"]
    assert saved["hf_reproducible"] == 3 and saved["forced_agreement"] >= 0.9
    assert runs["dense"]["hf_eager_forced_agreement"] == 1.0 and 0 < saved["hf_eager_forced_agreement"] <= 1
    assert code == (0 if saved["identical"] == 3 else 1)
    assert all(len(r["engine_tokens"]) == len(r["hf_tokens"]) == 8 for r in saved["rows"])


def test_decode_profile_groups_kernels_by_name():
    from rsparse.runtime.bench.step_profile import _group

    assert _group("_main_kernel") == _group("_epilogue_kernel") == "R-Sparse kernels"
    assert _group("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT") == "cuBLAS products"
    assert _group("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16") == "attention"
    assert _group("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_12") == "fused glue"
    assert _group("void at::native::vectorized_elementwise_kernel<4>") == "other"


@pytest.mark.parametrize("verb,argv,message", [
    ("attention", ["--models", "llama2-7b,foo"], "error: unknown --models foo"),
    ("attention", ["--batches", "1,x"], "error: --batches takes a comma list"),
    ("attention", ["--batches", "0"], "error: --batches takes a comma list"),
    ("decode", ["--attention", "flash"], "error: --attention takes auto, kernel and/or sdpa"),
    ("decode", ["--compile", "on,maybe"], "error: --compile takes on and/or off"),
    ("decode", ["--weights", "fp,int3"], "error: --weights takes fp and/or int4"),
    ("decode", ["--weights", "int4", "--model", "ck"], "error: --weights applies to the random shapes"),
])
def test_bench_bad_flags_end_in_one_error_line(verb, argv, message, tmp_path):
    # checked before any model is built or GPU looked for; the CLI prints the one line, exit 1
    import importlib

    mod = importlib.import_module(f"rsparse.runtime.bench.{verb}")
    with pytest.raises(SystemExit) as e:
        mod.main(argv + ["--out", str(tmp_path / "out")])
    assert isinstance(e.value.code, str) and e.value.code.startswith(message) and "\n" not in e.value.code
    assert not (tmp_path / "out").exists()
