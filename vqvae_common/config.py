"""Model and training configuration, the dataset presets, and their JSON form.

Every default lives here once; both twins and both entry points read them from here.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from vqvae_common.errors import UserError

DATASETS = ("mnist", "cifar10")

# The quantizer computes its (N, K) distances in blocks of at most this many entries (64 MiB
# of float32), so that memory stays linear in N whatever N * K is.
DISTANCE_BLOCK = 1 << 24


def distance_block_rows(num_codes: int) -> int:
    """How many vectors' distances to all num_codes codes fit in one DISTANCE_BLOCK."""
    return max(1, DISTANCE_BLOCK // num_codes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The VQ-VAE's shape: C image channels, D hidden/embedding width, K codes, beta, and
    when the quantizer restarts a dead code (see VectorQuantizer.restart_dead_codes).

    restart_below: a code is dead when its moving-average share of the encoder vectors falls
        below restart_below / K (1/K is the uniform share); 0 never restarts (the paper).
    usage_decay: the decay of that moving average, one update per training step.
    """

    in_channels: int = 1
    hidden: int = 128
    num_codes: int = 512
    beta: float = 1.0
    restart_below: float = 0.01
    usage_decay: float = 0.99


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 500
    lr: float = 3e-4
    seed: int = 0
    out: str = "runs/latest"
    device: str = "auto"
    resume: bool = False
    log_every: int = 50
    checkpoint_every: int = 500


PRESETS: dict[str, ModelConfig] = {
    "mnist": ModelConfig(in_channels=1, hidden=128),
    "cifar10": ModelConfig(in_channels=3, hidden=256),
}

IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def model_config(raw: Any) -> ModelConfig:
    """The ModelConfig a checkpoint recorded; a UserError if it is not one of this project's."""
    try:
        return ModelConfig(**raw)
    except TypeError as e:
        raise UserError(f"the checkpoint records an unknown model config {raw!r}") from e


def to_json(model: ModelConfig, train: TrainConfig) -> str:
    return json.dumps({"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)},
                      indent=2, sort_keys=True)


def from_json(text: str) -> tuple[ModelConfig, TrainConfig]:
    raw: dict[str, Any] = json.loads(text)
    return ModelConfig(**raw["model"]), TrainConfig(**raw["train"])
