"""What every checkpoint of this project records beside its arrays, and the checks made when
one is read back, the same for both twins' formats and for converted checkpoints.

The record is a flat JSON-able dict {"framework": "torch" | "jax", "kind": "vqvae" | "prior",
"model_config": {...}, "step": int, "weights_only": bool, "lr_schedule": "constant" |
"cosine"}; a record without "kind" (written before priors existed) is a VQ-VAE's, one
without "lr_schedule" a constant rate's. The schedule shapes a Flax optimizer state (optax
keeps a step count for a schedule), so a Flax checkpoint is read back into a state built
with the schedule its record names. A weights-only checkpoint holds the model (weights,
BatchNorm statistics, code usage) but no optimizer state: it can be evaluated, never resumed.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from vqvae_common.config import (PICTURES, RUN_RECORDS, ModelConfig, folder_around, is_run,
                                  model_config, read_run)
from vqvae_common.errors import UserError
from vqvae_common.prior import PriorConfig, prior_config

FRAMEWORK_NAMES = {"torch": "PyTorch", "jax": "Flax"}
KINDS = {"vqvae": ("a VQ-VAE", model_config), "prior": ("a PixelCNN prior", prior_config)}
# Each kind of run's checkpoint inside its --out (PyTorch: a file, Flax: a directory), and
# the weights-only file of a trained_models/ folder
CHECKPOINT_NAMES = {("torch", "vqvae"): "checkpoint.pt", ("jax", "vqvae"): "checkpoint",
                    ("torch", "prior"): "prior.pt", ("jax", "prior"): "prior"}
TRAINED_MODEL_NAME = "model.pt"
# A Flax checkpoint is a directory of step folders, each named by its step and holding the
# record as an orbax item of this name (vqvae_jax.checkpoint writes it). orbax takes any
# numbered folder in there for a step: one made by anything else would pass for the newest.
FLAX_RECORD_ITEM = "meta"


def checkpoint_in(directory: str, kinds: tuple[str, ...] = tuple(KINDS)) -> str | None:
    """The first checkpoint of one of `kinds` that a run's directory holds (its path), None
    if it holds none."""
    names = [TRAINED_MODEL_NAME] if "vqvae" in kinds else []
    names += [name for (_, kind), name in CHECKPOINT_NAMES.items() if kind in kinds]
    for name in names:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def is_flax_step(folder: str) -> bool:
    """Whether `folder` is a step of a Flax checkpoint of this project: named by a number,
    holding the record."""
    return (os.path.basename(os.path.normpath(folder)).isdigit()
            and os.path.isdir(os.path.join(folder, FLAX_RECORD_ITEM)))


def is_flax_checkpoint(folder: str) -> bool:
    """Whether `folder` holds a step of a Flax checkpoint of this project."""
    try:
        names = os.listdir(folder)
    except OSError:  # not a directory, or not readable
        return False
    return any(is_flax_step(os.path.join(folder, name)) for name in names)


def checkpoint_around(path: str) -> str | None:
    """The Flax checkpoint that `path` lies inside, if any (a PyTorch checkpoint is a file:
    nothing lies inside one)."""
    return folder_around(path, is_flax_checkpoint)


def run_files(folder: str) -> tuple[str, ...]:
    """The names of the records and pictures that the run in `folder` writes there, () where
    no run's config.json is. Its kind is its config.json's checkpoint name or, in an older
    version's, that of the checkpoint the folder holds (none: a VQ-VAE's)."""
    if not is_run(folder):
        return ()
    name = read_run(folder).get("checkpoint")
    held = name if isinstance(name, str) else os.path.basename(checkpoint_in(folder) or "")
    kind = next((kind for (_, kind), checkpoint in CHECKPOINT_NAMES.items()
                 if checkpoint == held), "vqvae")
    return (*RUN_RECORDS, *PICTURES[kind])


def refuse_run_directory(path: str, kind: str | None) -> None:
    """A UserError naming the checkpoint inside, where `path` is a run's directory holding a
    `kind` model's checkpoint (None: any kind's; given where the checkpoint itself was
    expected)."""
    kinds = tuple(KINDS) if kind is None else (kind,)
    inside = checkpoint_in(path, kinds) if os.path.isdir(path) else None
    if inside is not None:
        raise UserError(f"{path} is a run's directory: pass the checkpoint in it, {inside}")


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    framework: str
    model_config: ModelConfig | PriorConfig
    step: int
    weights_only: bool = False
    kind: str = "vqvae"
    lr_schedule: str = "constant"  # the optimizer's --lr-schedule

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "kind": self.kind,
                "model_config": dataclasses.asdict(self.model_config),
                "step": self.step, "weights_only": self.weights_only,
                "lr_schedule": self.lr_schedule}

    def check_config(self, config: ModelConfig | PriorConfig, path: str) -> None:
        """Refuse a checkpoint of another model config (trained with other flags), or a
        prior over a VQ-VAE whose weights changed since (its codes changed meaning)."""
        held, wanted = (_comparable(dataclasses.asdict(c)) for c in (self.model_config, config))
        if "" in (held.get("vqvae_weights"), wanted.get("vqvae_weights")):  # unknown: a
            del held["vqvae_weights"], wanted["vqvae_weights"]  # prior saved before it
        if held.get("vqvae_weights") != wanted.get("vqvae_weights"):
            raise UserError(f"{path} was trained over another VQ-VAE than {config.vqvae} "
                            f"(the weights differ: another model, or this one trained on "
                            f"since): train a new prior over it, in another --out")
        if held != wanted:
            differ = ", ".join(f"{key} {held.get(key)} (not {wanted.get(key)})"
                               for key in sorted(held.keys() | wanted.keys())
                               if held.get(key) != wanted.get(key))
            raise UserError(f"{path} holds a model with config {differ}: trained with other "
                            f"flags")

    def check_resumable(self, path: str, lr_schedule: str) -> None:
        """Refuse to resume a weights-only checkpoint, or one trained with another
        --lr-schedule (a run whose rate jumps from one curve to another is no run of either,
        and a Flax optimizer state has a shape per schedule)."""
        if self.weights_only:
            raise UserError(f"{path} holds weights only (a converted checkpoint): it can be "
                            f"evaluated but not resumed (--init-from starts a new run from it)")
        if self.lr_schedule != lr_schedule:
            raise UserError(f"--lr-schedule {lr_schedule}: {path} was trained with "
                            f"--lr-schedule {self.lr_schedule}; resume it with that one")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A model config as check_config compares it: a prior's VQ-VAE by the file its path names
    (priors record it absolute; before stop 39, as given on the command line)."""
    if isinstance(config.get("vqvae"), str):
        return {**config, "vqvae": os.path.realpath(config["vqvae"])}
    return config


