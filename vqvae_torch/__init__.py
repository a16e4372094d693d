"""The PyTorch VQ-VAE, the reference twin."""
