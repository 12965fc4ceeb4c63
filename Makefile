# Two entry points for a fresh machine: `make run` (the default pipeline) and `make test`.
# Both create the virtual environment in .venv/ if it is missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned here (the ranges live in pyproject.toml): these builds are the ones this project is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test lint dry-run clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

run: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --profile profiles/local

test: $(STAMP)
	$(BIN)/ruff check .  # style (pyproject.toml: line length 120, pyflakes, isort) before the tests
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest

lint: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --lint

dry-run: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --profile profiles/local -n
