"""Framework-free core shared by the PyTorch and the Flax VQ-VAE: configs, data, metrics,
images, logging and the training loop's bookkeeping. Imports numpy, never torch or jax."""
