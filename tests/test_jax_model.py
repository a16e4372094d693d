"""vqvae_jax.model, tested as its twin is in tests/test_torch_model.py (NHWC layout), plus the
Flax-only pieces that must reproduce PyTorch: BatchNorm and the convolutions, each on both its
plain XLA path and its fast CPU path (vqvae_jax/xla_cpu.py), and the quantizer's
HIGHEST-precision distance matmul."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vqvae_common import config
from vqvae_common.config import DATASETS, ModelConfig
from vqvae_jax import model as jax_model
from vqvae_jax import xla_cpu
from vqvae_jax.model import (VQVAE, BatchNorm, ConvTranspose, ResidualBlock, VectorQuantizer,
                             nearest_codes)

CODEBOOK = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]  # K=3, D=2
Z = [[0.9, 0.2], [0.1, 1.2]]  # two latent vectors, laid out as z_e (1, 1, 2, D) below
# ||z - e_k||^2 by hand:   e0            e1            e2
DIST = [[0.81 + 0.04, 0.01 + 0.04, 0.81 + 3.24],
        [0.01 + 1.44, 0.81 + 1.44, 0.01 + 0.64]]


def _quantizer(codebook):
    vq = VectorQuantizer(*np.shape(codebook), rngs=nnx.Rngs(0))
    vq.codebook[...] = jnp.asarray(codebook, jnp.float32)
    return vq


def _z_e(vectors, h=1):
    """(N, D) vectors -> z_e (1, h, N/h, D)."""
    z = jnp.asarray(vectors, jnp.float32)
    return z.reshape(1, h, -1, z.shape[1])


def _functional(vq):
    """(f, params): f(params, z_e) -> Quantized, a pure function of the codebook and z_e
    (in eval mode, which leaves the usage statistics as they are)."""
    vq.eval()
    graphdef, params, usage = nnx.split(vq, nnx.Param, ...)
    return (lambda p, z: nnx.merge(graphdef, p, usage)(z)), params


def _codebook_of(state):
    (leaf,) = jax.tree.leaves(state)
    return np.asarray(leaf)


def test_hand_computed_distances_pick_the_nearest_code():
    np.testing.assert_allclose(DIST, ((np.array(Z)[:, None] - np.array(CODEBOOK)) ** 2).sum(-1))
    q = _quantizer(CODEBOOK)(_z_e(Z))
    assert q.indices.shape == (1, 1, 2) and q.indices.dtype == jnp.int32
    assert np.asarray(q.indices).flatten().tolist() == [1, 2] == np.argmin(DIST, 1).tolist()
    np.testing.assert_allclose(np.asarray(q.z_q[0, 0]), [CODEBOOK[1], CODEBOOK[2]], atol=1e-6)
    # (0.1^2 + 0.2^2 + 0.1^2 + 0.8^2) / 4 elements
    assert float(q.codebook_loss) == pytest.approx(0.175, rel=1e-6)
    assert float(q.commitment_loss) == pytest.approx(0.175, rel=1e-6)


def test_random_latents_map_to_the_nearest_code():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(16, 4)).astype(np.float32)
    z = rng.normal(size=(2 * 3 * 5, 4)).astype(np.float32)
    q = _quantizer(codebook)(_z_e(z, h=6))
    nearest = ((z[:, None].astype(np.float64) - codebook) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(np.asarray(q.indices).flatten(), nearest)
    np.testing.assert_allclose(np.asarray(q.z_q).reshape(-1, 4), codebook[nearest], atol=1e-6)


@pytest.mark.parametrize("block", [37 * 64, 37 * 7, 10])  # several blocks, a ragged last one
def test_distances_in_blocks_pick_the_same_codes(block, monkeypatch):
    monkeypatch.setattr(config, "DISTANCE_BLOCK", block)
    rng = np.random.default_rng(2)
    flat = rng.normal(size=(1000, 8)).astype(np.float32)
    codebook = rng.normal(size=(37, 8)).astype(np.float32)
    nearest = ((flat[:, None].astype(np.float64) - codebook) ** 2).sum(-1).argmin(1)
    found = nearest_codes(jnp.asarray(flat), jnp.asarray(codebook))
    np.testing.assert_array_equal(np.asarray(found), nearest)


def test_straight_through_gradient_is_the_identity():
    f, params = _functional(VectorQuantizer(8, 4, rngs=nnx.Rngs(0)))
    z_e = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    upstream = jax.random.normal(jax.random.key(2), (2, 3, 3, 4))
    _, vjp = jax.vjp(lambda p, z: f(p, z).z_q, params, z_e)
    codebook_grad, z_grad = vjp(upstream)
    np.testing.assert_array_equal(np.asarray(z_grad), np.asarray(upstream))
    assert not _codebook_of(codebook_grad).any()


def test_commitment_term_does_not_reach_the_codebook():
    f, params = _functional(_quantizer(CODEBOOK))
    codebook_grad, z_grad = jax.grad(lambda p, z: f(p, z).commitment_loss, (0, 1))(
        params, _z_e(Z))
    assert not _codebook_of(codebook_grad).any()
    expected = 2 * (np.array(Z) - np.array(CODEBOOK)[[1, 2]]) / 4
    np.testing.assert_allclose(np.asarray(z_grad[0, 0]), expected, rtol=1e-6)


def test_codebook_term_trains_only_the_codebook():
    rng = np.random.default_rng(1)
    codebook = rng.normal(size=(5, 3)).astype(np.float32)
    z = rng.normal(size=(12, 3)).astype(np.float32)
    f, params = _functional(_quantizer(codebook))
    z_e = _z_e(z, h=3)
    codebook_grad, z_grad = jax.grad(lambda p, z: f(p, z).codebook_loss, (0, 1))(params, z_e)
    assert not np.asarray(z_grad).any()
    idx = np.asarray(f(params, z_e).indices).flatten()
    expected = np.zeros_like(codebook)
    np.add.at(expected, idx, 2 * (codebook[idx] - z) / z.size)
    assert len(set(idx)) > 1
    np.testing.assert_allclose(_codebook_of(codebook_grad), expected, rtol=1e-5, atol=1e-7)


def test_usage_is_a_moving_average_of_code_shares_in_train_mode_only():
    vq = VectorQuantizer(3, 2, usage_decay=0.9, rngs=nnx.Rngs(0))
    vq.codebook[...] = jnp.asarray(CODEBOOK)
    vq.train()
    vq(_z_e(Z))  # indices [1, 2]: shares [0, 1/2, 1/2]
    np.testing.assert_allclose(np.asarray(vq.usage[...]), [0, 0.05, 0.05], rtol=1e-6)
    vq(_z_e([Z[0], Z[0]]))  # indices [1, 1]
    np.testing.assert_allclose(np.asarray(vq.usage[...]), [0, 0.045 + 0.1, 0.045], rtol=1e-6)
    vq.eval()
    vq(_z_e(Z))
    np.testing.assert_allclose(np.asarray(vq.usage[...]), [0, 0.145, 0.045], rtol=1e-6)


def test_dead_codes_restart_on_evenly_spaced_batch_vectors():
    vq = VectorQuantizer(4, 2, restart_below=0.01, rngs=nnx.Rngs(0))
    codebook = np.asarray(vq.codebook[...])
    vq.usage[...] = jnp.asarray([0.5, 0.0, 0.5, 0.002])  # dead below 0.01 / 4: 1 and 3
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    vq.restart_dead_codes(_z_e(z, h=2))
    # M = 2 dead codes, N = 6 vectors: rank 0 -> vector 0, rank 1 -> vector floor(6 / 2) = 3
    expected = codebook.copy()
    expected[[1, 3]] = z[[0, 3]]
    np.testing.assert_array_equal(np.asarray(vq.codebook[...]), expected)
    np.testing.assert_allclose(np.asarray(vq.usage[...]), [0.5, 0.25, 0.5, 0.25])


def test_more_dead_codes_than_vectors_wrap_around_the_batch():
    vq = VectorQuantizer(5, 2, restart_below=0.01, rngs=nnx.Rngs(0))
    z = np.arange(6, dtype=np.float32).reshape(3, 2)
    vq.restart_dead_codes(_z_e(z))  # all 5 dead (usage 0), N = 3: vectors 0, 1, 2, 0, 1
    np.testing.assert_array_equal(np.asarray(vq.codebook[...]), z[[0, 1, 2, 0, 1]])


def test_restart_below_zero_never_restarts():
    vq = VectorQuantizer(4, 2, restart_below=0.0, rngs=nnx.Rngs(0))
    codebook = np.asarray(vq.codebook[...])
    vq.restart_dead_codes(_z_e(np.ones((6, 2), np.float32), h=2))
    np.testing.assert_array_equal(np.asarray(vq.codebook[...]), codebook)
    assert not np.asarray(vq.usage[...]).any()


def test_losses_match_numpy():
    model = VQVAE(ModelConfig(in_channels=1, hidden=8, num_codes=16, beta=0.25),
                  rngs=nnx.Rngs(0))
    model.train()
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1, maxval=1)
    z_e = nnx.clone(model).encoder(x)  # train mode: batch statistics, as inside model(x)
    out = model(x)

    z = np.asarray(z_e, np.float64).reshape(-1, 8)
    codebook = np.asarray(model.quantizer.codebook[...], np.float64)
    idx = ((z[:, None] - codebook) ** 2).sum(-1).argmin(1)
    z_q = codebook[idx]
    recon = np.mean((np.asarray(out.recon, np.float64) - np.asarray(x, np.float64)) ** 2)
    codebook_term = np.mean((z_q - z) ** 2)
    total = recon + codebook_term + 0.25 * codebook_term

    np.testing.assert_array_equal(np.asarray(out.indices).flatten(), idx)
    assert float(out.losses["recon"]) == pytest.approx(recon, rel=1e-5)
    assert float(out.losses["codebook"]) == pytest.approx(codebook_term, rel=1e-5)
    assert float(out.losses["commitment"]) == pytest.approx(codebook_term, rel=1e-5)
    assert float(out.losses["loss"]) == pytest.approx(total, rel=1e-5)
    assert total != pytest.approx(recon + 2 * codebook_term, rel=1e-3)

    z_q_nhwc = jnp.asarray(z_q, jnp.float32).reshape(4, 7, 7, 8)
    np.testing.assert_allclose(np.asarray(model.decoder(z_q_nhwc)), np.asarray(out.recon),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("dataset, size, latent", [("mnist", 28, 7), ("cifar10", 32, 8)])
def test_preset_shapes(dataset, size, latent):
    config = DATASETS[dataset].preset
    model = VQVAE(config, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.uniform(jax.random.key(1), (2, size, size, config.in_channels),
                           minval=-1, maxval=1)
    z_e = model.encoder(x)
    out = model(x)
    d = {"mnist": 128, "cifar10": 256}[dataset]
    assert z_e.shape == (2, latent, latent, d)
    assert model.quantizer.codebook[...].shape == (512, d)
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, latent, latent)
    assert float(jnp.abs(out.recon).max()) <= 1.0
    assert set(out.losses) == {"loss", "recon", "codebook", "commitment"}


def test_initialisers():
    model = VQVAE(DATASETS["mnist"].preset, rngs=nnx.Rngs(0))
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, (nnx.Conv, ConvTranspose))]
    assert len(convs) == 12
    for conv in convs:
        assert not np.asarray(conv.bias[...]).any()
        w = np.asarray(conv.kernel[...])  # (kh, kw, I, O)
        receptive = w.shape[0] * w.shape[1]
        xavier = math.sqrt(2.0 / ((w.shape[2] + w.shape[3]) * receptive))
        assert w.std() == pytest.approx(xavier, rel=0.1), conv
        # a plain normal, not Flax's truncated default: a truncated normal of this std never
        # exceeds 2.28 std; here ~1.2% of at least 2048 entries lie beyond 2.5 std
        assert (np.abs(w) > 2.5 * xavier).any(), conv
    k = DATASETS["mnist"].preset.num_codes
    codebook = np.asarray(model.quantizer.codebook[...])
    assert np.abs(codebook).max() <= 1 / k
    assert codebook.min() < -0.9 / k and codebook.max() > 0.9 / k


def test_residual_block_skip_carries_x_not_relu_x():
    block = ResidualBlock(4, rngs=nnx.Rngs(0))
    block.train()
    x = -jax.random.uniform(jax.random.key(1), (2, 5, 5, 4)) - 0.5
    out = block(x)
    # relu(x) = 0, and batch norm in train mode maps the constant conv output to 0: F(x) = 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-4, rtol=0)


def test_residual_block_is_x_plus_f_of_x():
    block = ResidualBlock(4, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for bn in (block.bn1, block.bn2):
        bn.mean[...] = jnp.asarray(rng.uniform(-0.5, 0.5, 4), jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    block.eval()
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
    f = block.bn2(block.conv2(jax.nn.relu(block.bn1(block.conv1(jax.nn.relu(x))))))
    np.testing.assert_allclose(np.asarray(block(x)), np.asarray(x + f), rtol=1.3e-6, atol=1e-5)


# --- Flax only: the pieces written out to reproduce PyTorch's semantics ---------------------


PATHS = [pytest.param(False, id="plain"), pytest.param(True, id="fast_cpu")]
BATCH_NORMS = {False: jax_model.batch_norm, True: xla_cpu.batch_norm}
CONV_TRANSPOSES = {False: jax_model.conv_transpose, True: xla_cpu.conv_transpose}


def _nchw(x):
    return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _named_leaves(state):
    """{'encoder.conv1.bias': array, ...} of an nnx.State."""
    return {".".join(str(k.key) for k in path if hasattr(k, "key")): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("fast_cpu", PATHS)
def test_batch_norm_matches_torch(fast_cpu):
    rng = np.random.default_rng(0)
    c = 3
    ours = BatchNorm(c, fast_cpu=fast_cpu)
    ref = torch.nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)
    scale, bias = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    ours.scale[...] = jnp.asarray(scale, jnp.float32)
    ours.bias[...] = jnp.asarray(bias, jnp.float32)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(scale))
        ref.bias.copy_(torch.tensor(bias))

    def both(x):
        return np.asarray(ours(jnp.asarray(x))), _nhwc(ref(_nchw(x)))

    ours.train()
    ref.train()
    for step in range(1, 4):
        # n = 4*5*6 = 120 values per channel: the unbiased running variance is 0.8% larger
        x = (rng.normal(size=(4, 5, 6, c)) * [1.0, 3.0, 0.2] + [2.0, -1.0, 0.5]).astype(np.float32)
        y, y_ref = both(x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours.mean[...]), ref.running_mean.numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(),
                                   rtol=1e-5, atol=1e-6)
        assert int(ours.count[...]) == ref.num_batches_tracked.item() == step

    ours.eval()
    ref.eval()
    x = (rng.normal(size=(2, 3, 4, c)) * 2 + 1).astype(np.float32)
    y, y_ref = both(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert int(ours.count[...]) == 3  # eval mode leaves the statistics alone
    np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("fast_cpu", PATHS)
def test_batch_norm_gradients_match_torch(fast_cpu):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4, 5, 6, 3)) * [1.0, 3.0, 0.2] + 1).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    upstream = rng.normal(size=x.shape).astype(np.float32)
    _, vjp = jax.vjp(lambda *a: BATCH_NORMS[fast_cpu](*a, 1e-5)[0],
                     *map(jnp.asarray, (x, scale, bias)))
    grads = vjp(jnp.asarray(upstream))

    leaves = [_nchw(x).requires_grad_(), torch.tensor(scale).requires_grad_(),
              torch.tensor(bias).requires_grad_()]
    torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True,
                                   eps=1e-5).backward(_nchw(upstream))
    expected = [_nhwc(leaves[0].grad), leaves[1].grad.numpy(), leaves[2].grad.numpy()]
    for got, want in zip(grads, expected):
        _assert_close_relative(np.asarray(got), want)


def test_fast_batch_norm_backward_equals_autodiff_for_all_three_outputs():
    """The closed form's terms for the batch mean and variance (which the model
    stop-gradients, so torch cannot check them) against autodiff of the plain formula."""
    rng = np.random.default_rng(2)
    args = [jnp.asarray(rng.normal(size=shape) + 1, jnp.float32)
            for shape in ((4, 5, 6, 3), (3,), (3,))]
    outputs, plain_vjp = jax.vjp(lambda *a: jax_model.batch_norm(*a, 1e-5), *args)
    cotangents = [jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in outputs]
    _, fast_vjp = jax.vjp(lambda *a: xla_cpu.batch_norm(*a, 1e-5), *args)
    for got, want in zip(fast_vjp(tuple(cotangents)), plain_vjp(tuple(cotangents))):
        _assert_close_relative(np.asarray(got), np.asarray(want))


# the model's three convolutions: k, s, p, (B, H, W, I, O)
CONV_SHAPES = [(4, 2, 1, (2, 8, 6, 3, 5)), (3, 1, 1, (2, 5, 4, 3, 4)), (1, 1, 0, (2, 3, 5, 6, 7))]


@pytest.mark.parametrize("fast_cpu", PATHS)
@pytest.mark.parametrize("k, s, p, shape", CONV_SHAPES)
def test_conv_and_its_gradients_match_torch(k, s, p, shape, fast_cpu):
    b, h, w, i, o = shape
    rng = np.random.default_rng(k * 100 + h * 10 + i)
    module = jax_model.conv(i, o, k, s, p, fast_cpu, nnx.Rngs(0))
    module.bias[...] = jnp.asarray(rng.normal(size=o), jnp.float32)
    x = rng.normal(size=(b, h, w, i)).astype(np.float32)
    graphdef, params = nnx.split(module)
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, jnp.asarray(x))
    upstream = rng.normal(size=y.shape).astype(np.float32)
    d_params, dx = vjp(jnp.asarray(upstream))
    d_params = _named_leaves(d_params)

    x_t = _nchw(x).requires_grad_()
    weight = torch.tensor(np.asarray(module.kernel[...]).transpose(3, 2, 0, 1)).requires_grad_()
    bias = torch.tensor(np.asarray(module.bias[...])).requires_grad_()
    y_t = torch.nn.functional.conv2d(x_t, weight, bias, stride=s, padding=p)
    y_t.backward(_nchw(upstream))
    _assert_close_relative(np.asarray(y), _nhwc(y_t))
    _assert_close_relative(np.asarray(dx), _nhwc(x_t.grad))
    _assert_close_relative(d_params["kernel"], weight.grad.permute(2, 3, 1, 0).numpy())
    _assert_close_relative(d_params["bias"], bias.grad.numpy())


CONV_T_SHAPES = [(2, 7, 7, 3, 5), (1, 4, 6, 2, 1), (3, 1, 1, 4, 2), (2, 5, 3, 1, 3),
                 (1, 8, 8, 16, 16)]  # (B, H, W, I, O)


def _torch_conv_transpose(x, kernel, bias=None):
    """PyTorch's ConvTranspose2d(4, stride 2, padding 1) on NHWC numpy, weight (I, O, kh, kw)."""
    out = torch.nn.functional.conv_transpose2d(
        _nchw(x), torch.tensor(kernel.transpose(2, 3, 0, 1)),
        None if bias is None else torch.tensor(bias), stride=2, padding=1)
    return _nhwc(out)


