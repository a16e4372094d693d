"""Level 4: 50 Adam steps from the same weights on the same batches.

In float64 the twins must follow the same trajectory. In float32 they cannot, measurably: Adam's
update is ~lr * sign(g) for small gradients, so an entry whose gradient is within rounding of
0 (the conv biases feeding a BatchNorm are exactly such entries) moves by +-lr on a coin
flip, and the VQ argmin amplifies that. PyTorch does not agree with itself to 1e-3 after 50
float32 steps unless its deterministic algorithms are on. In float32 the total loss is held
to its own, looser stated bound, and the terms and final weights are reported, not bounded.
"""
import jax
import numpy as np
import pytest

from parity_tests import tolerances as tol
from parity_tests.conftest import relative
from parity_tests.test_gradients import feeds_batchnorm
from parity_tests.twins import Pair, flax_state, torch_state, train_flax, train_torch
from vqvae_common import data
from vqvae_common.config import IMAGE_SHAPES, PRESETS

STEPS = 50
LR = 3e-4


def fake_dataset(preset: str, n: int) -> np.ndarray:
    """Smooth random uint8 images (blurred noise), so the model has structure to learn."""
    rng = np.random.default_rng(7)
    h, w, c = IMAGE_SHAPES[preset]
    noise = rng.uniform(0, 255, (n, h // 4, w // 4, c))
    return np.repeat(np.repeat(noise, 4, 1), 4, 2).astype(np.uint8)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset,batch", [("mnist", 16), ("cifar10", 8)])
def test_fifty_adam_steps_match(preset, batch, dtype, device, check, measure):
    with jax.enable_x64(dtype == "float64"):
        pair = Pair(PRESETS[preset], 0, device, np.dtype(dtype).type)
        train = fake_dataset(preset, STEPS * batch)
        batches = [b.astype(dtype) for b in data.batches(train, batch, seed=0, epoch=0)]
        assert len(batches) == STEPS
        flax_model, f_history = train_flax(pair.flax, batches, LR, pair.jax_device)
        t_history = train_torch(pair.torch, batches, LR, pair.torch_device)
        f_w = flax_state(flax_model)
    for history in (t_history, f_history):
        assert history[-1]["recon"] < 0.75 * history[0]["recon"], "a twin did not learn"
    exact = dtype == "float64"
    for f, t in zip(f_history, t_history):
        for term in t:
            quantity = f"training {dtype} {term} (each of 50 steps)"
            if exact or term == "loss":
                check(quantity, f[term], t[term], tol.TRAIN_LOSS if exact else tol.TRAIN_LOSS_FLOAT32)
            else:
                measure(quantity, relative(f[term], t[term]))
    for key, want in torch_state(pair.torch).items():
        if not key.endswith("num_batches_tracked") and not feeds_batchnorm(key):
            if exact:
                check("training float64 final weights", f_w[key], want, tol.TRAIN_WEIGHTS)
            else:
                measure("training float32 final weights", relative(f_w[key], want))
