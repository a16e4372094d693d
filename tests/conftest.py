import os

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
