#!/usr/bin/env python
"""Train the Flax VQ-VAE, or with `prior` a PixelCNN prior over a trained one's codes:
`python train_jax.py --help` and `python train_jax.py prior --help` list the flags."""
import sys

from vqvae_common import cli, loop, prior
from vqvae_common.config import ModelConfig, TrainConfig


def fit(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, float]:
    from vqvae_jax.train import JaxTwin  # after parsing: --help must not wait for jax

    return loop.fit(JaxTwin, model_cfg, train_cfg)


def fit_prior(prior_cfg: prior.PriorConfig, train_cfg: TrainConfig) -> dict[str, float]:
    from vqvae_jax.prior_train import JaxPriorTwin

    return loop.fit(JaxPriorTwin, prior_cfg, train_cfg,
                    prior.PriorTask("jax", prior_cfg, train_cfg))


def checkpoint_config(path: str) -> ModelConfig:
    from vqvae_jax import checkpoint

    return checkpoint.read_record(path).model_config


if __name__ == "__main__":
    sys.exit(cli.main("jax", fit, fit_prior=fit_prior, checkpoint_config=checkpoint_config))
