"""Both twins' model (vqvae_{torch,jax}/model.py), each property stated once and run against
each twin (the `twin` fixture: tests/twin_adapters.py), in the NHWC layout of the Twin
interface. The Flax-only pieces that reproduce PyTorch: tests/test_jax_model.py."""
import math

import numpy as np
import pytest

from vqvae_common import config
from vqvae_common.config import DATASETS, ModelConfig

CODEBOOK = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]  # K=3, D=2
Z = [[0.9, 0.2], [0.1, 1.2]]  # two latent vectors, laid out as z_e (1, 1, 2, D) below
# ||z - e_k||^2 by hand:   e0            e1            e2
DIST = [[0.81 + 0.04, 0.01 + 0.04, 0.81 + 3.24],
        [0.01 + 1.44, 0.81 + 1.44, 0.01 + 0.64]]


def latents(vectors, h=1):
    """(N, D) vectors -> z_e (1, h, N/h, D)."""
    z = np.asarray(vectors, np.float32)
    return z.reshape(1, h, -1, z.shape[1])


def test_hand_computed_distances_pick_the_nearest_code(twin):
    np.testing.assert_allclose(DIST, ((np.array(Z)[:, None] - np.array(CODEBOOK)) ** 2).sum(-1))
    q = twin.apply(twin.quantizer(3, 2, CODEBOOK), latents(Z))
    assert q.indices.shape == (1, 1, 2) and q.indices.dtype == twin.index_dtype
    assert q.indices.flatten().tolist() == [1, 2] == np.argmin(DIST, 1).tolist()
    np.testing.assert_allclose(q.z_q[0, 0], [CODEBOOK[1], CODEBOOK[2]], atol=1e-6)
    # (0.1^2 + 0.2^2 + 0.1^2 + 0.8^2) / 4 elements
    assert float(q.codebook_loss) == pytest.approx(0.175, rel=1e-6)
    assert float(q.commitment_loss) == pytest.approx(0.175, rel=1e-6)


