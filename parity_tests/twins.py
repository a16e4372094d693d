"""Both twins on the same weights and inputs, every result returned as numpy in NHWC (PyTorch
keys for parameters), so that a test compares plain arrays."""
from __future__ import annotations

import copy

import jax
import numpy as np
import torch
from flax import nnx

from vqvae_common.config import ModelConfig
from vqvae_jax import convert
from vqvae_jax import model as jax_model
from vqvae_jax import train as jax_train
from vqvae_torch import model as torch_model
from vqvae_torch.train import to_numpy, to_tensor


class Pair:
    """A PyTorch VQ-VAE and the Flax VQ-VAE converted from its weights."""

    def __init__(self, config: ModelConfig, seed: int, device: str) -> None:
        torch.manual_seed(seed)
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.jax_device = jax.devices(device)[0]
        self.torch = torch_model.VQVAE(config).to(self.torch_device)
        with jax.default_device(self.jax_device):
            self.flax = jax_model.VQVAE(config, rngs=nnx.Rngs(seed))
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
    """PyTorch names of the trainable parameters (not the BatchNorm statistics)."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return [k for k in convert.flax_to_torch(model) if not k.endswith(stats)]


def train_torch(model: torch_model.VQVAE, batches: list[np.ndarray], lr: float,
                device: torch.device) -> list[float]:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        loss = model(to_tensor(batch, device)).losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_flax(model: jax_model.VQVAE, batches: list[np.ndarray], lr: float,
               device: jax.Device) -> tuple[jax_model.VQVAE, list[float]]:
    """The jitted step of vqvae_jax.train from `model`'s weights; returns the trained model."""
    import functools

    import optax

    model = nnx.clone(model)
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)))
    step = jax.jit(functools.partial(jax_train.train_step, graphdef))
    losses = []
    for batch in batches:
        state, out = step(state, jax.device_put(batch, device))
        losses.append(float(out["loss"]))
    trained, _ = nnx.merge(graphdef, state)
    return trained, losses
