"""The Flax twin of the training step: device choice, the jitted Adam step, evaluation, and
the `Twin` interface that vqvae_common.loop.fit drives. Mirrors vqvae_torch/train.py.

The step is one pure jitted function of (state, batch) -> (state, losses), optimizer update
included, with the old state's buffers donated; the losses stay on the device until the
loop fetches them at its logging cadence.

Data-parallel over N devices with JAX's own engine: a Mesh of the devices with one axis,
"data"; the global batch is sharded along it (NamedSharding(mesh, P("data"))), the model
and optimizer state are replicated, and the same jitted step runs. Written for the global
batch, every batch statistic in it (BatchNorm's mean and variance, code usage, the EMA
averages, the rows a dead code restarts onto) stays one over the global batch: XLA inserts
the cross-device reductions, so an N-device step is the 1-device step's function.
Several hosts: each process joins with jax.distributed.initialize() (join_processes) and
hands in its share of the global batch.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqvae_common import data
from vqvae_common.checkpoint_record import CHECKPOINT_NAMES, CheckpointRecord
from vqvae_common.config import ModelConfig, TrainConfig, check_global_batch, learning_rate
from vqvae_common.errors import UserError
from vqvae_jax import checkpoint, xla_cpu
from vqvae_jax.model import VQVAE, Output


def select_device(name: str) -> jax.Device:
    """auto -> JAX's default backend (an accelerator when present); 'cuda' is accepted as gpu."""
    if name == "auto":
        return jax.devices()[0]
    if name not in ("cpu", "gpu", "cuda", "tpu"):
        raise UserError(f"unknown --device {name!r}: choose auto, cpu, cuda, gpu or tpu")
    try:
        return jax.devices("gpu" if name == "cuda" else name)[0]
    except RuntimeError as e:
        raise UserError(f"--device {name}: JAX sees no such device here") from e


def select_devices(name: str, count: int | None) -> list[jax.Device]:
    """The devices one step runs on: the first `count` (None: every one) of --device's kind,
    over all processes."""
    first = select_device(name)
    devices = jax.devices(first.platform)
    if count is not None and count > len(devices):
        raise UserError(f"--num-devices {count}: JAX sees {len(devices)} {first.platform} "
                        f"device(s) here")
    return devices[:count]


def adam(lr: float, schedule: str = "constant", total_steps: int | None = None
         ) -> optax.GradientTransformation:
    """Adam at vqvae_common.config.learning_rate's rate, traced from optax's step count. A
    constant rate stays a plain float, so that its optimizer state (and so its checkpoints,
    those from before the flag included) has no step count of the schedule's; the state's
    shape depends on `schedule` alone (total_steps None: the rate stays lr)."""
    if schedule == "constant":
        return optax.adam(lr)
    return optax.adam(lambda step: learning_rate(step, lr, schedule, total_steps, jnp))


def create(model_cfg: ModelConfig, lr: float, seed: int, fast_cpu: bool | None = None,
           schedule: str = "constant", total_steps: int | None = None
           ) -> tuple[VQVAE, nnx.Optimizer]:
    model = VQVAE(model_cfg, fast_cpu=fast_cpu, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, adam(lr, schedule, total_steps), wrt=nnx.Param)


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: jax.Array
               ) -> tuple[nnx.State, dict[str, jax.Array]]:
    """One Adam step on `batch` in train mode (batch statistics; running stats and code usage
    updated), then the dead codes restarted from this batch's encoder outputs."""
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model: VQVAE):
        out = model(batch)
        return out.losses["loss"], out

    grads, out = nnx.grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    model.quantizer.restart_dead_codes(out.z_e)
    return nnx.state((model, optimizer)), out.losses


def train_steps(graphdef: nnx.GraphDef, state: nnx.State, batches: jax.Array,
                unroll: bool = False) -> tuple[nnx.State, dict[str, jax.Array]]:
    """len(batches) train_steps in one compiled call, a lax.scan over batches (k, B, H, W, C)
    already on the device: the state after the last, and the last step's losses.

    unroll: the k steps as straight-line code instead of a loop, for XLA's CPU backend. In a
    loop's body it leaves the convolutions' kernel gradients in a layout that only its naive
    convolution emitter takes (XLA's per-op trace: 0.2-0.9 s each against milliseconds
    outside a loop); MNIST preset, k = 4, 2-core Zen 5: 3.7 s a step rolled, 84 ms unrolled,
    85 ms as single steps. The price is compile time, which grows with k."""
    state, losses = jax.lax.scan(functools.partial(train_step, graphdef), state, batches,
                                 unroll=unroll)
    return state, jax.tree.map(lambda terms: terms[-1], losses)


