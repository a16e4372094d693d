"""One adapter per twin, so that tests/test_model.py and tests/test_train.py state each
property once, for both twins, through the `twin` fixture (tests/conftest.py).

An adapter speaks numpy in the NHWC layout of the `Twin` interface and hides what differs:
NCHW tensors or NHWC arrays, train and eval modes, how a gradient is taken, how module,
optimizer and checkpoint state is read and written. Modules are the twins' own
(vqvae_{torch,jax}/model.py); outputs come back as the same NamedTuples, holding numpy.
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
from vqvae_jax import model as jax_model
from vqvae_jax.train import JaxTwin
from vqvae_jax.train import select_device as jax_select_device
from vqvae_torch import checkpoint as torch_checkpoint
from vqvae_torch import model as torch_model
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


def _to_numpy(value: Any, array: Any) -> Any:
    """`value` (a tensor or array, or a NamedTuple, tuple or dict of them) with each leaf
    through `array`."""
    if isinstance(value, dict):
        return {k: _to_numpy(v, array) for k, v in value.items()}
    if isinstance(value, tuple):
        return type(value)(*(_to_numpy(v, array) for v in value))
    return array(value)


def _vectors_second(z: np.ndarray) -> torch.Tensor:
    """Channels-last z (B, ..., D) as PyTorch's layers lay it out: (B, D, ...)."""
    return torch.tensor(z, dtype=torch.float32).movedim(-1, 1)


def _torch_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return to_numpy(t) if t.ndim == 4 else t.cpu().numpy()


