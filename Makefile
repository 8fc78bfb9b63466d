# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
comma := ,

# The accelerator JAX is installed for: cuda13 or cuda12 where nvidia-smi answers (by the CUDA
# version its driver supports), else cpu. Override with e.g. `make run ACCEL=cpu`; switching an
# existing .venv back to cpu needs `make clean-venv` first.
ACCEL ?= $(shell cuda=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1); \
	if [ -z "$$cuda" ]; then echo cpu; elif [ "$$cuda" -ge 13 ]; then echo cuda13; else echo cuda12; fi)
ifeq ($(filter $(ACCEL),cpu cuda12 cuda13),)
$(error ACCEL must be cpu, cuda12 or cuda13, not '$(ACCEL)')
endif
EXTRAS := test$(if $(filter cuda%,$(ACCEL)),$(comma)$(ACCEL))
STAMP := $(VENV)/.installed-$(ACCEL)

# The newest JAX the project supports (requirements/newest-jax.txt) needs Python >= 3.12; its
# environment runs the KFAC and VMC training tests as part of `make test`.
PYTHON312 ?= $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12.*/bin/python3.12 2>/dev/null) \
	$$(command -v python3.12); do $$p -c '' 2>/dev/null && echo $$p && break; done)
NEWEST_VENV := .venv-newest-jax
NEWEST_STAMP := $(NEWEST_VENV)/.installed
NEWEST_TESTS := tests/test_vmc_optim.py tests/test_vmc_train.py tests/test_vmc_shared.py

.PHONY: run test test-newest-jax venv clean-venv bench gpu-prepare gpu-rehearsal

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(NEWEST_STAMP): pyproject.toml requirements/newest-jax.txt
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 found for the newest-JAX environment; set PYTHON312" >&2; exit 2; }
	rm -rf $(NEWEST_VENV)
	$(PYTHON312) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python requirements/override.py requirements/newest-jax.txt > $(NEWEST_VENV)/requirements.txt
	$(NEWEST_VENV)/bin/pip install --quiet -r $(NEWEST_VENV)/requirements.txt
	$(NEWEST_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

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
test: $(STAMP) test-newest-jax
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-newest-jax: $(NEWEST_STAMP)
	$(NEWEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(NEWEST_TESTS)

bench: $(STAMP)
	$(BIN)/python experiments/generation_speed.py

# The device check (experiments/gpu/README.md): wheels and data for a GPU machine without a
# package registry, then its rehearsal here at test sizes.
gpu-prepare: $(STAMP)
	$(BIN)/python experiments/gpu/prepare.py

gpu-rehearsal:
	PYTHON312=$(PYTHON312) bash experiments/gpu/rehearse.sh

clean-venv:
	rm -rf $(VENV) $(NEWEST_VENV)
