"""Level 5: how the codebook learns, across the twins.

- EMA (--codebook-update ema): the forward, the gradients and one train-mode call's EMA state
  (counts, sums, codebook) on the same weights (MNIST's shape: the image channels change
  nothing in the quantizer), then 50 Adam steps with dead-code restarts:
  every step's loss terms and the final EMA state. float64 is held to tol.EMA (1e-9,
  relative); float32 trajectories part by design (test_training.py) and are reported.
- k-means (--codebook-init kmeans): given the same encoder outputs, both twins' codebooks are
  identical to the bit (the k-means itself is one numpy function, vqvae_common.kmeans).

Small widths (D = 16, K = 32): the EMA and the k-means do not depend on the width.
"""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from parity_tests import tolerances as tol
from parity_tests.conftest import relative
from parity_tests.inputs import arrange, images, smooth_dataset
from parity_tests.test_forward import SMALL, compare_forward
from parity_tests.test_gradients import feeds_batchnorm
from parity_tests.twins import Pair, flax_state, torch_state
from vqvae_common import data
from vqvae_jax import model as jax_model
from vqvae_torch import model as torch_model
from vqvae_torch.train import to_tensor

EMA = {name: dataclasses.replace(config, codebook_update="ema") for name, config in SMALL.items()}
EMA_STATE = ("quantizer.ema_counts", "quantizer.ema_sums", "quantizer.codebook")
STEPS, BATCH, LR = 50, 16, 1e-3


def train_ema_pair(steps: int, dtype: str, device: str):
    """(pair, torch losses, flax losses, trained Flax state by PyTorch key) after `steps` Adam
    steps of both twins' own train step, EMA codebook and restarts on."""
    with jax.enable_x64(dtype == "float64"):
        pair = Pair(EMA["mnist"], 0, device, np.dtype(dtype).type)
        train = smooth_dataset("mnist", steps * BATCH)
        batches = [arrange(b.astype(dtype)) for b in data.batches(train, BATCH, 0, 0)]
        t_history, f_history, flax_model = pair.train(batches, LR)
        return pair, t_history, f_history, flax_state(flax_model)


def test_ema_forward_gradients_and_state_match(device, check, note):
    pair = Pair(EMA["mnist"], 1, device)
    x = images("mnist", 7, 1)
    compare_forward(pair, x, train=True, check=check)
    compare_forward(pair, x, train=False, check=check)
    t, f = pair.grads(x)
    assert set(f) == set(t) and "quantizer.codebook" not in t  # the EMA's, not the optimizer's
    for key, want in t.items():
        if not feeds_batchnorm(key):
            check("EMA model gradients", f[key], want, tol.GRADIENT,
                  scale=float(np.max(np.abs(want))))
    pair.train_mode_call(x)
    pair.audit.verify(note)
    t, f = torch_state(pair.torch), flax_state(pair.flax)
    for key in EMA_STATE:
        check("EMA state after a train-mode call", f[key], t[key], tol.BATCHNORM)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fifty_steps_with_an_ema_codebook_match(dtype, device, check, measure, note):
    exact = dtype == "float64"
    pair, t_history, f_history, f_state = train_ema_pair(STEPS, dtype, device)
    pair.audit.verify(note, drift_from_step=None if exact else 1)
    assert t_history[-1]["recon"] < 0.75 * t_history[0]["recon"], "PyTorch did not learn"
    t_state = torch_state(pair.torch)
    assert not np.allclose(t_state["quantizer.ema_counts"], 1)  # the averages moved
    for f, t in zip(f_history, t_history):
        for term in t:
            if exact or term == "loss":
                check(f"EMA training {dtype} {term} (each of 50 steps)", f[term], t[term],
                      tol.TRAIN_LOSS if exact else tol.TRAIN_LOSS_FLOAT32)
    for key in EMA_STATE:
        quantity = f"EMA training {dtype} {key.split('.')[1]} after 50 steps"
        if exact:
            check(quantity, f_state[key], t_state[key], tol.EMA)
        else:
            measure(quantity, relative(f_state[key], t_state[key]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kmeans_codebooks_are_identical_given_the_same_encoder_outputs(dtype, device):
    z_e = np.random.default_rng(0).normal(size=(8, 7, 7, 16)).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        torch.manual_seed(0)
        t = torch_model.VectorQuantizer(32, 16).to(getattr(torch, dtype))
        t.initialize_kmeans(to_tensor(z_e, torch.device("cuda" if device == "gpu" else "cpu")),
                            seed=3, iterations=5)
        f = jax_model.VectorQuantizer(32, 16, rngs=nnx.Rngs(0))
        f.codebook[...] = f.codebook[...].astype(dtype)
        f.initialize_kmeans(jax.device_put(z_e, jax.devices(device)[0]), seed=3, iterations=5)
        flax_codebook = np.asarray(f.codebook[...])
    torch_codebook = t.codebook.detach().cpu().numpy()
    assert flax_codebook.dtype == torch_codebook.dtype == dtype
    np.testing.assert_array_equal(flax_codebook, torch_codebook)
    assert len(np.unique(torch_codebook, axis=0)) == 32