def test_random_latents_map_to_the_nearest_code(twin):
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(16, 4)).astype(np.float32)
    z = rng.normal(size=(2 * 3 * 5, 4)).astype(np.float32)
    q = twin.apply(twin.quantizer(16, 4, codebook), latents(z, h=6))
    nearest = ((z[:, None].astype(np.float64) - codebook) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(q.indices.flatten(), nearest)
    np.testing.assert_allclose(q.z_q.reshape(-1, 4), codebook[nearest], atol=1e-6)


@pytest.mark.parametrize("block", [37 * 64, 37 * 7, 10])  # several blocks, a ragged last one
def test_distances_in_blocks_pick_the_same_codes(twin, block, monkeypatch):
    monkeypatch.setattr(config, "DISTANCE_BLOCK", block)
    rng = np.random.default_rng(2)
    flat = rng.normal(size=(1000, 8)).astype(np.float32)
    codebook = rng.normal(size=(37, 8)).astype(np.float32)
    nearest = ((flat[:, None].astype(np.float64) - codebook) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(twin.nearest_codes(flat, codebook), nearest)


@pytest.mark.parametrize("shape, says", [
    ({"num_codes": 0, "dim": 3}, "at least 1 code of at least 1 dimension, not num_codes 0"),
    ({"num_codes": 4, "dim": 0}, "at least 1 code of at least 1 dimension, not num_codes 4, "
                                 "dim 0"),
    ({"num_codes": 4, "dim": 3, "codebook_update": "kmeans"}, "must be 'grad' or 'ema'")])
def test_a_quantizer_that_cannot_be_built_is_refused(twin, shape, says):
    """num_codes 0 was a ZeroDivisionError in the distance blocks."""
    options = {k: v for k, v in shape.items() if k not in ("num_codes", "dim")}
    with pytest.raises(ValueError, match=says):
        twin.quantizer(shape["num_codes"], shape["dim"], **options)


@pytest.mark.parametrize("train", [False, True])
def test_an_empty_batch_is_refused(twin, train):
    """PyTorch's usage became NaN (shares of N = 0 vectors), so no code restarted again."""
    vq = twin.quantizer(4, 3)
    with pytest.raises(ValueError, match=r"no vectors to quantize: z_e of shape \(0, "):
        twin.apply(vq, np.zeros((0, 2, 2, 3), np.float32), train=train)


def test_straight_through_gradient_is_the_identity(twin):
    rng = np.random.default_rng(0)
    z_e = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    upstream = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    codebook_grad, z_grad = twin.gradients(twin.quantizer(8, 4), z_e, "z_q", upstream)
    np.testing.assert_array_equal(z_grad, upstream)
    assert twin.no_gradient(codebook_grad)


def test_commitment_term_does_not_reach_the_codebook(twin):
    codebook_grad, z_grad = twin.gradients(twin.quantizer(3, 2, CODEBOOK), latents(Z),
                                           "commitment_loss")
    assert twin.no_gradient(codebook_grad)
    expected = 2 * (np.array(Z) - np.array(CODEBOOK)[[1, 2]]) / 4
    np.testing.assert_allclose(z_grad[0, 0], expected, rtol=1e-6)


def test_codebook_term_trains_only_the_codebook(twin):
    rng = np.random.default_rng(1)
    codebook = rng.normal(size=(5, 3)).astype(np.float32)
    z = rng.normal(size=(12, 3)).astype(np.float32)
    vq = twin.quantizer(5, 3, codebook)
    codebook_grad, z_grad = twin.gradients(vq, latents(z, h=3), "codebook_loss")
    assert twin.no_gradient(z_grad)
    idx = twin.apply(vq, latents(z, h=3)).indices.flatten()
    expected = np.zeros_like(codebook)
    np.add.at(expected, idx, 2 * (codebook[idx] - z) / z.size)
    assert len(set(idx)) > 1
    np.testing.assert_allclose(codebook_grad, expected, rtol=1e-5, atol=1e-7)


def test_usage_is_a_moving_average_of_code_shares_in_train_mode_only(twin):
    vq = twin.quantizer(3, 2, CODEBOOK, usage_decay=0.9)
    twin.apply(vq, latents(Z), train=True)  # indices [1, 2]: shares [0, 1/2, 1/2]
    np.testing.assert_allclose(twin.usage(vq), [0, 0.05, 0.05], rtol=1e-6)
    twin.apply(vq, latents([Z[0], Z[0]]), train=True)  # indices [1, 1]
    np.testing.assert_allclose(twin.usage(vq), [0, 0.045 + 0.1, 0.045], rtol=1e-6)
    twin.apply(vq, latents(Z), train=False)
    np.testing.assert_allclose(twin.usage(vq), [0, 0.145, 0.045], rtol=1e-6)


def test_dead_codes_restart_on_evenly_spaced_batch_vectors(twin):
    vq = twin.quantizer(4, 2, restart_below=0.01)
    codebook = twin.codebook(vq)
    twin.set_usage(vq, [0.5, 0.0, 0.5, 0.002])  # dead below 0.01 / 4: 1 and 3
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    twin.restart_dead_codes(vq, latents(z, h=2))
    # M = 2 dead codes, N = 6 vectors: rank 0 -> vector 0, rank 1 -> vector floor(6 / 2) = 3
    expected = codebook.copy()
    expected[[1, 3]] = z[[0, 3]]
    np.testing.assert_array_equal(twin.codebook(vq), expected)
    np.testing.assert_allclose(twin.usage(vq), [0.5, 0.25, 0.5, 0.25])


def test_more_dead_codes_than_vectors_wrap_around_the_batch(twin):
    vq = twin.quantizer(5, 2, restart_below=0.01)
    z = np.arange(6, dtype=np.float32).reshape(3, 2)
    twin.restart_dead_codes(vq, latents(z))  # all 5 dead (usage 0), N = 3: vectors 0, 1, 2, 0, 1
    np.testing.assert_array_equal(twin.codebook(vq), z[[0, 1, 2, 0, 1]])


@pytest.mark.parametrize("shape", [(30, 4), (2, 15, 4), (1, 2, 3, 5, 4)])
def test_the_quantizer_takes_vectors_at_any_number_of_positions(twin, shape):
    """(B, D), (B, D, T), ... in the twin's own layout (PyTorch's vectors along dimension 1,
    Flax's along the last axis): the codes, vectors, losses and restarts of the same vectors
    laid out as an image's (B, h, w, D)."""
    rng = np.random.default_rng(3)
    codebook = rng.normal(size=(16, 4)).astype(np.float32)
    z = rng.normal(size=shape).astype(np.float32)
    want = twin.apply(twin.quantizer(16, 4, codebook), latents(z.reshape(-1, 4)))
    got = twin.quantize_any_rank(twin.quantizer(16, 4, codebook), z)
    assert got.indices.shape == shape[:-1]
    np.testing.assert_array_equal(got.indices.flatten(), want.indices.flatten())
    np.testing.assert_array_equal(got.z_q.reshape(-1, 4), want.z_q.reshape(-1, 4))
    for term in ("codebook_loss", "commitment_loss"):
        assert float(getattr(got, term)) == pytest.approx(float(getattr(want, term)), rel=1e-6)
    restarted, as_image = (twin.quantizer(16, 4, codebook, restart_below=0.5) for _ in "ab")
    twin.restart_any_rank(restarted, z)  # usage 0: every code dead
    twin.restart_dead_codes(as_image, latents(z.reshape(-1, 4)))
    np.testing.assert_array_equal(twin.codebook(restarted), twin.codebook(as_image))


def test_restart_below_zero_never_restarts(twin):
    vq = twin.quantizer(4, 2, restart_below=0.0)
    codebook = twin.codebook(vq)
    twin.restart_dead_codes(vq, latents(np.ones((6, 2), np.float32), h=2))
    np.testing.assert_array_equal(twin.codebook(vq), codebook)
    assert not twin.usage(vq).any()


def test_losses_match_numpy(twin):
    model = twin.vqvae(ModelConfig(in_channels=1, hidden=8, num_codes=16, beta=0.25))
    x = np.random.default_rng(1).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    out = twin.apply(model, x, train=True)

    z = out.z_e.astype(np.float64).reshape(-1, 8)  # train mode: batch statistics
    codebook = twin.codebook(model.quantizer).astype(np.float64)
    idx = ((z[:, None] - codebook) ** 2).sum(-1).argmin(1)
    z_q = codebook[idx]
    recon = np.mean((out.recon.astype(np.float64) - x.astype(np.float64)) ** 2)
    codebook_term = np.mean((z_q - z) ** 2)
    total = recon + codebook_term + 0.25 * codebook_term

    np.testing.assert_array_equal(out.indices.flatten(), idx)
    assert float(out.losses["recon"]) == pytest.approx(recon, rel=1e-5)
    assert float(out.losses["codebook"]) == pytest.approx(codebook_term, rel=1e-5)
    assert float(out.losses["commitment"]) == pytest.approx(codebook_term, rel=1e-5)
    assert float(out.losses["loss"]) == pytest.approx(total, rel=1e-5)
    assert total != pytest.approx(recon + 2 * codebook_term, rel=1e-3)

    decoded = twin.apply(model.decoder, z_q.reshape(4, 7, 7, 8), train=True)
    np.testing.assert_allclose(decoded, out.recon, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dataset, size, latent", [("mnist", 28, 7), ("cifar10", 32, 8)])
def test_preset_shapes(twin, dataset, size, latent):
    preset = DATASETS[dataset].preset
    model = twin.vqvae(preset)
    x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, preset.in_channels))
    z_e = twin.apply(model.encoder, x)
    out = twin.apply(model, x)
    d = {"mnist": 128, "cifar10": 256}[dataset]
    assert z_e.shape == (2, latent, latent, d)
    assert twin.codebook(model.quantizer).shape == (512, d)
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, latent, latent)
    assert np.abs(out.recon).max() <= 1.0
    assert set(out.losses) == {"loss", "recon", "codebook", "commitment"}


