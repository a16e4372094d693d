import os

import numpy as np
import pytest


def _real_data_dir(name: str) -> str:
    root = os.environ.get("TFDS_DATA_DIR")
    if not root:
        pytest.skip("TFDS_DATA_DIR is not set: no real data to test against")
    if not os.path.isdir(os.path.join(root, name)):
        pytest.skip(f"TFDS_DATA_DIR={root} holds no {name}")
    return root


@pytest.fixture(scope="session")
def real_data_dir():
    """real_data_dir(name) -> $TFDS_DATA_DIR when it holds dataset `name`, else skip."""
    return _real_data_dir


@pytest.fixture(scope="session")
def restart_rows():
    """restart_rows(m, n): which of n batch vectors m dead codes move onto, as the
    VectorQuantizer docstrings of both twins state it."""
    return lambda m, n: np.arange(m) * (n // m) if m <= n else np.arange(m) % n


@pytest.fixture(params=["torch", "jax"])
def twin(request):
    """The adapter (tests/twin_adapters.py) of each twin in turn: a test that takes `twin`
    states its property once and runs against both."""
    from twin_adapters import ADAPTERS
    return ADAPTERS[request.param]
