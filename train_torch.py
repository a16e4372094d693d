#!/usr/bin/env python
"""Train the PyTorch VQ-VAE: `python train_torch.py --help` lists the flags."""
import sys

from vqvae_common import cli, loop


def fit(model_cfg, train_cfg):
    from vqvae_torch.train import TorchTwin  # after parsing: --help must not wait for torch

    return loop.fit(TorchTwin, model_cfg, train_cfg)


if __name__ == "__main__":
    sys.exit(cli.main("torch", fit))
