#!/usr/bin/env python
"""Evaluate a checkpoint of either twin on a whole test split.

    python evaluate.py --checkpoint runs/t/checkpoint.pt [--json OUT]   # PyTorch: a file
    python evaluate.py --checkpoint runs/j/checkpoint [--json OUT]      # Flax: a directory

Prints and writes (--json) mse (on [-1, 1]), psnr (dB, on [0, 255]), ssim, perplexity (over
the whole split), codes_used (fraction of the K codes) and images_per_s. Given the same
weights, both frameworks' checkpoints give the same numbers.
"""
import json
import os
import sys
import time

from vqvae_common import cli, config, data, loop
from vqvae_common.errors import UserError

KEYS = ("mse", "psnr", "ssim", "perplexity", "codes_used", "images_per_s")


def parse(argv):
    p = cli.UserErrorParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a PyTorch checkpoint file or a Flax checkpoint directory")
    p.add_argument("--dataset", choices=config.DATASETS, default=None,
                   help="default: the one whose channels the model takes")
    p.add_argument("--data-dir", default=None, help="as for training")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=500)
    return p.parse_args(argv)


def run(args) -> dict[str, float]:
    if os.path.isfile(args.checkpoint):
        from vqvae_torch.train import TorchTwin as Twin
    elif os.path.isdir(args.checkpoint):
        from vqvae_jax.train import JaxTwin as Twin
    else:
        raise UserError(f"no checkpoint at {args.checkpoint}")
    twin = Twin.from_checkpoint(args.checkpoint, args.device)
    model_cfg = twin.config
    dataset = args.dataset or next(name for name, shape in config.IMAGE_SHAPES.items()
                                   if shape[2] == model_cfg.in_channels)
    if config.IMAGE_SHAPES[dataset][2] != model_cfg.in_channels:
        raise UserError(f"the model takes {model_cfg.in_channels}-channel images, "
                        f"{dataset} has {config.IMAGE_SHAPES[dataset][2]}")
    test_images = data.load(dataset, "test", args.data_dir)
    twin.evaluate(data.to_float(test_images[:args.batch_size]))  # compile outside the timing
    start = time.perf_counter()
    result = loop.evaluate(twin, test_images, args.batch_size, model_cfg.num_codes)
    result["images_per_s"] = len(test_images) / (time.perf_counter() - start)
    result = {key: result[key] for key in KEYS}
    print(f"{dataset} test ({len(test_images)} images): " +
          ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    if args.json:
        loop.write_atomic(args.json, json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    return cli.report_errors(lambda: run(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
