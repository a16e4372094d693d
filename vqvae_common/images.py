"""Pictures of what the model does: a target|reconstruction grid, a latent-walk GIF, a grid
of samples, and the loss curves of a run. Each file is replaced atomically: a kill while one
is written leaves the previous picture, never a truncated one."""
from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from vqvae_common import atomic, metrics


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] NHWC -> uint8 [0, 255] NHWC: the levels metrics.to_8bit scores."""
    return metrics.to_8bit(images).astype(np.uint8)


def _pil(image: np.ndarray, scale: int) -> Image.Image:
    pic = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)


def reconstruction_grid(targets: np.ndarray, recons: np.ndarray, path: str,
                        pairs_per_row: int = 8, scale: int = 2) -> None:
    """PNG of `pairs_per_row` (target, reconstruction) pairs per row, a 2-pixel gap between
    pairs: a sample grid of the pairs joined side by side (N, H, 2W, C)."""
    sample_grid(np.concatenate([targets, recons], axis=2), path, pairs_per_row, scale)


def sample_grid(samples: np.ndarray, path: str, per_row: int, scale: int = 2) -> None:
    """PNG of `samples` (N, H, W, C in [-1, 1]), `per_row` to a row, a 2-pixel gap between."""
    pics = to_uint8(samples)
    n, h, w, c = pics.shape
    rows, gap = -(-n // per_row), 2
    grid = np.full((rows * (h + gap) + gap, per_row * (w + gap) + gap, c), 255, np.uint8)
    for i in range(n):
        y, x = gap + (i // per_row) * (h + gap), gap + (i % per_row) * (w + gap)
        grid[y:y + h, x:x + w] = pics[i]
    with atomic.replacing(path) as tmp:
        _pil(grid, scale).save(tmp, format="PNG")


def interpolation_latents(z_a: np.ndarray, z_b: np.ndarray, frames: int) -> np.ndarray:
    """(frames, h, w, D): (1 - t) z_a + t z_b for t evenly spaced on [0, 1]."""
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None, None, None]
    return (1.0 - t) * z_a[None] + t * z_b[None]


def interpolation_gif(frames: np.ndarray, path: str, scale: int = 4,
                      frame_ms: int = 120) -> None:
    """Animated GIF that walks forward through `frames` (T, H, W, C in [-1, 1]) and back."""
    pics = [_pil(f, scale) for f in to_uint8(frames)]
    pics = pics + pics[-2:0:-1]
    with atomic.replacing(path) as tmp:
        pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:],
                     duration=frame_ms, loop=0)


def loss_curve_labels(train: list[dict]) -> dict[str, str]:
    """{label: metrics.jsonl column} of the train loss terms to draw. The codebook term
    ||sg[z_e] - e||^2 and the commitment term ||z_e - sg[e]||^2 have one value (they differ
    in where their gradients go), so where a run logged them equal (to float32 rounding:
    PyTorch's differ in the last bit) one curve shows both."""
    if all(math.isclose(r["codebook"], r["commitment"], rel_tol=1e-6) for r in train):
        return {"loss": "loss", "recon": "recon", "codebook = commitment": "codebook"}
    return {term: term for term in ("loss", "recon", "codebook", "commitment")}


def loss_curves(metrics_path: str, path: str) -> None:
    """PNG of a run's metrics.jsonl: the train loss terms (log scale) and the test PSNR."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    fig, (losses, quality) = plt.subplots(1, 2, figsize=(10, 3.6))
    marker = "o" if len(train) == 1 else None  # one logged step draws no line
    for label, term in loss_curve_labels(train).items():
        losses.plot([r["step"] for r in train], [r[term] for r in train], label=label,
                    marker=marker)
    losses.set(yscale="log", xlabel="step", title="train loss terms")
    # below the axes: inside, it covered the curves, which fill the whole plot
    losses.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    quality.plot([r["step"] for r in test], [r["psnr"] for r in test], "o-")
    quality.set(xlabel="step", ylabel="dB", title="test PSNR")
    fig.tight_layout()
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
