"""The Flax twin of the prior's training step and sampler, and the prior twin that
vqvae_common.loop.fit drives with vqvae_common.prior.PriorTask. Mirrors
vqvae_torch/prior_train.py.

The step is one pure jitted function of (state, codes, labels) -> (state, losses), with the
old state's buffers donated; the sampler one jitted fori_loop over the positions.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from vqvae_common import layout
from vqvae_common import prior as common
from vqvae_common.checkpoint_record import CHECKPOINT_NAMES, CheckpointRecord
from vqvae_common.config import TrainConfig
from vqvae_common.prior import PriorConfig
from vqvae_jax import checkpoint
from vqvae_jax.prior import PixelCNN, nll, sample
from vqvae_jax.train import JaxTwin, adam, select_device


def create(config: PriorConfig, lr: float, seed: int, schedule: str = "constant",
           total_steps: int | None = None) -> tuple[PixelCNN, nnx.Optimizer]:
    model = PixelCNN(config, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, adam(lr, schedule, total_steps), wrt=nnx.Param)


def train_step(graphdef: nnx.GraphDef, state: nnx.State, codes: jax.Array, labels: jax.Array
               ) -> tuple[nnx.State, dict[str, jax.Array]]:
    """One Adam step on the NLL of a batch of code maps."""
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: nll(m(codes, labels), codes))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {"loss": loss}


def eval_nll(graphdef: nnx.GraphDef, state: nnx.State, codes: jax.Array, labels: jax.Array
             ) -> jax.Array:
    model, _ = nnx.merge(graphdef, state)
    return nll(model(codes, labels), codes)


def sample_codes(graphdef: nnx.GraphDef, state: nnx.State, labels: jax.Array,
                 gumbel: jax.Array) -> jax.Array:
    model, _ = nnx.merge(graphdef, state)
    return sample(model, labels, gumbel)


def vqvae_fingerprint(vqvae: JaxTwin) -> str:
    """vqvae_common.prior.fingerprint of the VQ-VAE's weights, in PyTorch's convention."""
    model, _ = nnx.merge(vqvae.graphdef, vqvae.state)
    return common.fingerprint(layout.flax_to_torch(checkpoint.export_arrays(model)))


class JaxPriorTwin:
    """A gated PixelCNN and its Adam as one nnx.State on one device, stepped by one jitted
    call that donates it, over the codes of a frozen JaxTwin VQ-VAE; checkpoints are an
    orbax directory."""

    checkpoint_name = CHECKPOINT_NAMES[("jax", "prior")]
    has_checkpoint = staticmethod(checkpoint.has_checkpoint)
    remove_partial_checkpoints = staticmethod(checkpoint.remove_partial_writes)

    def __init__(self, prior_cfg: PriorConfig, train_cfg: TrainConfig,
                 total_steps: int | None = None) -> None:
        self.device = select_device(train_cfg.device)
        self.vqvae = JaxTwin.from_checkpoint(prior_cfg.vqvae, train_cfg.device)
        self.config = common.complete(prior_cfg, self.vqvae.config, train_cfg.dataset,
                                      vqvae_fingerprint(self.vqvae))
        self.num_devices, self.device_kind = 1, self.vqvae.device_kind
        self.lr_schedule = train_cfg.lr_schedule
        with jax.default_device(self.device):
            self.graphdef, state = nnx.split(create(self.config, train_cfg.lr, train_cfg.seed,
                                                    train_cfg.lr_schedule, total_steps))
        self.state = jax.device_put(state, self.device)
        self._train_step = jax.jit(functools.partial(train_step, self.graphdef),
                                   donate_argnums=0)
        self._eval_nll = jax.jit(functools.partial(eval_nll, self.graphdef))
        self._sample = jax.jit(functools.partial(sample_codes, self.graphdef))

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", vqvae: str | None = None
                        ) -> "JaxPriorTwin":
        """The prior saved in `path`, over the VQ-VAE it records (or `vqvae`), ready to
        sample."""
        record = checkpoint.read_record(path, kind="prior")
        recorded = record.model_config
        config = common.decoding_vqvae(recorded, vqvae, path)
        twin = cls(config, TrainConfig(device=device, dataset=config.dataset,
                                       lr_schedule=record.lr_schedule))
        _, state = checkpoint.load(path, recorded, twin.state, kind="prior")
        twin.state = jax.device_put(state, twin.device)
        return twin

    def _put(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        codes, labels = batch
        return (jax.device_put(np.asarray(codes, np.int32), self.device),
                jax.device_put(np.asarray(labels, np.int32), self.device))

    def codes(self, images: np.ndarray) -> np.ndarray:
        return self.vqvae.evaluate(images)[1].astype(np.int32)

    def train_step(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, jax.Array]:
        self.state, losses = self._train_step(self.state, *self._put(batch))
        return losses

    def fetch(self, step_metrics: dict[str, jax.Array]) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(step_metrics).items()}

    def evaluate(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        return {"loss": float(self._eval_nll(self.state, *self._put(batch)))}

    def sample(self, labels: np.ndarray, gumbel: np.ndarray) -> np.ndarray:
        labels_d = jax.device_put(np.asarray(labels, np.int32), self.device)
        return np.asarray(self._sample(self.state, labels_d, jax.device_put(gumbel, self.device)))

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return self.vqvae.decode_codes(codes)

    def save(self, path: str, step: int) -> None:
        record = CheckpointRecord("jax", self.config, step, kind="prior",
                                  lr_schedule=self.lr_schedule)
        checkpoint.save(path, step, self.state, record.to_dict())

    def load(self, path: str) -> int:
        checkpoint.read_record(path, kind="prior").check_resumable(path, self.lr_schedule)
        record, state = checkpoint.load(path, self.config, self.state, kind="prior")
        self.state = jax.device_put(state, self.device)
        return record.step
