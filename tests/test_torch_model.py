import math

import numpy as np
import pytest
import torch
from torch import nn

from vqvae_common import config
from vqvae_common.config import DATASETS, ModelConfig
from vqvae_torch.model import VQVAE, ResidualBlock, VectorQuantizer, nearest_codes

CODEBOOK = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]  # K=3, D=2
Z = [[0.9, 0.2], [0.1, 1.2]]  # two latent vectors, laid out as z_e (1, D, 1, 2) below
# ||z - e_k||^2 by hand:   e0            e1            e2
DIST = [[0.81 + 0.04, 0.01 + 0.04, 0.81 + 3.24],
        [0.01 + 1.44, 0.81 + 1.44, 0.01 + 0.64]]


def _quantizer(codebook):
    vq = VectorQuantizer(*np.shape(codebook))
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor(codebook, dtype=torch.float32))
    return vq


def _z_e(vectors, h=1):
    """(N, D) vectors -> z_e (1, D, h, N/h)."""
    z = torch.tensor(vectors, dtype=torch.float32)
    return z.reshape(1, h, -1, z.shape[1]).permute(0, 3, 1, 2).contiguous()


def test_hand_computed_distances_pick_the_nearest_code():
    np.testing.assert_allclose(DIST, ((np.array(Z)[:, None] - np.array(CODEBOOK)) ** 2).sum(-1))
    q = _quantizer(CODEBOOK)(_z_e(Z))
    assert q.indices.shape == (1, 1, 2) and q.indices.dtype == torch.int64
    assert q.indices.flatten().tolist() == [1, 2] == np.argmin(DIST, 1).tolist()
    np.testing.assert_allclose(q.z_q[0, :, 0].T.numpy(), [CODEBOOK[1], CODEBOOK[2]],
                               atol=1e-6)
    # (0.1^2 + 0.2^2 + 0.1^2 + 0.8^2) / 4 elements
    assert q.codebook_loss.item() == pytest.approx(0.175, rel=1e-6)
    assert q.commitment_loss.item() == pytest.approx(0.175, rel=1e-6)


