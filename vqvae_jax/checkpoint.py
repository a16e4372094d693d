"""Checkpoints for the Flax twin, with orbax: a directory of step folders. orbax writes each
step into `STEP.orbax-checkpoint-tmp-*` and renames it to `STEP` once complete, so a kill at
any moment leaves the last complete step loadable, plus at worst a temporary folder that is
not a checkpoint (`remove_partial_writes` deletes it). Each step holds the NNX state (model
and optimizer) and the shared record (vqvae_common.checkpoint_record) as JSON.

The model's arrays also travel as a flat numpy dict in Flax's own convention (dotted paths
such as "encoder.conv1.kernel", "encoder.bn1.mean"; kernels (kh, kw, I, O)): export_arrays
and import_arrays, what vqvae_common.layout translates to and from the PyTorch twin's.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vqvae_common import checkpoint_record, layout
from vqvae_common.checkpoint_record import CheckpointRecord
from vqvae_common.config import ModelConfig
from vqvae_common.errors import UserError, clip
from vqvae_common.prior import PriorConfig

KEEP = 2


def _manager(path: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(path), item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=KEEP, enable_async_checkpointing=False))


def save(path: str, step: int, state: nnx.State, meta: dict[str, Any]) -> None:
    """Write step `step` ({"state": state, "meta": the JSON record}); older steps beyond the
    newest KEEP are deleted."""
    try:
        with _manager(path) as manager:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as e:
        kept = "; the previous checkpoint is kept" if checkpoint_record.is_flax_checkpoint(
            path) else ""
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from e


def has_checkpoint(path: str) -> bool:
    """Whether `path` holds a complete step (a temporary folder is not one) with this
    project's record; a numbered folder without one, newer than every step (or where there
    is none), is refused: _newest_step."""
    if not os.path.isdir(path):
        return False
    with _manager(path) as manager:
        return _newest_step(manager, path) is not None


def remove_partial_writes(path: str) -> None:
    """Delete what saves interrupted by a kill left in `path`: temporary step folders, and
    the steps beyond the newest KEEP that a save was deleting (perhaps half deleted)."""
    pattern = os.path.join(glob.escape(path), "*" + ocp.path.atomicity_types.TMP_DIR_SUFFIX + "*")
    for folder in glob.glob(pattern):
        shutil.rmtree(folder)
    if os.path.isdir(path):
        with _manager(path) as manager:
            for step in sorted(manager.all_steps())[:-KEEP]:
                manager.delete(step)


def read_record(path: str, kind: str | None = "vqvae") -> CheckpointRecord:
    """The record of the newest complete step, checked to be a Flax checkpoint's of a
    `kind` model (None: of either kind)."""
    with _reading(path, kind) as (manager, step):
        return _record(manager, step, path, kind)


def load(path: str, config: ModelConfig | PriorConfig, like: nnx.State, kind: str = "vqvae"
         ) -> tuple[CheckpointRecord, nnx.State]:
    """The newest complete step's record and state (shaped like `like`), refused unless it
    holds a `kind` model of `config`."""
    with _reading(path, kind) as (manager, step):
        record = _record(manager, step, path, kind)
        record.check_config(config, path)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like)))["state"]
    return record, state


def export_arrays(model: nnx.Module, *filters: nnx.filterlib.Filter) -> dict[str, np.ndarray]:
    """The model's variables (those `filters` select, e.g. nnx.Param; all by default) as
    numpy copies on the host, by dotted path: weights, BatchNorm statistics, code usage."""
    return {".".join(map(str, path)): np.array(variable[...])
            for path, variable in nnx.to_flat_state(nnx.state(model, *filters))}


def import_arrays(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load export_arrays' dict into `model` in place, each array cast to its variable's
    dtype; a one-line UserError for a missing or unexpected key, or a wrong shape. `model`
    may be abstract (nnx.eval_shape): every variable is replaced, none initialised."""
    variables = {".".join(map(str, path)): node for path, node in nnx.iter_graph(model)
                 if isinstance(node, nnx.Variable)}
    layout.check_fits(arrays, {key: variable.get_value().shape
                               for key, variable in variables.items()})
    for key, variable in variables.items():  # replaced, not written into: no scatter to
        #   compile; copied: on a CPU jnp.asarray may share the caller's (PyTorch's) memory
        variable.set_value(jnp.array(arrays[key], variable.get_value().dtype))


def _record(manager: ocp.CheckpointManager, step: int, path: str, kind: str | None
            ) -> CheckpointRecord:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    # every Flax checkpoint holds an optimizer state (a converted one, a fresh one)
    return checkpoint_record.read_record(meta, path, "jax", holds_optimizer=True, kind=kind)


def _newest_step(manager: ocp.CheckpointManager, path: str) -> int | None:
    """The newest step that holds this project's record, None if none. orbax takes any
    folder named by a number for a step: one newer than our newest (or there where we have
    none) would be restored in its place, or count towards the KEEP steps a run keeps, and
    a fresh run would write over the steps it hides, so it is a UserError, the folder left
    alone. (An older one is what an interrupted prune leaves, for remove_partial_writes.)"""
    steps = manager.all_steps()
    ours = [step for step in steps if checkpoint_record.is_flax_step(os.path.join(path, str(step)))]
    newest = max(ours, default=None)
    if foreign := [step for step in steps if newest is None or step > newest]:
        raise UserError(f"{os.path.join(path, str(min(foreign)))} is not a step of this "
                        f"project's checkpoint (it holds no record), yet orbax would take it "
                        f"for one: move it out of {path}")
    return newest


@contextlib.contextmanager
def _reading(path: str, kind: str | None):
    """(manager, newest complete step) of a `kind` model's checkpoint (None: either kind's);
    any damage becomes one UserError line."""
    checkpoint_record.refuse_run_directory(path, kind)
    if not os.path.isdir(path):
        convert = (f" (if it is a PyTorch checkpoint, convert it: python convert.py "
                   f"--from-torch {path} --out DIR)") if os.path.isfile(path) else ""
        raise UserError(f"{path} is not a Flax checkpoint directory{convert}")
    try:
        with _manager(path) as manager:
            step = _newest_step(manager, path)
            if step is None:
                parent = os.path.dirname(os.path.normpath(path))
                hint = (f": it is one step of the checkpoint {parent}, pass that"
                        if checkpoint_record.is_flax_step(path) else "")
                raise UserError(f"{path} holds no complete checkpoint{hint}")
            yield manager, step
    except UserError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for a damaged checkpoint
        raise UserError(f"cannot load {path}: truncated or corrupt ({type(e).__name__}: "
                        f"{clip(str(e), 120)})") from e
