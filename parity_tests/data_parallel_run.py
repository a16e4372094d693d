"""One twin's 2-device run for the data-parallel parity level (test_data_parallel.py): 20
float64 Adam steps from the weights in IN.npz (PyTorch keys) on the global batches there.

    python parity_tests/data_parallel_run.py jax IN.npz OUT.npz
        under XLA_FLAGS=--xla_force_host_platform_device_count=2: JaxTwin's mesh over 2
        CPU devices, each step following PyTorch's code indices (IN.npz's "indices", from
        the PyTorch run) and proving each index it changed a near-tie (parity_tests/ties.py)
    python parity_tests/data_parallel_run.py torch IN.npz OUT.npz
        in each of 2 processes started as torchrun starts them (RANK, WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT): TorchTwin under DistributedDataParallel; rank 0 writes

OUT.npz: each step's loss terms ("loss/<term>", (20,)), the final weights by PyTorch key
("state/<key>"), and the run's code indices of each step ("indices", (20, B, h, w)); JAX
also the audit's counts. A script: the device and process counts are fixed when a process
starts, so the test runs each twin in processes of their own.
"""
from __future__ import annotations

import functools
import sys

import numpy as np

from vqvae_common import layout
from vqvae_common.config import ModelConfig, TrainConfig

STEPS, BATCH, LR = 20, 16, 1e-3
# EMA codebook and dead-code restarts on: every global batch statistic of the step
MODEL = ModelConfig(in_channels=1, hidden=16, num_codes=32, codebook_update="ema")
TRAIN = TrainConfig(device="cpu", num_devices=2, batch_size=BATCH, lr=LR)


def jax_run(given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from parity_tests.ties import Audit, follow
    from parity_tests.twins import flax_state
    from vqvae_jax import checkpoint
    from vqvae_jax import train as jax_train
    from vqvae_jax import xla_cpu

    jax.config.update("jax_enable_x64", True)
    twin = jax_train.JaxTwin(MODEL, TRAIN)
    model, optimizer = nnx.merge(twin.graphdef, twin.state)
    floats = nnx.state((model, optimizer), lambda _, v: np.issubdtype(v.dtype, np.floating))
    nnx.update((model, optimizer), jax.tree.map(lambda a: a.astype(np.float64), floats))
    checkpoint.import_arrays(model, layout.torch_to_flax(weights(given)))
    state = jax.device_put(nnx.state((model, optimizer)), twin.replicated)
    audit = Audit()

    @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options(twin.device))
    def step(state, batch, reference, number):
        with follow(reference, audit, number):  # active while tracing; each call its own
            return jax_train.train_step(twin.graphdef, state, batch)

    losses = []
    for number in range(STEPS):
        state, terms = step(state, twin._put(given["batches"][number]),
                            given["indices"][number].ravel(), number)
        losses.append(twin.fetch(terms))
    audit.verify()  # an index that differs beyond a near-tie fails here
    trained, _ = nnx.merge(twin.graphdef, state)
    return {**stacked(losses), **{f"state/{k}": v for k, v in flax_state(trained).items()},
            "compared": np.array(audit.compared), "aligned": np.array(audit.aligned)}


def torch_run(given: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    import torch
    import torch.distributed as dist

    from parity_tests.twins import torch_state
    from vqvae_torch import distributed
    from vqvae_torch import train as torch_train

    torch_train.TorchTwin.join_processes(TRAIN)
    twin = torch_train.TorchTwin(MODEL, TRAIN)
    assert twin.num_devices == 2, "start 2 processes: torchrun --standalone --nproc_per_node 2"
    twin.model.double()  # in place: the optimizer keeps the same parameters
    twin.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights(given).items()})
    indices: list[np.ndarray] = []  # this process's share of each step's
    twin.model.quantizer.register_forward_hook(
        lambda module, args, out: indices.append(out.indices.cpu().numpy()))
    losses = [twin.fetch(twin.train_step(given["batches"][number])) for number in range(STEPS)]
    dist_rank = dist.get_rank()
    shares: list[list[np.ndarray] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, indices)
    every_step = np.stack([np.concatenate(step) for step in zip(*shares)])  # rank order
    result = {**stacked(losses), "indices": every_step,
              **{f"state/{k}": v for k, v in torch_state(twin.model).items()}}
    # both leave together, and with the DDP wrapper freed (distributed.leave)
    dist.barrier()
    del twin
    distributed.leave()
    return result if dist_rank == 0 else None


def weights(given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("state/"):]: v for k, v in given.items() if k.startswith("state/")}


def stacked(losses: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {f"loss/{term}": np.array([step[term] for step in losses]) for term in losses[0]}


if __name__ == "__main__":
    framework, source, out = sys.argv[1:]
    given = dict(np.load(source))
    result = {"jax": jax_run, "torch": torch_run}[framework](given)
    if result is not None:
        np.savez(out, **result)
