"""20 steps of the Flax twin on 1 device and on 2 (JaxTwin's mesh over XLA's forced host
devices) from the same weights on the same global batches, in float64: writes
the final states, flattened by path, to OUT.npz, and prints each run's loss terms per step
and the error a global batch of 15 gets on 2 devices, as JSON; then trains 2 steps through
the shared loop on every device, into the folder `run` beside OUT.npz.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/jax_devices_run.py OUT.npz

A script, not a test: the device count is fixed when JAX starts, so tests/test_jax_devices.py
runs it in a process of its own."""
import json
import os
import sys

import jax
import numpy as np

from vqvae_common import data, loop
from vqvae_common.config import ModelConfig, TrainConfig
from vqvae_common.errors import UserError
from vqvae_jax.train import JaxTwin

STEPS, BATCH = 20, 16
# EMA codebook and dead-code restarts on: every global batch statistic of the step
MODEL = ModelConfig(in_channels=1, hidden=16, num_codes=32, codebook_update="ema")


def run(num_devices: int) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    twin = JaxTwin(MODEL, TrainConfig(device="cpu", num_devices=num_devices,
                                      batch_size=BATCH, lr=1e-3))
    assert twin.num_devices == num_devices
    twin.state = jax.device_put(jax.tree.map(
        lambda a: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a,
        twin.state), twin.replicated)
    images = np.random.default_rng(0).integers(0, 256, (STEPS * BATCH, 28, 28, 1), np.uint8)
    losses = [twin.fetch(twin.train_step(batch.astype(np.float64)))
              for batch in data.batches(images, BATCH, seed=0, epoch=0)]
    state = {jax.tree_util.keystr(path): np.asarray(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(twin.state)}
    return losses, state


def main(out: str) -> None:
    assert len(jax.devices("cpu")) == 2, \
        "run with XLA_FLAGS=--xla_force_host_platform_device_count=2"
    arrays, losses = {}, {}
    with jax.enable_x64():  # float32 was compared too until stop 39, within 3.6e-4 (bound
        #                        5e-2); the trainer's run below still runs it on 2 devices
        for n in (1, 2):
            losses[f"float64/{n}"], state = run(n)
            arrays.update({f"float64/{n}/{k}": v for k, v in state.items()})
    np.savez(out, **arrays)
    try:
        JaxTwin(MODEL, TrainConfig(device="cpu", batch_size=15))
        refused = None
    except UserError as e:
        refused = str(e)
    print(json.dumps({"losses": losses, "batch 15 refused": refused}))
    train_on_two_devices(os.path.join(os.path.dirname(out), "run"))


def train_on_two_devices(out: str) -> None:
    """A whole run of the trainer's loop on random images: by default on every device."""
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), np.uint8)
    loop.data.load = lambda name, split, data_dir=None: images
    loop.fit(JaxTwin, MODEL, TrainConfig(device="cpu", batch_size=BATCH, max_steps=2,
                                         codebook_init="uniform", out=out))


if __name__ == "__main__":
    main(sys.argv[1])
