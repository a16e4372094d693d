"""How the codebook learns, in both twins (the `twin` fixture: tests/twin_adapters.py): the
EMA update (--codebook-update ema), the k-means start (--codebook-init kmeans), and how both
combine with dead-code restarts and checkpoints."""
import dataclasses
import os

import numpy as np
import pytest

from twin_adapters import MODEL, assert_same_arrays
from vqvae_common import data
from vqvae_common.config import TrainConfig
from vqvae_common.kmeans import kmeans

CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)  # K=3, D=2
Z = np.array([[0.9, 0.2], [0.1, 1.2]], np.float32)  # nearest codes 1 and 2
EMA_MODEL = dataclasses.replace(MODEL, codebook_update="ema")


def latents(vectors: np.ndarray, h: int = 1) -> np.ndarray:
    return vectors.reshape(1, h, -1, vectors.shape[-1])


def ema_quantizer(twin, **options):
    return twin.quantizer(3, 2, CODEBOOK, codebook_update="ema", ema_decay=0.9,
                          ema_epsilon=1e-5, **options)


def test_ema_update_follows_the_equations(twin):
    vq = ema_quantizer(twin)
    counts, sums = twin.ema_state(vq)  # as if each code had been assigned itself once
    np.testing.assert_array_equal(counts, [1, 1, 1])
    np.testing.assert_array_equal(sums, CODEBOOK)

    q = twin.apply(vq, latents(Z), train=True)
    np.testing.assert_array_equal(q.z_q[0, 0], CODEBOOK[[1, 2]])  # the codebook it started with
    n = np.array([0, 1, 1])
    s = np.array([[0, 0], Z[0], Z[1]], np.float64)
    counts = 0.9 * 1 + 0.1 * n
    sums = 0.9 * CODEBOOK + 0.1 * s
    total = counts.sum()
    smoothed = (counts + 1e-5) / (total + 3 * 1e-5) * total
    got_counts, got_sums = twin.ema_state(vq)
    np.testing.assert_allclose(got_counts, counts, rtol=1e-6)
    np.testing.assert_allclose(got_sums, sums, rtol=1e-6)
    np.testing.assert_allclose(twin.codebook(vq), sums / smoothed[:, None], rtol=1e-6)


def test_ema_codebook_stands_still_in_eval_mode(twin):
    vq = ema_quantizer(twin)
    twin.apply(vq, latents(Z), train=False)
    np.testing.assert_array_equal(twin.codebook(vq), CODEBOOK)
    np.testing.assert_array_equal(twin.ema_state(vq)[0], [1, 1, 1])


def test_only_a_gradient_codebook_is_the_optimizers(twin):
    assert twin.learns_by_gradient(twin.quantizer(3, 2))
    assert not twin.learns_by_gradient(ema_quantizer(twin))


def test_ema_model_leaves_the_codebook_term_out_of_the_loss(twin):
    model = twin.vqvae(dataclasses.replace(EMA_MODEL, beta=0.25))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
    losses = twin.apply(model, x, train=False).losses
    assert float(losses["codebook"]) > 0
    assert float(losses["loss"]) == pytest.approx(
        float(losses["recon"]) + 0.25 * float(losses["commitment"]), rel=1e-6)


def test_a_restart_restarts_the_ema_averages_of_the_restarted_codes(twin):
    vq = ema_quantizer(twin, restart_below=0.01)
    twin.apply(vq, latents(Z), train=True)  # code 0 gets no vector: usage 0, dead
    before_counts, before_sums = twin.ema_state(vq)
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    twin.restart_dead_codes(vq, latents(z, h=2))
    counts, sums = twin.ema_state(vq)
    np.testing.assert_array_equal(twin.codebook(vq)[0], z[0])
    assert (counts[0], *sums[0]) == (1, *z[0])
    np.testing.assert_array_equal(counts[1:], before_counts[1:])
    np.testing.assert_array_equal(sums[1:], before_sums[1:])


def test_initialize_kmeans_sets_the_codebook_usage_and_ema_averages(twin):
    rng = np.random.default_rng(0)
    z_e = rng.normal(size=(4, 5, 5, 2)).astype(np.float32)
    vq = ema_quantizer(twin)
    twin.initialize_kmeans(vq, z_e, seed=3, iterations=4)
    want = kmeans(z_e.reshape(-1, 2), 3, seed=3, iterations=4).astype(np.float32)
    np.testing.assert_array_equal(twin.codebook(vq), want)
    np.testing.assert_allclose(twin.usage(vq), [1 / 3] * 3)  # the grace share: no restart next
    counts, sums = twin.ema_state(vq)
    np.testing.assert_array_equal(counts, [1, 1, 1])
    np.testing.assert_array_equal(sums, want)


