"""Where the Flax step's time goes, against PyTorch's: each layer of the model, forward +
backward as the train step takes it, in both twins, then the whole steps, interleaved
(torch, flax, torch, flax, ...) in one process:

    python bench/layers_vs_torch.py [--dataset mnist|cifar10] [--batch 64] [--repeats 7]

A layer is the twins' own module (vqvae_torch/model.py, vqvae_jax/model.py with its CPU fast
path), in train mode, differentiated as in the step: its kernel, bias and scale always, its
input except at the first layer, whose input is the data. Flax runs it jitted with the
trainer's compiler options. Each layer's time is multiplied by how often the model holds it,
and what the whole step takes beyond the sum is "the rest" (the quantizer, loss, ReLUs,
Adam, the dead-code restart, the call). Prints the median of each; a measurement, never a
test. CPU only.

Both frameworks share this process, and each one's idle threads wait for work by spinning
for a while: measured on a 2-core AMD EPYC (Zen 4), MNIST, the Flax step took 177 ms beside
PyTorch's OpenMP threads spinning, 144 ms with OMP_WAIT_POLICY=PASSIVE (set here), 140 ms
alone in its process; PyTorch's step 140-144 ms here, 123 ms alone. So the Flax column reads
as in a Flax-only process and the PyTorch column is pessimistic: the step ratio that counts
is bench/train_step.py's.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from vqvae_common import host_memory

host_memory.keep_freed_memory()  # as the trainers run, before either framework allocates
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import jax  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402  # bench/timing.py, beside this script
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from vqvae_common.config import DATASETS, TrainConfig  # noqa: E402
from vqvae_jax import xla_cpu  # noqa: E402
from vqvae_jax.train import JaxTwin  # noqa: E402
from vqvae_torch.train import TorchTwin  # noqa: E402

# (module path, copies in the model, input (H, W, C) as a fraction of the image side and
# channels: "c" the image's, "d" the hidden width, first layer or not)
LAYERS = [("encoder.conv1", 1, 1, "c", True), ("encoder.bn1", 2, 2, "d", False),
          ("encoder.conv2", 1, 2, "d", False), ("encoder.res1.conv1", 4, 4, "d", False),
          ("encoder.res1.bn1", 8, 4, "d", False), ("encoder.res1.conv2", 4, 4, "d", False),
          ("decoder.deconv1", 1, 4, "d", False), ("decoder.deconv2", 1, 2, "d", False)]


def submodule(root, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def torch_layer(module: torch.nn.Module, x: np.ndarray, cotangent: np.ndarray, first: bool
                ) -> Callable[[], None]:
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(not first)
    ct = torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous()

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x_t.grad = None
        module(x_t).backward(ct)
    return run


def flax_layer(module: nnx.Module, x: np.ndarray, cotangent: np.ndarray, first: bool
               ) -> Callable[[], None]:
    graphdef, state = nnx.split(module)

    def forward_and_backward(state, x, ct):
        """The gradients of <layer(x), ct> and layer(x) itself: returned, so that XLA cannot
        drop the forward pass of a linear layer, whose gradients do not need its output."""
        def inner_product(layer, x):
            y = layer(x)
            return (y * ct).sum(), y
        layer = nnx.merge(graphdef, state)
        return nnx.grad(inner_product, argnums=0 if first else (0, 1), has_aux=True)(layer, x)

    step = jax.jit(forward_and_backward,
                   compiler_options=xla_cpu.compiler_options(jax.devices("cpu")[0]))
    x, ct = jax.numpy.asarray(x), jax.numpy.asarray(cotangent)
    return lambda: jax.block_until_ready(step(state, x, ct))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    spec = DATASETS[args.dataset]
    train_cfg = TrainConfig(device="cpu", batch_size=args.batch)
    twins = {"torch": TorchTwin(spec.preset, train_cfg), "flax": JaxTwin(spec.preset, train_cfg)}
    flax_model = nnx.merge(twins["flax"].graphdef, twins["flax"].state)[0]
    flax_model.train()
    twins["torch"].model.train()
    rng = np.random.default_rng(0)
    side, channels = spec.image_shape[0], {"c": spec.image_shape[2], "d": spec.preset.hidden}
    print(f"{args.dataset}, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"median ms of {args.repeats} interleaved windows")
    print(f"{'layer':22s} {'copies':>6s} {'torch':>8s} {'flax':>8s} {'flax/torch':>10s}")
    total = {"torch": 0.0, "flax": 0.0}
    for path, copies, fraction, width, first in LAYERS:
        x = rng.standard_normal((args.batch, side // fraction, side // fraction,
                                 channels[width])).astype(np.float32)
        torch_module = submodule(twins["torch"].model, path)
        with torch.no_grad():
            out_shape = torch_module(torch.from_numpy(x).permute(0, 3, 1, 2)).shape
        ct = rng.standard_normal((out_shape[0], *out_shape[2:], out_shape[1])).astype(np.float32)
        median = {name: seconds * 1e3 for name, seconds in timing.interleaved({
            "torch": torch_layer(torch_module, x, ct, first),
            "flax": flax_layer(submodule(flax_model, path), x, ct, first)}, args.repeats, 5
        ).items()}
        for name in total:
            total[name] += copies * median[name]
        print(f"{path:22s} {copies:6d} {median['torch']:8.2f} {median['flax']:8.2f} "
              f"{median['flax'] / median['torch']:10.2f}")
    batch = rng.uniform(-1, 1, (args.batch, *spec.image_shape)).astype(np.float32)
    step = {name: seconds * 1e3 for name, seconds in timing.interleaved(
        {name: lambda twin=twin: twin.fetch(twin.train_step(batch))
         for name, twin in twins.items()}, args.repeats, 3).items()}
    rest = {name: step[name] - total[name] for name in total}
    for label, row in (("layers x copies", total), ("the rest", rest), ("whole step", step)):
        print(f"{label:22s} {'':6s} {row['torch']:8.2f} {row['flax']:8.2f} "
              f"{row['flax'] / row['torch']:10.2f}")


if __name__ == "__main__":
    main()
