# The two commands of the README. Both set everything up first (scripts/setup.sh, idempotent).
.PHONY: setup run test

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rsparse run --out out/run

test: setup
	.venv/bin/python -m pytest -q
