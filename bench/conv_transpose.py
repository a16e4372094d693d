"""Forward + backward time of PyTorch's ConvTranspose2d(4, 2, 1) written three ways in JAX, on
the shapes of the model's two transposed convolutions, interleaved (A, B, C, A, B, C, ...):

    autodiff_lhs_dilated   jax.lax.conv_transpose, differentiated by JAX
    autodiff_subpixel      a 2x2 stride-1 conv to 4*O channels + depth-to-space, by JAX
    adjoint_custom_vjp     vqvae_jax.model.conv_transpose (what the model uses)

    python bench/conv_transpose.py [--dataset mnist|cifar10] [--batch 64] [--repeats 5]

Prints the median time of each and its ratio to the model's formulation. A measurement,
never a test.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqvae_common.config import DATASETS
from vqvae_jax.model import conv_transpose

TAPS = np.array([[3, 1], [2, 0]])  # output phase a takes kernel rows 3 - a - 2t, t in {0, 1}


def autodiff_lhs_dilated(x, kernel):
    return jax.lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def autodiff_subpixel(x, kernel):
    b, h, w, i = x.shape
    k = kernel[TAPS][:, :, TAPS]  # (a, t, c, u, I, O)
    o = k.shape[-1]
    k = k.transpose(1, 3, 4, 0, 2, 5).reshape(2, 2, i, 4 * o)
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, h + 1, w + 1, 2, 2, o)
    phases = jnp.stack([jnp.stack([y[:, a:a + h, c:c + w, a, c] for c in (0, 1)], 3)
                        for a in (0, 1)], 2)
    return phases.reshape(b, 2 * h, 2 * w, o)


FORMULATIONS = {"autodiff_lhs_dilated": autodiff_lhs_dilated,
                "autodiff_subpixel": autodiff_subpixel,
                "adjoint_custom_vjp": conv_transpose}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d, c = DATASETS[args.dataset].preset.hidden, DATASETS[args.dataset].image_shape[2]
    h = DATASETS[args.dataset].image_shape[0] // 4
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, {args.dataset}, batch {args.batch}: "
          f"median ms of forward + gradient (x and kernel)")
    for name, (size, i, o) in {"deconv1": (h, d, d), "deconv2": (2 * h, d, c)}.items():
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, i)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((4, 4, i, o)) * 0.05, jnp.float32)
        steps = {k: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
                 for k, f in FORMULATIONS.items()}
        reference = conv_transpose(x, kernel)
        for k, f in FORMULATIONS.items():  # all compute the same function
            np.testing.assert_allclose(f(x, kernel), reference, rtol=1e-4, atol=1e-4)
            jax.block_until_ready(steps[k](x, kernel))
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.repeats):
            for k, step in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(x, kernel))
                times[k].append(time.perf_counter() - start)
        ours = np.median(times["adjoint_custom_vjp"])
        for k, t in times.items():
            print(f"  {name} {size}x{size}x{i}->{o:<4} {k:22} {np.median(t) * 1e3:9.1f} ms"
                  f"  {np.median(t) / ours:6.1f}x")


if __name__ == "__main__":
    main()
