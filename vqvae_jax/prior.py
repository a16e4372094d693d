"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") over a VQ-VAE's code maps, in Flax NNX: the twin of vqvae_torch/prior.py.

Shapes, JAX layout (B batch, (h, w) the code map, K codes, F channels, L layers), e.g.
MNIST's codes [64, 7, 7] with K = 512, F = 32 (the default) -> logits [64, 7, 7, 512]:

    c (B, h, w) --embed_codes--> x (B, h, w, F);  v_0 = h_0 = x;  s = 0
    for layer l = 0 .. L-1, with y the class label (conditional priors only):
        a_v = V_l * v_l + E_l[y]                       (B, h, w, 2F)  vertical stack
        v_{l+1} = tanh(a_v[:F]) . sigmoid(a_v[F:])      (B, h, w, F)   gated unit
        a_h = H_l * h_l + W_l a_v + E_l[y]              (B, h, w, 2F)  horizontal stack
        g = tanh(a_h[:F]) . sigmoid(a_h[F:])
        h_{l+1} = R_l g + h_l   (layer 0: R_0 g)        residual (not in the last layer:
                                                        nothing reads h_L)
        s = s + S_l g                                   skip
    logits = O_2 relu(O_1 relu(s))                      (B, h, w, K)
    loss = mean over (B, h, w) of -log softmax(logits)[c]    (nats per code)

V_l is a k x k and H_l a 1 x k convolution, masked by vqvae_common.prior.masks (layer 0 of
type A: no position sees its own code; later layers also the centre); W_l, R_l, S_l, O_1, O_2
are 1 x 1 convolutions, E_l an embedding (num_classes, 2F). The vertical stack sees every
row above within its growing k-wide window, the horizontal stack the positions to the left
in the row, so a position's receptive field holds every earlier position near enough: no
blind spot (the paper's section 2.2).

Sampling runs the raster order: code_ij = argmax_k(logits_ijk + g_ijk) with g given Gumbel
noise (vqvae_common.prior.gumbel_noise), a draw of softmax(logits_ij), in one
jax.lax.fori_loop over the h * w positions.

Module paths equal PyTorch's (layers.0.conv_vertical, embed_codes, ...); leaf names follow
Flax (kernel, embedding) and vqvae_common/layout.py maps them. Conv kernels are
xavier-normal with zero biases, embeddings standard normal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae_common import prior
from vqvae_common.prior import PriorConfig
from vqvae_jax.model import NHWC, xavier_normal

standard_normal = jax.nn.initializers.normal(1.0)


class MaskedConv2d(nnx.Module):
    """A same-padded convolution whose (kh, kw) kernel is multiplied by a fixed 0/1 mask.
    The mask is kept as a tuple, a constant of the module rather than a variable, so that
    the state holds what PyTorch's state_dict holds."""

    def __init__(self, in_channels: int, out_channels: int, mask: np.ndarray, *,
                 rngs: nnx.Rngs) -> None:
        kh, kw = mask.shape
        self.kernel = nnx.Param(xavier_normal(rngs.params(), (kh, kw, in_channels,
                                                              out_channels)))
        self.bias = nnx.Param(jnp.zeros(out_channels))
        self.mask = tuple(map(tuple, mask.tolist()))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        mask = jnp.asarray(self.mask, kernel.dtype)[:, :, None, None]
        kh, kw = mask.shape[:2]
        return jax.lax.conv_general_dilated(
            x, kernel * mask, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=NHWC) + self.bias[...]


def conv1x1(in_channels: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(in_channels, out_channels, (1, 1), kernel_init=xavier_normal, rngs=rngs)


def gate(a: jax.Array) -> jax.Array:
    """tanh(a[:F]) . sigmoid(a[F:]) over the channel axis of (B, h, w, 2F)."""
    f, g = jnp.split(a, 2, axis=-1)
    return jnp.tanh(f) * jax.nn.sigmoid(g)


class GatedLayer(nnx.Module):
    def __init__(self, channels: int, kernel_size: int, first: bool, last: bool,
                 num_classes: int, *, rngs: nnx.Rngs) -> None:
        vertical, horizontal = prior.masks(kernel_size, first)
        self.first = first
        self.conv_vertical = MaskedConv2d(channels, 2 * channels, vertical, rngs=rngs)
        self.conv_horizontal = MaskedConv2d(channels, 2 * channels, horizontal, rngs=rngs)
        self.conv_v2h = conv1x1(2 * channels, 2 * channels, rngs)
        self.conv_residual = conv1x1(channels, channels, rngs) if not last else None
        self.conv_skip = conv1x1(channels, channels, rngs)
        self.embed_class = nnx.Embed(num_classes, 2 * channels, embedding_init=standard_normal,
                                     rngs=rngs) if num_classes else None

    def __call__(self, v: jax.Array, h: jax.Array, labels: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(v_{l+1}, h_{l+1}, the skip S_l g)."""
        condition = 0 if self.embed_class is None else self.embed_class(labels)[:, None, None]
        a_v = self.conv_vertical(v) + condition
        a_h = self.conv_horizontal(h) + self.conv_v2h(a_v) + condition
        g = gate(a_h)
        if self.conv_residual is None:
            return gate(a_v), h, self.conv_skip(g)
        residual = self.conv_residual(g)
        return gate(a_v), residual if self.first else residual + h, self.conv_skip(g)


class PixelCNN(nnx.Module):
    def __init__(self, config: PriorConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        f = config.channels
        self.embed_codes = nnx.Embed(config.num_codes, f, embedding_init=standard_normal,
                                     rngs=rngs)
        self.layers = nnx.List([
            GatedLayer(f, config.kernel_size, first=i == 0,
                       last=i == config.layers - 1, num_classes=config.num_classes,
                       rngs=rngs)
            for i in range(config.layers)])
        self.conv_out1 = conv1x1(f, f, rngs)
        self.conv_out2 = conv1x1(f, config.num_codes, rngs)

    def __call__(self, codes: jax.Array, labels: jax.Array) -> jax.Array:
        """codes (B, h, w) int, labels (B,) int (unused when unconditional) ->
        logits (B, h, w, K)."""
        x = self.embed_codes(codes)
        v, h, skip = x, x, 0
        for layer in self.layers:
            v, h, s = layer(v, h, labels)
            skip = skip + s
        return self.conv_out2(jax.nn.relu(self.conv_out1(jax.nn.relu(skip))))


def nll(logits: jax.Array, codes: jax.Array) -> jax.Array:
    """Mean of -log softmax(logits)[code] over every position: nats per code."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()


def sample(model: PixelCNN, labels: jax.Array, gumbel: jax.Array) -> jax.Array:
    """Codes (N, h, w) int32 drawn in raster order, code_ij = argmax(logits_ij + gumbel_ij),
    from labels (N,) and gumbel (N, h, w, K); one forward pass per position, in one
    fori_loop (jit the caller)."""
    n, height, width, _ = gumbel.shape

    def position(p: jax.Array, codes: jax.Array) -> jax.Array:
        i, j = p // width, p % width
        logits = model(codes, labels)[:, i, j]
        return codes.at[:, i, j].set(jnp.argmax(logits + gumbel[:, i, j], axis=-1))

    return jax.lax.fori_loop(0, height * width, position,
                             jnp.zeros((n, height, width), jnp.int32))
