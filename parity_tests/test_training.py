"""Level 4: 50 Adam steps from the same weights on the same batches."""
import numpy as np
import pytest

from parity_tests import tolerances as tol
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


@pytest.mark.parametrize("preset,batch", [("mnist", 16), ("cifar10", 8)])
def test_fifty_adam_steps_match(preset, batch, device, check):
    pair = Pair(PRESETS[preset], 0, device)
    train = fake_dataset(preset, STEPS * batch)
    batches = list(data.batches(train, batch, seed=0, epoch=0))
    assert len(batches) == STEPS
    flax_model, f_losses = train_flax(pair.flax, batches, LR, pair.jax_device)
    t_losses = train_torch(pair.torch, batches, LR, pair.torch_device)
    assert t_losses[-1] < t_losses[0]
    for step, (f, t) in enumerate(zip(f_losses, t_losses)):
        check("training loss (each of 50 steps)", f, t, tol.TRAIN_LOSS)
    t_w, f_w = torch_state(pair.torch), flax_state(flax_model)
    for key, want in t_w.items():
        if not key.endswith("num_batches_tracked"):
            check("training final weights", f_w[key], want, tol.TRAIN_WEIGHTS)
