"""VQ-VAE (van den Oord et al. 2017) in Flax NNX: the twin of vqvae_torch/model.py.

Shapes, JAX layout (B batch, C image channels, D hidden width, K codes, h = H/4, w = W/4):

    x (B, H, W, C) --Encoder--> z_e (B, h, w, D) --VectorQuantizer--> z_q (B, h, w, D)
                   --Decoder--> x_hat (B, H, W, C) in [-1, 1]

    Encoder:  Conv4x4/2 (C->D), BN, ReLU, Conv4x4/2 (D->D), Residual, Residual
    Decoder:  Residual, Residual, ReLU, ConvT4x4/2 (D->D), BN, ReLU, ConvT4x4/2 (D->C), tanh
    Residual: x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x))))))

Loss, with sg = jax.lax.stop_gradient and every mean over all elements:

    L = mean((x_hat - x)^2) + mean((z_q - sg[z_e])^2) + beta * mean((z_e - sg[z_q])^2)
         recon                codebook                 commitment

without the codebook term when the codebook learns by EMA (VectorQuantizer).

Module paths equal PyTorch's (encoder.conv1, decoder.deconv2, quantizer.codebook, ...); leaf
names follow Flax (kernel, scale, mean, var) and vqvae_common/layout.py maps them. Conv kernels
are xavier-normal (not Flax's truncated default) with zero biases, the codebook
uniform(-1/K, 1/K). BatchNorm and the transposed convolution reproduce PyTorch's semantics,
so that both twins compute the same function.

Every layer is written with plain XLA ops. With `fast_cpu` (by default: when the model is
created on a CPU), BatchNorm and the convolutions run the formulations of vqvae_jax/xla_cpu.py
instead, the same function, measured faster on XLA's CPU backend.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae_common.config import (ModelConfig, TrainConfig, check_image_sides,
                                 check_quantizer_shape, distance_block_rows)
from vqvae_common.kmeans import kmeans
from vqvae_jax import xla_cpu

xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
NHWC = ("NHWC", "HWIO", "NHWC")


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((a - b) ** 2)


def use_fast_cpu(fast_cpu: bool | None) -> bool:
    """`fast_cpu` itself, or for None: whether the model is being created on a CPU (the device
    of an enclosing jax.default_device, else JAX's default backend), the one backend where
    vqvae_jax/xla_cpu.py was measured."""
    if fast_cpu is not None:
        return fast_cpu
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend() == "cpu"
    return (device if isinstance(device, str) else device.platform) == "cpu"


# PyTorch's nn.BatchNorm2d, nn.ConvTranspose2d and nn.Conv2d, with PyTorch's semantics.


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch normalization over (B, H, W) per channel: (y, mu_B, var_B).

        y = (x - mu_B) / sqrt(var_B + eps) * scale + bias,  var_B the biased batch variance
    """
    mean = x.mean((0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm2d over the channel (last) axis.

        train: y = batch_norm(x); mean <- (1 - m) mean + m mu_B;
               var <- (1 - m) var + m var_B * n / (n - 1)
        eval:  y = (x - mean) / sqrt(var + eps) * scale + bias

    m = 0.1 in PyTorch's convention (Flax's momentum 0.9 weights the other side, and Flax
    keeps the biased variance). n = B*H*W. `count` mirrors PyTorch's num_batches_tracked.
    `fast_cpu` takes xla_cpu.batch_norm, the same function with a faster backward on a CPU
    (None: see use_fast_cpu).
    """

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 fast_cpu: bool | None = None) -> None:
        self.scale = nnx.Param(jnp.ones(features))
        self.bias = nnx.Param(jnp.zeros(features))
        self.mean = nnx.BatchStat(jnp.zeros(features))
        self.var = nnx.BatchStat(jnp.ones(features))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum, self.eps = momentum, eps
        self.fast_cpu = use_fast_cpu(fast_cpu)
        self.use_running_average = False  # set by nnx.Module.eval() / .train()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            return ((x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps)
                    * self.scale[...] + self.bias[...])
        n = x.size // x.shape[-1]
        if n == 1:  # PyTorch's refusal: var_B * n / (n - 1) would make the running var NaN
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input of shape {x.shape}")
        normalize = xla_cpu.batch_norm if self.fast_cpu else batch_norm
        y, mean, var = normalize(x, self.scale[...], self.bias[...], self.eps)
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
        self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * n / (n - 1)
        self.count[...] = self.count[...] + 1
        return y


def conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's conv_transpose2d(stride 2, padding 1) for a 4x4 kernel, without bias.

    x (B, H, W, I), kernel (4, 4, I, O) with kernel[p, q, i, o] = torch_weight[i, o, p, q],
    result (B, 2H, 2W, O): x dilated by 2, padded by k - 1 - p = 2, and convolved with the
    spatially flipped kernel.
    """
    return jax.lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=NHWC)


class ConvTranspose(nnx.Module):
    """PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1): (B, H, W, I) -> (B, 2H, 2W, O).
    `fast_cpu` takes xla_cpu.conv_transpose (None: see use_fast_cpu)."""

    def __init__(self, in_features: int, out_features: int, *, fast_cpu: bool | None = None,
                 rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(xavier_normal(rngs.params(), (4, 4, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros(out_features))
        self.fast_cpu = use_fast_cpu(fast_cpu)

    def __call__(self, x: jax.Array) -> jax.Array:
        transpose = xla_cpu.conv_transpose if self.fast_cpu else conv_transpose
        return transpose(x, self.kernel[...]) + self.bias[...]


def conv(in_features: int, out_features: int, kernel: int, stride: int, padding: int,
         fast_cpu: bool | None, rngs: nnx.Rngs) -> nnx.Conv:
    """PyTorch's Conv2d; `fast_cpu` runs it through xla_cpu.conv_general_dilated (None: see
    use_fast_cpu)."""
    convolve = (xla_cpu.conv_general_dilated if use_fast_cpu(fast_cpu)
                else jax.lax.conv_general_dilated)
    return nnx.Conv(in_features, out_features, (kernel, kernel), (stride, stride),
                    padding=((padding, padding), (padding, padding)),
                    kernel_init=xavier_normal, conv_general_dilated=convolve, rngs=rngs)


# The model: vqvae_torch/model.py, class for class.


class ResidualBlock(nnx.Module):
    """x + F(x) with F = ReLU, Conv3x3, BN, ReLU, Conv1x1, BN: the plain residual (the seed
    model's in-place ReLU made its skip carry relu(x); this skip carries x)."""

    def __init__(self, dim: int, *, fast_cpu: bool | None = None, rngs: nnx.Rngs) -> None:
        self.conv1 = conv(dim, dim, 3, 1, 1, fast_cpu, rngs)
        self.bn1 = BatchNorm(dim, fast_cpu=fast_cpu)
        self.conv2 = conv(dim, dim, 1, 1, 0, fast_cpu, rngs)
        self.bn2 = BatchNorm(dim, fast_cpu=fast_cpu)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn1(self.conv1(jax.nn.relu(x)))
        h = self.bn2(self.conv2(jax.nn.relu(h)))
        return x + h


class Encoder(nnx.Module):
    def __init__(self, in_channels: int, dim: int, *, fast_cpu: bool | None = None,
                 rngs: nnx.Rngs) -> None:
        self.conv1 = conv(in_channels, dim, 4, 2, 1, fast_cpu, rngs)
        self.bn1 = BatchNorm(dim, fast_cpu=fast_cpu)
        self.conv2 = conv(dim, dim, 4, 2, 1, fast_cpu, rngs)
        self.res1 = ResidualBlock(dim, fast_cpu=fast_cpu, rngs=rngs)
        self.res2 = ResidualBlock(dim, fast_cpu=fast_cpu, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        return self.res2(self.res1(self.conv2(h)))


class Decoder(nnx.Module):
    def __init__(self, dim: int, out_channels: int, *, fast_cpu: bool | None = None,
                 rngs: nnx.Rngs) -> None:
        self.res1 = ResidualBlock(dim, fast_cpu=fast_cpu, rngs=rngs)
        self.res2 = ResidualBlock(dim, fast_cpu=fast_cpu, rngs=rngs)
        self.deconv1 = ConvTranspose(dim, dim, fast_cpu=fast_cpu, rngs=rngs)
        self.bn1 = BatchNorm(dim, fast_cpu=fast_cpu)
        self.deconv2 = ConvTranspose(dim, out_channels, fast_cpu=fast_cpu, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.res2(self.res1(z)))
        h = jax.nn.relu(self.bn1(self.deconv1(h)))
        return jnp.tanh(self.deconv2(h))


def nearest_codes(flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_k ||z_n - e_k||^2 for flat (N, D) and codebook (K, D): indices (N,).

    The distances ||z||^2 - 2 z.e + ||e||^2 come from one matmul per block of rows, each
    block at most config.DISTANCE_BLOCK entries (jax.lax.map runs the blocks one after
    another), so memory grows as N * D, never as N * K. Each block's argmin is
    xla_cpu.first_argmin: jnp.argmin's indices, by reductions XLA's CPU backend vectorizes.
    """
    codebook_sq = jnp.sum(codebook ** 2, 1)

    def block_argmin(block: jax.Array) -> jax.Array:
        products = jnp.matmul(block, codebook.T, precision=jax.lax.Precision.HIGHEST)
        distances = codebook_sq - 2 * products + jnp.sum(block ** 2, 1, keepdims=True)
        return xla_cpu.first_argmin(distances)

    rows = distance_block_rows(len(codebook))
    if len(flat) <= rows:
        return block_argmin(flat)
    return jax.lax.map(lambda z: block_argmin(z[None])[0], flat, batch_size=rows)


class Quantized(NamedTuple):
    z_q: jax.Array  # (B, h, w, D) as z_e, straight-through: forward z_q, gradient to z_e
    indices: jax.Array  # (B, h, w) int32
    codebook_loss: jax.Array  # mean((z_q - sg[z_e])^2)
    commitment_loss: jax.Array  # mean((z_e - sg[z_q])^2), not yet times beta


class VectorQuantizer(nnx.Module):
    """Nearest-code quantization with a straight-through gradient. A layer of its own: any
    model may use it on (B, h, w, D) encoder outputs, or on any (..., D) with the vectors
    along the last axis, as Flax's layers give them ((B, D) and (B, T, D) too).

    With z the N = B*h*w encoder vectors (N, D) and e the codebook (K, D), e.g. MNIST's
    [64, 7, 7, 128] -> [3136, 128] against K = 512:

        d[n, k] = ||z_n||^2 - 2 z_n . e_k + ||e_k||^2          (N, K), by matmul in blocks
        i[n]    = argmin_k d[n, k]                              (N,)
        z_q[n]  = e[i[n]]                                       (N, D)
        z_q_st  = z + sg[z_q - z]                               forward z_q, gradient to z

    The matmul runs at HIGHEST precision, so a GPU's default TF32 cannot change the argmin.
    The two loss terms are computed from z_q before the straight-through patch, so the
    codebook learns only from the codebook term and the encoder only from the commitment
    term and the reconstruction.

    How the codebook learns (`codebook_update`):
    - "grad": e is an nnx.Param, moved by the optimizer along the codebook term's gradient.
    - "ema" (appendix A.1 of the paper; Sonnet's VectorQuantizerEMA): e is an nnx.BatchStat,
      outside the optimizer, and the codebook term leaves the loss. Each train-mode call,
      with n_k = #{n : i[n] = k} and s_k = sum_{i[n] = k} z_n, and gamma = ema_decay:

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

    Data parallel (vqvae_jax.train's mesh): z_e is one global array sharded over the
    devices, so count_k, n_k, s_k and the restart rows are those of the global batch with no
    code of their own here: XLA adds the collectives, and every device holds the codebook
    one device would.
    """

    def __init__(self, num_codes: int, dim: int,
                 restart_below: float = ModelConfig.restart_below,
                 usage_decay: float = ModelConfig.usage_decay,
                 codebook_update: str = ModelConfig.codebook_update,
                 ema_decay: float = ModelConfig.ema_decay,
                 ema_epsilon: float = ModelConfig.ema_epsilon, *, rngs: nnx.Rngs) -> None:
        check_quantizer_shape(num_codes, dim, codebook_update)
        learned_by = nnx.Param if codebook_update == "grad" else nnx.BatchStat
        self.codebook = learned_by(jax.random.uniform(
            rngs.params(), (num_codes, dim), minval=-1 / num_codes, maxval=1 / num_codes))
        self.usage = nnx.BatchStat(jnp.zeros(num_codes))
        self.restart_below, self.usage_decay = restart_below, usage_decay
        self.codebook_update, self.ema_decay, self.ema_epsilon = (codebook_update, ema_decay,
                                                                 ema_epsilon)
        if codebook_update == "ema":
            self.ema_counts = nnx.BatchStat(jnp.ones(num_codes))
            # a buffer of its own: the train step donates every leaf of the state
            self.ema_sums = nnx.BatchStat(jnp.copy(self.codebook[...]))
        self.use_running_average = False  # set by nnx.Module.eval() / .train()

    def __call__(self, z: jax.Array) -> Quantized:
        e = self.codebook[...]
        flat = z.reshape(-1, z.shape[-1])
        if not len(flat):  # the usage shares would divide by N = 0
            raise ValueError(f"no vectors to quantize: z_e of shape {z.shape}")
        indices = nearest_codes(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(e))
        z_q = e[indices].reshape(z.shape)
        if not self.use_running_average:
            counts = jnp.bincount(indices, length=len(e)).astype(self.usage[...].dtype)
            share = counts / len(indices)
            self.usage[...] = self.usage_decay * self.usage[...] + (1 - self.usage_decay) * share
            if self.codebook_update == "ema":
                self._update_ema(jax.lax.stop_gradient(flat), indices, counts)
        codebook_loss = mse(z_q, jax.lax.stop_gradient(z))
        commitment_loss = mse(z, jax.lax.stop_gradient(z_q))
        z_q_st = z + jax.lax.stop_gradient(z_q - z)
        return Quantized(z_q_st, indices.reshape(z.shape[:-1]), codebook_loss, commitment_loss)

    def _update_ema(self, flat: jax.Array, indices: jax.Array, counts: jax.Array) -> None:
        """The EMA step of the class docstring, from the batch's flat (N, D) and indices (N,)."""
        sums = jnp.zeros_like(self.ema_sums[...]).at[indices].add(flat)  # (K, D)
        gamma, eps = self.ema_decay, self.ema_epsilon
        self.ema_counts[...] = gamma * self.ema_counts[...] + (1 - gamma) * counts
        self.ema_sums[...] = gamma * self.ema_sums[...] + (1 - gamma) * sums
        total = self.ema_counts[...].sum()
        smoothed = (self.ema_counts[...] + eps) / (total + len(counts) * eps) * total
        self.codebook[...] = self.ema_sums[...] / smoothed[:, None]

    def _restart_ema(self, codes: jax.Array) -> None:
        """EMA state of the `codes` (a (K,) mask) as if each had been assigned itself once."""
        if self.codebook_update == "ema":
            self.ema_counts[...] = jnp.where(codes, 1.0, self.ema_counts[...])
            self.ema_sums[...] = jnp.where(codes[:, None], self.codebook[...],
                                           self.ema_sums[...])

    def set_codebook(self, codebook: jax.Array | np.ndarray) -> None:
        """codebook <- a copy of the given (K, D); the EMA averages restart from it."""
        # jnp.array copies: on a CPU jnp.asarray may share an aligned numpy buffer (a
        # PyTorch tensor's .numpy(), say), which the caller may go on to change
        self.codebook[...] = jnp.array(codebook, self.codebook[...].dtype)
        self._restart_ema(jnp.ones(len(codebook), bool))

    def initialize_kmeans(self, z_e: jax.Array, seed: int,
                          iterations: int = TrainConfig.kmeans_iterations,
                          show_progress: bool = True) -> None:
        """codebook <- vqvae_common.kmeans of the vectors of z_e (..., D), from `seed`;
        every code then gets the uniform share 1/K (no restart at the next step). Not
        jittable: the k-means runs in numpy."""
        num_codes = len(self.codebook[...])
        self.set_codebook(kmeans(np.asarray(z_e).reshape(-1, z_e.shape[-1]), num_codes, seed,
                                 iterations, show_progress))
        self.usage[...] = jnp.full_like(self.usage[...], 1 / num_codes)

    def restart_dead_codes(self, z_e: jax.Array) -> None:
        """Move the dead codes onto vectors of z_e (B, h, w, D) or any (..., D), as __call__
        takes it; run after the optimizer step.
        Under a mesh z_e is the global batch, so the rows are the same on every device."""
        if self.restart_below <= 0:
            return
        e = self.codebook[...]
        flat = jax.lax.stop_gradient(z_e).reshape(-1, z_e.shape[-1])
        dead = self.usage[...] < self.restart_below / len(e)
        n, m = len(flat), jnp.maximum(dead.sum(), 1)
        rank = jnp.cumsum(dead) - 1
        rows = jnp.where(m <= n, rank * (n // m), rank % n)
        replacement = flat[jnp.clip(rows, 0, n - 1)]
        self.codebook[...] = jnp.where(dead[:, None], replacement, e)
        self.usage[...] = jnp.where(dead, 1 / len(e), self.usage[...])
        self._restart_ema(dead)


class Output(NamedTuple):
    recon: jax.Array  # x_hat (B, H, W, C)
    z_e: jax.Array  # encoder output (B, h, w, D)
    indices: jax.Array  # (B, h, w)
    losses: dict[str, jax.Array]  # loss, recon, codebook, commitment (scalars)


class VQVAE(nnx.Module):
    """The whole model. fast_cpu: True runs vqvae_jax/xla_cpu.py's formulations, False the
    plain XLA ops, None (the default) decides by the device it is created on (use_fast_cpu)."""

    def __init__(self, config: ModelConfig, *, fast_cpu: bool | None = None,
                 rngs: nnx.Rngs) -> None:
        fast_cpu = use_fast_cpu(fast_cpu)
        self.config = config
        self.encoder = Encoder(config.in_channels, config.hidden, fast_cpu=fast_cpu, rngs=rngs)
        self.quantizer = VectorQuantizer(config.num_codes, config.hidden, config.restart_below,
                                         config.usage_decay, config.codebook_update,
                                         config.ema_decay, config.ema_epsilon, rngs=rngs)
        self.decoder = Decoder(config.hidden, config.in_channels, fast_cpu=fast_cpu, rngs=rngs)

    def __call__(self, x: jax.Array) -> Output:
        check_image_sides(*x.shape[1:3])
        z_e = self.encoder(x)
        quantized = self.quantizer(z_e)
        x_hat = self.decoder(quantized.z_q)
        recon = mse(x_hat, x)
        codebook_term = quantized.codebook_loss if self.config.codebook_update == "grad" else 0
        loss = recon + codebook_term + self.config.beta * quantized.commitment_loss
        return Output(x_hat, z_e, quantized.indices, {
            "loss": loss, "recon": recon, "codebook": quantized.codebook_loss,
            "commitment": quantized.commitment_loss})
