"""The PyTorch twin of the prior's training step and sampler, and the prior twin that
vqvae_common.loop.fit drives with vqvae_common.prior.PriorTask. Mirrors
vqvae_jax/prior_train.py."""
from __future__ import annotations

import numpy as np
import torch

from vqvae_common import prior as common
from vqvae_common.checkpoint_record import CHECKPOINT_NAMES, CheckpointRecord
from vqvae_common.config import TrainConfig
from vqvae_common.prior import PriorConfig
from vqvae_torch import checkpoint
from vqvae_torch.prior import PixelCNN, nll, sample
from vqvae_torch.train import (TorchTwin, caller_state_kept, deterministic, scheduled_rate,
                               select_device, set_learning_rate)


def train_step(model: PixelCNN, optimizer: torch.optim.Optimizer, codes: torch.Tensor,
               labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Adam step on the NLL of a batch of code maps."""
    model.train()
    loss = nll(model(codes, labels), codes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


def vqvae_fingerprint(vqvae: TorchTwin) -> str:
    """vqvae_common.prior.fingerprint of the VQ-VAE's weights."""
    return common.fingerprint(checkpoint.export_arrays(vqvae.model))


class TorchPriorTwin:
    """A gated PixelCNN and its Adam on one device, stepped eagerly, over the codes of a
    frozen TorchTwin VQ-VAE; checkpoints are one file."""

    checkpoint_name = CHECKPOINT_NAMES[("torch", "prior")]
    has_checkpoint = staticmethod(checkpoint.has_checkpoint)
    remove_partial_checkpoints = staticmethod(checkpoint.remove_partial_writes)

    def __init__(self, prior_cfg: PriorConfig, train_cfg: TrainConfig,
                 total_steps: int | None = None) -> None:
        self.device = select_device(train_cfg.device)
        deterministic()
        self.vqvae = TorchTwin.from_checkpoint(prior_cfg.vqvae, train_cfg.device)
        self.config = common.complete(prior_cfg, self.vqvae.config, train_cfg.dataset,
                                      vqvae_fingerprint(self.vqvae))
        self.num_devices, self.device_kind = 1, self.vqvae.device_kind
        torch.default_generator.manual_seed(train_cfg.seed)  # initialised on the CPU
        self.model = PixelCNN(self.config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr)
        self.lr_schedule = train_cfg.lr_schedule
        self.learning_rate = scheduled_rate(train_cfg, total_steps)
        self.step = 0  # steps taken, counted from the checkpoint resumed

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", vqvae: str | None = None
                        ) -> "TorchPriorTwin":
        """The prior saved in `path`, over the VQ-VAE it records (or `vqvae`), ready to
        sample: in eval mode, PyTorch's global state left as it was."""
        record, payload = checkpoint.load(path, select_device(device), kind="prior")
        config = common.decoding_vqvae(record.model_config, vqvae, path)
        with caller_state_kept():
            twin = cls(config, TrainConfig(device=device, dataset=config.dataset))
        checkpoint.load_weights(twin.model, payload["model"], path)
        twin.model.eval()
        return twin

    def _put(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        codes, labels = batch
        return (torch.from_numpy(np.asarray(codes, np.int64)).to(self.device),
                torch.from_numpy(np.asarray(labels, np.int64)).to(self.device))

    def codes(self, images: np.ndarray) -> np.ndarray:
        return self.vqvae.evaluate(images)[1].astype(np.int32)

    def train_step(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        set_learning_rate(self.optimizer, float(self.learning_rate(self.step)))
        self.step += 1
        return train_step(self.model, self.optimizer, *self._put(batch))

    def fetch(self, step_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: v.item() for k, v in step_metrics.items()}

    @torch.no_grad()
    def evaluate(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        self.model.eval()
        codes, labels = self._put(batch)
        return {"loss": nll(self.model(codes, labels), codes).item()}

    def sample(self, labels: np.ndarray, gumbel: np.ndarray) -> np.ndarray:
        self.model.eval()
        labels_t = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
        codes = sample(self.model, labels_t, torch.from_numpy(gumbel).to(self.device))
        return codes.cpu().numpy().astype(np.int32)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return self.vqvae.decode_codes(codes)

    def save(self, path: str, step: int) -> None:
        record = CheckpointRecord("torch", self.config, step, kind="prior",
                                  lr_schedule=self.lr_schedule)
        checkpoint.save(path, {**record.to_dict(), "model": self.model.state_dict(),
                               "optimizer": self.optimizer.state_dict()})

    def load(self, path: str) -> int:
        record, payload = checkpoint.load(path, self.device, self.config, kind="prior")
        record.check_resumable(path, self.lr_schedule)
        checkpoint.load_weights(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = record.step
        return record.step
