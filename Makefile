# The README's two commands for a fresh machine, and the checks CI runs. The datasets live
# in $TFDS_DATA_DIR when it is set, else in tfds's own default, ~/tensorflow_datasets.
VENV ?= .venv
PY := $(VENV)/bin/python
# The install also brings TensorFlow, which tfds needs to prepare a dataset the first time.
INSTALLED := $(VENV)/.installed

.PHONY: install test parity train-torch train-jax

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,prepare]'
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest

parity: $(INSTALLED)
	$(PY) -m pytest parity_tests

train-torch: $(INSTALLED)
	$(PY) train_torch.py

train-jax: $(INSTALLED)
	$(PY) train_jax.py
