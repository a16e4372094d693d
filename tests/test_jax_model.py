"""The Flax-only pieces of vqvae_jax.model that must reproduce PyTorch: BatchNorm and the
convolutions, each on both its plain XLA path and its fast CPU path (vqvae_jax/xla_cpu.py),
and the quantizer's HIGHEST-precision distance matmul. What both twins' models share is
tested once for both in tests/test_model.py."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from twin_adapters import JaxAdapter
from vqvae_common import config
from vqvae_common.config import ModelConfig
from vqvae_jax import model as jax_model
from vqvae_jax import xla_cpu
from vqvae_jax.model import VQVAE, BatchNorm, ConvTranspose

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
def test_batch_norm_of_one_value_per_channel_is_refused_as_torch_refuses_it(fast_cpu):
    """Its unbiased running variance would divide by n - 1 = 0: NaN for every later eval."""
    x = np.zeros((1, 1, 1, 3), np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when "
                                         "training") as refused:
        torch.nn.BatchNorm2d(3).train()(_nchw(x))
    bn = BatchNorm(3, fast_cpu=fast_cpu)
    with pytest.raises(ValueError, match=re.escape(str(refused.value).split(",")[0])):
        bn(jnp.asarray(x))
    assert np.isfinite(bn.var[...]).all()


def test_set_codebook_keeps_a_copy_of_what_it_is_given():
    """A PyTorch tensor's CPU buffer is aligned so that jnp.asarray would share it: the Flax
    codebook then moved with PyTorch's, in the middle of a port."""
    given = torch.zeros(4, 3)
    quantizer = jax_model.VectorQuantizer(4, 3, codebook_update="ema", rngs=nnx.Rngs(0))
    quantizer.set_codebook(given.numpy())
    given += 1
    np.testing.assert_array_equal(quantizer.codebook[...], np.zeros((4, 3)))


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


# the model's three convolutions: k, s, p, (B, H, W, I, O); the 4x4/2 and the 3x3 also over odd
# sizes, which the fast path hands to the plain conv
CONV_SHAPES = [(4, 2, 1, (2, 8, 6, 3, 5)), (4, 2, 1, (2, 7, 5, 3, 4)), (3, 1, 1, (2, 5, 4, 3, 4)),
               (3, 1, 1, (2, 6, 4, 3, 4)),
               (1, 1, 0, (2, 3, 5, 6, 7))]


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
    vq = JaxAdapter().quantizer(3, 2)
    vq.eval()  # a closure may not update the usage statistics under make_jaxpr
    jaxpr = jax.make_jaxpr(lambda z: vq(z).indices)(jnp.ones((1, 1, 2, 2))).jaxpr
    dots = list(_dot_generals(jaxpr))
    assert dots, jaxpr
    for dot in dots:
        precision = dot.params["precision"]
        assert precision is not None, "a distance matmul runs at the backend's default precision"
        operands = precision if isinstance(precision, tuple) else (precision,)
        assert all(p == jax.lax.Precision.HIGHEST for p in operands), precision


@pytest.mark.parametrize("jit", [None, jax.jit, functools.partial(
    jax.jit, compiler_options=xla_cpu.COMPILER_OPTIONS)], ids=["eager", "jit", "jit-as-twin"])
def test_first_argmin_is_argmin_with_ties_infinities_and_nans(jit):
    """nearest_codes' argmin (vqvae_jax.xla_cpu.first_argmin, the faster formulation of
    jnp.argmin on XLA's CPU backend) gives jnp.argmin's indices: the first of tied minima,
    the first NaN of a row that has one, 0 for a row all +inf. Eager, jitted, and jitted as
    JaxTwin jits on a CPU (its barrier kept)."""
    rng = np.random.default_rng(0)
    d = rng.integers(0, 6, (300, 37)).astype(np.float32)  # many exact ties
    d[5, 3], d[6, :] = np.nan, np.inf
    d[7, [2, 9]], d[8, :] = np.nan, np.nan
    d[9, 4], d[10, 30] = -np.inf, -np.inf
    d[11, :] = 0
    argmin = jit(xla_cpu.first_argmin) if jit else xla_cpu.first_argmin
    got, want = np.asarray(argmin(jnp.asarray(d))), np.asarray(jnp.argmin(jnp.asarray(d), 1))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype
    assert (got[[5, 6, 7, 8, 9, 10, 11]] == [3, 0, 2, 0, 4, 30, 0]).all()


def test_nearest_codes_blocks_equal_one_block(monkeypatch):
    rng = np.random.default_rng(1)
    flat = jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)
    codebook = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    one = np.asarray(jax_model.nearest_codes(flat, codebook))
    monkeypatch.setattr(config, "DISTANCE_BLOCK", 16 * 7)  # 7 rows a block
    np.testing.assert_array_equal(np.asarray(jax.jit(jax_model.nearest_codes)(flat, codebook)),
                                  one)
    d = ((np.asarray(flat)[:, None] - np.asarray(codebook)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(one, d.argmin(1))
