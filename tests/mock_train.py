"""`python tests/mock_train.py {torch|jax} [train flags]`: the real trainer on tfds's mock data
(random images of the real shapes), so tests can run and kill whole training processes
without the real dataset or its decoding time."""
import sys

import tensorflow_datasets as tfds

from vqvae_common import cli, data, loop

MOCK_IMAGES = 512

if __name__ == "__main__":
    framework = sys.argv[1]
    if framework == "torch":
        from vqvae_torch.train import TorchTwin as Twin
    else:
        from vqvae_jax.train import JaxTwin as Twin
    data._prepare = lambda *args: None  # mock data is "prepared" everywhere
    with tfds.testing.mock_data(num_examples=MOCK_IMAGES, policy=tfds.testing.MockPolicy.USE_CODE):
        sys.exit(cli.main(framework, lambda m, t: loop.fit(Twin, m, t), sys.argv[2:]))