def _assert_close_relative(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= tol * np.abs(expected).max()


@pytest.mark.parametrize("fast_cpu", PATHS)
@pytest.mark.parametrize("b, h, w, i, o", CONV_T_SHAPES)
def test_conv_transpose_matches_torch(b, h, w, i, o, fast_cpu):
    rng = np.random.default_rng(h * 100 + w * 10 + i + o)
    x = rng.normal(size=(b, h, w, i)).astype(np.float32)
    kernel = rng.normal(size=(4, 4, i, o)).astype(np.float32)
    y = np.asarray(CONV_TRANSPOSES[fast_cpu](jnp.asarray(x), jnp.asarray(kernel)))
    assert y.shape == (b, 2 * h, 2 * w, o)
    _assert_close_relative(y, _torch_conv_transpose(x, kernel))


@pytest.mark.parametrize("fast_cpu", PATHS)
@pytest.mark.parametrize("b, h, w, i, o", CONV_T_SHAPES[:2])
def test_conv_transpose_gradients_match_torch(b, h, w, i, o, fast_cpu):
    rng = np.random.default_rng(h * 100 + w * 10 + i + o + 1)
    x = rng.normal(size=(b, h, w, i)).astype(np.float32)
    kernel = rng.normal(size=(4, 4, i, o)).astype(np.float32)
    upstream = rng.normal(size=(b, 2 * h, 2 * w, o)).astype(np.float32)
    _, vjp = jax.vjp(CONV_TRANSPOSES[fast_cpu], jnp.asarray(x), jnp.asarray(kernel))
    dx, dkernel = vjp(jnp.asarray(upstream))

    x_t = _nchw(x).requires_grad_()
    weight = torch.tensor(kernel.transpose(2, 3, 0, 1)).requires_grad_()
    torch.nn.functional.conv_transpose2d(x_t, weight, stride=2, padding=1).backward(
        _nchw(upstream))
    _assert_close_relative(np.asarray(dx), _nhwc(x_t.grad))
    _assert_close_relative(np.asarray(dkernel), weight.grad.permute(2, 3, 0, 1).numpy())


@pytest.mark.parametrize("fast_cpu", PATHS)
def test_conv_transpose_module_matches_torch(fast_cpu):
    rng = np.random.default_rng(0)
    for b, h, w, i, o in CONV_T_SHAPES[:3]:
        module = ConvTranspose(i, o, fast_cpu=fast_cpu, rngs=nnx.Rngs(0))
        module.bias[...] = jnp.asarray(rng.normal(size=o), jnp.float32)
        x = rng.normal(size=(b, h, w, i)).astype(np.float32)
        y = np.asarray(module(jnp.asarray(x)))
        expected = _torch_conv_transpose(x, np.asarray(module.kernel[...]),
                                         np.asarray(module.bias[...]))
        _assert_close_relative(y, expected)


def _paths(model):
    """{fast_cpu of each BatchNorm, ConvTranspose and nnx.Conv in `model`}."""
    found = set()
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            found.add(module.conv_general_dilated is xla_cpu.conv_general_dilated)
        elif isinstance(module, (BatchNorm, ConvTranspose)):
            found.add(module.fast_cpu)
    return found


def test_fast_cpu_follows_the_device_the_model_is_created_on():
    small = ModelConfig(in_channels=1, hidden=8, num_codes=16)
    with jax.default_device(jax.devices("cpu")[0]):  # abstract models: no array is made
        assert _paths(nnx.eval_shape(lambda: VQVAE(small, rngs=nnx.Rngs(0)))) == {True}
        assert _paths(nnx.eval_shape(lambda: VQVAE(small, fast_cpu=False,
                                                   rngs=nnx.Rngs(0)))) == {False}
    with jax.default_device("gpu"):  # only read, no array is made there
        assert not jax_model.use_fast_cpu(None)
    assert jax_model.use_fast_cpu(True) and not jax_model.use_fast_cpu(False)


# conv biases feeding a BatchNorm: their exact gradient is 0, so only rounding is left
FEEDS_BATCH_NORM = re.compile(r"(encoder\.conv1|res\d\.conv[12]|decoder\.deconv1)\.bias$")


def test_both_paths_train_the_same_model():
    """The plain and the fast model, from the same seed: the same losses, gradients and
    running statistics after a train-mode forward."""
    small = ModelConfig(in_channels=1, hidden=16, num_codes=32)
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1, maxval=1)

    def loss(model):
        out = model(x)
        return out.losses["loss"], out

    @nnx.jit
    def train_mode_forward(model):
        grads, out = nnx.grad(loss, has_aux=True)(model)
        return out, grads, nnx.state(model, nnx.BatchStat)

    runs = []
    for fast_cpu in (False, True):
        model = VQVAE(small, fast_cpu=fast_cpu, rngs=nnx.Rngs(0))
        model.train()
        out, grads, stats = train_mode_forward(model)
        runs.append((out, _named_leaves(grads), _named_leaves(stats)))
    (plain, plain_grads, plain_stats), (fast, fast_grads, fast_stats) = runs
    np.testing.assert_array_equal(np.asarray(fast.indices), np.asarray(plain.indices))
    for name in plain.losses:
        assert float(fast.losses[name]) == pytest.approx(float(plain.losses[name]), rel=1e-5)
    _assert_close_relative(np.asarray(fast.recon), np.asarray(plain.recon), 1e-4)
    assert fast_grads.keys() == plain_grads.keys()
    largest = max(np.abs(g).max() for g in plain_grads.values())
    for name, want in plain_grads.items():
        scale = largest if FEEDS_BATCH_NORM.search(name) else np.abs(want).max()
        assert np.abs(fast_grads[name] - want).max() <= 1e-4 * scale, name
    assert fast_stats.keys() == plain_stats.keys()
    for name, want in plain_stats.items():
        _assert_close_relative(fast_stats[name], want)


def _dot_generals(jaxpr):
    """Every dot_general in `jaxpr`, inside nested jaxprs (lax.map's scan) too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_generals(inner)


@pytest.mark.parametrize("block", [config.DISTANCE_BLOCK, 3])  # one block; one row per block
def test_quantizer_distances_use_highest_precision(block, monkeypatch):
    monkeypatch.setattr(config, "DISTANCE_BLOCK", block)
    vq = _quantizer(CODEBOOK)
    vq.eval()  # a closure may not update the usage statistics under make_jaxpr
    jaxpr = jax.make_jaxpr(lambda z: vq(z).indices)(_z_e(Z)).jaxpr
    dots = list(_dot_generals(jaxpr))
    assert dots, jaxpr
    for dot in dots:
        precision = dot.params["precision"]
        assert precision is not None, "a distance matmul runs at the backend's default precision"
        operands = precision if isinstance(precision, tuple) else (precision,)
        assert all(p == jax.lax.Precision.HIGHEST for p in operands), precision
