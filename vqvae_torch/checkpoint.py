"""Checkpoint files for the PyTorch twin: written atomically, read without executing code.

A checkpoint is one `torch.save` archive of tensors and plain Python values:
{"framework": "torch", "model_config": {...}, "step": int, "model": state_dict,
"optimizer": state_dict}. It is loaded with `weights_only=True`, so a crafted pickle that
would run code is refused.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from typing import Any

import torch

from vqvae_common.config import ModelConfig
from vqvae_common.errors import UserError


def save(path: str, payload: dict[str, Any]) -> None:
    """Write to `path`.tmp, fsync, then rename: a kill at any moment leaves the old file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                        f"the previous checkpoint is kept") from e


def load(path: str, device: torch.device, config: ModelConfig | None = None) -> dict[str, Any]:
    """The checkpoint's payload, after checking it is a PyTorch one (of `config`, if given)."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise UserError(f"cannot load {path}: not a PyTorch checkpoint of this project, "
                        f"or truncated/corrupt ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("framework") != "torch" or not {
            "model_config", "step", "model"} <= payload.keys():
        found = payload.get("framework") if isinstance(payload, dict) else None
        raise UserError(f"{path} is a {found or 'foreign'} checkpoint, not a PyTorch one; "
                        f"convert it first (python -m vqvae_jax.convert)")
    saved = payload.get("model_config")
    if config is not None and saved != dataclasses.asdict(config):
        raise UserError(f"{path} holds a model with config {saved}, "
                        f"not {dataclasses.asdict(config)}")
    return payload
