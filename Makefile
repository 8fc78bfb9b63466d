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

# Main job on a small built-in default: a small thermally sampled water dataset.
run: $(STAMP)
	$(BIN)/phisnet generate water --samples 8 --workers 2 --basis sto-3g --seed 0 \
		--output runs/demo/water.h5
	$(BIN)/phisnet inspect runs/demo/water.h5

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python experiments/generation_speed.py

clean-venv:
	rm -rf $(VENV)
