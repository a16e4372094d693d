import sys

import pytest

from vqvae_common import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_glibc_takes_the_allocator_settings():
    assert host_memory.keep_freed_memory()
