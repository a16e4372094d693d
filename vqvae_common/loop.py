"""The training loop both twins share. A twin supplies only what depends on its framework.

Bookkeeping done here, once: output directory, resume, the seeded data order, logging
cadence, images/s, the NaN guard, checkpoint cadence, evaluation on the test split and the
artifacts (config.json, metrics.jsonl, TensorBoard events, reconstruction.png,
interpolation.gif, loss_curves.png).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vqvae_common import config as cfg
from vqvae_common import data, images, metrics
from vqvae_common.errors import UserError
from vqvae_common.logbook import Logbook

INTERPOLATION_FRAMES = 16
GRID_PAIRS = 32


class Twin(Protocol):
    """What a framework implements for `fit`. Images are NHWC float32 numpy in [-1, 1]."""

    checkpoint_name: str  # file or directory name inside --out

    def __init__(self, model_cfg: cfg.ModelConfig, train_cfg: cfg.TrainConfig) -> None: ...

    def train_step(self, batch: np.ndarray) -> Any:
        """One optimizer step; returns the loss terms on the device, not synced."""

    def fetch(self, step_metrics: Any) -> dict[str, float]:
        """Device loss terms -> Python floats (the only host sync of a training step)."""

    def evaluate(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Eval-mode forward: (reconstruction NHWC, code indices (B, h, w), loss terms)."""

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Encoder output z_e, (B, h, w, D), before quantization."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Quantize (B, h, w, D) latents and decode them to images."""

    def save(self, path: str, step: int) -> None: ...

    def load(self, path: str) -> int:
        """Restore model and optimizer state, refusing a checkpoint of another config;
        returns the step it was saved at."""


def prepare_out_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable")



def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def evaluate(twin: Twin, test_images: np.ndarray, batch_size: int,
             num_codes: int) -> dict[str, float]:
    """Loss terms, MSE, PSNR, SSIM and codebook usage over the whole split."""
    sums: dict[str, float] = {}
    counts = np.zeros(num_codes, np.int64)
    for batch in data.eval_batches(test_images, batch_size):
        recons, indices, losses = twin.evaluate(batch)
        losses["ssim"] = float(metrics.ssim_per_image(batch, recons).mean())
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value * len(batch)
        counts += metrics.code_counts(indices, num_codes)
    result = {key: value / len(test_images) for key, value in sums.items()}
    result["mse"] = result["recon"]
    result["psnr"] = metrics.psnr(result["mse"])
    result["perplexity"] = metrics.perplexity(counts)
    result["codes_used"] = metrics.codes_used(counts)
    return result


def write_artifacts(twin: Twin, test_images: np.ndarray, out: str) -> None:
    targets = data.to_float(test_images[:GRID_PAIRS])
    recons, _, _ = twin.evaluate(targets)
    images.reconstruction_grid(targets, recons, os.path.join(out, "reconstruction.png"))
    z = twin.encode(targets[:2])
    frames = twin.decode(images.interpolation_latents(z[0], z[1], INTERPOLATION_FRAMES))
    images.interpolation_gif(frames, os.path.join(out, "interpolation.gif"))
    images.loss_curves(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curves.png"))


def fit(make_twin: type[Twin], model_cfg: cfg.ModelConfig,
        train_cfg: cfg.TrainConfig) -> dict[str, float]:
    """Train, evaluating each epoch; returns the last test-split metrics. `make_twin` is a
    Twin class: its checkpoint_name is checked before any data is decoded. --out is created
    only once the data, the device and any checkpoint to resume have passed, so that bad
    input leaves nothing behind."""
    out = train_cfg.out
    ckpt = os.path.join(out, make_twin.checkpoint_name)
    _check_resume(ckpt, train_cfg, out)
    train_images = data.load(train_cfg.dataset, "train", train_cfg.data_dir)
    test_images = data.load(train_cfg.dataset, "test", train_cfg.data_dir)
    per_epoch = data.steps_per_epoch(len(train_images), train_cfg.batch_size)
    if per_epoch == 0:
        raise UserError(f"--batch-size {train_cfg.batch_size} is larger than the "
                        f"{len(train_images)} training images")
    total = per_epoch * train_cfg.epochs
    if train_cfg.max_steps is not None:
        total = min(total, train_cfg.max_steps)

    twin = make_twin(model_cfg, train_cfg)
    step = twin.load(ckpt) if train_cfg.resume else 0
    prepare_out_dir(out)
    write_atomic(os.path.join(out, "config.json"), cfg.to_json(model_cfg, train_cfg))

    logbook = Logbook(out, resume_step=step if train_cfg.resume else None)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    last_eval: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < total:
            epoch, skip = divmod(step, per_epoch)
            for batch in data.batches(train_images, train_cfg.batch_size, train_cfg.seed,
                                      epoch, skip):
                step_metrics = twin.train_step(batch)
                step += 1
                window_steps += 1
                bar.update()
                checkpoint_due = step % train_cfg.checkpoint_every == 0
                epoch_done = step % per_epoch == 0 or step == total
                if step % train_cfg.log_every == 0 or checkpoint_due or epoch_done:
                    # before every save: a checkpoint never holds non-finite weights
                    record = _finite_or_stop(twin.fetch(step_metrics), step, ckpt)
                    elapsed = time.perf_counter() - window_start
                    record["images_per_s"] = window_steps * train_cfg.batch_size / elapsed
                    logbook.write({"step": step, "epoch": epoch, **record})
                    bar.set_postfix(loss=f"{record['loss']:.4f}", recon=f"{record['recon']:.4f}")
                    window_start, window_steps = time.perf_counter(), 0
                if checkpoint_due and not epoch_done:  # the epoch's end saves anyway
                    twin.save(ckpt, step)
                if epoch_done:
                    break
            last_eval = evaluate(twin, test_images, train_cfg.eval_batch_size,
                                 model_cfg.num_codes)
            logbook.write({"step": step, "epoch": epoch, **last_eval}, prefix="test")
            bar.write(f"epoch {epoch} step {step}: test mse {last_eval['mse']:.5f} "
                      f"psnr {last_eval['psnr']:.2f} dB ssim {last_eval['ssim']:.3f} "
                      f"perplexity {last_eval['perplexity']:.1f} "
                      f"codes used {last_eval['codes_used']:.1%}")
            twin.save(ckpt, step)
            write_artifacts(twin, test_images, out)
            window_start, window_steps = time.perf_counter(), 0
    finally:
        bar.close()
        logbook.close()
    return last_eval


def _check_resume(ckpt: str, train_cfg: cfg.TrainConfig, out: str) -> None:
    if train_cfg.resume and not os.path.exists(ckpt):
        raise UserError(f"--resume: no checkpoint {ckpt} to resume from")
    if not train_cfg.resume and os.path.exists(ckpt):
        raise UserError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                        f"or choose another --out")


def _finite_or_stop(record: dict[str, float], step: int, ckpt: str) -> dict[str, float]:
    bad = [k for k, v in record.items() if not math.isfinite(v)]
    if bad:
        raise UserError(f"training diverged: {', '.join(bad)} not finite at step {step}; "
                        f"stopped, the last good checkpoint {ckpt} is kept")
    return record
