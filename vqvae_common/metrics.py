"""Reconstruction and codebook metrics, in numpy.

    MSE        mean((x_hat - x)^2) on the model's [-1, 1] scale
    PSNR       10 log10(255^2 / MSE_255), with MSE_255 = MSE * 127.5^2 (the [0, 255] scale):
               the dataset-level figure, from the MSE over the whole split
    PSNR 8-bit as papers report it: both images rounded to 8-bit integers, the PSNR of each
               image from its own MSE, then averaged over the images (capped at
               PSNR_CAP_DB for an image reconstructed exactly, which would be infinite)
    perplexity exp(-sum_k p_k log p_k), p_k the share of latents assigned to code k
    codes used the fraction of the K codes assigned at least once
    SSIM       Wang et al. 2004 on [0, 255]: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
               K2 = 0.03, valid positions only, averaged over positions and channels
"""
from __future__ import annotations

import numpy as np


def mse(targets: np.ndarray, recons: np.ndarray) -> float:
    return float(np.mean((np.asarray(recons, np.float64) - np.asarray(targets, np.float64)) ** 2))


def psnr(mse_unit: float) -> float:
    """PSNR in dB on the [0, 255] scale from an MSE measured on [-1, 1]; inf when exact."""
    if mse_unit == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 ** 2 / (mse_unit * 127.5 ** 2)))


PSNR_CAP_DB = 100.0


def to_8bit(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> the nearest of the 256 levels of an 8-bit image, as float64."""
    return np.clip(np.rint((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255)


def psnr_8bit_per_image(targets: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """PSNR in dB of each NHWC image pair after rounding both to 8 bits, (N,)."""
    squared = (to_8bit(recons) - to_8bit(targets)) ** 2
    mse_255 = squared.reshape(len(squared), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(255.0 ** 2 / mse_255), PSNR_CAP_DB)


def code_counts(indices: np.ndarray, num_codes: int) -> np.ndarray:
    return np.bincount(np.asarray(indices).ravel(), minlength=num_codes)


def perplexity(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def codes_used(counts: np.ndarray) -> float:
    return float(np.mean(counts > 0))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (N, H, W, C) over H and W."""
    x = np.lib.stride_tricks.sliding_window_view(x, len(g), axis=1) @ g
    return np.lib.stride_tricks.sliding_window_view(x, len(g), axis=2) @ g


def ssim_per_image(targets: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """SSIM of each image pair, (N,), for NHWC images on [-1, 1]."""
    x = (np.asarray(targets, np.float64) + 1.0) * 127.5
    y = (np.asarray(recons, np.float64) + 1.0) * 127.5
    g = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x ** 2
    var_y = _filter(y * y, g) - mu_y ** 2
    cov = _filter(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
         / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return s.mean(axis=(1, 2, 3))
