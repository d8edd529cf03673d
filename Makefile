# Two commands for a fresh machine with Python 3.11, pip and make:
#   make run    set up .venv and run the default workflow (config.yaml)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
SNAKEMAKE_ARGS ?=

.PHONY: setup run test lint dry-run clean

$(STAMP): envs/requirements.txt envs/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

dry-run: setup
	$(BIN)/snakemake --dry-run $(SNAKEMAKE_ARGS)

test: setup
	$(BIN)/ruff check workflow tests
	$(BIN)/python -m pytest tests -q

lint: setup
	$(BIN)/ruff check workflow tests
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake .cache
