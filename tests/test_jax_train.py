"""vqvae_jax.train and vqvae_jax.checkpoint, tested as their twins are in tests/test_torch_train.py.

The twin's state is one nnx.State of (model, optimizer): state[0] holds the parameters and the
BatchNorm statistics (mean, var, count), state[1] Adam's moments and step count. Pickle tests
have no twin here: orbax never unpickles.
"""
import dataclasses
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vqvae_common.config import ModelConfig, TrainConfig
from vqvae_common.errors import UserError
from vqvae_jax import checkpoint
from vqvae_jax.train import JaxTwin, select_device

MODEL = ModelConfig(in_channels=1, hidden=8, num_codes=16)


def _twin(seed=0, model=MODEL):
    return JaxTwin(model, TrainConfig(device="cpu", seed=seed))


@pytest.fixture
def batch():
    return np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)


def _arrays(state):
    """{path: numpy copy} for every leaf of an nnx.State."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in leaves}


def _assert_same_arrays(sa, sb):
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sb[key].dtype == sa[key].dtype, key
        np.testing.assert_array_equal(sb[key], sa[key], err_msg=key)


def _assert_same_state(a, b):
    """Parameters and BatchNorm statistics."""
    sa = _arrays(a.state[0])
    assert any(key.endswith("['count'].value") for key in sa)
    _assert_same_arrays(sa, _arrays(b.state[0]))


def _assert_same_optimizer(a, b):
    sa = _arrays(a.state[1])
    assert any(key.endswith("['mu']['quantizer']['codebook'].value") for key in sa)
    assert int(sa["['step'].value"]) > 0
    _assert_same_arrays(sa, _arrays(b.state[1]))


def _has_backend(name):
    try:
        jax.devices(name)
    except RuntimeError:
        return False
    return True


def test_select_device():
    assert select_device("cpu") == jax.devices("cpu")[0]
    assert select_device("auto") == jax.devices()[0]
    with pytest.raises(UserError, match="unknown"):
        select_device("nope")
    for name in ("gpu", "cuda", "tpu"):
        if not _has_backend("gpu" if name == "cuda" else name):
            with pytest.raises(UserError, match="no such device"):
                select_device(name)


def test_train_step_reduces_recon(batch):
    twin = _twin()
    recon = [twin.fetch(twin.train_step(batch))["recon"] for _ in range(20)]
    assert recon[-1] < 0.95 * recon[0]


def test_train_step_restarts_dead_codes_onto_the_batch(batch, restart_rows):
    twin = _twin()
    model, _ = nnx.merge(twin.graphdef, twin.state)
    model.train()
    z = np.asarray(model.encoder(jnp.asarray(batch))).reshape(-1, MODEL.hidden)
    twin.train_step(batch)
    quantizer = nnx.merge(twin.graphdef, twin.state)[0].quantizer
    restarted = np.asarray(quantizer.usage[...]) == np.float32(1 / MODEL.num_codes)
    assert restarted.any()  # usage starts at 0: the first step restarts the rarely picked codes
    np.testing.assert_allclose(np.asarray(quantizer.codebook[...])[restarted],
                               z[restart_rows(restarted.sum(), len(z))], rtol=1e-5, atol=1e-6)


def test_train_step_returns_unsynced_loss_terms(batch):
    twin = _twin()
    out = twin.train_step(batch)
    assert set(out) == {"loss", "recon", "codebook", "commitment"}
    assert all(isinstance(v, jax.Array) and v.shape == () for v in out.values())
    fetched = twin.fetch(out)
    assert all(type(v) is float for v in fetched.values())
    assert fetched["loss"] == pytest.approx(
        fetched["recon"] + fetched["codebook"] + MODEL.beta * fetched["commitment"], rel=1e-6)


def test_evaluate_is_nhwc_and_leaves_batch_norm_alone(batch):
    twin = _twin()
    twin.train_step(batch)
    stats = _arrays(twin.state)
    recon, indices, losses = twin.evaluate(batch)
    assert recon.shape == (8, 28, 28, 1) and recon.dtype == np.float32
    assert indices.shape == (8, 7, 7) and 0 <= indices.min() and indices.max() < 16
    assert set(losses) == {"loss", "recon", "codebook", "commitment"}
    assert all(isinstance(v, float) for v in losses.values())
    assert losses["recon"] == pytest.approx(np.mean((recon - batch) ** 2), rel=1e-5)
    _assert_same_arrays(stats, _arrays(twin.state))
    # eval mode: running statistics, so an image's reconstruction ignores the rest of the batch
    np.testing.assert_allclose(twin.evaluate(batch[:2])[0], recon[:2], rtol=0, atol=1e-5)


def test_encode_decode_shapes(batch):
    twin = _twin()
    z = twin.encode(batch[:2])
    assert z.shape == (2, 7, 7, 8)
    images = twin.decode(z)
    assert images.shape == (2, 28, 28, 1) and np.abs(images).max() <= 1.0


def test_save_load_round_trip(tmp_path, batch):
    path = str(tmp_path / "checkpoint")
    a = _twin(seed=0)
    for _ in range(2):
        a.train_step(batch)
    a.save(path, 7)
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert "7" in os.listdir(path)

    b = _twin(seed=1)
    assert not np.array_equal(a.state[0]["quantizer"]["codebook"][...],
                              b.state[0]["quantizer"]["codebook"][...])
    assert b.load(path) == 7
    _assert_same_state(a, b)
    _assert_same_optimizer(a, b)
    assert int(b.state[0]["encoder"]["bn1"]["count"][...]) == 2

    losses_a = a.fetch(a.train_step(batch))
    losses_b = b.fetch(b.train_step(batch))
    assert losses_a == losses_b
    _assert_same_state(a, b)
    _assert_same_optimizer(a, b)


def test_load_refuses_another_config(tmp_path):
    path = str(tmp_path / "checkpoint")
    _twin().save(path, 1)
    other = _twin(model=ModelConfig(in_channels=1, hidden=8, num_codes=32))
    with pytest.raises(UserError, match="config"):
        other.load(path)


@pytest.mark.parametrize("kind", ["torch file", "foreign record"])
def test_load_refuses_a_foreign_checkpoint(tmp_path, kind):
    path = str(tmp_path / "checkpoint")
    twin = _twin()
    if kind == "torch file":
        torch.save({"framework": "torch", "model_config": dataclasses.asdict(MODEL)}, path)
    else:
        checkpoint.save(path, 1, twin.state, {
            "framework": "torch", "model_config": dataclasses.asdict(MODEL), "step": 1})
    with pytest.raises(UserError, match="not a Flax checkpoint"):
        twin.load(path)


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path):
    path = str(tmp_path / "checkpoint")
    twin = _twin()
    checkpoint.save(path, 3, twin.state, {
        "framework": "jax", "model_config": dataclasses.asdict(MODEL), "step": 3,
        "weights_only": True})
    with pytest.raises(UserError, match="weights only"):
        _twin().load(path)


def _truncate(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def _garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(max(size, 16)))


# orbax leaves an "Event loop is closed" behind when a restore fails; it is orbax's, not ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate data", "empty data", "garbage data",
                                    "truncate every file", "delete state", "garbage record"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path, damage):
    path = str(tmp_path / "checkpoint")
    _twin(seed=0).save(path, 1)
    step = os.path.join(path, "1")
    data = glob.glob(os.path.join(step, "state", "**", "d", "*"), recursive=True)
    assert data
    if damage == "truncate data":
        for f in data:
            _truncate(f, 0.5)
    elif damage == "empty data":
        for f in data:
            _truncate(f, 0.0)
    elif damage == "garbage data":
        for f in data:
            _garbage(f)
    elif damage == "truncate every file":
        for f in glob.glob(os.path.join(step, "**"), recursive=True):
            if os.path.isfile(f):
                _truncate(f, 0.5)
    elif damage == "delete state":
        shutil.rmtree(os.path.join(step, "state"))
    else:
        _garbage(os.path.join(step, "meta", "metadata"))
    twin = _twin(seed=1)
    before = _arrays(twin.state)
    with pytest.raises(UserError, match="truncated or corrupt"):
        twin.load(path)
    _assert_same_arrays(before, _arrays(twin.state))


@pytest.mark.parametrize("kind", ["missing", "empty dir", "no complete step"])
def test_missing_checkpoint_is_a_user_error(tmp_path, kind):
    path = tmp_path / "checkpoint"
    if kind == "empty dir":
        path.mkdir()
    elif kind == "no complete step":
        _twin().save(str(path), 1)
        shutil.rmtree(path / "1")
    with pytest.raises(UserError, match="not a Flax checkpoint directory|no complete"):
        _twin().load(str(path))


def test_same_seed_gives_identical_losses(batch):
    a, b, c = _twin(seed=0), _twin(seed=0), _twin(seed=1)
    _assert_same_state(a, b)
    assert not np.array_equal(a.state[0]["encoder"]["conv1"]["kernel"][...],
                              c.state[0]["encoder"]["conv1"]["kernel"][...])
    losses_a = [a.fetch(a.train_step(batch)) for _ in range(3)]
    losses_b = [b.fetch(b.train_step(batch)) for _ in range(3)]
    assert losses_a == losses_b
    assert losses_a[0] != losses_a[-1]
    _assert_same_state(a, b)
