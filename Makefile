# The two commands of the README. Both set everything up first (scripts/setup.sh, idempotent).
.PHONY: setup run test test-fast

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rsparse run --out out/run --overwrite

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup  # the unit tier (tests marked unit): under a minute
	.venv/bin/python -m pytest -q -m unit