def test_random_latents_map_to_the_nearest_code():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(16, 4)).astype(np.float32)
    z = rng.normal(size=(2 * 3 * 5, 4)).astype(np.float32)
    q = _quantizer(codebook)(_z_e(z, h=6))
    nearest = ((z[:, None].astype(np.float64) - codebook) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(q.indices.flatten().numpy(), nearest)
    np.testing.assert_allclose(q.z_q.permute(0, 2, 3, 1).reshape(-1, 4).numpy(),
                               codebook[nearest], atol=1e-6)


@pytest.mark.parametrize("block", [37 * 64, 37 * 7, 10])  # several blocks, a ragged last one
def test_distances_in_blocks_pick_the_same_codes(block, monkeypatch):
    monkeypatch.setattr(config, "DISTANCE_BLOCK", block)
    rng = np.random.default_rng(2)
    flat = rng.normal(size=(1000, 8)).astype(np.float32)
    codebook = rng.normal(size=(37, 8)).astype(np.float32)
    nearest = ((flat[:, None].astype(np.float64) - codebook) ** 2).sum(-1).argmin(1)
    found = nearest_codes(torch.tensor(flat), torch.tensor(codebook))
    np.testing.assert_array_equal(found.numpy(), nearest)


def test_straight_through_gradient_is_the_identity():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    vq(z_e).z_q.backward(upstream)
    assert torch.equal(z_e.grad, upstream)
    assert vq.codebook.grad is None


def test_commitment_term_does_not_reach_the_codebook():
    vq = _quantizer(CODEBOOK)
    z_e = _z_e(Z).requires_grad_()
    vq(z_e).commitment_loss.backward()
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    expected = 2 * (np.array(Z) - np.array(CODEBOOK)[[1, 2]]) / 4
    np.testing.assert_allclose(z_e.grad[0, :, 0].T.numpy(), expected, rtol=1e-6)


def test_codebook_term_trains_only_the_codebook():
    rng = np.random.default_rng(1)
    codebook = rng.normal(size=(5, 3)).astype(np.float32)
    z = rng.normal(size=(12, 3)).astype(np.float32)
    vq = _quantizer(codebook)
    z_e = _z_e(z, h=3).requires_grad_()
    q = vq(z_e)
    q.codebook_loss.backward()
    assert z_e.grad is None or not z_e.grad.any()
    idx = q.indices.flatten().numpy()
    expected = np.zeros_like(codebook)
    np.add.at(expected, idx, 2 * (codebook[idx] - z) / z.size)
    assert len(set(idx)) > 1
    np.testing.assert_allclose(vq.codebook.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_usage_is_a_moving_average_of_code_shares_in_train_mode_only():
    vq = VectorQuantizer(3, 2, usage_decay=0.9)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor(CODEBOOK))
    vq.train()(_z_e(Z))  # indices [1, 2]: shares [0, 1/2, 1/2]
    np.testing.assert_allclose(vq.usage.numpy(), [0, 0.05, 0.05], rtol=1e-6)
    vq.train()(_z_e([Z[0], Z[0]]))  # indices [1, 1]
    np.testing.assert_allclose(vq.usage.numpy(), [0, 0.045 + 0.1, 0.045], rtol=1e-6)
    vq.eval()(_z_e(Z))
    np.testing.assert_allclose(vq.usage.numpy(), [0, 0.145, 0.045], rtol=1e-6)


def test_dead_codes_restart_on_evenly_spaced_batch_vectors():
    vq = VectorQuantizer(4, 2, restart_below=0.01)
    codebook = vq.codebook.detach().clone()
    with torch.no_grad():
        vq.usage.copy_(torch.tensor([0.5, 0.0, 0.5, 0.002]))  # dead below 0.01 / 4: 1 and 3
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    vq.restart_dead_codes(_z_e(z, h=2))
    # M = 2 dead codes, N = 6 vectors: rank 0 -> vector 0, rank 1 -> vector floor(6 / 2) = 3
    expected = codebook.numpy().copy()
    expected[[1, 3]] = z[[0, 3]]
    np.testing.assert_array_equal(vq.codebook.detach().numpy(), expected)
    np.testing.assert_allclose(vq.usage.numpy(), [0.5, 0.25, 0.5, 0.25])


def test_more_dead_codes_than_vectors_wrap_around_the_batch():
    vq = VectorQuantizer(5, 2, restart_below=0.01)
    z = np.arange(6, dtype=np.float32).reshape(3, 2)
    vq.restart_dead_codes(_z_e(z))  # all 5 dead (usage 0), N = 3: vectors 0, 1, 2, 0, 1
    np.testing.assert_array_equal(vq.codebook.detach().numpy(), z[[0, 1, 2, 0, 1]])


def test_restart_below_zero_never_restarts():
    vq = VectorQuantizer(4, 2, restart_below=0.0)
    codebook = vq.codebook.detach().clone()
    vq.restart_dead_codes(_z_e(np.ones((6, 2), np.float32), h=2))
    assert torch.equal(vq.codebook.detach(), codebook) and not vq.usage.any()


def test_losses_match_numpy():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(in_channels=1, hidden=8, num_codes=16, beta=0.25)).train()
    captured = {}
    model.encoder.register_forward_hook(lambda m, i, out: captured.update(z_e=out.detach()))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    out = model(x)

    z = captured["z_e"].permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    codebook = model.quantizer.codebook.detach().double().numpy()
    idx = ((z[:, None] - codebook) ** 2).sum(-1).argmin(1)
    z_q = codebook[idx]
    recon = np.mean((out.recon.detach().double().numpy() - x.double().numpy()) ** 2)
    codebook_term = np.mean((z_q - z) ** 2)
    total = recon + codebook_term + 0.25 * codebook_term

    np.testing.assert_array_equal(out.indices.flatten().numpy(), idx)
    assert out.losses["recon"].item() == pytest.approx(recon, rel=1e-5)
    assert out.losses["codebook"].item() == pytest.approx(codebook_term, rel=1e-5)
    assert out.losses["commitment"].item() == pytest.approx(codebook_term, rel=1e-5)
    assert out.losses["loss"].item() == pytest.approx(total, rel=1e-5)
    assert total != pytest.approx(recon + 2 * codebook_term, rel=1e-3)

    z_q_nchw = torch.tensor(z_q, dtype=torch.float32).reshape(4, 7, 7, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.decoder(z_q_nchw), out.recon, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dataset, size, latent", [("mnist", 28, 7), ("cifar10", 32, 8)])
def test_preset_shapes(dataset, size, latent):
    config = DATASETS[dataset].preset
    model = VQVAE(config).eval()
    x = torch.rand(2, config.in_channels, size, size) * 2 - 1
    with torch.no_grad():
        z_e = model.encoder(x)
        out = model(x)
    d = {"mnist": 128, "cifar10": 256}[dataset]
    assert z_e.shape == (2, d, latent, latent)
    assert model.quantizer.codebook.shape == (512, d)
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, latent, latent)
    assert out.recon.abs().max() <= 1.0
    assert set(out.losses) == {"loss", "recon", "codebook", "commitment"}


def test_initialisers():
    torch.manual_seed(0)
    model = VQVAE(DATASETS["mnist"].preset)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 12
    for conv in convs:
        assert not conv.bias.any()
        w = conv.weight
        receptive = w[0, 0].numel()
        xavier = math.sqrt(2.0 / ((w.shape[0] + w.shape[1]) * receptive))
        assert w.std().item() == pytest.approx(xavier, rel=0.1), conv
    k = DATASETS["mnist"].preset.num_codes
    codebook = model.quantizer.codebook
    assert codebook.abs().max().item() <= 1 / k
    assert codebook.min().item() < -0.9 / k and codebook.max().item() > 0.9 / k


def test_residual_block_skip_carries_x_not_relu_x():
    torch.manual_seed(0)
    block = ResidualBlock(4).train()
    x = -torch.rand(2, 4, 5, 5) - 0.5
    original = x.clone()
    out = block(x)
    # relu(x) = 0, and batch norm in train mode maps the constant conv output to 0: F(x) = 0
    torch.testing.assert_close(out, original, atol=1e-4, rtol=0)
    assert torch.equal(x, original)


def test_residual_block_is_x_plus_f_of_x():
    torch.manual_seed(0)
    block = ResidualBlock(4)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    block.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(torch.relu(x))))))
        torch.testing.assert_close(block(x), x + f)
