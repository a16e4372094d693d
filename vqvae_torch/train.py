"""The PyTorch twin of the training step: device choice, the eager Adam step, evaluation,
and the `Twin` interface that vqvae_common.loop.fit drives. Mirrors vqvae_jax/train.py."""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from vqvae_common import data
from vqvae_common.checkpoint_record import CHECKPOINT_NAMES, CheckpointRecord
from vqvae_common.config import ModelConfig, TrainConfig, learning_rate
from vqvae_common.errors import UserError
from vqvae_torch import checkpoint, distributed
from vqvae_torch.model import VQVAE


def select_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; 'gpu' is accepted as cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA device here")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown --device {name!r}: choose auto, cpu, cuda or gpu")


def deterministic() -> None:
    """PyTorch's deterministic algorithms. Without them its CPU backward differs from run to
    run in the last bits, which the VQ argmin amplifies: same seed, different losses. On CUDA
    cuBLAS then needs a fixed workspace, set before its first matmul, else it raises."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def caller_state_kept() -> Iterator[None]:
    """PyTorch's CPU RNG, its deterministic-algorithms flags and CUBLAS_WORKSPACE_CONFIG as
    they were before: a twin built to be used, not trained (from_checkpoint), leaves a
    library caller's own draws and ops theirs. (A twin seeds the CPU generator alone, as
    its model is initialised there, so no CUDA state is touched or initialised.)"""
    flags = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """NHWC numpy floats -> NCHW tensor on `device`."""
    data.check_floats(batch)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC numpy."""
    return x.permute(0, 2, 3, 1).cpu().numpy()


