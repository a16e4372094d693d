"""VQ-VAE (van den Oord et al. 2017) in PyTorch: the reference twin of vqvae_jax/model.py.

Shapes, PyTorch layout (B batch, C image channels, D hidden width, K codes, h = H/4, w = W/4):

    x (B, C, H, W) --Encoder--> z_e (B, D, h, w) --VectorQuantizer--> z_q (B, D, h, w)
                   --Decoder--> x_hat (B, C, H, W) in [-1, 1]

    Encoder:  Conv4x4/2 (C->D), BN, ReLU, Conv4x4/2 (D->D), Residual, Residual
    Decoder:  Residual, Residual, ReLU, ConvT4x4/2 (D->D), BN, ReLU, ConvT4x4/2 (D->C), tanh
    Residual: x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x))))))

Loss, with sg the stop-gradient and every mean over all elements:

    L = mean((x_hat - x)^2) + mean((z_q - sg[z_e])^2) + beta * mean((z_e - sg[z_q])^2)
         recon                codebook                 commitment

without the codebook term when the codebook learns by EMA (VectorQuantizer).

Conv weights are xavier-normal with zero biases, the codebook uniform(-1/K, 1/K).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqvae_common.config import (ModelConfig, TrainConfig, check_image_sides,
                                 check_quantizer_shape, distance_block_rows)
from vqvae_common.kmeans import kmeans
from vqvae_torch.distributed import all_gather_rows, all_reduce_sum, world_size


class ResidualBlock(nn.Module):
    """x + F(x) with F = ReLU, Conv3x3, BN, ReLU, Conv1x1, BN.

    The seed model's first ReLU ran in place, so its skip silently carried relu(x); here the
    skip carries x itself, the plain residual.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(F.relu(x)))
        h = self.bn2(self.conv2(F.relu(h)))
        return x + h


