"""Both twins on the same weights and inputs, every result returned as numpy in NHWC (PyTorch
keys for parameters), so that a test compares plain arrays.

The PyTorch twin always runs first; the Flax twin then runs under `ties.follow` and
`ties.follow_relus`, taking PyTorch's code index wherever its own argmin differs and PyTorch's
side of 0 at every ReLU; `Pair.audit` proves each such case a tie (parity_tests/ties.py).
"""
from __future__ import annotations

import copy
import functools

import jax
import numpy as np
import torch
from flax import nnx

from parity_tests.ties import Audit, follow, follow_relus, torch_relu_inputs
from vqvae_common import layout
from vqvae_common.config import ModelConfig, learning_rate
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax import model as jax_model
from vqvae_jax import train as jax_train
from vqvae_jax import xla_cpu
from vqvae_torch import model as torch_model
from vqvae_torch import train as torch_train
from vqvae_torch.train import to_numpy, to_tensor


class Pair:
    """A PyTorch VQ-VAE and the Flax VQ-VAE converted from its weights. With dtype float64
    both compute in float64 (the Flax one only inside `jax.enable_x64()`). fast_cpu: the
    Flax model's path (vqvae_jax.model.use_fast_cpu; None: the fast CPU kernels on a CPU,
    plain XLA ops elsewhere)."""

    def __init__(self, config: ModelConfig, seed: int, device: str,
                 dtype: type = np.float32, fast_cpu: bool | None = None) -> None:
        torch.manual_seed(seed)
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.jax_device = jax.devices(device)[0]
        self.audit = Audit()
        self.torch = torch_model.VQVAE(config).to(self.torch_device, torch.from_numpy(
            np.zeros(0, dtype)).dtype)
        with jax.default_device(self.jax_device):
            self.flax = flax_twin(self.torch, config, fast_cpu, dtype)

    def x(self, batch: np.ndarray) -> tuple[torch.Tensor, jax.Array]:
        return to_tensor(batch, self.torch_device), jax.device_put(batch, self.jax_device)

    def forward(self, batch: np.ndarray, train: bool
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(torch, flax) results of one forward pass; the models are left as they were."""
        tx, fx = self.x(batch)
        with torch_relu_inputs() as relus:
            t = torch_forward(self.torch, tx, train)
        with follow(t["indices"], self.audit), follow_relus(relus, self.audit):
            f = flax_forward(self.flax, fx, train)
        return t, f

    def train_mode_call(self, batch: np.ndarray) -> None:
        """One train-mode forward of each model, in place: BatchNorm statistics and code
        usage move."""
        tx, fx = self.x(batch)
        self.torch.train()
        with torch_relu_inputs() as relus:
            indices = self.torch(tx).indices.cpu().numpy()
        self.flax.train()
        with follow(indices, self.audit), follow_relus(relus, self.audit):
            self.flax(fx)

    def grads(self, batch: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(torch, flax) gradients of the total loss, in train mode, by PyTorch key; the
        models are left as they were."""
        tx, fx = self.x(batch)
        with torch_relu_inputs() as relus:
            t, indices = torch_grads(self.torch, tx)
        with follow(indices, self.audit), follow_relus(relus, self.audit):
            f = flax_grads(self.flax, fx)
        return t, f

    def train(self, batches: list[np.ndarray], lr: float, schedule: str = "constant"
              ) -> tuple[list[dict[str, float]], list[dict[str, float]], jax_model.VQVAE]:
        """Adam steps of each twin's own train step, the rate following --lr-schedule
        `schedule` over the batches: (torch losses per step, flax losses per step, the
        trained Flax copy). The PyTorch model trains in place. The jitted Flax
        step follows PyTorch's code indices but not its ReLU sides: a kink tie needs float32
        rounding, and the float64 trajectory is the one held to a tight bound."""
        t_history, references = train_torch(self.torch, batches, lr, self.torch_device,
                                            schedule)
        trained, f_history = train_flax(self.flax, batches, references, lr, self.jax_device,
                                        self.audit, schedule)
        return t_history, f_history, trained


def flax_twin(model: torch_model.VQVAE, config: ModelConfig, fast_cpu: bool | None,
              dtype: type) -> jax_model.VQVAE:
    """The Flax VQ-VAE holding `model`'s weights, its floats in `dtype`. Built abstractly
    (nnx.eval_shape): every variable comes from PyTorch, and initialising them would compile
    a random normal per kernel shape (0.2-0.9 s each on this project's 2-core CPU)."""
    flax = nnx.eval_shape(lambda: jax_model.VQVAE(config, fast_cpu=fast_cpu, rngs=nnx.Rngs(0)))
    floats = nnx.state(flax, lambda _, v: jax.numpy.issubdtype(v.dtype, np.floating))
    nnx.update(flax, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), floats))
    jax_checkpoint.import_arrays(flax, layout.torch_to_flax(torch_state(model)))
    return flax


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def flax_state(model: jax_model.VQVAE) -> dict[str, np.ndarray]:
    return layout.flax_to_torch(jax_checkpoint.export_arrays(model))


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


