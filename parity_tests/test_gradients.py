"""Level 3: the gradient of the total loss for every parameter, codebook included.

Both twins run on the same code indices and the same ReLU sides (parity_tests/ties.py: a
ReLU input within rounding of 0 takes PyTorch's side, with a batch of one a single such
element would move a weight gradient by ~1%), so every gradient is held to the tolerance.

A conv bias that feeds a BatchNorm has a gradient of exactly 0 (the normalization subtracts
it again), so both twins return rounding noise there: for those, both must be ~0 against the
same layer's weight gradient, instead of close to each other.
"""
import re

import numpy as np
import pytest

from parity_tests import tolerances as tol
from parity_tests.inputs import images
from parity_tests.test_forward import make_pair


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
@pytest.mark.parametrize("width,seed,batch", [("preset", 2, 16), ("small", 0, 1),
                                              ("small", 2, 1), ("small", 1, 7),
                                              ("small plain", 1, 7)])
def test_gradients_match(preset, width, seed, batch, device, check, note):
    pair = make_pair(preset, width, seed, device)
    t, f = pair.grads(images(preset, batch, seed))
    pair.audit.verify(note)
    assert set(f) == set(t)
    for key, want in t.items():
        if feeds_batchnorm(key):
            weight = t[key.replace(".bias", ".weight")]
            for name, got in (("torch", want), ("flax", f[key])):
                check(f"gradient of a bias feeding a BatchNorm ({name}, exactly 0)", got,
                      np.zeros_like(got), tol.ZERO_GRADIENT, scale=float(np.max(np.abs(weight))))
        else:
            check(f"gradient {key}", f[key], want, tol.GRADIENT,
                  scale=float(np.max(np.abs(want))))


def feeds_batchnorm(key: str) -> bool:
    return re.fullmatch(r"encoder\.conv1\.bias|.*res\d\.conv\d\.bias|decoder\.deconv1\.bias",
                        key) is not None
