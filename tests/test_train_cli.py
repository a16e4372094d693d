import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twin_adapters import ADAPTERS
from vqvae_common import cli, config
from vqvae_common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ["torch", "jax"]
CHECKPOINT = {"torch": "checkpoint.pt", "jax": "checkpoint"}


@pytest.fixture(scope="module")
def trainer(child_env):
    """trainer(framework, *args, data_dir=None, timeout=300) -> the CompletedProcess of
    `python train_{framework}.py ARGS`."""
    def run(framework, *args, data_dir=None, timeout=300):
        env = {**child_env, "TFDS_DATA_DIR": data_dir} if data_dir else child_env
        return subprocess.run([sys.executable, str(ROOT / f"train_{framework}.py"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return run


def _checkpoint_step(framework, path, model_cfg):
    """The step recorded in the checkpoint at `path`, after checking its model config."""
    if framework == "torch":
        from vqvae_torch import checkpoint

        return checkpoint.load(str(path), device="cpu", config=model_cfg)[0].step
    from vqvae_jax import checkpoint

    record = checkpoint.read_record(str(path))
    assert record.model_config == model_cfg
    assert str(record.step) in os.listdir(path)  # orbax's step folder
    return record.step


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_unknown_dataset_exits_2_with_one_line(trainer, framework):
    run = trainer(framework, "--dataset", "nope", timeout=60)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error:")
    assert "nope" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_data_leaves_no_output_behind(trainer, tmp_path, framework):
    (tmp_path / "a_file").write_text("")
    run = trainer(framework, "--data-dir", str(tmp_path / "a_file"), "--out",
                  str(tmp_path / "run"), timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith("is not a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_into_an_empty_dir_exits_2(trainer, tmp_path, real_data_dir, framework):
    run = trainer(framework, "--resume", "--out", str(tmp_path / "run"),
                  data_dir=real_data_dir("mnist"))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "--resume" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def short_runs(trainer, tmp_path_factory, real_data_dir):
    """{framework: (the CompletedProcess, --out)} of each trainer's 30 steps on real MNIST, in
    batches of 16 (the preset model still, its steps 4 times cheaper), the k-means start on
    256 images and the evaluation on the first 1000 test images (the whole split took 18 of
    the PyTorch run's 34 s). Both trainers run at once: torch on one core, JAX mostly on the
    other."""
    data_dir = real_data_dir("mnist")

    def run(framework):
        out = tmp_path_factory.mktemp(framework) / "run"
        return trainer(framework, "--max-steps", "30", "--log-every", "5", "--batch-size", "16",
                       "--kmeans-images", "256", "--eval-images", "1000", "--out", str(out),
                       data_dir=data_dir), out

    with ThreadPoolExecutor(len(FRAMEWORKS)) as pool:
        return dict(zip(FRAMEWORKS, pool.map(run, FRAMEWORKS)))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_short_training_run_writes_every_artifact(short_runs, framework):
    run, out = short_runs[framework]
    assert run.returncode == 0, run.stderr[-2000:]

    model_cfg, train_cfg = config.from_json((out / "config.json").read_text())
    assert model_cfg == config.DATASETS["mnist"].preset and train_cfg.max_steps == 30

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train) == [5, 10, 15, 20, 25, 30]
    assert train[30]["recon"] < train[5]["recon"]
    test = [r for r in records if r["split"] == "test"]
    assert len(test) == 1 and test[0]["step"] == 30 and 0 < test[0]["codes_used"] <= 1

    events = os.listdir(out / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert _checkpoint_step(framework, out / CHECKPOINT[framework], model_cfg) == 30
    assert Image.open(out / "reconstruction.png").format == "PNG"
    gif = Image.open(out / "interpolation.gif")
    assert gif.format == "GIF" and gif.n_frames > 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_init_from_starts_a_new_run_from_the_model(trainer, short_runs, tmp_path, real_data_dir,
                                                   framework):
    """At a rate too small to move the weights, one step from a trained model keeps its
    kernels, and its codebook but for one EMA update: no k-means start replaced it."""
    _, trained = short_runs[framework]
    out = tmp_path / "fine-tune"
    run = trainer(framework, "--init-from", str(trained / CHECKPOINT[framework]), "--lr", "1e-8",
                  "--max-steps", "1", "--batch-size", "16", "--eval-images", "100", "--out",
                  str(out), data_dir=real_data_dir("mnist"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "k-means" not in run.stderr

    twin = ADAPTERS[framework]
    models = [twin.model_of(twin.Twin.from_checkpoint(str(run_dir / CHECKPOINT[framework]), "cpu"))
              for run_dir in (trained, out)]
    np.testing.assert_allclose(twin.encoder_kernel(models[1]), twin.encoder_kernel(models[0]),
                               atol=1e-6)
    codebooks = [twin.codebook(model.quantizer) for model in models]
    assert np.linalg.norm(codebooks[1] - codebooks[0]) < 0.05 * np.linalg.norm(codebooks[0])
    model_cfg, train_cfg = config.from_json((out / "config.json").read_text())
    assert train_cfg.init_from == str(trained / CHECKPOINT[framework])
    assert _checkpoint_step(framework, out / CHECKPOINT[framework], model_cfg) == 1


def entry_point(framework):
    spec = importlib.util.spec_from_file_location(f"train_{framework}",
                                                  ROOT / f"train_{framework}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_each_trainer_reads_the_model_of_its_init_from_checkpoint(short_runs, framework):
    _, trained = short_runs[framework]
    start = ["--init-from", str(trained / CHECKPOINT[framework])]
    read = entry_point(framework).checkpoint_config
    assert cli.parse(framework, start, read)[0] == config.DATASETS["mnist"].preset
    with pytest.raises(UserError, match="1-channel images, and --dataset cifar10's have 3"):
        cli.parse(framework, [*start, "--dataset", "cifar10"], read)
    with pytest.raises(UserError, match="holds a model with beta 0.25, which a run from it"):
        cli.parse(framework, [*start, "--beta", "0.5"], read)


def test_a_seed_era_model_starts_a_run_with_no_model_flag_repeated():
    start = ["--init-from", str(ROOT / "trained_models" / "mnist_torch" / "model.pt")]
    model, _ = cli.parse("torch", start, entry_point("torch").checkpoint_config)
    assert (model.beta, model.codebook_update) == (1.0, "grad")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_init_from_a_run_directory_names_the_checkpoint_in_it(short_runs, framework):
    _, trained = short_runs[framework]
    with pytest.raises(UserError, match=f"run's directory: pass the checkpoint in it, "
                                        f"{re.escape(str(trained / CHECKPOINT[framework]))}"):
        ADAPTERS[framework].make().init_weights(str(trained))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_init_from_with_resume_exits_2(trainer, tmp_path, framework):
    run = trainer(framework, "--resume", "--init-from", "elsewhere", "--out",
                  str(tmp_path / "run"), timeout=60)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and "--init-from" in run.stderr
    assert not (tmp_path / "run").exists()