def test_a_bfloat16_torch_quantizer_starts_from_kmeans_as_flax_does():
    """numpy has no bfloat16: the vectors reach k-means (float64 anyway) as float64."""
    import torch

    from vqvae_torch.model import VectorQuantizer

    z_e = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    quantizer = VectorQuantizer(16, 8).to(torch.bfloat16)
    quantizer.initialize_kmeans(z_e, seed=3, iterations=2, show_progress=False)
    want = kmeans(z_e.permute(0, 2, 3, 1).reshape(-1, 8).double().numpy(), 16, 3, 2, False)
    assert quantizer.codebook.dtype == torch.bfloat16
    np.testing.assert_array_equal(quantizer.codebook.detach().double().numpy(),
                                  torch.tensor(want).bfloat16().double().numpy())


@pytest.mark.parametrize("update", ["grad", "ema"])
def test_twin_kmeans_start_clusters_train_mode_encoder_outputs(twin, update):
    trained = twin.make(model=dataclasses.replace(MODEL, codebook_update=update))
    images = np.random.default_rng(0).uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32)
    z = twin.train_mode_encoder_outputs(trained, images)
    before = twin.model_arrays(trained)
    trained.initialize_codebook(images, seed=5, iterations=3)
    after = twin.model_arrays(trained)
    quantizer = twin.model_of(trained).quantizer
    np.testing.assert_allclose(twin.codebook(quantizer),
                               kmeans(z.reshape(-1, MODEL.hidden), MODEL.num_codes, 5, 3),
                               rtol=1e-5, atol=1e-6)
    assert twin.batch_norm_count(twin.model_of(trained)) == 0  # running stats untouched
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("quantizer" in k for k in changed)


def test_first_images_are_the_first_of_epoch_zero():
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
    first = data.first_images(images, 12, seed=4)
    batches = list(data.batches(images, 4, seed=4, epoch=0))
    np.testing.assert_array_equal(first, np.concatenate(batches[:3]))


def test_ema_state_survives_a_checkpoint(twin, tmp_path):
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    path = str(tmp_path / twin.Twin.checkpoint_name)
    a = twin.make(model=EMA_MODEL)
    a.train_step(batch)
    a.save(path, 1)
    b = twin.make(seed=1, model=EMA_MODEL)
    b.load(path)
    assert_same_arrays(twin.model_arrays(a), twin.model_arrays(b))
    assert any("ema_sums" in key for key in twin.model_arrays(b))
    assert a.fetch(a.train_step(batch)) == b.fetch(b.train_step(batch))
    assert_same_arrays(twin.model_arrays(a), twin.model_arrays(b))
    assert os.path.exists(path)


def test_a_gradient_checkpoint_does_not_load_into_an_ema_model(twin, tmp_path):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    twin.make().save(path, 1)
    with pytest.raises(Exception, match="config|does not fit"):
        twin.make(model=EMA_MODEL).load(path)


def test_an_ema_model_converts_torch_flax_torch_bit_identically():
    from flax import nnx

    from vqvae_common import layout
    from vqvae_jax import checkpoint as jax_checkpoint
    from vqvae_jax.model import VQVAE as FlaxVQVAE
    from vqvae_torch import checkpoint as torch_checkpoint
    from vqvae_torch.train import TorchTwin

    torch_twin = TorchTwin(EMA_MODEL, dataclasses.replace(TrainConfig(), device="cpu"))
    torch_twin.train_step(np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1))
                          .astype(np.float32))
    arrays = torch_checkpoint.export_arrays(torch_twin.model)
    flax_model = FlaxVQVAE(EMA_MODEL, rngs=nnx.Rngs(1))
    jax_checkpoint.import_arrays(flax_model, layout.torch_to_flax(arrays))
    back = TorchTwin(EMA_MODEL, dataclasses.replace(TrainConfig(), device="cpu", seed=1))
    torch_checkpoint.import_arrays(
        back.model, layout.flax_to_torch(jax_checkpoint.export_arrays(flax_model)))
    assert_same_arrays(arrays, torch_checkpoint.export_arrays(back.model))
    assert not np.allclose(arrays["quantizer.ema_counts"], 1)
