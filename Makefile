# The README's two commands for a fresh machine, and the checks CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TFDS_DATA_DIR ?= ../shared/data/tensorflow_datasets
export TFDS_DATA_DIR

.PHONY: install test parity train-torch train-jax

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'

install: $(PY)

test: $(PY)
	$(PY) -m pytest

parity: $(PY)
	$(PY) -m pytest parity_tests

train-torch: $(PY)
	$(PY) train_torch.py

train-jax: $(PY)
	$(PY) train_jax.py
