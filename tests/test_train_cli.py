import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vqvae_common import config
from vqvae_torch import checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _train(*args, data_dir=None, timeout=300):
    env = dict(os.environ)
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    return subprocess.run([sys.executable, str(ROOT / "train_torch.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_dataset_exits_2_with_one_line():
    run = _train("--dataset", "nope", timeout=60)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error:")
    assert "nope" in run.stderr and "Traceback" not in run.stderr


def test_resume_into_an_empty_dir_exits_2(tmp_path, real_data_dir):
    run = _train("--resume", "--out", str(tmp_path / "run"), data_dir=real_data_dir("mnist"))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "--resume" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_short_training_run_writes_every_artifact(tmp_path, real_data_dir):
    out = tmp_path / "run"
    run = _train("--max-steps", "30", "--log-every", "5", "--out", str(out),
                 data_dir=real_data_dir("mnist"))
    assert run.returncode == 0, run.stderr[-2000:]

    model_cfg, train_cfg = config.from_json((out / "config.json").read_text())
    assert model_cfg == config.PRESETS["mnist"] and train_cfg.max_steps == 30

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train) == [5, 10, 15, 20, 25, 30]
    assert train[30]["recon"] < train[5]["recon"]
    test = [r for r in records if r["split"] == "test"]
    assert len(test) == 1 and test[0]["step"] == 30 and 0 < test[0]["codes_used"] <= 1

    events = os.listdir(out / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert checkpoint.load(str(out / "checkpoint.pt"), device="cpu", config=model_cfg)["step"] == 30
    assert Image.open(out / "reconstruction.png").format == "PNG"
    gif = Image.open(out / "interpolation.gif")
    assert gif.format == "GIF" and gif.n_frames > 1
