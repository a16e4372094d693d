"""Reconstruction and codebook metrics, in numpy.

    MSE        mean((x_hat - x)^2) on the model's [-1, 1] scale
    PSNR       10 log10(255^2 / MSE_255), with MSE_255 = MSE * 127.5^2 (the [0, 255] scale)
    perplexity exp(-sum_k p_k log p_k), p_k the share of latents assigned to code k
    codes used the fraction of the K codes assigned at least once
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


def code_counts(indices: np.ndarray, num_codes: int) -> np.ndarray:
    return np.bincount(np.asarray(indices).ravel(), minlength=num_codes)


def perplexity(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def codes_used(counts: np.ndarray) -> float:
    return float(np.mean(counts > 0))
