"""--lr-schedule: vqvae_common.config.learning_rate, and each twin's steps taken at its rate.

The parity suite proves the twins step alike under a cosine schedule (parity_tests/
test_training.py); these prove the schedule is the one asked for, which both twins ignoring
it alike would not show there.
"""
import numpy as np
import pytest
from flax import nnx

from vqvae_common import layout
from vqvae_common.config import ModelConfig, TrainConfig, learning_rate
from vqvae_common.errors import UserError
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax.train import JaxTwin
from vqvae_torch import checkpoint as torch_checkpoint
from vqvae_torch.train import TorchTwin


def test_cosine_falls_from_lr_to_zero_at_the_last_step():
    assert learning_rate(0, 0.1, "cosine", 10) == pytest.approx(0.1)
    assert learning_rate(5, 0.1, "cosine", 10) == pytest.approx(0.05)
    assert learning_rate(8, 0.1, "cosine", 10) == pytest.approx(0.05 * (1 + np.cos(0.8 * np.pi)))
    assert learning_rate(10, 0.1, "cosine", 10) == pytest.approx(0.0, abs=1e-17)
    assert learning_rate(13, 0.1, "cosine", 10) == pytest.approx(0.0, abs=1e-17)  # stays 0


def test_constant_and_no_horizon_keep_lr():
    assert learning_rate(7, 0.1, "constant", 10) == 0.1
    assert learning_rate(7, 0.1, "cosine", None) == 0.1  # a twin built only to evaluate


def encoder_kernel(twin) -> np.ndarray:
    """encoder.conv1.weight, by its PyTorch name, of either twin."""
    if isinstance(twin, TorchTwin):
        arrays = torch_checkpoint.export_arrays(twin.model)
    else:
        arrays = layout.flax_to_torch(jax_checkpoint.export_arrays(
            nnx.merge(twin.graphdef, twin.state)[0]))
    return arrays["encoder.conv1.weight"]


@pytest.mark.parametrize("make_twin", [TorchTwin, JaxTwin], ids=["torch", "jax"])
def test_a_twin_steps_at_the_schedule_rate(make_twin):
    """Cosine over 2 steps: steps 0 and 1 move the weights, step 2 (rate 0) leaves them;
    the same third step at a constant rate moves them."""
    config = ModelConfig(in_channels=1, hidden=8, num_codes=16)
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    moved = {}
    for schedule in ("cosine", "constant"):
        twin = make_twin(config, TrainConfig(device="cpu", lr_schedule=schedule),
                         total_steps=2)
        kernels = [encoder_kernel(twin)]
        for _ in range(3):
            twin.fetch(twin.train_step(batch))
            kernels.append(encoder_kernel(twin))
        moved[schedule] = [not np.array_equal(a, b) for a, b in zip(kernels, kernels[1:])]
    assert moved["cosine"] == [True, True, False]
    assert moved["constant"] == [True, True, True]


def test_a_flax_checkpoint_of_a_cosine_run_evaluates_and_converts(tmp_path):
    """optax keeps a step count for a schedule, so a cosine run's optimizer state has another
    shape than a constant one's: reading it back for evaluation or conversion (where the
    flags are not known) takes the shape from the checkpoint's record."""
    import convert

    config = ModelConfig(in_channels=1, hidden=8, num_codes=16)
    twin = JaxTwin(config, TrainConfig(device="cpu", lr_schedule="cosine"), total_steps=4)
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    twin.fetch(twin.train_step(batch))
    path = str(tmp_path / "checkpoint")
    twin.save(path, 1)
    loaded = JaxTwin.from_checkpoint(path, device="cpu")
    np.testing.assert_array_equal(encoder_kernel(loaded), encoder_kernel(twin))
    assert convert.main(["--from-jax", path, "--out", str(tmp_path / "model.pt")]) == 0
    back = TorchTwin.from_checkpoint(str(tmp_path / "model.pt"), device="cpu")
    np.testing.assert_allclose(encoder_kernel(back), encoder_kernel(twin), rtol=0, atol=0)


@pytest.mark.parametrize("make_twin,name", [(TorchTwin, "checkpoint.pt"),
                                            (JaxTwin, "checkpoint")], ids=["torch", "jax"])
def test_resuming_with_another_schedule_is_one_line(make_twin, name, tmp_path):
    config = ModelConfig(in_channels=1, hidden=8, num_codes=16)
    path = str(tmp_path / name)
    make_twin(config, TrainConfig(device="cpu", lr_schedule="constant")).save(path, 0)
    cosine = make_twin(config, TrainConfig(device="cpu", lr_schedule="cosine"), total_steps=9)
    with pytest.raises(UserError, match="trained with --lr-schedule constant; resume it"):
        cosine.load(path)
