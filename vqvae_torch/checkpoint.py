"""Checkpoint files for the PyTorch twin: written atomically, read without executing code.

A checkpoint is one `torch.save` archive of tensors and plain Python values: the shared
record (vqvae_common.checkpoint_record: framework "torch", kind, model_config, step,
weights_only, lr_schedule), "model": state_dict and, unless weights-only, "optimizer":
state_dict. It is written to a temporary file and renamed (vqvae_common.atomic), so a kill
at any moment leaves the previous file whole. It is loaded with `weights_only=True`, so a
crafted pickle that would run code is refused.

The model's arrays also travel as a flat numpy dict in PyTorch's own convention (state_dict
keys and layouts): export_arrays and import_arrays, what vqvae_common.layout translates to
and from the Flax twin's.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np
import torch

from vqvae_common import atomic, checkpoint_record, layout
from vqvae_common.checkpoint_record import CheckpointRecord
from vqvae_common.config import ModelConfig
from vqvae_common.errors import UserError
from vqvae_common.prior import PriorConfig


def save(path: str, payload: dict[str, Any]) -> None:
    try:
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)  # a file, not a path: errors are then OSErrors
    except OSError as e:
        kept = "; the previous checkpoint is kept" if os.path.isfile(path) else ""
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from e


def has_checkpoint(path: str) -> bool:
    """Whether `path` holds a complete checkpoint (a write in progress is another file)."""
    return os.path.isfile(path)


def remove_partial_writes(path: str) -> None:
    """Delete the temporary file that a save interrupted by a kill left beside `path`."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + atomic.SUFFIX)


def load(path: str, device: torch.device, config: ModelConfig | PriorConfig | None = None,
         kind: str | None = "vqvae") -> tuple[CheckpointRecord, dict[str, Any]]:
    """The checkpoint's record and payload, refused unless it is a PyTorch one of a `kind`
    model (None: of either kind; of `config`, if given)."""
    checkpoint_record.refuse_run_directory(path, kind)
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a PyTorch checkpoint file (if it is a "
                        f"Flax checkpoint, convert it: python convert.py --from-jax {path} "
                        f"--out FILE.pt)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise UserError(f"cannot load {path}: {e.strerror or e}") from e
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            KeyError, IndexError, struct.error) as e:  # the weights-only unpickler's, on garbage
        raise UserError(f"cannot load {path}: not a PyTorch checkpoint of this project, "
                        f"or truncated/corrupt ({type(e).__name__})") from e
    holds_optimizer = isinstance(payload, dict) and "optimizer" in payload
    record = checkpoint_record.read_record(payload, path, "torch", holds_optimizer, kind)
    if "model" not in payload:
        raise UserError(f"{path} holds no model weights: truncated or corrupt")
    if config is not None:
        record.check_config(config, path)
    return record, payload


def read_record(path: str, kind: str | None = "vqvae") -> CheckpointRecord:
    """The record of the checkpoint at `path`, checked to be a PyTorch checkpoint's of a
    `kind` model (None: of either kind). The whole file is read (torch.save keeps no record
    apart from the tensors), a few MB for the presets."""
    return load(path, torch.device("cpu"), kind=kind)[0]


def load_weights(model: torch.nn.Module, state_dict: dict[str, Any], path: str) -> None:
    """model.load_state_dict, a mismatch (missing, unexpected or mis-shaped tensors) one
    UserError line naming `path`."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the model its config describes: "
                        f"{str(e)[:200]}") from e


def export_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy copies on the host: weights (conv weights
    (O, I, kh, kw), transposed convs' (I, O, kh, kw)), BatchNorm statistics, code usage."""
    return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def import_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load export_arrays' dict into `model` in place; a one-line UserError for a missing or
    unexpected key, or a wrong shape."""
    state = model.state_dict()
    layout.check_fits(arrays, {key: tuple(value.shape) for key, value in state.items()})
    model.load_state_dict({key: torch.tensor(arrays[key]) for key in state})
