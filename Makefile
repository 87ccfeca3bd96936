# The two commands of the README, and the benchmark.
.PHONY: setup demo test bench bench-relay bench-admission lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/acp-fleet demo

test: setup
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/startup.py

bench-relay: setup
	.venv/bin/python bench/relay.py

bench-admission: setup
	.venv/bin/python bench/admission.py

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy shared worker scheduler
