# Set-up on a fresh machine is part of both jobs: the first run builds .venv
# (moshi==0.2.13 brings torch 2.9.1, a few GB and a few minutes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/moshi-ttt train --with-baseline

test: setup
	$(BIN)/python -m pytest
