# The two commands of the README. Both set everything up first (scripts/setup.sh, idempotent).
.PHONY: setup run test test-fast setup-vllm test-vllm

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rsparse run --out out/run --overwrite

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup  # the unit tier (tests marked unit): under a minute
	.venv/bin/python -m pytest -q -m unit

# The vLLM tier: vLLM's CPU build in its own environment (.venv-vllm) serving rsparse directories
# through the plugin (tests/serving, docs/serving-vllm.md). The embedded model is compressed once
# with the main environment's rsparse (out/vllm-tier/smollm-50, kept between runs).
VLLM_MODEL = out/vllm-tier/smollm-50

setup-vllm:
	bash scripts/setup_vllm.sh

$(VLLM_MODEL)/config.json: | setup
	.venv/bin/rsparse compress --out $(VLLM_MODEL) --sparsity 0.5 --calib-samples 4 --seq-len 256 --overwrite

test-vllm: setup setup-vllm $(VLLM_MODEL)/config.json
	RSPARSE_VLLM_MODEL=$(VLLM_MODEL) .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/serving
