"""The suite's inputs: random images of each preset's shape, and a small smooth dataset.

PARITY_BATCH_ORDER=reversed reverses the images within every batch, which changes the order
of every reduction over the batch (BatchNorm statistics, loss means) and so how each
result rounds, as another machine's kernels would (parity_tests/matrix.py uses it).
"""
from __future__ import annotations

import os

import numpy as np

from vqvae_common.config import DATASETS

BATCH_ORDER = os.environ.get("PARITY_BATCH_ORDER", "given")
if BATCH_ORDER not in ("given", "reversed"):
    raise ValueError(f"PARITY_BATCH_ORDER={BATCH_ORDER!r}: expected given or reversed")


def arrange(batch: np.ndarray) -> np.ndarray:
    """The batch in the order PARITY_BATCH_ORDER asks for."""
    return batch[::-1].copy() if BATCH_ORDER == "reversed" else batch  # copy: no negative strides


def images(preset: str, batch: int, seed: int) -> np.ndarray:
    """(batch, H, W, C) float32 uniform in [-1, 1], of `preset`'s image shape."""
    rng = np.random.default_rng(seed + 100)
    return arrange(rng.uniform(-1, 1, (batch, *DATASETS[preset].image_shape)).astype(np.float32))


def smooth_dataset(preset: str, n: int) -> np.ndarray:
    """n smooth random uint8 images (4x4 blocks of noise), so a model has structure to learn."""
    rng = np.random.default_rng(7)
    h, w, c = DATASETS[preset].image_shape
    noise = rng.uniform(0, 255, (n, h // 4, w // 4, c))
    return np.repeat(np.repeat(noise, 4, 1), 4, 2).astype(np.uint8)
