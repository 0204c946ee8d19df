# The two commands in the README. Both create the environment first if it is missing.
SHELL := /bin/bash
# Offline mode is a profile setting: `offline: true` in params.yaml (the default profile) keeps the
# HF libraries off the network; the paper profile (`offline: false`) reaches the Hub. Variables you
# set yourself win either way (`?=` never overrides the environment).
PROFILE_OFFLINE := $(shell sed -n 's/^offline:[[:space:]]*\([A-Za-z]*\).*/\1/p' params.yaml 2>/dev/null)
ifeq ($(PROFILE_OFFLINE),true)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
endif
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0
VENV_BIN := .venv/bin
# Stage commands in dvc.yaml (moesae, papermill) come from the environment.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export MPLBACKEND := Agg
# The environment may be shared by several clones (it is cached by lock hash): this clone's
# sources always come first, for the stages, the tests and the notebook kernels alike.
export PYTHONPATH := $(CURDIR)/src

.PHONY: env reproduce test test-fast benchmark gpu-check clean-results lab

env:
	@bash scripts/ensure_env.sh

## make reproduce: dvc repro on the profile in params.yaml (the offline default unless switched)
reproduce: env
	$(VENV_BIN)/dvc repro

## make test: the whole test suite (CI runs exactly this)
test: env
	$(VENV_BIN)/python -m pytest -q

test-fast: env
	$(VENV_BIN)/python -m pytest -q -m "not slow"

benchmark: env
	$(VENV_BIN)/python benchmarks/throughput.py

## make gpu-check: on a GPU machine, paper-size throughput (-> benchmarks/results/cuda.json) and the
## paper profile's pipeline at reduced size on a random GPT-2 small, offline, in <= 8 minutes
gpu-check: env
	$(VENV_BIN)/python benchmarks/gpu_check.py

## make lab: JupyterLab on notebooks/, the moesae kernel by default, nothing fetched from the network
## (news, update checks and the extension manager's index off); `make lab LAB_BROWSER=False` opens
## no browser (the URL with its token is printed). The stage variables above apply to the kernels.
## As root (containers, CI) it adds --allow-root, which Jupyter otherwise refuses to start without.
LAB_BROWSER ?= True
lab: env
	$(VENV_BIN)/jupyter lab --ServerApp.root_dir=notebooks --ServerApp.open_browser=$(LAB_BROWSER) \
	    $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True) \
	    --MappingKernelManager.default_kernel_name=moesae \
	    --LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate \
	    --LabApp.extension_manager=readonly
