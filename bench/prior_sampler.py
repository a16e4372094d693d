"""The prior's samplers side by side: PyTorch's eager loop over the h * w positions against
Flax's one jitted fori_loop, on the same weights and the same Gumbel noise.

    python bench/prior_sampler.py [--num 100] [--repeats 3] [--json OUT]

The prior has the shape of the shipped MNIST one (7 x 7 codes, K = 512, F = 32, 8 layers,
class-conditional; random weights: the cost does not depend on them). Reported per twin:
first_call_s (Flax: tracing and compilation included), seconds (median of --repeats calls
after it) and samples_per_s; and whether both drew the same codes. A measurement, never a
test.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import jax
import numpy as np
import timing  # bench/timing.py, beside this script
import torch
from flax import nnx

from vqvae_common import layout
from vqvae_common import prior as common
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax import prior as jax_prior
from vqvae_torch import checkpoint as torch_checkpoint
from vqvae_torch import prior as torch_prior

CONFIG = common.PriorConfig(vqvae="unused", channels=32, layers=8, conditional=True,
                            dataset="mnist", num_codes=512)


def timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of `repeats` later calls)."""
    return timing.seconds(call), timing.median_seconds(call, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=100, help="samples per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    t_model = torch_prior.PixelCNN(CONFIG).eval()
    f_model = jax_prior.PixelCNN(CONFIG, rngs=nnx.Rngs(0))
    jax_checkpoint.import_arrays(f_model,
                                 layout.torch_to_flax(torch_checkpoint.export_arrays(t_model)))
    labels = common.sample_labels(args.num, CONFIG.num_classes)
    gumbel = common.gumbel_noise(0, args.num, CONFIG.code_shape, CONFIG.num_codes)

    t_labels, t_gumbel = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(gumbel)
    t_codes = []
    t_first, t_median = timed(
        lambda: t_codes.append(torch_prior.sample(t_model, t_labels, t_gumbel)), args.repeats)

    graphdef, state = nnx.split(f_model)
    sample = jax.jit(lambda s, l, g: jax_prior.sample(nnx.merge(graphdef, s), l, g))
    f_labels, f_gumbel = jax.device_put(labels), jax.device_put(gumbel)
    f_codes = []
    f_first, f_median = timed(
        lambda: f_codes.append(sample(state, f_labels, f_gumbel).block_until_ready()),
        args.repeats)

    results = {
        "device": timing.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "num": args.num,
        "config": {"code_shape": CONFIG.code_shape, "num_codes": CONFIG.num_codes,
                   "channels": CONFIG.channels, "layers": CONFIG.layers},
        "torch_eager": {"first_call_s": t_first, "seconds": t_median,
                        "samples_per_s": args.num / t_median},
        "flax_jit": {"first_call_s": f_first, "seconds": f_median,
                     "samples_per_s": args.num / f_median},
        "same_codes": bool(np.array_equal(t_codes[-1].numpy(), np.asarray(f_codes[-1]))),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