def torch_grads(model: torch_model.VQVAE, x: torch.Tensor
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(gradient of every parameter, the code indices of that forward pass)."""
    model = copy.deepcopy(model)  # train mode updates the running stats; keep the caller's
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.losses["loss"].backward()
    grads = {k: p.grad.cpu().numpy() for k, p in model.named_parameters() if p.requires_grad}
    return grads, out.indices.cpu().numpy()


def flax_grads(model: jax_model.VQVAE, x: jax.Array) -> dict[str, np.ndarray]:
    model = nnx.clone(model)
    model.train()
    grads = nnx.grad(lambda m: m(x).losses["loss"])(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    as_torch = flax_state(nnx.merge(graphdef, grads, rest))
    return {k: as_torch[k] for k in torch_state_params(model)}


def torch_state_params(model: jax_model.VQVAE) -> list[str]:
    """PyTorch names of the trainable parameters (the nnx.Params: not the BatchNorm
    statistics, not the code usage)."""
    return list(layout.flax_to_torch(jax_checkpoint.export_arrays(model, nnx.Param)))


def train_torch(model: torch_model.VQVAE, batches: list[np.ndarray], lr: float,
                device: torch.device, schedule: str = "constant"
                ) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    """vqvae_torch.train's step, in place on `model`, at the rates of `schedule` over the
    batches: each step's loss terms and code indices."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history, indices = [], []
    hook = model.quantizer.register_forward_hook(
        lambda module, args, out: indices.append(out.indices.cpu().numpy()))
    try:
        for step, batch in enumerate(batches):
            torch_train.set_learning_rate(
                optimizer, float(learning_rate(step, lr, schedule, len(batches))))
            losses = torch_train.train_step(model, optimizer, to_tensor(batch, device))
            history.append({k: v.item() for k, v in losses.items()})
    finally:
        hook.remove()
    return history, indices


def train_flax(model: jax_model.VQVAE, batches: list[np.ndarray], references: list[np.ndarray],
               lr: float, device: jax.Device, audit: Audit, schedule: str = "constant"
               ) -> tuple[jax_model.VQVAE, list[dict[str, float]]]:
    """vqvae_jax.train's jitted step from `model`'s weights, at the rates of `schedule` over
    the batches, step i following the code indices references[i]: the trained copy, and
    each step's loss terms."""
    model = nnx.clone(model)
    model.train()
    optimizer = nnx.Optimizer(model, jax_train.adam(lr, schedule, len(batches)), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state = jax.device_put(state, device)  # committed, as the step's outputs: else step 2
    #                                        compiles the step again (1.8 s)

    @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options(device))
    def step(state: nnx.State, batch: jax.Array, reference: jax.Array, number: jax.Array):
        with follow(reference, audit, number):  # active while tracing: each call follows its own
            return jax_train.train_step(graphdef, state, batch)

    history = []
    for number, (batch, reference) in enumerate(zip(batches, references, strict=True)):
        state, losses = step(state, jax.device_put(batch, device), reference, number)
        history.append({k: float(v) for k, v in losses.items()})
    trained, _ = nnx.merge(graphdef, state)
    return trained, history
