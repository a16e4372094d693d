import os

import jax
import numpy as np
import pytest
import torch


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


@pytest.fixture(scope="session")
def child_env():
    """The environment of the trainers and converters that tests run: each compiles only
    what no process of this worker compiled before it (building a model alone is about 3 s
    of JAX compiles; the cache is the worker's, conftest.py), with torch on one thread. The
    cache's writes are not atomic: one JAX process at a time."""
    cache = {name.upper(): str(getattr(jax.config, name))
             for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                          "jax_persistent_cache_min_entry_size_bytes")}
    return {**os.environ, "OMP_NUM_THREADS": "1", **cache}


@pytest.fixture(scope="module", autouse=True)
def small_model_speed():
    """Torch runs on one thread for tests/ (on a busy 2-core machine, two threads wait a time
    slice at each op). Undone after each module: a session fixture would be undone only after
    parity_tests/, which set their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
