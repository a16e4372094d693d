"""One adapter per twin, so that tests/test_model.py and tests/test_train.py state each
property once, for both twins, through the `twin` fixture (tests/conftest.py).

An adapter speaks numpy in the NHWC layout of the `Twin` interface and hides what differs:
NCHW tensors or NHWC arrays, how module state is read and written, how a twin's model and
optimizer state and its checkpoints look on disk.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from vqvae_common.config import ModelConfig, TrainConfig
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax.train import JaxTwin
from vqvae_jax.train import select_device as jax_select_device
from vqvae_torch import checkpoint as torch_checkpoint
from vqvae_torch.train import TorchTwin, to_numpy, to_tensor
from vqvae_torch.train import select_device as torch_select_device

MODEL = ModelConfig(in_channels=1, hidden=8, num_codes=16)
CPU = torch.device("cpu")


def record(framework: str, step: int = 1, **extra: Any) -> dict[str, Any]:
    """A checkpoint record of MODEL, as the twins write it."""
    return {"framework": framework, "model_config": dataclasses.asdict(MODEL), "step": step,
            **extra}


def assert_same_arrays(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    """The same keys, dtypes and values, to the bit."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


class TorchAdapter:
    name, other, framework_name = "torch", "jax", "PyTorch"
    Twin = TorchTwin
    select_device = staticmethod(torch_select_device)
    # no device of these names here: `select_device` must say so
    missing_device = "no CUDA device|unknown --device"
    restart_tolerance = {"rtol": 1e-6}

    def make(self, seed: int = 0, model: ModelConfig = MODEL) -> TorchTwin:
        return TorchTwin(model, TrainConfig(device="cpu", seed=seed))

    def has_device(self, name: str) -> bool:
        return name in ("cuda", "gpu") and torch.cuda.is_available()

    def default_device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def cpu_device(self) -> torch.device:
        return CPU

    def is_device_scalar(self, value: Any) -> bool:
        """A loss term still on the device, cut from the autograd graph."""
        return isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad

    @torch.no_grad()
    def train_mode_encoder_outputs(self, twin: TorchTwin, batch: np.ndarray) -> np.ndarray:
        """z_e (B, h, w, D) with batch statistics, as inside a train step; `twin` untouched."""
        return to_numpy(copy.deepcopy(twin.model).train().encoder(to_tensor(batch, CPU)))

    def codebook(self, twin: TorchTwin) -> np.ndarray:
        return twin.model.quantizer.codebook.detach().numpy().copy()

    def usage(self, twin: TorchTwin) -> np.ndarray:
        return twin.model.quantizer.usage.numpy().copy()

    def encoder_kernel(self, twin: TorchTwin) -> np.ndarray:
        return twin.model.encoder.conv1.weight.detach().numpy().copy()

    def batch_norm_count(self, twin: TorchTwin) -> int:
        """Train steps seen by the encoder's first BatchNorm."""
        return int(twin.model.encoder.bn1.num_batches_tracked)

    def model_arrays(self, twin: TorchTwin) -> dict[str, np.ndarray]:
        """Parameters and buffers (BatchNorm statistics, code usage), copied."""
        return {k: v.cpu().numpy().copy() for k, v in twin.model.state_dict().items()}

    def optimizer_arrays(self, twin: TorchTwin) -> dict[str, np.ndarray]:
        """Adam's moments and step counts, and its hyperparameters, copied."""
        state = twin.optimizer.state_dict()
        arrays = {f"state[{i}].{name}": value.cpu().numpy().copy()
                  for i, moments in state["state"].items() for name, value in moments.items()}
        arrays.update({f"param_groups[{i}].{name}": np.asarray(value)
                       for i, group in enumerate(state["param_groups"])
                       for name, value in group.items()})
        return arrays

    def codebook_moment(self, twin: TorchTwin) -> np.ndarray:
        """Adam's first moment of the codebook."""
        return twin.optimizer.state[twin.model.quantizer.codebook]["exp_avg"].numpy().copy()

    def optimizer_step(self, twin: TorchTwin) -> int:
        return int(twin.optimizer.state[twin.model.quantizer.codebook]["step"])

    def saved_steps(self, path: str) -> list[int]:
        return [torch_checkpoint.load(path, CPU)[0].step]

    def write_record(self, path: str, meta: dict[str, Any]) -> None:
        """A PyTorch checkpoint file that holds `meta` and nothing else."""
        torch.save(meta, path)

    def save_weights_only(self, twin: TorchTwin, path: str, step: int) -> None:
        """A PyTorch checkpoint is weights-only when it holds no optimizer state."""
        torch_checkpoint.save(path, {**record("torch", step), "model": twin.model.state_dict()})


