# The two commands of the README: `make demo` and `make test` (each installs first).
# The install uses the active environment's python (a venv or conda env: python3 on PATH),
# else the checkout's .venv if there is one, else the python3 on PATH; torch is pinned to
# the release the project is tested with (pyproject.toml keeps ranges).
PYTHON ?= $(if $(VIRTUAL_ENV)$(CONDA_PREFIX),python3,$(if $(wildcard .venv/bin/python),.venv/bin/python,python3))
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.14.1 torchvision==0.29.1
CORES ?= 2

.PHONY: setup demo test lint

setup:
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[dev]"

demo: setup
	$(PYTHON) -m snakemake --cores $(CORES) --configfile config/demo.yaml
	$(PYTHON) -m snakemake --configfile config/demo.yaml --report results/report.html
	@echo "demo done: results/report.html, results/report.md, results/figures/"

test: setup
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m snakemake --lint --configfile config/demo.yaml
	$(PYTHON) -m snakefmt --check workflow
