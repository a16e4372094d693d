"""Settings for every test process, set before any test module imports JAX.

pytest-xdist (`pytest -n N`) runs N processes: on a GPU, each JAX process would otherwise
take 75% of the GPU's memory at its first array, and the second would fail to allocate.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
