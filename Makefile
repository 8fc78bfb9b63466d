# Two commands set everything up on a fresh machine: `make run` and `make test`.
VENV := .venv
BIN := $(VENV)/bin
comma := ,

# An interpreter of Python $(1) (e.g. 3.12): pyenv's, else python$(1) or python3 from the PATH.
find_python = $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1).*/bin/python$(1) 2>/dev/null) \
	$$(command -v python$(1)) $$(command -v python3); do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != ($(subst .,$(comma) ,$(1))))' 2>/dev/null && echo $$p && break; done)
# The pinned versions (pyproject.toml) need Python 3.12; the oldest supported JAX runs on 3.11.
PYTHON ?= $(call find_python,3.12)
OLDEST_PYTHON ?= $(call find_python,3.11)

# The accelerator JAX is installed for: cuda13 or cuda12 where nvidia-smi answers (by the CUDA
# version its driver supports), else cpu. Override with e.g. `make run ACCEL=cpu`; another
# ACCEL than the one .venv was made for makes it anew.
ACCEL ?= $(shell cuda=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1); \
	if [ -z "$$cuda" ]; then echo cpu; elif [ "$$cuda" -ge 13 ]; then echo cuda13; else echo cuda12; fi)
ifeq ($(filter $(ACCEL),cpu cuda12 cuda13),)
$(error ACCEL must be cpu, cuda12 or cuda13, not '$(ACCEL)')
endif
EXTRAS := test$(if $(filter cuda%,$(ACCEL)),$(comma)$(ACCEL))
STAMP := $(VENV)/.installed-$(ACCEL)

# The oldest JAX the project supports (requirements/oldest-jax.txt), on Python 3.11: `make test`
# runs the KFAC tests there too (the compatibility layer, KFAC steps and VMC optimisation of H2;
# the code that differs between JAX releases). All VMC training tests: make test-oldest-jax
# OLDEST_TESTS="tests/test_vmc_optim.py tests/test_vmc_train.py tests/test_vmc_shared.py".
OLDEST_VENV := .venv-oldest-jax
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST_TESTS ?= tests/test_vmc_optim.py

.PHONY: run test test-oldest-jax venv clean-venv bench gpu-prepare gpu-rehearsal

# Packages are installed by uv (pinned here; pip installs it into each environment first): the
# same resolved versions as pip, in about half the time. Modules are compiled to bytecode at
# installation, as pip does, so that the many processes the tests start do not each compile
# them again where PYTHONDONTWRITEBYTECODE is set.
UV := uv==0.13.9
# new_venv: a new environment $(2) of the interpreter $(1), with uv in it. uv_install: installs
# into the environment $(1) what the arguments after it name.
new_venv = rm -rf $(2) && $(1) -m venv $(2) && $(2)/bin/pip install --quiet $(UV)
uv_install = $(1)/bin/uv pip install --quiet --compile-bytecode --python $(1)/bin/python

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python 3.12 found; install one (pyenv install 3.12) or set PYTHON" >&2; exit 2; }
	$(call new_venv,$(PYTHON),$(VENV))
	$(call uv_install,$(VENV)) -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml requirements/oldest-jax.txt
	@test -n "$(OLDEST_PYTHON)" || { echo "no Python 3.11 found for the oldest-JAX environment; set OLDEST_PYTHON" >&2; exit 2; }
	$(call new_venv,$(OLDEST_PYTHON),$(OLDEST_VENV))
	$(OLDEST_VENV)/bin/python requirements/override.py requirements/oldest-jax.txt > $(OLDEST_VENV)/requirements.txt
	$(call uv_install,$(OLDEST_VENV)) -r $(OLDEST_VENV)/requirements.txt
	$(call uv_install,$(OLDEST_VENV)) --no-deps -e .
	touch $@

# Main job, both pillars on a small built-in default (11 minutes on 2 CPU cores from a fresh
# clone, installation included). PhiSNet: 40 thermally distorted water geometries labelled at
# PBE/def2-SVP (the paper's level of theory), a small PhiSNet trained on 30 of them for 2
# minutes and its accuracy on 5 held-out ones; then the shipped model water-pbe-def2svp (35
# minutes of training on 500 geometries) on all 40: its accuracy, the observables it predicts for
# two geometries (orbital energies, density, gap, Mulliken charges, dipole, cube files of the
# density, HOMO and LUMO) and pyscf SCF iterations from its predicted density against pyscf's own
# guesses on 3 of them. VMC: a small neural wavefunction for H2 fitted to Hartree-Fock and
# optimised by VMC with KFAC for 400 steps, its energy with a blocking error bar next to the
# exact one; then the shipped base model hchains-base (H6 chains) fine-tuned on H10 for 30 steps
# and evaluated. Re-running continues the dataset and the training runs where they stopped.
DEMO := runs/demo
run: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/phisnet generate water --samples 40 --workers 2 --seed 0 --output $(DEMO)/water.h5
	$(BIN)/phisnet inspect $(DEMO)/water.h5
	$(BIN)/phisnet train $(DEMO)/water.h5 --run-dir $(DEMO)/phisnet --preset small \
		--train 30 --valid 5 --batch-size 10 --set validate_every=25 --time-budget 120
	$(BIN)/phisnet evaluate $(DEMO)/phisnet --split test
	$(BIN)/phisnet evaluate water-pbe-def2svp --dataset $(DEMO)/water.h5
	$(BIN)/phisnet predict water-pbe-def2svp --dataset $(DEMO)/water.h5 --molecule water --index 0 --index 1 \
		-o $(DEMO)/prediction.npz --cube $(DEMO)/cubes
	$(BIN)/phisnet scf-guess water-pbe-def2svp --dataset $(DEMO)/water.h5 -n 3
	$(BIN)/vmc train H2 --run-dir $(DEMO)/vmc_h2 --preset small --steps 400
	$(BIN)/vmc evaluate $(DEMO)/vmc_h2 --steps 200
	$(BIN)/vmc finetune hchains-base H10 --run-dir $(DEMO)/h10 --steps 30
	$(BIN)/vmc evaluate $(DEMO)/h10 --steps 100 --burn-in 100

# Two worker processes, one per test file at a time (module fixtures are built once).
TEST_WORKERS ?= 2
test: $(STAMP) $(OLDEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
	$(MAKE) --no-print-directory test-oldest-jax

# One file: its tests are spread over the workers one by one.
test-oldest-jax: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist load $(OLDEST_TESTS)

venv: $(STAMP)

bench: $(STAMP)
	$(BIN)/python experiments/generation_speed.py

# The device check (experiments/gpu/README.md): wheels and data for a GPU machine without a
# package registry, then its rehearsal here at test sizes.
gpu-prepare: $(STAMP)
	$(BIN)/python experiments/gpu/prepare.py

gpu-rehearsal:
	PYTHON312=$(PYTHON) bash experiments/gpu/rehearse.sh

clean-venv:
	rm -rf $(VENV) $(OLDEST_VENV)
