"""Level 2: the whole model forward, train and eval mode, and BatchNorm's running stats."""
import numpy as np
import pytest

from parity_tests import tolerances as tol
from parity_tests.twins import Pair, flax_forward, flax_state, torch_forward, torch_state
from vqvae_common.config import IMAGE_SHAPES, PRESETS

def images(preset: str, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    return rng.uniform(-1, 1, (batch, *IMAGE_SHAPES[preset])).astype(np.float32)


def compare_forward(pair: Pair, x: np.ndarray, train: bool, check) -> None:
    tx, fx = pair.x(x)
    t = torch_forward(pair.torch, tx, train)
    f = flax_forward(pair.flax, fx, train)
    mode = "train" if train else "eval"
    assert np.array_equal(f["indices"], t["indices"]), f"{mode}: code indices differ"
    for key in ("z_e", "x_hat", "loss", "recon", "codebook", "commitment"):
        check(f"forward {mode} {key}", f[key], t[key], tol.FORWARD)


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
@pytest.mark.parametrize("seed,batch", [(0, 1), (1, 5), (2, 16)])
def test_forward_matches(preset, seed, batch, device, check):
    pair = Pair(PRESETS[preset], seed, device)
    x = images(preset, batch, seed)
    compare_forward(pair, x, train=True, check=check)
    compare_forward(pair, x, train=False, check=check)


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
def test_batchnorm_running_stats_after_a_train_step(preset, device, check):
    pair = Pair(PRESETS[preset], 0, device)
    tx, fx = pair.x(images(preset, 8, 0))
    pair.torch.train()
    pair.torch(tx)
    pair.flax.train()
    pair.flax(fx)
    t, f = torch_state(pair.torch), flax_state(pair.flax)
    stats = [k for k in t if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 10  # encoder 1 + decoder 1 + four residual blocks x 2
    for key in stats:
        check(f"batchnorm {key.rsplit('.', 1)[1]}", f[key], t[key], tol.BATCHNORM)
    counts = [k for k in t if k.endswith("num_batches_tracked")]
    assert all(f[k] == t[k] == 1 for k in counts)