def _nnx_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """{path: numpy copy} for every leaf of an nnx.State."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in leaves}


class JaxAdapter:
    """The twin's state is one nnx.State of (model, optimizer): state[0] holds the parameters
    and the BatchNorm statistics (mean, var, count), state[1] Adam's moments and step count."""
    name, other, framework_name = "jax", "torch", "Flax"
    Twin = JaxTwin
    select_device = staticmethod(jax_select_device)
    missing_device = "no such device"
    restart_tolerance = {"rtol": 1e-5, "atol": 1e-6}

    def make(self, seed: int = 0, model: ModelConfig = MODEL) -> JaxTwin:
        return JaxTwin(model, TrainConfig(device="cpu", seed=seed))

    def has_device(self, name: str) -> bool:
        try:
            jax.devices("gpu" if name == "cuda" else name)
        except RuntimeError:
            return False
        return True

    def default_device(self) -> jax.Device:
        return jax.devices()[0]

    def cpu_device(self) -> jax.Device:
        return jax.devices("cpu")[0]

    def is_device_scalar(self, value: Any) -> bool:
        """A loss term not yet fetched from the device."""
        return isinstance(value, jax.Array) and value.shape == ()

    def train_mode_encoder_outputs(self, twin: JaxTwin, batch: np.ndarray) -> np.ndarray:
        """z_e (B, h, w, D) with batch statistics, as inside a train step; `twin` untouched."""
        model, _ = nnx.merge(twin.graphdef, twin.state)
        model.train()
        return np.asarray(model.encoder(jnp.asarray(batch)))

    def codebook(self, twin: JaxTwin) -> np.ndarray:
        return np.array(twin.state[0]["quantizer"]["codebook"][...])

    def usage(self, twin: JaxTwin) -> np.ndarray:
        return np.array(twin.state[0]["quantizer"]["usage"][...])

    def encoder_kernel(self, twin: JaxTwin) -> np.ndarray:
        return np.array(twin.state[0]["encoder"]["conv1"]["kernel"][...])

    def batch_norm_count(self, twin: JaxTwin) -> int:
        """Train steps seen by the encoder's first BatchNorm."""
        return int(twin.state[0]["encoder"]["bn1"]["count"][...])

    def model_arrays(self, twin: JaxTwin) -> dict[str, np.ndarray]:
        """Parameters and BatchNorm statistics (mean, var, count), and code usage, copied."""
        arrays = _nnx_arrays(twin.state[0])
        assert any(key.endswith("['count'].value") for key in arrays)
        return arrays

    def optimizer_arrays(self, twin: JaxTwin) -> dict[str, np.ndarray]:
        """Adam's moments and step count, copied."""
        return _nnx_arrays(twin.state[1])

    def codebook_moment(self, twin: JaxTwin) -> np.ndarray:
        """Adam's first moment of the codebook."""
        (moment,) = [value for key, value in self.optimizer_arrays(twin).items()
                     if key.endswith("['mu']['quantizer']['codebook'].value")]
        return moment

    def optimizer_step(self, twin: JaxTwin) -> int:
        return int(self.optimizer_arrays(twin)["['step'].value"])

    def saved_steps(self, path: str) -> list[int]:
        return sorted(int(name) for name in os.listdir(path) if name.isdigit())

    def write_record(self, path: str, meta: dict[str, Any]) -> None:
        """A Flax checkpoint (a fresh twin's state) whose record is `meta`."""
        jax_checkpoint.save(path, meta["step"], self.make().state, meta)

    def save_weights_only(self, twin: JaxTwin, path: str, step: int) -> None:
        """Every Flax checkpoint holds an optimizer state: weights-only is the record's flag."""
        jax_checkpoint.save(path, step, twin.state, record("jax", step, weights_only=True))


ADAPTERS = {"torch": TorchAdapter(), "jax": JaxAdapter()}
