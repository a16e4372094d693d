"""Each parity check fails when it should: a known porting bug, planted in the Flax twin,
must push the compared quantity past its tolerance."""
import jax
import numpy as np
import pytest
from flax import nnx

from parity_tests import test_prior
from parity_tests import tolerances as tol
from parity_tests.conftest import relative
from parity_tests.inputs import images
from parity_tests.test_codebook_learning import EMA_STATE, train_ema_pair
from parity_tests.test_forward import compare_forward
from parity_tests.test_quantizer import run_both
from parity_tests.ties import Audit
from parity_tests.twins import Pair, flax_state, torch_state
from vqvae_common import prior
from vqvae_common.config import ModelConfig
from vqvae_jax import model as jax_model

SMALL = ModelConfig(in_channels=1, hidden=16, num_codes=32)


def violations(pair: Pair, x: np.ndarray, train: bool) -> list[str]:
    """The forward checks of test_forward that would fail, instead of asserting."""
    failed = []

    def record(quantity, got, want, bound, scale=None):
        if relative(got, want, scale) > bound:
            failed.append(quantity)

    compare_forward(pair, x, train, record)
    try:
        pair.audit.verify()
    except AssertionError as e:
        failed.append(str(e))
    return failed


def test_the_unmodified_twins_pass():
    pair = Pair(SMALL, 0, "cpu")
    assert violations(pair, images("mnist", 7, 0), train=True) == []


def test_a_transposed_conv_kernel_fails_the_forward_check():
    pair = Pair(SMALL, 0, "cpu")
    kernel = pair.flax.encoder.res1.conv1.kernel
    kernel[...] = kernel[...].transpose(1, 0, 2, 3)  # (kh, kw) swapped in a converter
    assert violations(pair, images("mnist", 7, 0), train=True)


def test_a_flipped_transposed_conv_kernel_fails_the_forward_check():
    pair = Pair(SMALL, 0, "cpu")
    kernel = pair.flax.decoder.deconv1.kernel
    kernel[...] = kernel[...][::-1, ::-1]  # the spatial flip between conv and its transpose
    assert violations(pair, images("mnist", 7, 0), train=False)


@pytest.mark.parametrize("bug", ["flax_momentum", "biased_running_var"])
def test_a_batchnorm_convention_flip_fails_the_running_stats_check(bug, monkeypatch):
    if bug == "biased_running_var":  # Flax's own BatchNorm keeps the biased variance
        monkeypatch.setattr(jax_model.BatchNorm, "__call__", _biased_batchnorm)
    pair = Pair(SMALL, 0, "cpu")
    if bug == "flax_momentum":  # Flax's momentum 0.9 read as PyTorch's 0.1
        for _, module in nnx.iter_modules(pair.flax):
            if isinstance(module, jax_model.BatchNorm):
                module.momentum = 0.9
    pair.train_mode_call(images("mnist", 7, 0))
    t, f = torch_state(pair.torch), flax_state(pair.flax)
    worst = max(relative(f[k], t[k]) for k in t if k.endswith(("running_mean", "running_var")))
    assert worst > tol.BATCHNORM


def _biased_batchnorm(self, x):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    self.mean[...] = 0.9 * self.mean[...] + 0.1 * mean
    self.var[...] = 0.9 * self.var[...] + 0.1 * var
    self.count[...] = self.count[...] + 1
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def _worst_gradient(pair: Pair, x: np.ndarray, prefix: str) -> float:
    t, f = pair.grads(x)
    return max(relative(f[k], t[k], float(np.abs(t[k]).max())) for k in t if k.startswith(prefix))


def test_a_missing_straight_through_fails_the_gradient_check(monkeypatch):
    call = jax_model.VectorQuantizer.__call__

    def no_straight_through(self, z):
        q = call(self, z)
        return q._replace(z_q=jax.lax.stop_gradient(q.z_q))

    monkeypatch.setattr(jax_model.VectorQuantizer, "__call__", no_straight_through)
    pair = Pair(SMALL, 0, "cpu")
    assert _worst_gradient(pair, images("mnist", 16, 0), "encoder.") > tol.GRADIENT


