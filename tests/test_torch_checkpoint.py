"""What only a PyTorch checkpoint file can suffer: a state_dict that does not fit, a file cut
short, and a pickle crafted to run code (refused unread: torch.load with weights_only)."""
import os
import pickle

import pytest
import torch

from twin_adapters import CPU, MODEL, TorchAdapter, record
from vqvae_common.errors import UserError
from vqvae_torch import checkpoint
from vqvae_torch.train import TorchTwin

TORCH = TorchAdapter()


def test_a_checkpoint_missing_a_tensor_is_a_user_error(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    weights = {k: v for k, v in TORCH.make().model.state_dict().items() if k != "quantizer.usage"}
    checkpoint.save(path, {**record("torch", 3), "model": weights})
    with pytest.raises(UserError, match="(?s)does not fit.*quantizer.usage"):
        TorchTwin.from_checkpoint(path, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.0, 0.01])
def test_truncated_checkpoint_is_a_user_error(tmp_path, keep):
    path = tmp_path / "checkpoint.pt"
    TORCH.make().save(str(path), 1)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError, match="truncated"):
        TORCH.make().load(str(path))


@pytest.mark.parametrize("garbage", [b"hello\n", b"a", b"}a.", b"Xab"])
def test_a_short_garbage_file_is_a_user_error(tmp_path, garbage):
    """The weights-only unpickler's own parse errors (KeyError, IndexError, struct.error)."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(garbage)
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        checkpoint.load(str(path), CPU)


@pytest.mark.parametrize("payload", [[1, 2], torch.zeros(2), {"conv.weight": torch.zeros(2)}])
def test_a_file_of_tensors_that_no_trainer_wrote_is_foreign_not_to_convert(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="foreign checkpoint, not one of this project") as error:
        checkpoint.load(str(path), CPU)
    assert "convert" not in str(error.value)


def test_a_missing_file_or_a_directory_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="No such file"):
        checkpoint.load(str(tmp_path / "nope.pt"), CPU)
    with pytest.raises(UserError, match="a directory"):
        checkpoint.load(str(tmp_path), CPU)


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
        checkpoint.load(str(path), device=CPU, config=MODEL)
    assert not marker.exists()


def test_payload_would_run_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_a_model_loaded_to_use_is_in_eval_mode_and_leaves_global_state_alone(tmp_path):
    """Loaded in train mode, a direct twin.model(x) moved the BatchNorm statistics, code
    usage and EMA codebook; and the load reseeded PyTorch's global RNG (a caller's draws
    were then the same whatever their seed) and turned deterministic algorithms on."""
    path = str(tmp_path / "checkpoint.pt")
    TORCH.make().save(path, 1)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    workspace = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    try:
        draws = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            twin = TorchTwin.from_checkpoint(path, device="cpu")
            draws.append(torch.rand(3))
            assert not torch.are_deterministic_algorithms_enabled()
            assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        torch.manual_seed(2)
        assert torch.equal(draws[1], torch.rand(3)) and not torch.equal(draws[0], draws[1])
    finally:
        torch.use_deterministic_algorithms(before)
        if workspace is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
    assert not twin.model.training and not any(m.training for m in twin.model.modules())
