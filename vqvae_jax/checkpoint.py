"""Checkpoints for the Flax twin, with orbax: a directory of step folders, each written to a
temporary folder and renamed when complete, so a kill at any moment leaves the last complete
step loadable. Each step holds the NNX state (model and optimizer) and a JSON record
{"framework": "jax", "model_config": {...}, "step": int}.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from vqvae_common.config import ModelConfig
from vqvae_common.errors import UserError

KEEP = 2


def _manager(path: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(path), item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=KEEP, enable_async_checkpointing=False))


def save(path: str, step: int, state: nnx.State, meta: dict[str, Any]) -> None:
    try:
        with _manager(path) as manager:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                        f"the previous checkpoint is kept") from e


def read_meta(path: str) -> dict[str, Any]:
    """The JSON record of the newest complete step, checked to be a Flax checkpoint's."""
    with _reading(path) as (manager, step):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("framework") != "jax":
        raise UserError(f"{path} is not a Flax checkpoint of this project")
    return meta


def load(path: str, config: ModelConfig, like: nnx.State) -> tuple[nnx.State, dict[str, Any]]:
    """The newest complete step's state (shaped like `like`) and its JSON record."""
    meta = read_meta(path)
    if meta.get("model_config") != dataclasses.asdict(config):
        raise UserError(f"{path} holds a model with config {meta.get('model_config')}, "
                        f"not {dataclasses.asdict(config)}")
    with _reading(path) as (manager, step):
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like)))["state"]
    return state, meta


@contextlib.contextmanager
def _reading(path: str):
    """(manager, newest complete step); any damage becomes one UserError line."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a Flax checkpoint directory")
    try:
        with _manager(path) as manager:
            step = manager.latest_step()
            if step is None:
                raise UserError(f"{path} holds no complete checkpoint")
            yield manager, step
    except UserError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for a damaged checkpoint
        raise UserError(f"cannot load {path}: truncated or corrupt ({type(e).__name__}: "
                        f"{str(e)[:120]})") from e
