"""Level 3: the gradient of the total loss for every parameter, codebook included."""
import numpy as np
import pytest

from parity_tests import tolerances as tol
from parity_tests.test_forward import images
from parity_tests.twins import Pair, flax_grads, torch_grads
from vqvae_common.config import PRESETS


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
@pytest.mark.parametrize("seed,batch", [(0, 1), (1, 7), (2, 16)])
def test_gradients_match(preset, seed, batch, device, check):
    pair = Pair(PRESETS[preset], seed, device)
    tx, fx = pair.x(images(preset, batch, seed))
    t = torch_grads(pair.torch, tx)
    f = flax_grads(pair.flax, fx)
    assert set(f) == set(t)
    for key, want in t.items():
        scale = float(np.max(np.abs(want)))
        check(f"gradient {key}", f[key], want, tol.GRADIENT, scale=scale)