def encode_batch_statistics(graphdef: nnx.GraphDef, state: nnx.State, batch: jax.Array
                            ) -> jax.Array:
    """The encoder's train-mode output; the running stats it moves belong to a discarded
    copy of the model."""
    model, _ = nnx.merge(graphdef, state)
    model.train()
    return model.encoder(batch)


def eval_forward(graphdef: nnx.GraphDef, state: nnx.State, batch: jax.Array) -> Output:
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model(batch)


def encode(graphdef: nnx.GraphDef, state: nnx.State, batch: jax.Array) -> jax.Array:
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model.encoder(batch)


def decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array) -> jax.Array:
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model.decoder(model.quantizer(latents).z_q)


def decode_codes(graphdef: nnx.GraphDef, state: nnx.State, codes: jax.Array) -> jax.Array:
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model.decoder(model.quantizer.codebook[...][codes])


def to_host(x: jax.Array) -> np.ndarray:
    """All of a global array as numpy, in every process (np.asarray alone sees only this
    host's devices' part when the run spans several hosts)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True)
                      if jax.process_count() > 1 else x)


class JaxTwin:
    """vqvae_common.loop's Twin in Flax: one nnx.State of (model, optimizer), replicated over
    the run's devices, stepped by one jitted call that donates it on batches sharded over
    them; checkpoints are an orbax directory."""

    checkpoint_name = CHECKPOINT_NAMES[("jax", "vqvae")]
    has_checkpoint = staticmethod(checkpoint.has_checkpoint)
    remove_partial_checkpoints = staticmethod(checkpoint.remove_partial_writes)

    @staticmethod
    def join_processes(train_cfg: TrainConfig) -> tuple[int, int]:
        """Several hosts: with JAX_COORDINATOR_ADDRESS set (JAX_NUM_PROCESSES and
        JAX_PROCESS_ID too, outside Slurm, Open MPI and TPU pods, which JAX reads itself),
        this process joins the others first."""
        if "JAX_COORDINATOR_ADDRESS" in os.environ and not jax.distributed.is_initialized():
            number = os.environ.get("JAX_NUM_PROCESSES")
            index = os.environ.get("JAX_PROCESS_ID")
            jax.distributed.initialize(num_processes=number and int(number),
                                       process_id=index and int(index))
        return jax.process_index(), jax.process_count()

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 total_steps: int | None = None) -> None:
        """total_steps: the run's optimizer steps, over which --lr-schedule moves the rate."""
        devices = select_devices(train_cfg.device, train_cfg.num_devices)
        check_global_batch(train_cfg.batch_size, len(devices), "devices")
        self.device = devices[0]
        self.num_devices, self.device_kind = len(devices), self.device.device_kind
        mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P("data"))  # along the batch axis
        self.config, self.lr_schedule = model_cfg, train_cfg.lr_schedule
        with jax.default_device(self.device):
            self.graphdef, state = nnx.split(create(
                model_cfg, train_cfg.lr, train_cfg.seed, fast_cpu=self.device.platform == "cpu",
                schedule=train_cfg.lr_schedule, total_steps=total_steps))
        # committed to the devices, like the step's outputs: an uncommitted first state
        # compiled the step a second time at step 2 (4.8 s on a 2-core CPU)
        self.state = jax.device_put(state, self.replicated)
        jit = functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options(self.device))
        self._train_step = jit(functools.partial(train_step, self.graphdef), donate_argnums=0)
        self.steps_per_call = train_cfg.steps_per_call
        self._train_steps = jit(functools.partial(
            train_steps, self.graphdef, unroll=self.device.platform == "cpu"), donate_argnums=0)
        self._eval_forward = jit(functools.partial(eval_forward, self.graphdef))
        self._encode = jit(functools.partial(encode, self.graphdef))
        self._decode = jit(functools.partial(decode, self.graphdef))
        self._decode_codes = jit(functools.partial(decode_codes, self.graphdef))

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto") -> "JaxTwin":
        """The model saved in `path` (any Flax checkpoint of this project, converted ones
        included), ready to evaluate."""
        # one device: evaluation needs no data parallelism, nor a batch that splits over many
        record = checkpoint.read_record(path)
        twin = cls(record.model_config,
                   TrainConfig(device=device, num_devices=1, lr_schedule=record.lr_schedule))
        _, state = checkpoint.load(path, twin.config, twin.state)
        twin.state = jax.device_put(state, twin.replicated)
        return twin

    def _put(self, batch: np.ndarray) -> jax.Array:
        """The global batch as one array over the run's devices: sharded along the batch
        when it splits evenly (every training batch), else replicated (a last, smaller
        evaluation batch)."""
        data.check_floats(batch)
        if len(batch) % self.num_devices:
            return self._assemble(batch, self.replicated, None)
        return self._assemble(batch, self.sharded, 0)

    def _assemble(self, array: np.ndarray, sharding: NamedSharding, batch_axis: int | None
                  ) -> jax.Array:
        """`array`, whole in every process, as one jax.Array with `sharding`: each process
        hands in its own rows along batch_axis (None: all of it, replicated)."""
        rows = [slice(None)] * array.ndim
        if batch_axis is not None:
            share = array.shape[batch_axis] // jax.process_count()
            rows[batch_axis] = slice(jax.process_index() * share,
                                     (jax.process_index() + 1) * share)
        return jax.make_array_from_process_local_data(sharding, array[tuple(rows)], array.shape)

    def initialize_codebook(self, images: np.ndarray, seed: int, iterations: int,
                            show_progress: bool = True) -> None:
        z_e = jax.jit(functools.partial(encode_batch_statistics, self.graphdef))(
            self.state, self._put(images))
        model, optimizer = nnx.merge(self.graphdef, self.state)
        model.quantizer.initialize_kmeans(to_host(z_e), seed, iterations, show_progress)
        self.state = jax.device_put(nnx.state((model, optimizer)), self.replicated)

    def train_step(self, batch: np.ndarray) -> dict[str, jax.Array]:
        self.state, losses = self._train_step(self.state, self._put(batch))
        return losses

    def train_steps(self, batches: list[np.ndarray]) -> dict[str, jax.Array]:
        host = np.stack(batches)  # (k, B, H, W, C)
        data.check_floats(host)
        stacked = self._assemble(host,  # sharded along B
                                 NamedSharding(self.sharded.mesh, P(None, "data")), 1)
        self.state, losses = self._train_steps(self.state, stacked)
        return losses

    def fetch(self, step_metrics: dict[str, jax.Array]) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(step_metrics).items()}

    def evaluate(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        out = self._eval_forward(self.state, self._put(batch))
        return to_host(out.recon), to_host(out.indices), self.fetch(out.losses)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        return to_host(self._encode(self.state, self._put(batch)))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return to_host(self._decode(self.state, self._put(latents)))

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        # integer indices: not _put's, which takes float images and latents only
        return to_host(self._decode_codes(self.state, self._assemble(
            np.asarray(codes, np.int32), self.replicated, None)))

    def save(self, path: str, step: int) -> None:
        record = CheckpointRecord("jax", self.config, step, lr_schedule=self.lr_schedule)
        checkpoint.save(path, step, self.state, record.to_dict())

    def load(self, path: str) -> int:
        checkpoint.read_record(path).check_resumable(path, self.lr_schedule)  # before the
        #   restore, which a state of another shape would fail less clearly
        record, state = checkpoint.load(path, self.config, self.state)
        self.state = jax.device_put(state, self.replicated)
        return record.step

    def init_weights(self, path: str) -> None:
        checkpoint.read_record(path).check_config(self.config, path)
        source = type(self).from_checkpoint(path, self.device.platform)
        model, optimizer = nnx.merge(self.graphdef, self.state)
        checkpoint.import_arrays(model, checkpoint.export_arrays(
            nnx.merge(source.graphdef, source.state)[0]))
        self.state = jax.device_put(nnx.state((model, optimizer)), self.replicated)
