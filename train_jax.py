#!/usr/bin/env python
"""Train the Flax VQ-VAE: `python train_jax.py --help` lists the flags."""
import sys

from vqvae_common import cli, loop


def fit(model_cfg, train_cfg):
    from vqvae_jax.train import JaxTwin  # after parsing: --help must not wait for jax

    return loop.fit(JaxTwin, model_cfg, train_cfg)


if __name__ == "__main__":
    sys.exit(cli.main("jax", fit))
