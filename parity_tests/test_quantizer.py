"""Level 1: the quantizer alone, on the same codebook and encoder vectors."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from parity_tests import tolerances as tol
from vqvae_common.config import PRESETS
from vqvae_jax.model import VectorQuantizer as FlaxVQ
from vqvae_torch.model import VectorQuantizer as TorchVQ


def near_ties(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Per vector: are its two best distances closer than NEAR_TIE (float64 distances)?"""
    flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
    d = ((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    best2 = np.sort(d, 1)[:, :2]
    return (best2[:, 1] - best2[:, 0]) < tol.NEAR_TIE * np.maximum(np.abs(best2[:, 0]), 1.0)


def run_both(z: np.ndarray, codebook: np.ndarray, device: str):
    torch_device = torch.device("cuda" if device == "gpu" else "cpu")
    tq = TorchVQ(*codebook.shape).to(torch_device)
    with torch.no_grad():
        tq.codebook.copy_(torch.from_numpy(codebook))
        t = tq(torch.from_numpy(z).permute(0, 3, 1, 2).to(torch_device))
    with jax.default_device(jax.devices(device)[0]):
        fq = FlaxVQ(*codebook.shape, rngs=nnx.Rngs(0))
        fq.codebook[...] = codebook
        f = fq(jax.numpy.asarray(z))
    return t, f


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_quantizer_matches(preset, seed, batch, device, check, note):
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, 7, 7, cfg.hidden)).astype(np.float32)
    codebook = rng.standard_normal((cfg.num_codes, cfg.hidden)).astype(np.float32)
    t, f = run_both(z, codebook, device)
    t_idx = t.indices.cpu().numpy().ravel()
    f_idx = np.asarray(f.indices).ravel()
    differ = t_idx != f_idx
    ties = near_ties(z, codebook)
    assert not np.any(differ & ~ties), "indices differ away from any near-tie"
    note("quantizer near-ties (count)", int(ties.sum()))
    note("quantizer indices differing at near-ties (count)", int(differ.sum()))
    keep = ~differ
    z_q_t = t.z_q.permute(0, 2, 3, 1).cpu().numpy().reshape(-1, cfg.hidden)
    z_q_f = np.asarray(f.z_q).reshape(-1, cfg.hidden)
    check("quantizer z_q", z_q_f[keep], z_q_t[keep], tol.QUANTIZER)
    check("quantizer codebook term", f.codebook_loss, t.codebook_loss.item(), tol.QUANTIZER)
    check("quantizer commitment term", f.commitment_loss, t.commitment_loss.item(), tol.QUANTIZER)