@pytest.mark.parametrize("height, width", [(30, 30), (29, 31), (28, 30)])
def test_image_sides_that_do_not_come_back_whole_are_refused(twin, height, width):
    """Two stride-2 convolutions and two transposed ones give back sides rounded down to
    multiples of 4: the loss failed deep inside on shapes that do not broadcast."""
    model = twin.vqvae(ModelConfig(in_channels=1, hidden=8, num_codes=4))
    x = np.zeros((2, height, width, 1), np.float32)
    with pytest.raises(ValueError, match=f"multiples of 4, not {height} x {width}"):
        twin.apply(model, x)


def test_initialisers(twin):
    model = twin.vqvae(DATASETS["mnist"].preset)
    convs = twin.convolutions(model)
    assert len(convs) == 12
    for kernel, bias in convs:
        assert not bias.any()
        receptive = kernel.shape[0] * kernel.shape[1]
        xavier = math.sqrt(2.0 / ((kernel.shape[2] + kernel.shape[3]) * receptive))
        assert kernel.std() == pytest.approx(xavier, rel=0.1), kernel.shape
        # a plain normal, not Flax's truncated default: a truncated normal of this std never
        # exceeds 2.28 std; here ~1.2% of at least 2048 entries lie beyond 2.5 std
        assert (np.abs(kernel) > 2.5 * xavier).any(), kernel.shape
    k = DATASETS["mnist"].preset.num_codes
    codebook = twin.codebook(model.quantizer)
    assert np.abs(codebook).max() <= 1 / k
    assert codebook.min() < -0.9 / k and codebook.max() > 0.9 / k


def test_residual_block_skip_carries_x_not_relu_x(twin):
    x = -np.random.default_rng(1).uniform(size=(2, 5, 5, 4)).astype(np.float32) - 0.5
    out, x_after = twin.apply_reading_input(twin.residual_block(4), x, train=True)
    # relu(x) = 0, and batch norm in train mode maps the constant conv output to 0: F(x) = 0
    np.testing.assert_allclose(out, x, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(x_after, x)  # no in-place ReLU on the block's input


def test_residual_block_is_x_plus_f_of_x(twin):
    block = twin.residual_block(4)
    rng = np.random.default_rng(0)
    for bn in (block.bn1, block.bn2):
        twin.set_running_statistics(bn, rng.uniform(-0.5, 0.5, 4).astype(np.float32),
                                    rng.uniform(0.5, 2.0, 4).astype(np.float32))
    x = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
    out = twin.apply(block, x, train=False)
    np.testing.assert_allclose(out, x + twin.residual_branch(block, x), rtol=1.3e-6, atol=1e-5)
