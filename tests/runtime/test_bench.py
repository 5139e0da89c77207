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


@pytest.mark.parametrize("how", ["module", "script"])
def test_bench_kernel_smoke_runs_and_checks_every_op(how, tmp_path):
    cmd = ([sys.executable, "-m", "rsparse.runtime.bench.kernel"] if how == "module"
           else [sys.executable, str(ROOT / "rsparse/runtime/bench/kernel.py")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    args = ["--smoke", "--dtypes", "fp32", "--batches", "1,2", "--out", str(tmp_path)]
    done = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert records and isinstance(records, (list, dict))
    assert "smoke qkv" in (tmp_path / "kernel_bench.txt").read_text()
