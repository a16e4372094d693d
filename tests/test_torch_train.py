import copy
import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from vqvae_common.config import ModelConfig, TrainConfig
from vqvae_common.errors import UserError
from vqvae_torch import checkpoint
from vqvae_torch.train import TorchTwin, select_device, to_numpy, to_tensor

MODEL = ModelConfig(in_channels=1, hidden=8, num_codes=16)


def _twin(seed=0, model=MODEL):
    return TorchTwin(model, TrainConfig(device="cpu", seed=seed))


@pytest.fixture
def batch():
    return np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=key)


def _assert_same_optimizer(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for key, state in sa["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(sb["state"][key][name], value, rtol=0, atol=0)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError):
        select_device("tpu")


def test_train_step_reduces_recon(batch):
    twin = _twin()
    recon = [twin.fetch(twin.train_step(batch))["recon"] for _ in range(20)]
    assert recon[-1] < 0.95 * recon[0]


def test_train_step_restarts_dead_codes_onto_the_batch(batch, restart_rows):
    twin = _twin()
    with torch.no_grad():
        z_e = copy.deepcopy(twin.model).train().encoder(to_tensor(batch, twin.device))
    z = to_numpy(z_e).reshape(-1, MODEL.hidden)
    twin.train_step(batch)
    quantizer = twin.model.quantizer
    restarted = quantizer.usage.numpy() == np.float32(1 / MODEL.num_codes)
    assert restarted.any()  # usage starts at 0: the first step restarts the rarely picked codes
    np.testing.assert_allclose(quantizer.codebook.detach().numpy()[restarted],
                               z[restart_rows(restarted.sum(), len(z))], rtol=1e-6)


def test_train_step_returns_detached_loss_terms(batch):
    out = _twin().train_step(batch)
    assert set(out) == {"loss", "recon", "codebook", "commitment"}
    assert not any(v.requires_grad for v in out.values())


def test_evaluate_is_nhwc_and_leaves_batch_norm_alone(batch):
    twin = _twin()
    twin.train_step(batch)
    stats = {k: v.clone() for k, v in twin.model.state_dict().items()}
    recon, indices, losses = twin.evaluate(batch)
    assert recon.shape == (8, 28, 28, 1) and recon.dtype == np.float32
    assert indices.shape == (8, 7, 7) and 0 <= indices.min() and indices.max() < 16
    assert set(losses) == {"loss", "recon", "codebook", "commitment"}
    assert all(isinstance(v, float) for v in losses.values())
    assert losses["recon"] == pytest.approx(np.mean((recon - batch) ** 2), rel=1e-5)
    for key, value in twin.model.state_dict().items():
        assert torch.equal(value, stats[key]), key
    # eval mode: running statistics, so an image's reconstruction ignores the rest of the batch
    np.testing.assert_allclose(twin.evaluate(batch[:2])[0], recon[:2], rtol=0, atol=1e-5)


def test_encode_decode_shapes(batch):
    twin = _twin()
    z = twin.encode(batch[:2])
    assert z.shape == (2, 7, 7, 8)
    assert twin.decode(z).shape == (2, 28, 28, 1)


def test_save_load_round_trip(tmp_path, batch):
    path = str(tmp_path / "checkpoint.pt")
    a = _twin(seed=0)
    for _ in range(2):
        a.train_step(batch)
    a.save(path, 7)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]

    b = _twin(seed=1)
    assert not torch.equal(a.model.quantizer.codebook, b.model.quantizer.codebook)
    assert b.load(path) == 7
    _assert_same_state(a.model, b.model)
    _assert_same_optimizer(a.optimizer, b.optimizer)

    a.train_step(batch)
    b.train_step(batch)
    _assert_same_state(a.model, b.model)


def test_load_refuses_another_config(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    _twin().save(path, 1)
    other = _twin(model=ModelConfig(in_channels=1, hidden=8, num_codes=32))
    with pytest.raises(UserError, match="config"):
        other.load(path)


def test_load_refuses_a_foreign_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"framework": "jax", "model_config": {}}, path)
    with pytest.raises(UserError, match="jax"):
        _twin().load(path)


def test_a_checkpoint_missing_a_tensor_is_a_user_error(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    twin = _twin()
    weights = {k: v for k, v in twin.model.state_dict().items() if k != "quantizer.usage"}
    checkpoint.save(path, {"framework": "torch", "model_config": dataclasses.asdict(MODEL),
                           "step": 3, "model": weights})
    with pytest.raises(UserError, match="(?s)does not fit.*quantizer.usage"):
        TorchTwin.from_checkpoint(path, device="cpu")


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    twin = _twin()
    checkpoint.save(path, {"framework": "torch", "model_config": dataclasses.asdict(MODEL),
                           "step": 3, "model": twin.model.state_dict()})
    with pytest.raises(UserError):
        _twin().load(path)


@pytest.mark.parametrize("keep", [0.5, 0.0, 0.01])
def test_truncated_checkpoint_is_a_user_error(tmp_path, keep):
    path = tmp_path / "checkpoint.pt"
    _twin().save(str(path), 1)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError, match="truncated"):
        _twin().load(str(path))


class _Payload:
    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "checkpoint.pt"
    obj = {"framework": "torch", "model_config": {}, "model": payload}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    assert not marker.exists()
    with pytest.raises(UserError):
        checkpoint.load(str(path), device=torch.device("cpu"), config=MODEL)
    assert not marker.exists()


def test_payload_would_run_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
