"""Each fast formulation of vqvae_jax/xla_cpu.py against the plain XLA op it replaces, forward
+ backward on the shapes of the model's layers, interleaved (plain, fast, plain, fast, ...):

    case            plain (vqvae_jax/model.py)            fast (vqvae_jax/xla_cpu.py)
    batch_norm      batch_norm, differentiated by JAX     batch_norm, closed-form backward
    strided_conv    lax.conv_general_dilated, 4x4/2       conv_general_dilated -> strided_conv
    conv3x3         lax.conv_general_dilated, 3x3         conv_general_dilated -> Winograd
                                                          (even sizes; odd: the plain conv)
    conv1x1         lax.conv_general_dilated, 1x1         conv_general_dilated -> matmul
    conv_transpose  conv_transpose (lax.conv_transpose)   conv_transpose, the adjoint
    train_step      the whole jitted Adam step of VQVAE(fast_cpu=False) and (fast_cpu=True)

    python bench/xla_cpu_kernels.py [--dataset mnist|cifar10] [--batch 64] [--repeats 9]
                                    [--device cpu|gpu] [--cases batch_norm,...]

Each layer case takes the gradient the train step takes: the kernel's and scale's always, the
input's except at the first layer, whose input is the data. Prints the median time of each
and plain / fast (above 1: the fast path is faster). A measurement, never a test.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing  # bench/timing.py, beside this script
from flax import nnx

from vqvae_common.config import DATASETS
from vqvae_jax import model, train, xla_cpu

NHWC = ("NHWC", "HWIO", "NHWC")


def conv(convolve: Callable, strides: tuple[int, int], padding) -> Callable:
    return lambda x, w: convolve(x, w, strides, padding, dimension_numbers=NHWC)


def layer_cases(dataset: str, batch: int) -> list[tuple[str, str, Callable, Callable, list]]:
    """(case, layer, plain f, fast f, argument shapes) on the model's shapes; f(x, ...) is
    differentiated with respect to every argument but x, and x too unless `layer` is the
    first."""
    spec = DATASETS[dataset]
    d, size, c = spec.hidden, spec.image_shape[0], spec.image_shape[2]
    half, quarter = (batch, size // 2, size // 2, d), (batch, size // 4, size // 4, d)
    norm = {"plain": lambda x, s, b: model.batch_norm(x, s, b, 1e-5)[0],
            "fast": lambda x, s, b: xla_cpu.batch_norm(x, s, b, 1e-5)[0]}
    strided = [conv(f, (2, 2), ((1, 1), (1, 1)))
               for f in (jax.lax.conv_general_dilated, xla_cpu.conv_general_dilated)]
    same = [conv(f, (1, 1), ((1, 1), (1, 1)))
            for f in (jax.lax.conv_general_dilated, xla_cpu.conv_general_dilated)]
    pointwise = [conv(f, (1, 1), ((0, 0), (0, 0)))
                 for f in (jax.lax.conv_general_dilated, xla_cpu.conv_general_dilated)]
    transposed = [model.conv_transpose, xla_cpu.conv_transpose]
    return [
        ("batch_norm", "encoder.bn1", norm["plain"], norm["fast"], [half, (d,), (d,)]),
        ("batch_norm", "res*.bn*", norm["plain"], norm["fast"], [quarter, (d,), (d,)]),
        ("strided_conv", "encoder.conv1", *strided, [(batch, size, size, c), (4, 4, c, d)]),
        ("strided_conv", "encoder.conv2", *strided, [half, (4, 4, d, d)]),
        ("conv3x3", "res*.conv1", *same, [quarter, (3, 3, d, d)]),
        ("conv1x1", "res*.conv2", *pointwise, [quarter, (1, 1, d, d)]),
        ("conv_transpose", "decoder.deconv1", *transposed, [quarter, (4, 4, d, d)]),
        ("conv_transpose", "decoder.deconv2", *transposed, [half, (4, 4, d, c)]),
    ]


def gradient_step(f: Callable, first_layer: bool, cotangent: jax.Array) -> Callable:
    """f's output and the gradients of <f(...), cotangent>: the output is returned so that XLA
    cannot drop the forward pass of a linear f, whose gradients do not need it."""
    def loss(*args):
        y = f(*args)
        return jnp.vdot(y, cotangent), y

    def step(x, *params):
        if first_layer:
            return jax.grad(lambda *p: loss(x, *p), range(len(params)), has_aux=True)(*params)
        return jax.grad(loss, range(1 + len(params)), has_aux=True)(x, *params)
    return jax.jit(step)


def step_case(dataset: str, batch: int) -> tuple[Callable, Callable]:
    """The jitted train step of the plain and of the fast model, as run windows."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (batch, *DATASETS[dataset].image_shape)), jnp.float32)
    runs = []
    for fast_cpu in (False, True):
        net = model.VQVAE(DATASETS[dataset].preset, fast_cpu=fast_cpu, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split((net, nnx.Optimizer(net, optax.adam(3e-4), wrt=nnx.Param)))
        step = jax.jit(functools.partial(train.train_step, graphdef))
        runs.append(lambda step=step, state=state: jax.block_until_ready(step(state, x)))
    return runs[0], runs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default=None,
                        help="comma-separated cases to run (default: all, train_step included)")
    args = parser.parse_args()
    cases = args.cases.split(",") if args.cases else None
    device = jax.devices(args.device)[0]
    print(f"{device.device_kind} ({timing.machine()}), jax {jax.__version__}, {args.dataset}, "
          f"batch {args.batch}: median ms of forward + gradient, {args.repeats} interleaved repeats")
    print(f"  {'case':15} {'layer':16} {'shape':26} {'plain':>9} {'fast':>9} {'plain/fast':>10}")
    rng = np.random.default_rng(0)
    with jax.default_device(device):
        for case, layer, plain_f, fast_f, shapes in layer_cases(args.dataset, args.batch):
            if cases and case not in cases:
                continue
            inputs = [jnp.asarray(rng.standard_normal(s) * (0.05 if i else 1), jnp.float32)
                      for i, s in enumerate(shapes)]
            out = plain_f(*inputs)
            np.testing.assert_allclose(fast_f(*inputs), out, rtol=1e-4,
                                       atol=1e-4 * float(jnp.abs(out).max()))
            cotangent = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
            first = layer == "encoder.conv1"
            steps = [gradient_step(f, first, cotangent) for f in (plain_f, fast_f)]
            for g_plain, g_fast in zip(steps[0](*inputs)[0], steps[1](*inputs)[0]):
                np.testing.assert_allclose(g_fast, g_plain, rtol=1e-3,
                                           atol=1e-4 * float(jnp.abs(g_plain).max()))
            plain_s, fast_s = timing.interleaved({
                "plain": lambda: jax.block_until_ready(steps[0](*inputs)),
                "fast": lambda: jax.block_until_ready(steps[1](*inputs))}, args.repeats).values()
            shape = f"{'x'.join(map(str, shapes[0]))}->{out.shape[-1]}"
            print(f"  {case:15} {layer:16} {shape:26} {plain_s * 1e3:9.2f} {fast_s * 1e3:9.2f}"
                  f" {plain_s / fast_s:9.2f}x", flush=True)
        if not cases or "train_step" in cases:
            plain_s, fast_s = timing.interleaved(dict(zip(
                ("plain", "fast"), step_case(args.dataset, args.batch))), args.repeats).values()
            print(f"  {'train_step':15} {'whole model':16} {'':26} {plain_s * 1e3:9.2f} "
                  f"{fast_s * 1e3:9.2f} {plain_s / fast_s:9.2f}x")


if __name__ == "__main__":
    main()