class TorchAdapter:
    name, other, framework_name = "torch", "jax", "PyTorch"
    Twin = TorchTwin
    index_dtype = np.int64
    select_device = staticmethod(torch_select_device)
    # no device of these names here: `select_device` must say so
    missing_device = "no CUDA device|unknown --device"
    restart_tolerance = {"rtol": 1e-6}

    # --- modules --------------------------------------------------------------------------

    def vqvae(self, config: ModelConfig, seed: int = 0) -> torch_model.VQVAE:
        torch.manual_seed(seed)
        return torch_model.VQVAE(config)

    def residual_block(self, dim: int, seed: int = 0) -> torch_model.ResidualBlock:
        torch.manual_seed(seed)
        return torch_model.ResidualBlock(dim)

    def quantizer(self, num_codes: int, dim: int, codebook: Any = None, seed: int = 0,
                  **options: float) -> torch_model.VectorQuantizer:
        torch.manual_seed(seed)
        vq = torch_model.VectorQuantizer(num_codes, dim, **options)
        if codebook is not None:
            vq.set_codebook(torch.tensor(codebook, dtype=torch.float32))
        return vq

    def apply(self, module: torch.nn.Module, x: np.ndarray, train: bool = False) -> Any:
        """module(x) in train or eval mode, NHWC numpy in and out."""
        return self.apply_reading_input(module, x, train)[0]

    def apply_reading_input(self, module: torch.nn.Module, x: np.ndarray, train: bool = False
                            ) -> tuple[Any, np.ndarray]:
        """(module(x), the input as the module left it)."""
        x_t = to_tensor(np.asarray(x, np.float32), CPU)
        with torch.no_grad():
            out = module.train(train)(x_t)
        return _to_numpy(out, _torch_numpy), to_numpy(x_t)

    def nearest_codes(self, flat: np.ndarray, codebook: np.ndarray) -> np.ndarray:
        return torch_model.nearest_codes(torch.tensor(flat), torch.tensor(codebook)).numpy()

    def gradients(self, vq: torch_model.VectorQuantizer, z_e: np.ndarray, output: str,
                  cotangent: np.ndarray | None = None) -> tuple[Any, Any]:
        """The gradients of the quantizer's `output` (a field of Quantized) with respect to
        (codebook, z_e), pulled back from `cotangent` (1 for a scalar output); None where
        no gradient reaches."""
        z = to_tensor(np.asarray(z_e, np.float32), CPU).requires_grad_()
        vq.codebook.grad = None
        out = getattr(vq.eval()(z), output)
        out.backward(torch.ones(()) if cotangent is None else to_tensor(cotangent, CPU))
        grads = vq.codebook.grad, z.grad
        return tuple(None if g is None else _torch_numpy(g) for g in grads)

    def no_gradient(self, grad: Any) -> bool:
        """No gradient reached: the tensor is not in the graph at all."""
        return grad is None

    def restart_dead_codes(self, vq: torch_model.VectorQuantizer, z_e: np.ndarray) -> None:
        vq.restart_dead_codes(to_tensor(np.asarray(z_e, np.float32), CPU))

    def quantize_any_rank(self, vq: torch_model.VectorQuantizer, z: np.ndarray) -> Any:
        """vq on channels-last z (B, ..., D) of any rank, handed over as PyTorch's layers lay
        it out, (B, D, ...); its output channels-last again."""
        with torch.no_grad():
            out = vq.eval()(_vectors_second(z))
        return _to_numpy(out._replace(z_q=out.z_q.movedim(1, -1)), lambda t: t.numpy())

    def restart_any_rank(self, vq: torch_model.VectorQuantizer, z: np.ndarray) -> None:
        """vq's dead codes restarted from channels-last z of any rank, as quantize_any_rank."""
        vq.restart_dead_codes(_vectors_second(z))

    def codebook(self, vq: torch_model.VectorQuantizer) -> np.ndarray:
        return vq.codebook.detach().numpy().copy()

    def usage(self, vq: torch_model.VectorQuantizer) -> np.ndarray:
        return vq.usage.numpy().copy()

    def ema_state(self, vq: torch_model.VectorQuantizer) -> tuple[np.ndarray, np.ndarray]:
        """(counts (K,), sums (K, D)) of an EMA codebook."""
        return vq.ema_counts.numpy().copy(), vq.ema_sums.numpy().copy()

    def learns_by_gradient(self, vq: torch_model.VectorQuantizer) -> bool:
        """Whether the optimizer moves the codebook."""
        return vq.codebook.requires_grad

    def initialize_kmeans(self, vq: torch_model.VectorQuantizer, z_e: np.ndarray, seed: int,
                          iterations: int) -> None:
        vq.initialize_kmeans(to_tensor(np.asarray(z_e, np.float32), CPU), seed, iterations)

    def set_usage(self, vq: torch_model.VectorQuantizer, usage: Any) -> None:
        vq.usage.copy_(torch.tensor(usage))

    def set_running_statistics(self, bn: torch.nn.BatchNorm2d, mean: np.ndarray,
                               var: np.ndarray) -> None:
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))

    @torch.no_grad()
    def residual_branch(self, block: torch_model.ResidualBlock, x: np.ndarray) -> np.ndarray:
        """F(x) = BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))), written out from the block's parts."""
        x = to_tensor(np.asarray(x, np.float32), CPU)
        return to_numpy(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(torch.relu(x)))))))

    def convolutions(self, model: torch_model.VQVAE) -> list[tuple[np.ndarray, np.ndarray]]:
        """(kernel (kh, kw, a, b) with a, b its channel axes, bias) of every convolution."""
        return [(m.weight.detach().permute(2, 3, 0, 1).numpy(), m.bias.detach().numpy())
                for m in model.modules() if isinstance(m, (torch.nn.Conv2d,
                                                           torch.nn.ConvTranspose2d))]

    def encoder_kernel(self, model: torch_model.VQVAE) -> np.ndarray:
        return model.encoder.conv1.weight.detach().numpy().copy()

    def batch_norm_count(self, model: torch_model.VQVAE) -> int:
        """Train steps seen by the encoder's first BatchNorm."""
        return int(model.encoder.bn1.num_batches_tracked)

    # --- twins (vqvae_torch/train.py) and checkpoints --------------------------------------

    def make(self, seed: int = 0, model: ModelConfig = MODEL) -> TorchTwin:
        return TorchTwin(model, TrainConfig(device="cpu", seed=seed))

    def model_of(self, twin: TorchTwin) -> torch_model.VQVAE:
        return twin.model

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
        return self.apply(copy.deepcopy(twin.model).encoder, batch, train=True)

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