def scheduled_rate(train_cfg: TrainConfig, total_steps: int | None
                   ) -> Callable[[int], float]:
    """Adam's rate of step s, counted from 0, over a run of total_steps: the twin of
    vqvae_jax.train.adam's schedule (vqvae_common.config.learning_rate)."""
    return functools.partial(learning_rate, lr=train_cfg.lr, schedule=train_cfg.lr_schedule,
                             total_steps=total_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The rate of Adam's next step (vqvae_common.config.learning_rate's, step by step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: VQVAE, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
               forward: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One Adam step on `batch` in train mode (batch statistics; running stats and code usage
    updated), then the dead codes restarted from this batch's encoder outputs. Data parallel,
    `batch` is this process's share, `forward` the DistributedDataParallel wrapper of `model`,
    and the loss terms returned are the global batch's."""
    model.train()
    out = (forward or model)(batch)
    optimizer.zero_grad(set_to_none=True)
    out.losses["loss"].backward()
    optimizer.step()
    model.quantizer.restart_dead_codes(out.z_e.detach())
    return distributed.mean_over_processes({k: v.detach() for k, v in out.losses.items()})


class TorchTwin:
    """vqvae_common.loop's Twin in PyTorch: the model and its Adam on one device, stepped
    eagerly; checkpoints are one file.

    Under torchrun (WORLD_SIZE > 1) each process is one device (cuda:LOCAL_RANK, or the CPU
    with gloo): its BatchNorms become global ones (vqvae_torch.distributed), and training
    steps run through a DistributedDataParallel wrapper on its share of the global batch.
    `model` stays the plain module, used alone by evaluation, encode and decode (no
    collective), so the main process may write pictures by itself. Only process 0 writes
    checkpoints; every process loads the same one on --resume."""

    checkpoint_name = CHECKPOINT_NAMES[("torch", "vqvae")]
    has_checkpoint = staticmethod(checkpoint.has_checkpoint)
    remove_partial_checkpoints = staticmethod(checkpoint.remove_partial_writes)

    @staticmethod
    def join_processes(train_cfg: TrainConfig) -> tuple[int, int]:
        return distributed.join(train_cfg.batch_size, train_cfg.num_devices,
                                select_device(train_cfg.device))

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 total_steps: int | None = None) -> None:
        """total_steps: the run's optimizer steps, over which --lr-schedule moves the rate."""
        self.device = distributed.local_device(select_device(train_cfg.device))
        deterministic()
        self.config = model_cfg
        # the CPU generator alone: the model is initialised there, and nothing random runs
        # on the device
        torch.default_generator.manual_seed(train_cfg.seed)
        self.model = VQVAE(model_cfg).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr)
        self.lr_schedule = train_cfg.lr_schedule
        self.learning_rate = scheduled_rate(train_cfg, total_steps)
        self.num_devices = distributed.world_size()
        self.device_kind = ("cpu" if self.device.type == "cpu"
                            else torch.cuda.get_device_name(self.device))
        if self.num_devices > 1:
            distributed.sync_batch_norm(self.model)
        self.steps_per_call = train_cfg.steps_per_call
        self._ddp: torch.nn.Module | None = None  # built at the first step, after any load
        self.step = 0  # steps taken, counted from the checkpoint resumed
        self.last_checkpoint: tuple[str, int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto") -> "TorchTwin":
        """The model saved in `path` (any PyTorch checkpoint of this project, converted ones
        included), ready to evaluate: in eval mode, PyTorch's global state left as it was."""
        record, payload = checkpoint.load(path, select_device(device))
        with caller_state_kept():
            twin = cls(record.model_config, TrainConfig(device=device))
        checkpoint.load_weights(twin.model, payload["model"], path)
        twin.model.eval()
        return twin

    @torch.no_grad()
    def initialize_codebook(self, images: np.ndarray, seed: int, iterations: int,
                            show_progress: bool = True) -> None:
        # every process computes the same codebook from the same images, alone
        with distributed.local():
            encoder = copy.deepcopy(self.model.encoder).train()  # the model's stats stay
            z_e = encoder(to_tensor(images, self.device))
            self.model.quantizer.initialize_kmeans(z_e, seed, iterations, show_progress)

    def train_step(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        set_learning_rate(self.optimizer, float(self.learning_rate(self.step)))
        self.step += 1
        if self.num_devices == 1:
            return train_step(self.model, self.optimizer, to_tensor(batch, self.device))
        try:
            if self._ddp is None:
                self._ddp = distributed.data_parallel(self.model, self.device)
            return train_step(self.model, self.optimizer,
                              to_tensor(distributed.local_rows(batch), self.device), self._ddp)
        except RuntimeError as e:  # torch.distributed.DistBackendError included
            if not distributed.is_collective_failure(e):
                raise
            raise distributed.lost_peer(e, self.step, self.last_checkpoint) from e

    def train_steps(self, batches: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Eager: the steps one after another (a call costs nothing to dispatch here)."""
        return [self.train_step(batch) for batch in batches][-1]

    def fetch(self, step_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: v.item() for k, v in step_metrics.items()}

    @torch.no_grad()
    def evaluate(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        self.model.eval()
        out = self.model(to_tensor(batch, self.device))
        return to_numpy(out.recon), out.indices.cpu().numpy(), self.fetch(out.losses)

    @torch.no_grad()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        self.model.eval()
        return to_numpy(self.model.encoder(to_tensor(batch, self.device)))

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        self.model.eval()
        z_q = self.model.quantizer(to_tensor(latents, self.device)).z_q
        return to_numpy(self.model.decoder(z_q))

    @torch.no_grad()
    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        self.model.eval()
        indices = torch.from_numpy(np.asarray(codes, np.int64)).to(self.device)
        return to_numpy(self.model.decoder(
            self.model.quantizer.codebook[indices].permute(0, 3, 1, 2)))

    def save(self, path: str, step: int) -> None:
        if distributed.rank() == 0:
            record = CheckpointRecord("torch", self.config, step, lr_schedule=self.lr_schedule)
            checkpoint.save(path, {**record.to_dict(), "model": self.model.state_dict(),
                                   "optimizer": self.optimizer.state_dict()})
        self.last_checkpoint = (path, step)

    def load(self, path: str) -> int:
        record, payload = checkpoint.load(path, self.device, self.config)
        record.check_resumable(path, self.lr_schedule)
        checkpoint.load_weights(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = record.step
        self.last_checkpoint = (path, record.step)
        return record.step

    def init_weights(self, path: str) -> None:
        _, payload = checkpoint.load(path, self.device, self.config)
        checkpoint.load_weights(self.model, payload["model"], path)
