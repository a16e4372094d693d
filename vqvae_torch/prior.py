"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") over a VQ-VAE's code maps, in PyTorch: the reference twin of vqvae_jax/prior.py.

Shapes, PyTorch layout (B batch, (h, w) the code map, K codes, F channels, L layers), e.g.
MNIST's codes [64, 7, 7] with K = 512, F = 32 (the default) -> logits [64, 512, 7, 7]:

    c (B, h, w) --embed_codes--> x (B, F, h, w);  v_0 = h_0 = x;  s = 0
    for layer l = 0 .. L-1, with y the class label (conditional priors only):
        a_v = V_l * v_l + E_l[y]                       (B, 2F, h, w)  vertical stack
        v_{l+1} = tanh(a_v[:F]) . sigmoid(a_v[F:])      (B, F, h, w)   gated unit
        a_h = H_l * h_l + W_l a_v + E_l[y]              (B, 2F, h, w)  horizontal stack
        g = tanh(a_h[:F]) . sigmoid(a_h[F:])
        h_{l+1} = R_l g + h_l   (layer 0: R_0 g)        residual (not in the last layer:
                                                        nothing reads h_L)
        s = s + S_l g                                   skip
    logits = O_2 relu(O_1 relu(s))                      (B, K, h, w)
    loss = mean over (B, h, w) of -log softmax(logits)[c]    (nats per code)

V_l is a k x k and H_l a 1 x k convolution, masked by vqvae_common.prior.masks (layer 0 of
type A: no position sees its own code; later layers also the centre); W_l, R_l, S_l, O_1, O_2
are 1 x 1 convolutions, E_l an embedding (num_classes, 2F). The vertical stack sees every
row above within its growing k-wide window, the horizontal stack the positions to the left
in the row, so a position's receptive field holds every earlier position near enough: no
blind spot (the paper's section 2.2).

Sampling runs the raster order: code_ij = argmax_k(logits_ijk + g_ijk) with g given Gumbel
noise (vqvae_common.prior.gumbel_noise), a draw of softmax(logits_ij).

Conv weights are xavier-normal with zero biases, embeddings standard normal.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqvae_common import prior
from vqvae_common.prior import PriorConfig


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution whose (kh, kw) kernel is multiplied by a fixed 0/1 mask."""

    def __init__(self, in_channels: int, out_channels: int, mask: np.ndarray) -> None:
        kh, kw = mask.shape
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        self.register_buffer("mask", torch.from_numpy(mask), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def gate(a: torch.Tensor) -> torch.Tensor:
    """tanh(a[:F]) . sigmoid(a[F:]) over the channel axis of (B, 2F, h, w)."""
    f, g = a.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel_size: int, first: bool, last: bool,
                 num_classes: int) -> None:
        super().__init__()
        vertical, horizontal = prior.masks(kernel_size, first)
        self.first = first
        self.conv_vertical = MaskedConv2d(channels, 2 * channels, vertical)
        self.conv_horizontal = MaskedConv2d(channels, 2 * channels, horizontal)
        self.conv_v2h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.conv_residual = nn.Conv2d(channels, channels, 1) if not last else None
        self.conv_skip = nn.Conv2d(channels, channels, 1)
        self.embed_class = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(v_{l+1}, h_{l+1}, the skip S_l g)."""
        condition = 0 if self.embed_class is None else self.embed_class(labels)[:, :, None, None]
        a_v = self.conv_vertical(v) + condition
        a_h = self.conv_horizontal(h) + self.conv_v2h(a_v) + condition
        g = gate(a_h)
        if self.conv_residual is None:
            return gate(a_v), h, self.conv_skip(g)
        residual = self.conv_residual(g)
        return gate(a_v), residual if self.first else residual + h, self.conv_skip(g)


class PixelCNN(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        f = config.channels
        self.embed_codes = nn.Embedding(config.num_codes, f)
        self.layers = nn.ModuleList(
            GatedLayer(f, config.kernel_size, first=i == 0,
                       last=i == config.layers - 1, num_classes=config.num_classes)
            for i in range(config.layers))
        self.conv_out1 = nn.Conv2d(f, f, 1)
        self.conv_out2 = nn.Conv2d(f, config.num_codes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64, labels (B,) int64 (unused when unconditional) ->
        logits (B, K, h, w)."""
        x = self.embed_codes(codes).permute(0, 3, 1, 2)
        v, h, skip = x, x, 0
        for layer in self.layers:
            v, h, s = layer(v, h, labels)
            skip = skip + s
        return self.conv_out2(F.relu(self.conv_out1(F.relu(skip))))


def nll(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[code] over every position: nats per code."""
    return F.cross_entropy(logits, codes)


@torch.no_grad()
def sample(model: PixelCNN, labels: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """Codes (N, h, w) int64 drawn in raster order, code_ij = argmax(logits_ij + gumbel_ij),
    from labels (N,) and gumbel (N, h, w, K); one forward pass per position."""
    n, height, width, _ = gumbel.shape
    codes = torch.zeros((n, height, width), dtype=torch.int64, device=gumbel.device)
    for i in range(height):
        for j in range(width):
            logits = model(codes, labels)[:, :, i, j]
            codes[:, i, j] = (logits + gumbel[:, i, j]).argmax(1)
    return codes
