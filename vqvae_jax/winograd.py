"""The 3x3 stride-1 pad-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
Gray 2016, "Fast Algorithms for Convolutional Neural Networks"), NHWC and HWIO, even H and W.

Each 2x2 tile of the output y depends on a 4x4 tile d of the padded input, the tiles of d
overlapping by 2. Per tile and per (input, output) channel pair,

    y = A^T [(G g G^T) * (B^T d B)] A        g the 3x3 kernel, * elementwise

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

so the channel sum becomes 16 matmuls, one per position (i, j) of the 4x4 transformed tile,
e.g. CIFAR-10's residual conv, x (64, 8, 8, 256) with T = 64 * 4 * 4 = 1024 tiles:

    V = B^T d B  (16, T, C)   U = G g G^T  (16, C, O)   M = V @ U  (16, T, O)
    y = A^T M A  (64, 8, 8, O)

16 T C O multiply-adds where the direct conv takes 9 * 4 T C O: 2.25x fewer. The transforms
are additions (and halvings, exact in floating point) over strided slices, written out
rather than as einsums with the small matrices, which XLA:CPU ran 10x slower. Against XLA's
conv the result differs by float rounding (relative 1e-6 at the model's shapes).

The backward takes the same route: the input gradient is the 3x3 conv of dy with the kernel
flipped and transposed, dU = V^T @ (A dy A^T) per position, and dg = G^T dU G.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _b_t(d0, d1, d2, d3):  # B^T applied to the 4 rows of a tile
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _g(w0, w1, w2):  # G applied to the 3 taps of a kernel
    return w0, (w0 + w1 + w2) * 0.5, (w0 - w1 + w2) * 0.5, w2


def _g_t(u0, u1, u2, u3):  # G^T: the transpose of _g
    return u0 + (u1 + u2) * 0.5, (u1 - u2) * 0.5, (u1 + u2) * 0.5 + u3


def _a_t(m0, m1, m2, m3):  # A^T applied to the 4 rows of a transformed tile
    return m0 + m1 + m2, m1 - m2 - m3


def _a(y0, y1):  # A: the transpose of _a_t
    return y0, y0 + y1, y0 - y1, -y1


def input_tiles(x: jax.Array) -> jax.Array:
    """V = B^T d B for every 4x4 tile d of x padded by 1: (B, H, W, C) -> (16, T, C),
    T = B H W / 4. Tile (t, u) takes padded rows 2t..2t+3, i.e. row pairs t and t + 1."""
    b, h, w, c = x.shape
    pairs = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, h // 2 + 1, 2, w // 2 + 1,
                                                                  2, c)
    rows = _b_t(pairs[:, :-1, 0], pairs[:, :-1, 1], pairs[:, 1:, 0], pairs[:, 1:, 1])
    tiles = [col for r in rows  # r: (B, H/2, W/2 + 1, 2, C)
             for col in _b_t(r[:, :, :-1, 0], r[:, :, :-1, 1], r[:, :, 1:, 0], r[:, :, 1:, 1])]
    return jnp.stack(tiles).reshape(16, -1, c)


def kernel_tiles(w: jax.Array) -> jax.Array:
    """U = G g G^T: (3, 3, C, O) -> (16, C, O)."""
    return jnp.stack([col for r in _g(w[0], w[1], w[2]) for col in _g(r[0], r[1], r[2])])


def kernel_tiles_transpose(u: jax.Array) -> jax.Array:
    """G^T u G: (16, C, O) -> (3, 3, C, O), the transpose of kernel_tiles."""
    u = u.reshape(4, 4, *u.shape[1:])
    return jnp.stack([jnp.stack(_g_t(r[0], r[1], r[2], r[3])) for r in _g_t(*u)])


def output_tiles(m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A^T m A for every tile, interleaved: (16, T, O) -> shape = (B, H, W, O)."""
    b, h, w, _ = shape
    m = m.reshape(4, 4, b, h // 2, w // 2, -1)
    rows = [jnp.stack(_a_t(*r), 3) for r in _a_t(*m)]  # 2 x (B, H/2, W/2, 2, O)
    return jnp.stack(rows, 2).reshape(shape)


def output_tiles_transpose(dy: jax.Array) -> jax.Array:
    """A dy A^T for every 2x2 tile of dy: (B, H, W, O) -> (16, T, O), the transpose of
    output_tiles."""
    b, h, w, o = dy.shape
    q = dy.reshape(b, h // 2, 2, w // 2, 2, o)
    rows = _a(q[:, :, 0], q[:, :, 1])  # 4 x (B, H/2, W/2, 2, O)
    return jnp.stack([col for r in rows for col in _a(r[..., 0, :], r[..., 1, :])]
                     ).reshape(16, -1, o)


def _conv(v: jax.Array, w: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return output_tiles(v @ kernel_tiles(w), (*shape[:3], w.shape[-1]))


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """conv3x3(x, w), stride 1, padding 1: x (B, H, W, C) with H, W even, w (3, 3, C, O)."""
    return _conv(input_tiles(x), w, x.shape)


def _conv3x3_fwd(x, w):
    v = input_tiles(x)
    return _conv(v, w, x.shape), (v, w)


def _conv3x3_bwd(residuals, dy):
    v, w = residuals
    dx = _conv(input_tiles(dy), w[::-1, ::-1].transpose(0, 1, 3, 2), dy.shape)
    du = jnp.einsum("ktc,kto->kco", v, output_tiles_transpose(dy))  # (16, C, O)
    return dx, kernel_tiles_transpose(du)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
