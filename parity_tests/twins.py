"""Both twins on the same weights and inputs, every result returned as numpy in NHWC (PyTorch
keys for parameters), so that a test compares plain arrays."""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from unittest import mock

import jax
import numpy as np
import optax
import torch
from flax import nnx

from vqvae_common.config import ModelConfig
from vqvae_jax import convert
from vqvae_jax import model as jax_model
from vqvae_jax import train as jax_train
from vqvae_torch import model as torch_model
from vqvae_torch import train as torch_train
from vqvae_torch.train import to_numpy, to_tensor


class Pair:
    """A PyTorch VQ-VAE and the Flax VQ-VAE converted from its weights. With dtype float64
    both compute in float64 (the Flax one only inside `jax.enable_x64()`)."""

    def __init__(self, config: ModelConfig, seed: int, device: str,
                 dtype: type = np.float32) -> None:
        torch.manual_seed(seed)
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.jax_device = jax.devices(device)[0]
        self.torch = torch_model.VQVAE(config).to(self.torch_device, torch.from_numpy(
            np.zeros(0, dtype)).dtype)
        with jax.default_device(self.jax_device):
            self.flax = jax_model.VQVAE(config, rngs=nnx.Rngs(seed))
            floats = nnx.state(self.flax, lambda _, v: jax.numpy.issubdtype(v.dtype, np.floating))
            nnx.update(self.flax, jax.tree.map(lambda a: a.astype(dtype), floats))
            convert.torch_to_flax(torch_state(self.torch), self.flax)

    def x(self, batch: np.ndarray) -> tuple[torch.Tensor, jax.Array]:
        return to_tensor(batch, self.torch_device), jax.device_put(batch, self.jax_device)


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def flax_state(model: jax_model.VQVAE) -> dict[str, np.ndarray]:
    return convert.flax_to_torch(model)


def torch_forward(model: torch_model.VQVAE, x: torch.Tensor, train: bool) -> dict[str, np.ndarray]:
    model = copy.deepcopy(model)  # train mode updates the running stats; keep the caller's
    model.train(train)
    with torch.no_grad():
        z_e = model.encoder(x)
        out = model(x)
    return {"z_e": to_numpy(z_e), "x_hat": to_numpy(out.recon),
            "indices": out.indices.cpu().numpy(),
            **{k: v.cpu().numpy() for k, v in out.losses.items()}}


def flax_forward(model: jax_model.VQVAE, x: jax.Array, train: bool) -> dict[str, np.ndarray]:
    model = nnx.clone(model)  # train mode updates the running stats; keep the caller's
    model.train() if train else model.eval()
    z_e = nnx.clone(model).encoder(x)
    out = model(x)
    return {"z_e": np.asarray(z_e), "x_hat": np.asarray(out.recon),
            "indices": np.asarray(out.indices),
            **{k: np.asarray(v) for k, v in out.losses.items()}}


@contextlib.contextmanager
def relu_inputs() -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Record the input of every ReLU call of both twins (their models call F.relu and
    jax.nn.relu by attribute, so patching those sees every call), as NHWC numpy."""
    torch_inputs: list[np.ndarray] = []
    flax_inputs: list[np.ndarray] = []
    torch_relu, jax_relu = torch.nn.functional.relu, jax.nn.relu

    def torch_spy(x, *args, **kwargs):
        torch_inputs.append(x.detach().permute(0, 2, 3, 1).cpu().numpy())
        return torch_relu(x, *args, **kwargs)

    def jax_spy(x):
        flax_inputs.append(np.asarray(x))
        return jax_relu(x)

    with mock.patch.object(torch.nn.functional, "relu", torch_spy), \
            mock.patch.object(jax.nn, "relu", jax_spy):
        yield torch_inputs, flax_inputs


def kink_flips(torch_inputs: list[np.ndarray], flax_inputs: list[np.ndarray],
               near: float) -> tuple[int, int]:
    """(ReLU inputs on opposite sides of 0 in the twins, how many of those are farther than
    `near` x the layer's largest |input| from 0). Only the second kind is a disagreement: the
    first is a tie that float rounding breaks either way, as an argmin near-tie is."""
    assert len(torch_inputs) == len(flax_inputs)
    flips = far = 0
    for t, f in zip(torch_inputs, flax_inputs):
        differ = (t > 0) != (f > 0)
        flips += int(differ.sum())
        far += int((differ & (np.abs(t) > near * np.abs(t).max())).sum())
    return flips, far


def torch_grads(model: torch_model.VQVAE, x: torch.Tensor) -> dict[str, np.ndarray]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).losses["loss"].backward()
    return {k: p.grad.cpu().numpy() for k, p in model.named_parameters()}


def flax_grads(model: jax_model.VQVAE, x: jax.Array) -> dict[str, np.ndarray]:
    model = nnx.clone(model)
    model.train()
    grads = nnx.grad(lambda m: m(x).losses["loss"])(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    as_torch = convert.flax_to_torch(nnx.merge(graphdef, grads, rest))
    return {k: as_torch[k] for k in torch_state_params(model)}


def torch_state_params(model: jax_model.VQVAE) -> list[str]:
    """PyTorch names of the trainable parameters (the nnx.Params: not the BatchNorm
    statistics, not the code usage)."""
    return [key for key, variable, *_ in convert.leaves(model)
            if isinstance(variable, nnx.Param)]


def train_torch(model: torch_model.VQVAE, batches: list[np.ndarray], lr: float,
                device: torch.device) -> list[dict[str, float]]:
    """vqvae_torch.train's step, in place on `model`; each step's loss terms."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for batch in batches:
        losses = torch_train.train_step(model, optimizer, to_tensor(batch, device))
        history.append({k: v.item() for k, v in losses.items()})
    return history


def train_flax(model: jax_model.VQVAE, batches: list[np.ndarray], lr: float,
               device: jax.Device) -> tuple[jax_model.VQVAE, list[dict[str, float]]]:
    """vqvae_jax.train's jitted step from `model`'s weights: the trained copy, and each step's
    loss terms."""
    model = nnx.clone(model)
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)))
    step = jax.jit(functools.partial(jax_train.train_step, graphdef))
    history = []
    for batch in batches:
        state, losses = step(state, jax.device_put(batch, device))
        history.append({k: float(v) for k, v in losses.items()})
    trained, _ = nnx.merge(graphdef, state)
    return trained, history