class Encoder(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim, 4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 4, stride=2, padding=1)
        self.res1 = ResidualBlock(dim)
        self.res2 = ResidualBlock(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.res2(self.res1(self.conv2(h)))


class Decoder(nn.Module):
    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.res1 = ResidualBlock(dim)
        self.res2 = ResidualBlock(dim)
        self.deconv1 = nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.deconv2 = nn.ConvTranspose2d(dim, out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.res2(self.res1(z)))
        h = F.relu(self.bn1(self.deconv1(h)))
        return torch.tanh(self.deconv2(h))


def nearest_codes(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z_n - e_k||^2 for flat (N, D) and codebook (K, D): indices (N,).

    The distances ||z||^2 - 2 z.e + ||e||^2 come from one matmul per block of rows, each
    block at most config.DISTANCE_BLOCK entries, so memory grows as N * D, never as N * K.
    """
    codebook_sq = codebook.pow(2).sum(1)
    rows = distance_block_rows(len(codebook))
    # ||e||^2 - 2 z.e in one buffer, then ||z||^2 added in place. The norm, not
    # block.pow(2).sum(1), whose (rows, D) temporary per block the allocator keeps: 1 GiB
    # over 4,096 blocks at K = 65,536, N = 1M (bench/quantizer.py).
    return torch.cat([
        torch.addmm(codebook_sq, block, codebook.t(), alpha=-2)
        .add_(torch.linalg.vector_norm(block, dim=1, keepdim=True).square_()).argmin(1)
        for block in flat.split(rows)])


class Quantized(NamedTuple):
    z_q: torch.Tensor  # (B, D, h, w) as z_e, straight-through: forward z_q, gradient to z_e
    indices: torch.Tensor  # (B, h, w) int64
    codebook_loss: torch.Tensor  # mean((z_q - sg[z_e])^2)
    commitment_loss: torch.Tensor  # mean((z_e - sg[z_q])^2), not yet times beta


class VectorQuantizer(nn.Module):
    """Nearest-code quantization with a straight-through gradient. A layer of its own: any
    model may use it on (B, D, h, w) encoder outputs, or on any (B, D, ...) with the vectors
    along dimension 1, as PyTorch's layers give them ((B, D) and (B, D, T) too).

    With z the N = B*h*w encoder vectors (N, D) and e the codebook (K, D), e.g. MNIST's
    [64, 128, 7, 7] -> [3136, 128] against K = 512:

        d[n, k] = ||z_n||^2 - 2 z_n . e_k + ||e_k||^2          (N, K), by matmul in blocks
        i[n]    = argmin_k d[n, k]                              (N,)
        z_q[n]  = e[i[n]]                                       (N, D)
        z_q_st  = z + sg[z_q - z]                               forward z_q, gradient to z

    The two loss terms are computed from z_q before the straight-through patch, so the
    codebook learns only from the codebook term and the encoder only from the commitment
    term and the reconstruction.

    How the codebook learns (`codebook_update`):
    - "grad": e is a parameter, moved by the optimizer along the codebook term's gradient.
    - "ema" (appendix A.1 of the paper; Sonnet's VectorQuantizerEMA): e takes no gradient and
      the codebook term leaves the loss. Each train-mode call, with n_k = #{n : i[n] = k} and
      s_k = sum_{i[n] = k} z_n, and gamma = ema_decay:

          N_k <- gamma N_k + (1 - gamma) n_k                    ema_counts (K,)
          M_k <- gamma M_k + (1 - gamma) s_k                    ema_sums (K, D)
          e_k  = M_k / ((N_k + eps) / (sum_j N_j + K eps) * sum_j N_j)   Laplace-smoothed

      after z_q is taken, so the call's output uses the codebook it started with. The
      averages start as if each code had been assigned one vector, itself (N = 1, M = e),
      and restart that way whenever the codebook is set (k-means, a dead-code restart).

    Dead codes. A code that no encoder vector picks never moves (under "ema" it shrinks); from
    the uniform(-1/K, 1/K) start most codes die within the first epoch (MNIST: 7% of 512
    used after one epoch). In train mode the quantizer keeps the moving average of each
    code's share of the vectors, u_k <- decay u_k + (1 - decay) count_k / N (u = 0 at
    start), and `restart_dead_codes` moves each code with u_k < restart_below / K onto an
    encoder vector of the current batch: the r-th of the M dead codes (in index order) onto
    vector r * floor(N / M) (vector r mod N when M > N), spread evenly over the shuffled
    batch, with no randomness of its own so that both twins restart identically. A restarted
    code gets u_k = 1/K, the uniform share, as a grace period. As u starts at 0, the first
    step restarts nearly every code: a data-dependent initialisation of the codebook, which
    `initialize_kmeans` replaces by k-means (and then gives every code the uniform share).

    Data parallel (vqvae_torch.distributed): each process quantizes its share of the batch,
    and count_k, n_k, s_k and the restart rows are those of the global batch, so every
    process holds the codebook one process would.
    """

    def __init__(self, num_codes: int, dim: int,
                 restart_below: float = ModelConfig.restart_below,
                 usage_decay: float = ModelConfig.usage_decay,
                 codebook_update: str = ModelConfig.codebook_update,
                 ema_decay: float = ModelConfig.ema_decay,
                 ema_epsilon: float = ModelConfig.ema_epsilon) -> None:
        super().__init__()
        check_quantizer_shape(num_codes, dim, codebook_update)
        self.codebook = nn.Parameter(
            torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes),
            requires_grad=codebook_update == "grad")
        self.register_buffer("usage", torch.zeros(num_codes))
        self.restart_below, self.usage_decay = restart_below, usage_decay
        self.codebook_update, self.ema_decay, self.ema_epsilon = (codebook_update, ema_decay,
                                                                 ema_epsilon)
        if codebook_update == "ema":
            self.register_buffer("ema_counts", torch.ones(num_codes))
            self.register_buffer("ema_sums", self.codebook.detach().clone())

    def forward(self, z_e: torch.Tensor) -> Quantized:
        z = z_e.movedim(1, -1)  # (B, h, w, D)
        flat = z.reshape(-1, z.shape[-1])
        if not len(flat):  # the usage shares would divide by N = 0
            raise ValueError(f"no vectors to quantize: z_e of shape {tuple(z_e.shape)}")
        indices = nearest_codes(flat.detach(), self.codebook.detach())
        z_q = self.codebook[indices].view_as(z)
        if self.training:
            with torch.no_grad():
                # scatter_add_, not bincount: a fixed output shape for torch.compile, and
                # deterministic on CUDA
                # over the global batch when several processes share the step
                counts = all_reduce_sum(torch.zeros_like(self.usage).scatter_add_(
                    0, indices, torch.ones_like(indices, dtype=self.usage.dtype)))
                share = counts / (len(indices) * world_size())
                self.usage.mul_(self.usage_decay).add_((1 - self.usage_decay) * share)
                if self.codebook_update == "ema":
                    self._update_ema(flat.detach(), indices, counts)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        z_q_st = z + (z_q - z).detach()
        return Quantized(z_q_st.movedim(-1, 1), indices.view(z.shape[:-1]),
                         codebook_loss, commitment_loss)

    def _update_ema(self, flat: torch.Tensor, indices: torch.Tensor,
                    counts: torch.Tensor) -> None:
        """The EMA step of the class docstring, from the batch's flat (N, D) and indices (N,)."""
        sums = all_reduce_sum(  # (K, D)
            torch.zeros_like(self.ema_sums).index_add_(0, indices, flat))
        gamma, eps = self.ema_decay, self.ema_epsilon
        self.ema_counts.mul_(gamma).add_((1 - gamma) * counts)
        self.ema_sums.mul_(gamma).add_((1 - gamma) * sums)
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + eps) / (total + len(self.ema_counts) * eps) * total
        self.codebook.copy_(self.ema_sums / smoothed[:, None])

    def _restart_ema(self, codes: torch.Tensor) -> None:
        """EMA state of the `codes` (a (K,) mask) as if each had been assigned itself once."""
        if self.codebook_update == "ema":
            self.ema_counts.copy_(torch.where(codes, 1.0, self.ema_counts))
            self.ema_sums.copy_(torch.where(codes[:, None], self.codebook, self.ema_sums))

    @torch.no_grad()
    def set_codebook(self, codebook: torch.Tensor | np.ndarray) -> None:
        """codebook <- a copy of the given (K, D); the EMA averages restart from it."""
        self.codebook.copy_(torch.as_tensor(codebook))
        self._restart_ema(torch.ones_like(self.usage, dtype=torch.bool))

    @torch.no_grad()
    def initialize_kmeans(self, z_e: torch.Tensor, seed: int,
                          iterations: int = TrainConfig.kmeans_iterations,
                          show_progress: bool = True) -> None:
        """codebook <- vqvae_common.kmeans of the vectors of z_e (B, D, ...), from `seed`;
        every code then gets the uniform share 1/K (no restart at the next step)."""
        flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
        self.set_codebook(kmeans(flat.cpu().double().numpy(), len(self.codebook), seed,
                                 iterations, show_progress))  # numpy has no bfloat16
        self.usage.fill_(1 / len(self.codebook))

    @torch.no_grad()
    def restart_dead_codes(self, z_e: torch.Tensor) -> None:
        """Move the dead codes onto vectors of z_e (B, D, h, w) or any (B, D, ...), as
        forward takes it; run after the optimizer step.
        Several processes sharing the step each pass their share of the batch: the rows are
        then picked from the global batch's z_e, the same in every process."""
        if self.restart_below <= 0:
            return
        num_codes = len(self.codebook)
        z_e = all_gather_rows(z_e)
        flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
        dead = self.usage < self.restart_below / num_codes
        n, m = len(flat), dead.sum().clamp(min=1)
        rank = torch.cumsum(dead, 0) - 1
        rows = torch.where(m <= n, rank * (n // m), rank % n)
        replacement = flat[rows.clamp(0, n - 1)]
        self.codebook.copy_(torch.where(dead[:, None], replacement, self.codebook))
        self.usage.copy_(torch.where(dead, 1 / num_codes, self.usage))
        self._restart_ema(dead)


class Output(NamedTuple):
    recon: torch.Tensor  # x_hat (B, C, H, W)
    z_e: torch.Tensor  # encoder output (B, D, h, w)
    indices: torch.Tensor  # (B, h, w)
    losses: dict[str, torch.Tensor]  # loss, recon, codebook, commitment (scalars)


class VQVAE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.in_channels, config.hidden)
        self.quantizer = VectorQuantizer(config.num_codes, config.hidden, config.restart_below,
                                         config.usage_decay, config.codebook_update,
                                         config.ema_decay, config.ema_epsilon)
        self.decoder = Decoder(config.hidden, config.in_channels)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> Output:
        check_image_sides(*x.shape[2:])
        z_e = self.encoder(x)
        quantized = self.quantizer(z_e)
        x_hat = self.decoder(quantized.z_q)
        recon = F.mse_loss(x_hat, x)
        codebook_term = quantized.codebook_loss if self.config.codebook_update == "grad" else 0
        loss = recon + codebook_term + self.config.beta * quantized.commitment_loss
        return Output(x_hat, z_e, quantized.indices, {
            "loss": loss, "recon": recon, "codebook": quantized.codebook_loss,
            "commitment": quantized.commitment_loss})