def read_record(raw: Any, path: str, framework: str, holds_optimizer: bool,
                kind: str | None = "vqvae") -> CheckpointRecord:
    """The record of the checkpoint at `path`, refused unless it is `framework`'s and holds
    a model of `kind` (None: of either kind, whichever it records).

    The one weights-only rule: the record says so, or the checkpoint holds no optimizer state
    (`holds_optimizer`); files written before the record had the flag rely on the latter."""
    declared = raw.get("framework") if isinstance(raw, dict) else None
    if declared == framework and {"model_config", "step"} <= raw.keys():
        held = raw.get("kind", "vqvae")
        if held not in KINDS or (kind is not None and held != kind):
            raise UserError(f"{path} holds {KINDS.get(held, ('an unknown model',))[0]}, not "
                            f"{KINDS[kind][0] if kind else 'a model of this project'}")
        return CheckpointRecord(framework, KINDS[held][1](raw["model_config"]),
                                int(raw["step"]),
                                bool(raw.get("weights_only")) or not holds_optimizer, held,
                                raw.get("lr_schedule", "constant"))
    if declared in FRAMEWORK_NAMES and declared != framework:
        raise UserError(f"{path} is a {declared} checkpoint, not a "
                        f"{FRAMEWORK_NAMES[framework]} checkpoint; convert it first (python "
                        f"convert.py)")
    raise UserError(f"{path} is a foreign checkpoint, not one of this project (it lacks the "
                    f"record of framework, model config and step that its trainers write)")
