"""Level 2: the whole model forward, train and eval mode, and BatchNorm's running stats."""
import numpy as np
import pytest

from parity_tests import tolerances as tol
from parity_tests.inputs import images
from parity_tests.twins import Pair, flax_state, torch_state
from vqvae_common.config import DATASETS, ModelConfig

SMALL = {"mnist": ModelConfig(in_channels=1, hidden=16, num_codes=32),
         "cifar10": ModelConfig(in_channels=3, hidden=16, num_codes=32)}
# width: the preset's D, or D = 16 and K = 32 where the width is not the point; "plain" runs
# the Flax twin on plain XLA ops (what GPUs and TPUs run) instead of the fast CPU kernels
WIDTHS = {"preset": (None, None), "small": (SMALL, None), "small plain": (SMALL, False)}


def make_pair(preset: str, width: str, seed: int, device: str) -> Pair:
    configs, fast_cpu = WIDTHS[width]
    config = DATASETS[preset].preset if configs is None else configs[preset]
    return Pair(config, seed, device, fast_cpu=fast_cpu)


def compare_forward(pair: Pair, x: np.ndarray, train: bool, check) -> None:
    t, f = pair.forward(x, train)
    mode = "train" if train else "eval"
    for key in ("z_e", "x_hat", "loss", "recon", "codebook", "commitment"):
        check(f"forward {mode} {key}", f[key], t[key], tol.FORWARD)


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
@pytest.mark.parametrize("width,seed,batch", [("preset", 0, 1), ("small", 1, 7),
                                              ("small", 2, 16), ("small plain", 1, 7)])
def test_forward_matches(preset, width, seed, batch, device, check, note):
    pair = make_pair(preset, width, seed, device)
    x = images(preset, batch, seed)
    compare_forward(pair, x, train=True, check=check)
    compare_forward(pair, x, train=False, check=check)
    pair.audit.verify(note)


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
def test_batchnorm_running_stats_after_a_train_step(preset, device, check, note):
    pair = Pair(DATASETS[preset].preset, 0, device)
    pair.train_mode_call(images(preset, 16, 0))
    pair.audit.verify(note)
    t, f = torch_state(pair.torch), flax_state(pair.flax)
    stats = [k for k in t if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 10  # encoder 1 + decoder 1 + four residual blocks x 2
    for key in stats:
        check(f"batchnorm {key.rsplit('.', 1)[1]}", f[key], t[key], tol.BATCHNORM)
    check("code usage after a train-mode call", f["quantizer.usage"], t["quantizer.usage"],
          tol.BATCHNORM)
    counts = [k for k in t if k.endswith("num_batches_tracked")]
    assert all(f[k] == t[k] == 1 for k in counts)
