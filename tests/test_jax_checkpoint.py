"""What only an orbax checkpoint directory can suffer: damaged step folders and directories
that hold no complete step. (orbax never unpickles: the pickle cases have no twin here.)"""
import glob
import os
import shutil

import numpy as np
import pytest

from twin_adapters import JaxAdapter, assert_same_arrays
from vqvae_common.errors import UserError

JAX = JaxAdapter()


def _truncate(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def _garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(max(size, 16)))


def _damage(step, damage):
    data = glob.glob(os.path.join(step, "state", "**", "d", "*"), recursive=True)
    assert data
    if damage == "truncate data":
        for f in data:
            _truncate(f, 0.5)
    elif damage == "empty data":
        for f in data:
            _truncate(f, 0.0)
    elif damage == "garbage data":
        for f in data:
            _garbage(f)
    elif damage == "truncate every file":
        for f in glob.glob(os.path.join(step, "**"), recursive=True):
            if os.path.isfile(f):
                _truncate(f, 0.5)
    elif damage == "delete state":
        shutil.rmtree(os.path.join(step, "state"))
    else:
        _garbage(os.path.join(step, "meta", "metadata"))


# orbax leaves an "Event loop is closed" behind when a restore fails; it is orbax's, not ours
# (the command-line tools drop it: vqvae_common.cli.report_errors)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate data", "empty data", "garbage data",
                                    "truncate every file", "delete state", "garbage record"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path, damage):
    path = str(tmp_path / "checkpoint")
    JAX.make(seed=0).save(path, 1)
    _damage(os.path.join(path, "1"), damage)
    twin = JAX.make(seed=1)
    model, optimizer = JAX.model_arrays(twin), JAX.optimizer_arrays(twin)
    with pytest.raises(UserError, match="truncated or corrupt"):
        twin.load(path)
    assert_same_arrays(model, JAX.model_arrays(twin))
    assert_same_arrays(optimizer, JAX.optimizer_arrays(twin))


@pytest.mark.parametrize("kind", ["empty dir", "no complete step"])
def test_a_directory_without_a_complete_step_is_a_user_error(tmp_path, kind):
    path = tmp_path / "checkpoint"
    if kind == "empty dir":
        path.mkdir()
    else:
        JAX.make().save(str(path), 1)
        shutil.rmtree(path / "1")
    with pytest.raises(UserError, match="not a Flax checkpoint directory|no complete"):
        JAX.make().load(str(path))


def test_a_step_folder_given_for_its_checkpoint_names_the_checkpoint(tmp_path):
    path = tmp_path / "checkpoint"
    JAX.make().save(str(path), 20)
    with pytest.raises(UserError, match=f"it is one step of the checkpoint {path}, pass that"):
        JAX.make().load(str(path / "20"))


def test_a_checkpoint_given_as_a_runs_out_is_refused_and_left_as_it_was(tmp_path, monkeypatch):
    from vqvae_common import config as cfg
    from vqvae_common import loop
    from vqvae_jax.train import JaxTwin

    def unread(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(loop.data, "load", unread)
    path = tmp_path / "converted"
    JAX.make().save(str(path), 20)
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    for resume in (False, True):  # --resume there: what a user of a converted one tries
        with pytest.raises(UserError, match=f"--out {path} is a checkpoint, not a run's "
                                            f"folder: choose a new folder"):
            loop.fit(JaxTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(path), resume=resume))
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
    run = tmp_path / "run"  # a run's own checkpoint given as --out: its run goes on
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {}, "train": {}}')
    shutil.copytree(path / "20", run / "checkpoint" / "20")
    with pytest.raises(UserError, match=f"--out {run}/checkpoint is the checkpoint of the run "
                                        f"in {run}: to go on with that run, pass --out {run} "
                                        f"with --resume"):
        loop.fit(JaxTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(run / "checkpoint")))


def test_a_folder_of_numbered_folders_is_no_checkpoint_and_no_place_for_one(tmp_path,
                                                                            monkeypatch):
    """orbax alone would take "7" for a step: it counted towards the 2 steps a run keeps, so
    a run there kept one of its own, and every later --resume was refused."""
    from vqvae_common import config as cfg
    from vqvae_common import loop
    from vqvae_jax import checkpoint
    from vqvae_jax.train import JaxTwin

    monkeypatch.setattr(loop.data, "load", lambda *args, **kwargs: pytest.fail("data read"))
    (tmp_path / "checkpoint" / "7").mkdir(parents=True)
    refusal = f"{tmp_path}/checkpoint/7 is not a step of this project's checkpoint"
    for attempt in (lambda: checkpoint.has_checkpoint(str(tmp_path / "checkpoint")),
                    lambda: JAX.make().load(str(tmp_path / "checkpoint")),
                    lambda: loop.fit(JaxTwin, cfg.ModelConfig(),
                                     cfg.TrainConfig(out=str(tmp_path)))):
        with pytest.raises(UserError, match=refusal):
            attempt()
    assert os.listdir(tmp_path / "checkpoint") == ["7"]
    JAX.make().save(str(tmp_path / "c"), 20)
    assert checkpoint.has_checkpoint(str(tmp_path / "c"))


def test_a_numbered_folder_newer_than_every_step_is_refused_and_hides_none(tmp_path,
                                                                            monkeypatch):
    """orbax alone would restore it as the newest step, and a fresh run would write over the
    steps it hides; every reader and both kinds of run refuse it, and nothing is deleted."""
    from vqvae_common import config as cfg
    from vqvae_common import loop
    from vqvae_jax import checkpoint
    from vqvae_jax.train import JaxTwin

    monkeypatch.setattr(loop.data, "load", lambda *args, **kwargs: pytest.fail("data read"))
    run = tmp_path / "run"
    (run / "config.json").parent.mkdir()
    (run / "config.json").write_text('{"model": {}, "train": {}, "checkpoint": "checkpoint"}')
    ckpt = run / "checkpoint"
    JAX.make().save(str(ckpt), 20)
    (ckpt / "99").mkdir()
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    refusal = f"{ckpt}/99 is not a step of this project's checkpoint .* move it out of {ckpt}"
    for attempt in (lambda: checkpoint.has_checkpoint(str(ckpt)),
                    lambda: JAX.make().load(str(ckpt)),
                    lambda: checkpoint.read_record(str(ckpt)),
                    lambda: loop.fit(JaxTwin, cfg.ModelConfig(),
                                     cfg.TrainConfig(out=str(run), resume=True)),
                    lambda: loop.fit(JaxTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(run)))):
        with pytest.raises(UserError, match=refusal):
            attempt()
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    (ckpt / "99").rename(ckpt / "5")  # older than the newest step: what a prune leaves
    assert checkpoint.has_checkpoint(str(ckpt))
    assert checkpoint.read_record(str(ckpt)).step == 20
