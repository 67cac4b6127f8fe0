# The two set-up commands of README.md: `make demo` (main job) and `make test` (whole suite). Both install first
# (idempotent: scripts/install.sh skips when .venv matches pyproject.toml and the constraints).
.PHONY: install demo test lint format game game-bench bench docs device-compat

install:
	bash scripts/install.sh

demo: install
	.venv/bin/python -m comal_openrlhf.cli.demo --out comal_demo

test: install
	.venv/bin/pytest -q --durations=30

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or a page missing from nav.
docs: install
	.venv/bin/mkdocs build --strict -d site

game: install
	.venv/bin/python -m comal_openrlhf.cli.game --algo comal --init 0.6,0.3,0.1

# Every Nash learner of the game lab on the paper's game and generated games (about 45 s on 2 cores): the table into
# docs/game-lab.md between its game-bench markers, the plot into docs/img/game_bench.png.
game-bench: install
	.venv/bin/python -m comal_openrlhf.cli.game bench --plot docs/img/game_bench.png --doc docs/game-lab.md

bench: install
	.venv/bin/python benchmarks/kernels_bench.py
	.venv/bin/python benchmarks/comal_step.py

# The GPU machine's triton 3.6.0 (and NumPy >= 2.4) in .venv-compat/, without the project installed: the kernel
# tests under Triton's interpreter and the sm_90 compile (docs/gpu.md). About 90 s the first time, 35 s after.
device-compat:
	bash scripts/device_compat.sh

lint:
	.venv/bin/black --check --line-length 119 comal_openrlhf kernels benchmarks scripts tests examples
	.venv/bin/isort --check-only --profile black --line-length 119 comal_openrlhf kernels benchmarks scripts tests examples
	.venv/bin/ruff check comal_openrlhf kernels benchmarks scripts tests examples

format:
	.venv/bin/isort --profile black --line-length 119 comal_openrlhf kernels benchmarks scripts tests examples
	.venv/bin/black --line-length 119 comal_openrlhf kernels benchmarks scripts tests examples
