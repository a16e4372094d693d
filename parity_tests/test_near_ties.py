"""The near-tie handling at work (parity_tests/ties.py), on a tie planted on purpose.

Codebook row b is made a rounding away from row a, a code that PyTorch picks, and the Flax
twin's argmin is swapped for one that resolves every near-tie the other way, as another
CPU's rounding may: wherever a runner-up lies within 1e-6 of the best distance, it takes the
runner-up. Every level must still pass, with the flipped indices counted as aligned. A
difference that is not a near-tie, planted the same way, must fail.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity_tests import tolerances as tol
from parity_tests.inputs import images, smooth_dataset
from parity_tests.test_forward import SMALL, compare_forward
from parity_tests.test_gradients import feeds_batchnorm
from parity_tests.twins import Pair, flax_state, torch_forward, torch_state
from vqvae_common import data, layout
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax import model as jax_model

CONFIG = SMALL["mnist"]
ROUNDING = 1e-6  # relative: the planted argmin's idea of "within rounding"


def distances(flat: jax.Array, codebook: jax.Array) -> jax.Array:
    products = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(flat ** 2, 1, keepdims=True) - 2 * products + jnp.sum(codebook ** 2, 1)


def runner_up_at_ties(flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin, except that a runner-up within ROUNDING of the best wins: the other way."""
    d = distances(flat, codebook)
    rows = jnp.arange(len(d))
    best = jnp.argmin(d, 1)
    others = d.at[rows, best].set(jnp.inf)
    runner_up = jnp.argmin(others, 1)
    tie = others[rows, runner_up] <= d[rows, best] + ROUNDING * jnp.maximum(d[rows, best], 1)
    return jnp.where(tie, runner_up, best)


def runner_up_always(flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """The second-nearest code for every vector: a real disagreement, not a tie."""
    d = distances(flat, codebook)
    return jnp.argmin(d.at[jnp.arange(len(d)), jnp.argmin(d, 1)].set(jnp.inf), 1)


def plant_tie(pair: Pair, x: np.ndarray) -> None:
    """Row b := row a + a rounding, in both twins, for a the code PyTorch picks most on x."""
    indices = torch_forward(pair.torch, pair.x(x)[0], train=True)["indices"].ravel()
    a = int(np.bincount(indices).argmax())
    b = (a + 1) % CONFIG.num_codes
    with torch.no_grad():
        codebook = pair.torch.quantizer.codebook
        codebook[b] = codebook[a] * (1 + 1e-7)
    jax_checkpoint.import_arrays(pair.flax, layout.torch_to_flax(torch_state(pair.torch)))


def planted_pair(x: np.ndarray, device: str, dtype: type = np.float32) -> Pair:
    pair = Pair(CONFIG, 0, device, dtype)
    plant_tie(pair, x)
    return pair


def test_a_tie_resolved_the_other_way_passes_forward_gradients_and_batchnorm(
        monkeypatch, device, check):
    monkeypatch.setattr(jax_model, "nearest_codes", runner_up_at_ties)
    x = images("mnist", 7, 0)
    pair = planted_pair(x, device)
    compare_forward(pair, x, train=True, check=check)
    compare_forward(pair, x, train=False, check=check)
    t, f = pair.grads(x)
    for key in t:
        if not feeds_batchnorm(key):
            check("planted tie: gradients", f[key], t[key], tol.GRADIENT,
                  scale=float(np.max(np.abs(t[key]))))
    pair.train_mode_call(x)
    t, f = torch_state(pair.torch), flax_state(pair.flax)
    for key in t:
        if key.endswith(("running_mean", "running_var", "usage")):
            check("planted tie: batchnorm statistics and code usage", f[key], t[key], tol.BATCHNORM)
    pair.audit.verify()  # planted ties: asserted below, kept out of the report
    assert pair.audit.aligned > 0, "the planted tie was never resolved the other way"


def test_a_tie_resolved_the_other_way_passes_training(monkeypatch, device, check):
    monkeypatch.setattr(jax_model, "nearest_codes", runner_up_at_ties)
    with jax.enable_x64(True):
        batches = list(data.batches(smooth_dataset("mnist", 5 * 16), 16, seed=0, epoch=0))
        batches = [b.astype(np.float64) for b in batches]
        pair = planted_pair(batches[0], device, np.float64)
        t_history, f_history, trained = pair.train(batches, lr=3e-4)
        pair.audit.verify()  # planted ties: asserted below, kept out of the report
        assert pair.audit.aligned > 0, "the planted tie was never resolved the other way"
        for f, t in zip(f_history, t_history):
            for term in t:
                check(f"planted tie: training float64 {term}", f[term], t[term],
                      tol.TRAIN_LOSS)
        f_w, t_w = flax_state(trained), torch_state(pair.torch)
        for key in t_w:
            if not key.endswith("num_batches_tracked") and not feeds_batchnorm(key):
                check("planted tie: training float64 final weights", f_w[key], t_w[key], tol.TRAIN_WEIGHTS)


def test_a_difference_that_is_not_a_tie_fails_the_forward_check(monkeypatch, device):
    monkeypatch.setattr(jax_model, "nearest_codes", runner_up_always)
    pair = Pair(CONFIG, 0, device)
    pair.forward(images("mnist", 7, 0), train=True)
    with pytest.raises(AssertionError, match="disagreements away from any tie"):
        pair.audit.verify()


def test_a_difference_that_is_not_a_tie_fails_the_training_check(monkeypatch, device):
    monkeypatch.setattr(jax_model, "nearest_codes", runner_up_always)
    batches = list(data.batches(smooth_dataset("mnist", 2 * 16), 16, seed=0, epoch=0))
    pair = Pair(CONFIG, 0, device)
    pair.train(batches, lr=3e-4)
    with pytest.raises(AssertionError, match="disagreements away from any tie"):
        pair.audit.verify()
