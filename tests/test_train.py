"""Both twins' training interface (vqvae_{torch,jax}/train.py, vqvae_common.loop's `Twin`) and
their checkpoints, each property stated once and run against each twin (the `twin` fixture:
tests/twin_adapters.py). The format-specific cases: tests/test_{torch,jax}_checkpoint.py."""
import os
import re

import numpy as np
import pytest

from twin_adapters import ADAPTERS, MODEL, assert_same_arrays, record
from vqvae_common.config import ModelConfig
from vqvae_common.errors import UserError

LOSS_TERMS = {"loss", "recon", "codebook", "commitment"}


@pytest.fixture
def batch():
    return np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)


def assert_same_training_state(twin, a, b):
    assert_same_arrays(twin.model_arrays(a), twin.model_arrays(b))
    assert_same_arrays(twin.optimizer_arrays(a), twin.optimizer_arrays(b))


def test_select_device(twin):
    assert twin.select_device("cpu") == twin.cpu_device()
    assert twin.select_device("auto") == twin.default_device()
    with pytest.raises(UserError, match="unknown"):
        twin.select_device("nope")
    for name in ("gpu", "cuda", "tpu"):
        if not twin.has_device(name):
            with pytest.raises(UserError, match=twin.missing_device):
                twin.select_device(name)


def test_train_step_reduces_recon(twin, batch):
    trained = twin.make()
    recon = [trained.fetch(trained.train_step(batch))["recon"] for _ in range(20)]
    assert recon[-1] < 0.95 * recon[0]


def test_train_step_restarts_dead_codes_onto_the_batch(twin, batch, restart_rows):
    trained = twin.make()
    z = twin.train_mode_encoder_outputs(trained, batch).reshape(-1, MODEL.hidden)
    trained.train_step(batch)
    quantizer = twin.model_of(trained).quantizer
    restarted = twin.usage(quantizer) == np.float32(1 / MODEL.num_codes)
    assert restarted.any()  # usage starts at 0: the first step restarts the rarely picked codes
    np.testing.assert_allclose(twin.codebook(quantizer)[restarted],
                               z[restart_rows(restarted.sum(), len(z))],
                               **twin.restart_tolerance)


def test_train_step_returns_loss_terms_left_on_the_device(twin, batch):
    trained = twin.make()
    out = trained.train_step(batch)
    assert set(out) == LOSS_TERMS
    assert all(twin.is_device_scalar(v) for v in out.values())
    fetched = trained.fetch(out)
    assert all(type(v) is float for v in fetched.values())
    assert fetched["loss"] == pytest.approx(
        fetched["recon"] + fetched["codebook"] + MODEL.beta * fetched["commitment"], rel=1e-6)


def test_decoding_the_codes_of_a_batch_gives_its_reconstruction(twin, batch):
    trained = twin.make()
    trained.train_step(batch)
    recon, indices, _ = trained.evaluate(batch)
    np.testing.assert_allclose(trained.decode_codes(indices), recon, rtol=0, atol=1e-6)


def test_raw_uint8_images_are_refused_not_read_as_floats(twin, batch):
    """Flax read them as values in [0, 255]: a recon loss of 9004, no error."""
    trained = twin.make()
    raw = np.round((batch + 1) * 127.5).astype(np.uint8)
    for call in (trained.evaluate, trained.encode, trained.train_step,
                 lambda images: trained.train_steps([images, images])):
        with pytest.raises(ValueError, match="a batch of uint8 values: the model takes float "
                                             "images in \\[-1, 1\\]"):
            call(raw)


def test_evaluate_is_nhwc_and_leaves_the_state_alone(twin, batch):
    trained = twin.make()
    trained.train_step(batch)
    model, optimizer = twin.model_arrays(trained), twin.optimizer_arrays(trained)
    recon, indices, losses = trained.evaluate(batch)
    assert recon.shape == (8, 28, 28, 1) and recon.dtype == np.float32
    assert indices.shape == (8, 7, 7) and 0 <= indices.min() and indices.max() < 16
    assert set(losses) == LOSS_TERMS
    assert all(isinstance(v, float) for v in losses.values())
    assert losses["recon"] == pytest.approx(np.mean((recon - batch) ** 2), rel=1e-5)
    assert_same_arrays(model, twin.model_arrays(trained))  # BatchNorm statistics included
    assert_same_arrays(optimizer, twin.optimizer_arrays(trained))
    # eval mode: running statistics, so an image's reconstruction ignores the rest of the batch
    np.testing.assert_allclose(trained.evaluate(batch[:2])[0], recon[:2], rtol=0, atol=1e-5)


