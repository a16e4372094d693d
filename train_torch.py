#!/usr/bin/env python
"""Train the PyTorch VQ-VAE, or with `prior` a PixelCNN prior over a trained one's codes:
`python train_torch.py --help` and `python train_torch.py prior --help` list the flags."""
import sys

from vqvae_common import cli, loop, prior
from vqvae_common.config import ModelConfig, TrainConfig


def fit(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, float]:
    from vqvae_torch.train import TorchTwin  # after parsing: --help must not wait for torch

    return loop.fit(TorchTwin, model_cfg, train_cfg)


def fit_prior(prior_cfg: prior.PriorConfig, train_cfg: TrainConfig) -> dict[str, float]:
    from vqvae_torch.prior_train import TorchPriorTwin

    return loop.fit(TorchPriorTwin, prior_cfg, train_cfg,
                    prior.PriorTask("torch", prior_cfg, train_cfg))


def checkpoint_config(path: str) -> ModelConfig:
    from vqvae_torch import checkpoint

    return checkpoint.read_record(path).model_config


if __name__ == "__main__":
    sys.exit(cli.main("torch", fit, fit_prior=fit_prior, checkpoint_config=checkpoint_config))
