"""Level 1: the quantizer alone, on the same codebook and encoder vectors."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from parity_tests import tolerances as tol
from parity_tests.inputs import arrange
from parity_tests.ties import Audit, follow
from vqvae_common.config import DATASETS
from vqvae_jax.model import VectorQuantizer as FlaxVQ
from vqvae_torch.model import VectorQuantizer as TorchVQ


def run_both(z: np.ndarray, codebook: np.ndarray, device: str, audit: Audit):
    """(torch Quantized, flax Quantized) for z (B, h, w, D) and codebook (K, D); the Flax
    quantizer follows PyTorch's indices at near-ties (`audit` proves them)."""
    torch_device = torch.device("cuda" if device == "gpu" else "cpu")
    tq = TorchVQ(*codebook.shape).to(torch_device)
    with torch.no_grad():
        tq.codebook.copy_(torch.from_numpy(codebook))
        t = tq(torch.from_numpy(z).permute(0, 3, 1, 2).to(torch_device))
    with jax.default_device(jax.devices(device)[0]):
        fq = FlaxVQ(*codebook.shape, rngs=nnx.Rngs(0))
        fq.codebook[...] = codebook
        with follow(t.indices.cpu().numpy().ravel(), audit):
            f = fq(jax.numpy.asarray(z))
    return t, f


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_quantizer_matches(preset, seed, batch, device, check, note):
    cfg = DATASETS[preset].preset
    rng = np.random.default_rng(seed)
    z = arrange(rng.standard_normal((batch, 7, 7, cfg.hidden)).astype(np.float32))
    codebook = rng.standard_normal((cfg.num_codes, cfg.hidden)).astype(np.float32)
    audit = Audit()
    t, f = run_both(z, codebook, device, audit)
    audit.verify(note)
    assert audit.compared == z.size // cfg.hidden
    np.testing.assert_array_equal(np.asarray(f.indices), t.indices.cpu().numpy())
    check("quantizer z_q", np.asarray(f.z_q), t.z_q.permute(0, 2, 3, 1).cpu().numpy(),
          tol.QUANTIZER)
    check("quantizer codebook term", f.codebook_loss, t.codebook_loss.item(), tol.QUANTIZER)
    check("quantizer commitment term", f.commitment_loss, t.commitment_loss.item(), tol.QUANTIZER)
