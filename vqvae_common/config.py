"""Model and training configuration, one record per dataset, and their JSON form.

Every default lives here once. Each field that is a command-line flag (`--batch-size` for
`batch_size`) carries its help and inclusive bounds in its metadata (see `flag`), and
vqvae_common.cli builds both trainers' parser from these fields alone.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

from vqvae_common.errors import UserError

# The quantizer computes its (N, K) distances in blocks of at most this many entries (64 MiB
# of float32), so that memory stays linear in N whatever N * K is.
DISTANCE_BLOCK = 1 << 24


def distance_block_rows(num_codes: int) -> int:
    """How many vectors' distances to all num_codes codes fit in one DISTANCE_BLOCK."""
    return max(1, DISTANCE_BLOCK // num_codes)


def flag(default: Any, help: str, bounds: tuple[float, float] | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    """A config field that is also a command-line flag: its default, its `--help` line, and
    the inclusive (low, high) its value must lie in (an absurd value is as wrong as a
    negative one)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "bounds": bounds, "choices": choices})


def within(value: Any, bounds: tuple[float, float], whole: bool = False) -> bool:
    """Whether `value` is a number in the inclusive `bounds`: an int of any size (no float
    conversion to overflow) or, unless `whole`, a finite float; never a bool."""
    number = isinstance(value, int) or (not whole and isinstance(value, float)
                                        and math.isfinite(value))
    return number and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]


@functools.cache
def field_types(config_class: type) -> dict[str, type]:
    """Each field's type, an optional one's without its None: int for `int | None`."""
    return {name: next(t for t in (typing.get_args(kind) or (kind,)) if t is not type(None))
            for name, kind in typing.get_type_hints(config_class).items()}


def check_flags(config: Any) -> None:
    """A ValueError naming the first flag field of a config dataclass whose value the command
    line would refuse: outside its choices or bounds, or not a whole number where the field
    is an int (None, where a flag's default is None, stands for that default). A config built
    in Python is held to the same rules; numpy scalars in it become Python numbers first, as
    config.json holds them."""
    types = field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, np.generic):
            value = value.item()
            object.__setattr__(config, field.name, value)  # frozen: in __post_init__ only
        bounds, choices = field.metadata.get("bounds"), field.metadata.get("choices")
        name = f"{type(config).__name__}.{field.name}"
        if value is None and field.default is None:
            continue
        if choices and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        whole = types[field.name] is int
        if bounds and not within(value, bounds, whole):
            raise ValueError(f"{name} must be {'a whole number' if whole else 'a number'} in "
                             f"[{bounds[0]}, {bounds[1]}], not {value!r}")


def option(name: str) -> str:
    """The command-line option of the config field `name`: --batch-size for batch_size."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The VQ-VAE's shape: C image channels, D hidden/embedding width, K codes, beta, how the
    codebook learns, and when the quantizer restarts a dead code (see VectorQuantizer).

    restart_below: a code is dead when its moving-average share of the encoder vectors falls
        below restart_below / K (1/K is the uniform share); 0 never restarts (the paper).
    usage_decay: the decay of that moving average, one update per training step.

    The flags' defaults are the dataset's preset (Dataset.preset), not these.
    """

    in_channels: int = 1
    hidden: int = flag(128, "hidden and embedding width D", (1, 4096))
    num_codes: int = flag(512, "codebook size K", (1, 1 << 20))
    beta: float = flag(0.25, "commitment weight: the paper's 0.25 (best in "
                             "bench/codebook_ablation.py --study tuning); the seed model "
                             "used 1.0", (0.0, 100.0))
    restart_below: float = flag(
        0.01, "after each step, move a code onto an encoder output of the batch when its "
              "moving-average share of the vectors is below this fraction of the uniform "
              "share 1/K (from --codebook-init uniform, the first step so re-initialises the "
              "codebook from data); 0 never restarts, as in the paper", (0.0, 0.5))
    usage_decay: float = 0.99
    codebook_update: str = flag(
        "grad", "how the codebook learns: grad (the codebook loss term, by the optimizer) or "
                "ema (moving averages of the vectors each code is assigned, appendix A.1 of "
                "the paper; the codebook term then leaves the loss)", choices=("grad", "ema"))
    ema_decay: float = flag(0.99, "decay of the EMA codebook's counts and sums, one update "
                                  "per training step (--codebook-update ema)", (0.0, 0.99999))
    ema_epsilon: float = flag(1e-5, "Laplace smoothing of the EMA codebook's counts, so that "
                                    "a code assigned nothing divides by no zero", (1e-12, 1.0))

    def __post_init__(self) -> None:
        check_flags(self)


# What a checkpoint recorded before a ModelConfig field existed meant: the model it holds
# was trained that way, whatever today's default is.
BEFORE_FIELD_EXISTED = {"codebook_update": "grad"}


# The VQ-VAE's two stride-2 convolutions: an H x W image has an (H/4) x (W/4) code map.
DOWNSAMPLING = 4


def check_quantizer_shape(num_codes: int, dim: int, codebook_update: str) -> None:
    """A ValueError for a VectorQuantizer that cannot be built: fewer than one code or one
    dimension (num_codes 0 was a ZeroDivisionError in the distance blocks), or an unknown
    codebook_update."""
    if num_codes < 1 or dim < 1:
        raise ValueError(f"a quantizer needs at least 1 code of at least 1 dimension, not "
                         f"num_codes {num_codes}, dim {dim}")
    if codebook_update not in ("grad", "ema"):
        raise ValueError(f"codebook_update must be 'grad' or 'ema', not {codebook_update!r}")


def check_image_sides(height: int, width: int) -> None:
    """A ValueError unless the decoder gives back an H x W image: both sides multiples of
    DOWNSAMPLING (a 30 x 30 image comes back 28 x 28, and the loss cannot compare them)."""
    if height % DOWNSAMPLING or width % DOWNSAMPLING:
        raise ValueError(f"the VQ-VAE takes images whose sides are multiples of "
                         f"{DOWNSAMPLING}, not {height} x {width}")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A tfds dataset this project trains on: its images' (H, W, C), its split sizes, the
    model preset for it (D; C follows from the images), and its number of class labels."""

    name: str
    image_shape: tuple[int, int, int]
    train_size: int
    test_size: int
    hidden: int
    classes: int = 10

    @property
    def code_shape(self) -> tuple[int, int]:
        """(h, w) of an image's code map: (7, 7) for MNIST's 28 x 28."""
        height, width, _ = self.image_shape
        return height // DOWNSAMPLING, width // DOWNSAMPLING

    @property
    def preset(self) -> ModelConfig:
        # the EMA codebook: the best recipe of bench/codebook_ablation.py (README); the
        # ModelConfig defaults stay the paper's gradient codebook
        return ModelConfig(in_channels=self.image_shape[2], hidden=self.hidden,
                           codebook_update="ema")


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("mnist", image_shape=(28, 28, 1), train_size=60_000, test_size=10_000, hidden=128),
    Dataset("cifar10", image_shape=(32, 32, 3), train_size=50_000, test_size=10_000,
            hidden=256),
)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: every field is a flag of train_torch.py and train_jax.py."""

    dataset: str = flag("mnist", "dataset, and the model preset for it",
                        choices=tuple(DATASETS))
    data_dir: str | None = flag(None, "tfds data directory holding the prepared dataset, or "
                                      "where to prepare it (default: $TFDS_DATA_DIR, else "
                                      "~/tensorflow_datasets)")
    epochs: int = flag(10, "passes over the training split, each ending with an evaluation "
                           "on the test split", (1, 100_000))
    max_steps: int | None = flag(None, "stop after this many optimizer steps, mid-epoch if "
                                       "need be, as smoke runs do (default: no limit)",
                                 (1, 10**9))
    batch_size: int = flag(64, "training images per optimizer step", (1, 65_536))
    eval_images: int | None = flag(None, "evaluate on the first N test images only, as smoke "
                                         "runs do; at least 2, the interpolation's ends "
                                         "(default: the whole test split)", (2, 10**9))
    eval_batch_size: int = flag(500, "test images per forward pass when evaluating: it sets "
                                     "the memory used, not the results", (1, 65_536))
    lr: float = flag(2e-3, "Adam learning rate (of the first step, under --lr-schedule "
                           "cosine); the seed model used 3e-4 at a constant rate", (1e-8, 1.0))
    lr_schedule: str = flag(
        "cosine", "how the learning rate moves over the run's steps: constant, or cosine "
                  "(from --lr down to 0 at the last step of --epochs or --max-steps)",
        choices=("constant", "cosine"))
    seed: int = flag(0, "random seed of the initial weights and of the data order",
                     (0, 2**32 - 1))
    # the entry points default to runs/latest_{torch,jax} (priors: runs/prior_{torch,jax})
    out: str = flag("runs/latest", "output directory")
    device: str = flag("auto", "auto (an accelerator when present), cpu, cuda or gpu (and "
                               "tpu, for the Flax twin)")
    num_devices: int | None = flag(
        None, "devices that share each step, data-parallel over the global --batch-size: "
              "JAX takes the first N of --device's kind, PyTorch needs N processes under "
              "torchrun (default: JAX every visible one; PyTorch torchrun's process count)",
        (1, 65_536))
    resume: bool = flag(False, "continue from the checkpoint in --out with the flags its "
                               "config.json records; a flag given here replaces the recorded "
                               "one where a run may change it (--epochs, --max-steps, --lr, "
                               "...) and is refused where not (--batch-size, --seed, "
                               "--dataset, --lr-schedule, model flags)")
    init_from: str | None = flag(
        None, "fine-tune: start a new run from the model of this checkpoint of the same twin "
              "(a train_torch.py .pt file, a train_jax.py checkpoint directory; convert.py "
              "turns one into the other), shipped weights-only ones included: its model "
              "flags, weights, BatchNorm statistics and codebook state, with a fresh "
              "optimizer at step 0 and no --codebook-init (default: a fresh model)")
    steps_per_call: int = flag(
        1, "optimizer steps per call of the twin, logging and checkpoint steps kept: JAX "
           "runs them as one compiled lax.scan over batches put on the device together (for "
           "accelerators, where dispatching a step may cost as much as computing it; on a "
           "CPU unrolled: no faster than single steps, and its compile time grows with the "
           "count), PyTorch one after another", (1, 1000))
    log_every: int = flag(50, "steps between logged metrics, the only host syncs (each "
                              "checkpoint's step is logged too: its NaN guard)",
                          (1, 10**9))
    checkpoint_every: int = flag(500, "steps between checkpoints; one is also written at "
                                      "each epoch's end", (1, 10**9))
    codebook_init: str = flag(
        "kmeans", "the codebook's start: uniform(-1/K, 1/K), or kmeans (k-means++ seeding "
                   "and Lloyd iterations on the encoder outputs of the first training "
                   "images, from --seed)", choices=("uniform", "kmeans"))
    kmeans_images: int = flag(1024, "training images (the first of epoch 0) whose encoder "
                                    "outputs --codebook-init kmeans clusters; at most 10000: "
                                    "the encoder takes them as one batch (Flax, CIFAR-10: "
                                    "about 1.3 GB of memory a thousand)", (1, 10_000))
    kmeans_iterations: int = flag(10, "Lloyd iterations of --codebook-init kmeans (0: the "
                                      "k-means++ seeding alone)",
                                  (0, 10_000))

    def __post_init__(self) -> None:
        check_flags(self)


def learning_rate(step: Any, lr: float, schedule: str, total_steps: int | None,
                  xp: Any = np) -> Any:
    """Adam's learning rate at optimizer step `step` (0 for a run's first) of `total_steps`,
    for both twins: `xp` is numpy for PyTorch's eager steps and jax.numpy inside the jitted
    Flax step, which traces the same formula. With T = total_steps:

        constant   lr
        cosine     lr (1 + cos(pi min(step, T) / T)) / 2      lr at step 0, 0 from step T on

    (SGDR's cosine, Loshchilov & Hutter 2017, without restarts). T None, as when a twin is
    built only to evaluate, keeps the rate at lr. T comes from the run's --epochs and
    --max-steps, so resuming with other ones bends the rest of the curve.
    """
    if schedule == "constant" or total_steps is None:
        return lr
    return lr * 0.5 * (1 + xp.cos(xp.pi * xp.minimum(step, total_steps) / total_steps))


def check_global_batch(batch_size: int, parts: int, what: str) -> None:
    """A UserError unless the global --batch-size splits evenly over `parts` devices or
    processes (`what`), as data-parallel training needs in both twins."""
    if batch_size % parts:
        raise UserError(f"--batch-size {batch_size} does not split evenly over {parts} {what}: "
                        f"choose a multiple of {parts}")


def model_config(raw: Any) -> ModelConfig:
    """The ModelConfig a checkpoint recorded; a UserError if it is not one of this project's."""
    try:
        return ModelConfig(**{**BEFORE_FIELD_EXISTED, **raw})
    except (TypeError, ValueError) as e:
        raise UserError(f"the checkpoint records an unknown model config {raw!r}") from e


def to_json(model: ModelConfig, train: TrainConfig, run: dict[str, Any] | None = None) -> str:
    """config.json: the model, the training flags and, for a run, where it trained
    (num_devices, device_kind) and its checkpoint's name, which from_json does not need."""
    return json.dumps({"model": dataclasses.asdict(model), "train": dataclasses.asdict(train),
                       **(run or {})}, indent=2, sort_keys=True)


EVENTS_FOLDER = "tensorboard"  # a run's TensorBoard events, rebuilt from metrics.jsonl
RUN_RECORDS = ("config.json", "metrics.jsonl", EVENTS_FOLDER)  # what every run writes into
#   its --out
# ... beside the pictures of its kind (vqvae_common.checkpoint_record.KINDS), drawn at each
# epoch's end
PICTURES = {"vqvae": ("reconstruction.png", "interpolation.gif", "loss_curves.png"),
            "prior": ("samples.png",)}


def read_run(out: str) -> dict[str, Any]:
    """`out`'s config.json as a dict; {} where there is none (or it is not a JSON object)."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def is_run(folder: str) -> bool:
    """Whether `folder` holds a config.json that a run of this project wrote."""
    recorded = read_run(folder)
    return isinstance(recorded.get("model"), dict) and isinstance(recorded.get("train"), dict)


def folder_around(path: str, test: Callable[[str], bool]) -> str | None:
    """The nearest folder above `path` (real paths) that passes `test`, if any."""
    folder = os.path.realpath(path)
    while (parent := os.path.dirname(folder)) != folder:
        folder = parent
        if test(folder):
            return folder
    return None


def run_around(path: str) -> str | None:
    """The run directory that `path` lies inside, if any: the nearest folder above it whose
    config.json records a run."""
    return folder_around(path, is_run)


def from_json(text: str) -> tuple[ModelConfig, TrainConfig]:
    raw: dict[str, Any] = json.loads(text)
    return model_config(raw["model"]), TrainConfig(**raw["train"])
