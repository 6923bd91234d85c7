# The two commands of the README: `make demo` and `make test` (each installs first), and
# `make test-fast`, the quick tier to run while working (installs only what is missing).
# The install uses the active environment's python (a venv or conda env: python3 on PATH),
# else the checkout's .venv if there is one, else the python3 on PATH; torch is pinned to
# the release the project is tested with (pyproject.toml keeps ranges).
PYTHON ?= $(if $(VIRTUAL_ENV)$(CONDA_PREFIX),python3,$(if $(wildcard .venv/bin/python),.venv/bin/python,python3))
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.14.1 torchvision==0.29.1
CORES ?= 2
# pytest-xdist workers: one per core (0: one process). A module's tests (or a test class's)
# run on one worker, which builds their fixtures once; tests/conftest.py starts the longest
# first.
TEST_WORKERS ?= auto
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

.PHONY: setup demo test test-fast lint

setup:
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[dev]"

demo: setup
	$(PYTHON) -m snakemake --cores $(CORES) --configfile config/demo.yaml
	$(PYTHON) -m snakemake --configfile config/demo.yaml --report results/report.html
	@echo "demo done: results/report.html, results/report.md, results/figures/"

# The whole suite: slow, killloop and slurm tests included (CI's command).
test: setup
	$(PYTHON) -m pytest $(PYTEST_PARALLEL) --durations=15

# Everything but `slow` (unit and property tests, the float64 equality tests, the CPU
# stand-ins of the GPU paths, a dry run of the demo DAG, a 3-point kill loop); property
# tests with fewer examples each (Hypothesis profile `fast`, tests/conftest.py); a test
# running past --timeout seconds fails instead of stalling the tier.
test-fast:
	@$(PYTHON) -c "import torch, snakemake, xdist, pytest_timeout, hypothesis" 2>/dev/null \
		|| $(MAKE) setup
	$(PYTHON) -m pytest $(PYTEST_PARALLEL) -m "not slow" --hypothesis-profile fast \
		--timeout 900 --durations=10

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m snakemake --lint --configfile config/demo.yaml
	$(PYTHON) -m snakefmt --check workflow
