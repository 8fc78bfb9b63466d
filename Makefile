# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean-venv bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Main job on a small built-in default: 16 thermally distorted water geometries labelled at
# PBE/def2-SVP (the paper's level of theory); re-running continues or reuses the file.
run: $(STAMP)
	mkdir -p runs/demo
	$(BIN)/phisnet generate water --samples 16 --workers 2 --seed 0 --output runs/demo/water.h5
	$(BIN)/phisnet inspect runs/demo/water.h5

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python experiments/generation_speed.py

clean-venv:
	rm -rf $(VENV)
