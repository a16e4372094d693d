"""Interruptions, resume, determinism, the NaN guard and checkpoint writes, in both twins.

Whole training processes run on tfds's mock data (tests/mock_train.py) so that they can be
killed and resumed in seconds."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vqvae_common import config as cfg
from vqvae_common import loop
from vqvae_common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16", "--num-codes", "32", "--batch-size", "16", "--epochs", "4",
         "--log-every", "4", "--checkpoint-every", "8", "--eval-batch-size", "256",
         "--seed", "3"]  # 512 mock images: 32 steps an epoch, 128 in all
TOTAL_STEPS = 128
LOSS_TERMS = ("loss", "recon", "codebook", "commitment")
CHECKPOINTS = {"torch": "checkpoint.pt", "jax": "checkpoint"}


def train(framework: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "mock_train.py"), framework,
                             *SMALL, "--out", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]


def train_losses(out: Path) -> dict[int, tuple[float, ...]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: tuple(r[k] for k in LOSS_TERMS) for r in records if r["split"] == "train"}


def logged_step(out: Path) -> int:
    try:
        return max(train_losses(out), default=0)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.fixture(scope="module", params=["torch", "jax"])
def uninterrupted(request, tmp_path_factory) -> tuple[str, dict[int, tuple[float, ...]]]:
    out = tmp_path_factory.mktemp(f"whole-{request.param}")
    finish(train(request.param, out))
    return request.param, train_losses(out)


def test_same_seed_gives_identical_metrics(uninterrupted, tmp_path):
    framework, whole = uninterrupted
    finish(train(framework, tmp_path))
    assert train_losses(tmp_path) == whole
    assert len(whole) == TOTAL_STEPS // 4


def test_sigkill_then_resume_reaches_the_same_losses(uninterrupted, tmp_path):
    framework, whole = uninterrupted
    process = train(framework, tmp_path)
    deadline = time.monotonic() + 300
    while logged_step(tmp_path) < 44 and process.poll() is None:  # past checkpoints 8..40
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = logged_step(tmp_path)
    assert killed_at < TOTAL_STEPS
    finish(train(framework, tmp_path, "--resume"))
    resumed = train_losses(tmp_path)
    assert sorted(resumed) == sorted(whole), "resumed run logged other steps"
    assert resumed == whole  # bit-identical losses, before and after the kill


def test_a_kill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """Kill the torch trainer at many moments while it saves every 2 steps: whatever the
    moment, the checkpoint on disk loads (no torn file)."""
    import torch

    from vqvae_torch import checkpoint
    ckpt = tmp_path / "checkpoint.pt"
    for delay in np.linspace(0.0, 0.3, 6):
        process = train("torch", tmp_path, "--checkpoint-every", "2", "--log-every", "2",
                        *(["--resume"] if ckpt.exists() else []))
        while not ckpt.exists() and process.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert ckpt.exists()
        checkpoint.load(str(ckpt), torch.device("cpu"))  # raises UserError if torn


class FakeTwin:
    """A numpy stand-in for a framework, to drive the shared loop's bookkeeping."""

    checkpoint_name = "fake.json"
    nan_at: int | None = None

    def __init__(self, model_cfg: cfg.ModelConfig, train_cfg: cfg.TrainConfig) -> None:
        self.step, self.k = 0, model_cfg.num_codes

    def train_step(self, batch: np.ndarray) -> dict[str, float]:
        self.step += 1
        diverged = self.nan_at is not None and self.step >= self.nan_at  # NaN weights stay NaN
        loss = float("nan") if diverged else 1.0 / self.step
        return {"loss": loss, "recon": loss, "codebook": 0.0, "commitment": 0.0}

    def fetch(self, step_metrics: dict[str, float]) -> dict[str, float]:
        return step_metrics

    def evaluate(self, batch):
        return batch, np.zeros(batch.shape[:1] + (7, 7), int), {"loss": 1.0, "recon": 0.5,
                                                                 "codebook": 0.0,
                                                                 "commitment": 0.0}

    def encode(self, batch):
        return np.zeros((len(batch), 7, 7, 4), np.float32)

    def decode(self, latents):
        return np.zeros((len(latents), 28, 28, 1), np.float32)

    def save(self, path: str, step: int) -> None:
        loop.write_atomic(path, json.dumps({"step": step}))

    def load(self, path: str) -> int:
        self.step = json.loads(Path(path).read_text())["step"]
        return self.step


@pytest.fixture
def fake_data(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    monkeypatch.setattr(loop.data, "load", lambda name, split, data_dir=None: images)


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(
        fake_data, tmp_path, monkeypatch):
    monkeypatch.setattr(FakeTwin, "nan_at", 7)
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, log_every=1,
                                checkpoint_every=5)
    with pytest.raises(UserError, match="not finite at step 7") as error:
        loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    assert "last good checkpoint" in str(error.value)
    assert json.loads((tmp_path / "fake.json").read_text()) == {"step": 5}


def test_a_nan_between_log_points_is_caught_before_any_save(fake_data, tmp_path, monkeypatch):
    monkeypatch.setattr(FakeTwin, "nan_at", 15)  # 16 steps an epoch, logging every 100
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, log_every=100,
                                checkpoint_every=100)
    with pytest.raises(UserError, match="not finite at step 16"):
        loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    assert not (tmp_path / "fake.json").exists()


def test_a_full_disk_on_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from vqvae_torch import checkpoint
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save(path, {"framework": "torch", "step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is kept"):
        checkpoint.save(path, {"framework": "torch", "step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not os.path.exists(path + ".tmp")


def test_an_unwritable_output_directory_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/vqvae-cannot-write-here"  # even root cannot create this
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "run")
    with pytest.raises(UserError, match="output directory"):
        loop.prepare_out_dir(target)
