# The two set-up commands of README.md: `make demo` (main job) and `make test` (whole suite). Both install first
# (idempotent: scripts/install.sh skips when .venv matches pyproject.toml and the constraints).
.PHONY: install demo test lint format game bench

install:
	bash scripts/install.sh

demo: install
	.venv/bin/python -m comal_openrlhf.demo --out comal_demo

test: install
	.venv/bin/pytest -q

game: install
	.venv/bin/python -m comal_openrlhf.game --algo comal --init 0.6,0.3,0.1

bench: install
	.venv/bin/python -m comal_openrlhf.kernels.bench
	.venv/bin/python examples/bench_comal_step.py

lint:
	.venv/bin/black --check --line-length 119 comal_openrlhf kernels tests examples
	.venv/bin/isort --check-only --profile black --line-length 119 comal_openrlhf kernels tests examples
	.venv/bin/ruff check comal_openrlhf kernels tests examples

format:
	.venv/bin/isort --profile black --line-length 119 comal_openrlhf kernels tests examples
	.venv/bin/black --line-length 119 comal_openrlhf kernels tests examples
