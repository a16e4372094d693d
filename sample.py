#!/usr/bin/env python
"""Sample images from a trained PixelCNN prior of either twin: codes drawn position by
position, decoded by the VQ-VAE the prior models, written as one grid PNG.

    python sample.py --prior runs/prior_t/prior.pt --out samples.png      # PyTorch: a file
    python sample.py --prior runs/prior_j/prior --out samples.png         # Flax: a directory

A class-conditional prior draws one class per row (--num / classes images each, so --num is
a multiple of the classes). The draws come from numpy's Gumbel noise of --seed
(vqvae_common.prior.gumbel_noise), so both twins, given the same weights, sample the same
codes.
"""
import argparse
import os
import sys
from collections.abc import Sequence

from vqvae_common import cli, config, prior
from vqvae_common.errors import UserError


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.UserErrorParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True,
                   help="a train_torch.py prior checkpoint file (prior.pt) or a train_jax.py "
                        "prior checkpoint directory (prior)")
    p.add_argument("--vqvae", default=None,
                   help="the VQ-VAE checkpoint to decode with, in the prior's framework "
                        "(default: the one the prior was trained on, as its checkpoint "
                        "records it)")
    p.add_argument("--num", type=int, default=100, action=cli.InBounds, bounds=(1, 10_000),
                   help="images to sample; for a class-conditional prior a multiple of its "
                        "classes, one row per class (default: 100)")
    cli.add_flag(p, config.TrainConfig, "seed",
                 help_text="seed of the Gumbel noise that draws each code")
    cli.add_flag(p, config.TrainConfig, "device")
    p.add_argument("--out", default="samples.png", help="the grid PNG (default: samples.png)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    cli.check_output_file(args.out, "--out", kind="PNG")
    if os.path.isfile(args.prior):
        from vqvae_torch.prior_train import TorchPriorTwin as Twin
        from vqvae_torch.train import deterministic
        deterministic()  # the process is this tool's: its samples do not vary run to run
    elif os.path.isdir(args.prior):
        from vqvae_jax.prior_train import JaxPriorTwin as Twin
    else:
        raise UserError(f"no prior checkpoint at {args.prior}")
    twin = Twin.from_checkpoint(args.prior, args.device, args.vqvae)
    try:  # --out was checked first; a disk that fills up since is still possible
        prior.write_samples(twin, args.num, args.seed, args.out)
    except OSError as e:
        raise UserError(f"cannot write --out {args.out}: {e.strerror or e}") from e
    print(f"wrote {args.num} samples to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.report_errors(lambda: run(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
