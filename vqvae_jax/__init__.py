"""The Flax (NNX) VQ-VAE, the twin of vqvae_torch.

Importing it makes glibc's malloc keep freed memory for reuse (vqvae_jax.xla_cpu
.keep_freed_host_memory; VQVAE_KEEP_FREED_MEMORY=0 opts out): before JAX creates its CPU
client, which is when it takes effect.
"""
import os as _os

from vqvae_jax import xla_cpu as _xla_cpu

if _os.environ.get("VQVAE_KEEP_FREED_MEMORY", "1") != "0":
    _xla_cpu.keep_freed_host_memory()
