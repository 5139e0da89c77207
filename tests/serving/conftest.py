"""The vLLM tier (make test-vllm): runs in .venv-vllm, which has vLLM's CPU build; the main suite
does not collect this folder (pyproject.toml: norecursedirs)."""

import os

# The root conftest turns the Triton interpreter on for CPU runs; here the vLLM engine must run
# the torch reference (the interpreter is for the kernel test that asks for it).
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
