#!/usr/bin/env python
"""Evaluate a checkpoint of either twin on a whole test split.

    python evaluate.py --checkpoint runs/t/checkpoint.pt [--json OUT]   # PyTorch: a file
    python evaluate.py --checkpoint runs/j/checkpoint [--json OUT]      # Flax: a directory

Prints and writes (--json) mse (on [-1, 1]), psnr (dB, on [0, 255], from the split's MSE),
psnr_8bit (dB, each image rounded to 8 bits, averaged over images as papers report it), ssim,
perplexity (over the whole split), codes_used (fraction of the K codes) and images_per_s.
Given the same weights, both frameworks' checkpoints give the same numbers.

The test split is --dataset's. Without it, it is the dataset in the config.json that training
wrote beside the checkpoint, when that file records this checkpoint's model config; else the
only dataset whose images have as many channels as the model takes.
"""
import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from vqvae_common import atomic, cli, config, data, loop
from vqvae_common.errors import UserError

KEYS = ("mse", "psnr", "psnr_8bit", "ssim", "perplexity", "codes_used", "images_per_s")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.UserErrorParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a PyTorch checkpoint file or a Flax checkpoint directory")
    p.add_argument("--dataset", choices=tuple(config.DATASETS), default=None,
                   help="the test split to evaluate on (default: the dataset of the training "
                        "run's config.json beside the checkpoint, when it records this "
                        "model; else the only dataset whose images have the model's "
                        "channel count)")
    cli.add_flag(p, config.TrainConfig, "data_dir")
    cli.add_flag(p, config.TrainConfig, "device")
    cli.add_flag(p, config.TrainConfig, "eval_batch_size", "--batch-size")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def trained_on(checkpoint: str, model_cfg: config.ModelConfig) -> str | None:
    """The dataset recorded in the config.json beside `checkpoint`, if that file is a
    training run's config for this very model (a converted checkpoint may sit beside an
    unrelated one). Only the model and the dataset are read: a training flag that today's
    bounds refuse does not hide them."""
    recorded = config.read_run(os.path.dirname(os.path.abspath(checkpoint)))
    try:  # absent, or not a VQ-VAE run's config (a prior's, say: a checkpoint converted
        #   into it)
        run_model, dataset = config.model_config(recorded["model"]), recorded["train"]["dataset"]
        return dataset if run_model == model_cfg and dataset in config.DATASETS else None
    except (KeyError, TypeError, UserError):
        return None


def choose_dataset(requested: str | None, checkpoint: str, model_cfg: config.ModelConfig
                   ) -> config.Dataset:
    """--dataset, else the training run's, else the only one the model's channels fit."""
    channels = model_cfg.in_channels
    name = requested or trained_on(checkpoint, model_cfg)
    if name is None:
        fits = [d.name for d in config.DATASETS.values() if d.image_shape[2] == channels]
        if not fits:
            raise UserError(f"the model in {checkpoint} takes {channels}-channel images, "
                            f"which no dataset here has")
        if len(fits) > 1:
            raise UserError(f"cannot tell which of {', '.join(fits)} the model in "
                            f"{checkpoint} was trained on: pass --dataset")
        name = fits[0]
    dataset = config.DATASETS[name]
    if dataset.image_shape[2] != channels:
        raise UserError(f"the model takes {channels}-channel images, "
                        f"{name} has {dataset.image_shape[2]}")
    return dataset


def run(args: argparse.Namespace) -> dict[str, float]:
    if args.json is not None:
        cli.check_output_file(args.json, "--json", kind="JSON")
    if os.path.isfile(args.checkpoint):
        from vqvae_torch.train import TorchTwin as Twin, deterministic
        deterministic()  # the process is this tool's: its figures do not vary run to run
    elif os.path.isdir(args.checkpoint):
        from vqvae_jax.train import JaxTwin as Twin
    else:
        raise UserError(f"no checkpoint at {args.checkpoint}")
    twin = Twin.from_checkpoint(args.checkpoint, args.device)
    model_cfg = twin.config
    dataset = choose_dataset(args.dataset, args.checkpoint, model_cfg).name
    batch_size = args.eval_batch_size
    test_images = data.load(dataset, "test", args.data_dir)
    twin.evaluate(data.to_float(test_images[:batch_size]))  # compile outside the timing
    start = time.perf_counter()
    result = loop.evaluate(twin, test_images, batch_size, model_cfg.num_codes, "evaluate")
    result["images_per_s"] = len(test_images) / (time.perf_counter() - start)
    result = {key: result[key] for key in KEYS}
    print(f"{dataset} test ({len(test_images)} images): " +
          ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    if args.json is not None:
        try:  # checked before the evaluation; a disk that fills up since is still possible
            atomic.write_atomic(args.json, json.dumps(result, indent=2))
        except OSError as e:
            raise UserError(f"cannot write --json {args.json}: {e.strerror or e} (the "
                            f"results are printed above)") from e
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return cli.report_errors(lambda: run(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
