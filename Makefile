# The two commands in the README. Both create the environment first if it is missing.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
VENV_BIN := .venv/bin
# Stage commands in dvc.yaml (moesae, papermill) come from the environment.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export MPLBACKEND := Agg
# The environment may be shared by several clones (it is cached by lock hash): this clone's
# sources always come first, for the stages, the tests and the notebook kernels alike.
export PYTHONPATH := $(CURDIR)/src

.PHONY: env reproduce test test-fast benchmark clean-results

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
