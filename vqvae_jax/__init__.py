"""The Flax (NNX) VQ-VAE, the twin of vqvae_torch."""
