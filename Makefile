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

# Main job on a small built-in default (about 24 minutes on 2 CPU cores from a fresh clone, installation included): 80 thermally
# distorted water geometries labelled at PBE/def2-SVP (the paper's level of theory), a small
# PhiSNet trained on 50 of them for 4 minutes, its accuracy on the 20 held-out ones, the observables
# it predicts for two geometries (orbital energies, density, gap, Mulliken charges, dipole, cube
# files of the density, HOMO and LUMO) and pyscf SCF iterations from its predicted density against
# pyscf's own guesses on 5 held-out geometries; then a
# small neural wavefunction for H2 pretrained to Hartree-Fock and optimised by VMC with KFAC for
# 800 steps (about 2 minutes), and its energy with a blocking error bar next to the exact one;
# last, a base wavefunction shared by H4 chains at three spacings (300 steps, 3 geometries per
# step), fine-tuned on H6 next to the same network trained on H6 from scratch, both evaluated
# after 0, 20 and 50 steps (about 7 minutes; table and plot in runs/demo).
# Re-running continues the dataset and the training runs where they stopped.
DEMO := runs/demo
run: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/phisnet generate water --samples 80 --workers 2 --seed 0 --output $(DEMO)/water.h5
	$(BIN)/phisnet inspect $(DEMO)/water.h5
	$(BIN)/phisnet train $(DEMO)/water.h5 --run-dir $(DEMO)/phisnet --preset small \
		--train 50 --valid 10 --batch-size 10 --set validate_every=50 --time-budget 240
	$(BIN)/phisnet evaluate $(DEMO)/phisnet --split test
	$(BIN)/phisnet predict $(DEMO)/phisnet --dataset $(DEMO)/water.h5 --molecule water --index 0 --index 1 \
		-o $(DEMO)/prediction.npz --cube $(DEMO)/cubes
	$(BIN)/phisnet scf-guess $(DEMO)/phisnet --split test -n 5
	$(BIN)/vmc train H2 --run-dir $(DEMO)/vmc_h2 --preset small --steps 800
	$(BIN)/vmc evaluate $(DEMO)/vmc_h2 --steps 300
	$(BIN)/python experiments/finetuning.py --name demo_h4_to_h6 --base hchains:4@1.6,1.8,2.0 \
		--target H6 --geometries-per-step 3 --base-steps 300 --eval-at 0 20 50 --eval-steps 100 \
		--runs $(DEMO)/finetuning --results $(DEMO)

# Two worker processes, one per test file at a time (module fixtures are built once).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python experiments/generation_speed.py

clean-venv:
	rm -rf $(VENV)