def test_losses_taken_after_the_straight_through_patch_fail_the_gradient_check(monkeypatch):
    def losses_after_patch(self, z):
        q = call(self, z)  # the known bug: both terms computed from z_q_st
        return q._replace(codebook_loss=jax_model.mse(q.z_q, jax.lax.stop_gradient(z)),
                          commitment_loss=jax_model.mse(z, jax.lax.stop_gradient(q.z_q)))

    call = jax_model.VectorQuantizer.__call__
    monkeypatch.setattr(jax_model.VectorQuantizer, "__call__", losses_after_patch)
    pair = Pair(SMALL, 0, "cpu")
    assert _worst_gradient(pair, images("mnist", 16, 0), "quantizer.codebook") > tol.GRADIENT


def test_the_seed_models_distance_sign_fails_the_quantizer_check(monkeypatch):
    def plus_two_ze(flat, codebook):  # the seed model's ||z||^2 + 2 z.e + ||e||^2
        d = (flat ** 2).sum(1, keepdims=True) + 2 * flat @ codebook.T + (codebook ** 2).sum(1)
        return d.argmin(1)

    monkeypatch.setattr(jax_model, "nearest_codes", plus_two_ze)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 7, 7, 16)).astype(np.float32)
    codebook = rng.standard_normal((32, 16)).astype(np.float32)
    audit = Audit()
    run_both(z, codebook, "cpu", audit)
    assert len(audit.disagreements) > 0.5 * audit.compared
    with pytest.raises(AssertionError, match="disagreements away from any tie"):
        audit.verify()


def _ema_decay_on_the_wrong_side(self, flat, indices, counts):
    """The EMA step with gamma and 1 - gamma swapped: the batch weighted 0.99."""
    self.ema_decay = 1 - self.ema_decay
    try:
        return update_ema(self, flat, indices, counts)
    finally:
        self.ema_decay = 1 - self.ema_decay


def _ema_without_smoothing(self, flat, indices, counts):
    """The EMA step with epsilon 0: codebook = sums / counts, no Laplace smoothing."""
    self.ema_epsilon, epsilon = 0.0, self.ema_epsilon
    try:
        return update_ema(self, flat, indices, counts)
    finally:
        self.ema_epsilon = epsilon


update_ema = jax_model.VectorQuantizer._update_ema


@pytest.mark.parametrize("bug", [_ema_decay_on_the_wrong_side, _ema_without_smoothing],
                         ids=["decay on the wrong side", "smoothing dropped"])
def test_an_ema_bug_fails_the_ema_training_check(bug, monkeypatch):
    monkeypatch.setattr(jax_model.VectorQuantizer, "_update_ema", bug)
    pair, _, _, f_state = train_ema_pair(3, "float64", "cpu")
    t_state = torch_state(pair.torch)
    assert max(relative(f_state[k], t_state[k]) for k in EMA_STATE) > tol.EMA


def test_a_first_layer_mask_that_shows_each_position_its_own_code_fails_the_prior_checks(
        monkeypatch):
    config = test_prior.TINY
    pair = test_prior.PriorPair(config, 0, "cpu")  # the PyTorch prior, built with the masks
    masks = prior.masks
    monkeypatch.setattr(prior, "masks", lambda k, first: masks(k, first=False))  # type B only
    pair.flax = test_prior.PriorPair(config, 0, "cpu").flax
    codes, labels = test_prior.inputs(config, 8, 1)
    assert relative(pair.flax_logits(codes, labels), pair.torch_logits(codes, labels)) > tol.FORWARD
    leaks = test_prior.causality_violations(test_prior.reach(pair.flax_logits, config))["leaks"]
    assert (0, 0) in leaks  # position 0 sees its own code