def _set_mode(module: nnx.Module, train: bool) -> nnx.Module:
    if train:
        module.train()
    else:
        module.eval()
    return module


class JaxAdapter:
    """The twin's state is one nnx.State of (model, optimizer): state[0] holds the parameters
    and the BatchNorm statistics (mean, var, count), state[1] Adam's moments and step count.
    Modules take their default path (vqvae_jax.model.use_fast_cpu)."""
    name, other, framework_name = "jax", "torch", "Flax"
    Twin = JaxTwin
    index_dtype = np.int32
    select_device = staticmethod(jax_select_device)
    missing_device = "no such device"
    restart_tolerance = {"rtol": 1e-5, "atol": 1e-6}

    # --- modules --------------------------------------------------------------------------

    def vqvae(self, config: ModelConfig, seed: int = 0) -> jax_model.VQVAE:
        return jax_model.VQVAE(config, rngs=nnx.Rngs(seed))

    def residual_block(self, dim: int, seed: int = 0) -> jax_model.ResidualBlock:
        return jax_model.ResidualBlock(dim, rngs=nnx.Rngs(seed))

    def quantizer(self, num_codes: int, dim: int, codebook: Any = None, seed: int = 0,
                  **options: float) -> jax_model.VectorQuantizer:
        vq = jax_model.VectorQuantizer(num_codes, dim, **options, rngs=nnx.Rngs(seed))
        if codebook is not None:
            vq.set_codebook(jnp.asarray(codebook, jnp.float32))
        return vq

    def apply(self, module: nnx.Module, x: np.ndarray, train: bool = False) -> Any:
        """module(x) in train or eval mode, NHWC numpy in and out."""
        return self.apply_reading_input(module, x, train)[0]

    def apply_reading_input(self, module: nnx.Module, x: np.ndarray, train: bool = False
                            ) -> tuple[Any, np.ndarray]:
        """(module(x), the input as the module left it: arrays are immutable). Compiled as one
        function: op by op, a preset model's forward took 5-6 s of small compiles."""
        x = jnp.asarray(x, jnp.float32)
        out = nnx.jit(lambda m, x: m(x))(_set_mode(module, train), x)
        return _to_numpy(out, np.asarray), np.asarray(x)

    def nearest_codes(self, flat: np.ndarray, codebook: np.ndarray) -> np.ndarray:
        return np.asarray(jax_model.nearest_codes(jnp.asarray(flat), jnp.asarray(codebook)))

    def gradients(self, vq: jax_model.VectorQuantizer, z_e: np.ndarray, output: str,
                  cotangent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The gradients of the quantizer's `output` (a field of Quantized) with respect to
        (codebook, z_e), pulled back from `cotangent` (1 for a scalar output): a pure
        function of the codebook and z_e in eval mode, which leaves the usage alone."""
        graphdef, params, rest = nnx.split(_set_mode(vq, False), nnx.Param, ...)
        out, vjp = jax.vjp(lambda p, z: getattr(nnx.merge(graphdef, p, rest)(z), output),
                           params, jnp.asarray(z_e, jnp.float32))
        codebook_grad, z_grad = vjp(jnp.ones_like(out) if cotangent is None
                                    else jnp.asarray(cotangent))
        (codebook_grad,) = jax.tree.leaves(codebook_grad)
        return np.asarray(codebook_grad), np.asarray(z_grad)

    def no_gradient(self, grad: np.ndarray) -> bool:
        """No gradient reached: autodiff gives zeros."""
        return not grad.any()

    def restart_dead_codes(self, vq: jax_model.VectorQuantizer, z_e: np.ndarray) -> None:
        vq.restart_dead_codes(jnp.asarray(z_e, jnp.float32))

    def quantize_any_rank(self, vq: jax_model.VectorQuantizer, z: np.ndarray) -> Any:
        """vq on channels-last z (..., D) of any rank, as Flax's layers lay it out already."""
        return self.apply(vq, z)

    def restart_any_rank(self, vq: jax_model.VectorQuantizer, z: np.ndarray) -> None:
        self.restart_dead_codes(vq, z)  # any rank already

    def codebook(self, vq: jax_model.VectorQuantizer) -> np.ndarray:
        return np.array(vq.codebook[...])

    def usage(self, vq: jax_model.VectorQuantizer) -> np.ndarray:
        return np.array(vq.usage[...])

    def ema_state(self, vq: jax_model.VectorQuantizer) -> tuple[np.ndarray, np.ndarray]:
        """(counts (K,), sums (K, D)) of an EMA codebook."""
        return np.array(vq.ema_counts[...]), np.array(vq.ema_sums[...])

    def learns_by_gradient(self, vq: jax_model.VectorQuantizer) -> bool:
        """Whether the optimizer (nnx.Optimizer(wrt=nnx.Param)) moves the codebook."""
        return isinstance(vq.codebook, nnx.Param)

    def initialize_kmeans(self, vq: jax_model.VectorQuantizer, z_e: np.ndarray, seed: int,
                          iterations: int) -> None:
        vq.initialize_kmeans(jnp.asarray(z_e, jnp.float32), seed, iterations)

    def set_usage(self, vq: jax_model.VectorQuantizer, usage: Any) -> None:
        vq.usage[...] = jnp.asarray(usage, jnp.float32)

    def set_running_statistics(self, bn: jax_model.BatchNorm, mean: np.ndarray,
                               var: np.ndarray) -> None:
        bn.mean[...] = jnp.asarray(mean, jnp.float32)
        bn.var[...] = jnp.asarray(var, jnp.float32)

    def residual_branch(self, block: jax_model.ResidualBlock, x: np.ndarray) -> np.ndarray:
        """F(x) = BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))), written out from the block's parts."""
        x = jnp.asarray(x, jnp.float32)
        relu = jax.nn.relu
        return np.asarray(block.bn2(block.conv2(relu(block.bn1(block.conv1(relu(x)))))))

    def convolutions(self, model: jax_model.VQVAE) -> list[tuple[np.ndarray, np.ndarray]]:
        """(kernel (kh, kw, a, b) with a, b its channel axes, bias) of every convolution."""
        return [(np.asarray(m.kernel[...]), np.asarray(m.bias[...]))
                for _, m in nnx.iter_modules(model)
                if isinstance(m, (nnx.Conv, jax_model.ConvTranspose))]

    def encoder_kernel(self, model: jax_model.VQVAE) -> np.ndarray:
        return np.array(model.encoder.conv1.kernel[...])

    def batch_norm_count(self, model: jax_model.VQVAE) -> int:
        """Train steps seen by the encoder's first BatchNorm."""
        return int(model.encoder.bn1.count[...])

    # --- twins (vqvae_jax/train.py) and checkpoints ----------------------------------------

    def make(self, seed: int = 0, model: ModelConfig = MODEL) -> JaxTwin:
        return JaxTwin(model, TrainConfig(device="cpu", seed=seed))

    def model_of(self, twin: JaxTwin) -> jax_model.VQVAE:
        """A copy of the twin's model: changing it leaves the twin alone (nnx.merge alone
        would not: the merged model shares the state's variables)."""
        return nnx.clone(nnx.merge(twin.graphdef, twin.state)[0])

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
        return self.apply(self.model_of(twin).encoder, batch, train=True)

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
        jax_checkpoint.save(path, step, twin.state, record("jax", step, weights_only=True,
                                                           lr_schedule=twin.lr_schedule))


ADAPTERS = {"torch": TorchAdapter(), "jax": JaxAdapter()}