def test_encode_decode_shapes(twin, batch):
    trained = twin.make()
    z = trained.encode(batch[:2])
    assert z.shape == (2, 7, 7, 8)
    images = trained.decode(z)
    assert images.shape == (2, 28, 28, 1) and np.abs(images).max() <= 1.0


def test_same_seed_gives_identical_losses(twin, batch):
    a, b, c = twin.make(seed=0), twin.make(seed=0), twin.make(seed=1)
    assert_same_training_state(twin, a, b)
    assert not np.array_equal(twin.encoder_kernel(twin.model_of(a)),
                              twin.encoder_kernel(twin.model_of(c)))
    losses_a = [a.fetch(a.train_step(batch)) for _ in range(3)]
    losses_b = [b.fetch(b.train_step(batch)) for _ in range(3)]
    assert losses_a == losses_b
    assert losses_a[0] != losses_a[-1]
    assert_same_training_state(twin, a, b)


def test_save_load_round_trip(twin, tmp_path, batch):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    a = twin.make(seed=0)
    for _ in range(2):
        a.train_step(batch)
    a.save(path, 7)
    assert os.listdir(tmp_path) == [twin.Twin.checkpoint_name]
    assert 7 in twin.saved_steps(path)

    b = twin.make(seed=1)
    assert not np.array_equal(twin.codebook(twin.model_of(a).quantizer),
                              twin.codebook(twin.model_of(b).quantizer))
    assert b.load(path) == 7
    assert_same_training_state(twin, a, b)
    assert twin.batch_norm_count(twin.model_of(b)) == twin.optimizer_step(b) == 2
    assert twin.codebook_moment(b).any()

    losses_a = a.fetch(a.train_step(batch))
    losses_b = b.fetch(b.train_step(batch))
    assert losses_a == losses_b
    assert_same_training_state(twin, a, b)


@pytest.mark.parametrize("method", ["load", "init_weights"])
def test_load_and_init_weights_refuse_another_config(twin, tmp_path, method):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    twin.make().save(path, 1)
    other = twin.make(model=ModelConfig(in_channels=1, hidden=8, num_codes=32))
    with pytest.raises(UserError, match="holds a model with config num_codes 16 \\(not 32\\): "
                                         "trained with other flags$"):
        getattr(other, method)(path)


def test_load_refuses_the_other_twins_record(twin, tmp_path):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    twin.write_record(path, record(twin.other))
    with pytest.raises(UserError, match=f"is a {twin.other} checkpoint, "
                                        f"not a {twin.framework_name} checkpoint"):
        twin.make().load(path)


def test_load_refuses_the_other_twins_checkpoint(twin, tmp_path):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    ADAPTERS[twin.other].write_record(path, record(twin.other))
    with pytest.raises(UserError, match=f"not a {twin.framework_name} checkpoint"):
        twin.make().load(path)


def test_missing_checkpoint_is_a_user_error(twin, tmp_path):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    with pytest.raises(UserError, match=f"{re.escape(path)}.*(No such file|not a Flax)"):
        twin.make().load(path)


def test_weights_only_checkpoint_cannot_be_resumed(twin, tmp_path):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    twin.save_weights_only(twin.make(), path, 3)
    with pytest.raises(UserError, match="weights only"):
        twin.make().load(path)


@pytest.mark.parametrize("weights_only", [False, True])
def test_init_weights_takes_the_model_and_leaves_the_optimizer_fresh(twin, tmp_path, batch,
                                                                     weights_only):
    path = str(tmp_path / twin.Twin.checkpoint_name)
    a = twin.make(seed=0)
    for _ in range(2):
        a.train_step(batch)
    twin.save_weights_only(a, path, 2) if weights_only else a.save(path, 2)

    b = twin.make(seed=1)
    b.init_weights(path)
    assert_same_arrays(twin.model_arrays(a), twin.model_arrays(b))
    assert_same_arrays(twin.optimizer_arrays(twin.make(seed=1)), twin.optimizer_arrays(b))


def test_init_weights_from_the_other_twins_checkpoint_says_to_convert(twin, tmp_path):
    other = ADAPTERS[twin.other]
    path = str(tmp_path / other.Twin.checkpoint_name)
    other.make().save(path, 1)
    with pytest.raises(UserError, match="convert.py"):
        twin.make().init_weights(path)
