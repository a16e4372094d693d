"""What only the jitted Flax twin can get wrong: its step compiling more than once."""
import numpy as np

from vqvae_common.config import ModelConfig, TrainConfig
from vqvae_jax.train import JaxTwin


def test_the_train_step_compiles_once():
    """A state not committed to the device, unlike the step's outputs, made the second step
    miss jit's cache and compile again (4.8 s at every run start and resume)."""
    twin = JaxTwin(ModelConfig(in_channels=1, hidden=8, num_codes=16), TrainConfig(device="cpu"))
    # tests/test_train.py's model and batch shape: a step that XLA compiles once a session
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    for _ in range(3):
        twin.fetch(twin.train_step(batch))
    assert twin._train_step._cache_size() == 1
