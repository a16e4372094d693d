"""Interruptions, resume, determinism, the NaN guard, the run lock and checkpoint writes.

Whole training processes of both twins run on tfds's mock data (tests/mock_train.py) and are
killed or signalled at chosen instants by hooks installed there (MOCK_TRAIN_SIGNALS), so
every instant is hit on every run, however loaded the machine."""
from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqvae_common import atomic, checkpoint_record, loop
from vqvae_common import config as cfg
from vqvae_common.errors import UserError
from vqvae_common.run_lock import RunLock
from vqvae_common.stop_signals import Stopped

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16", "--num-codes", "32", "--batch-size", "64", "--epochs", "2",
         "--log-every", "2", "--checkpoint-every", "3", "--eval-batch-size", "256",
         "--seed", "3"]  # 256 mock images: 4 steps an epoch, 8 in all
TOTAL_STEPS = 8
LOGGED_STEPS = [2, 3, 4, 6, 8]  # every 2nd, every checkpoint, each epoch's end
CHECKPOINTS = {"torch": "checkpoint.pt", "jax": "checkpoint"}
PICTURES = ("reconstruction.png", "interpolation.gif", "loss_curves.png")
KILLED = -signal.SIGKILL


@dataclasses.dataclass
class Run:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """train(framework, out, *flags, signals="") -> Run: one training process on mock data,
    stopped as `signals` asks (see tests/mock_train.py). Each is forked from a server that
    has imported both twins once; torch runs on one thread, JAX keeps its compiled code on
    disk."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache"))}
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "mock_train.py"), "--serve"],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def run(framework: str, out: Path, *flags: str, signals: str = "") -> Run:
        request = {"framework": framework, "signals": signals,
                   "argv": [*SMALL, "--out", str(out), *flags]}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, "the mock_train server died"
        answer = json.loads(line)
        return Run(answer["status"], answer["stderr"])

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def finished(run: Run) -> None:
    assert run.returncode == 0, run.stderr[-2000:]


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def tensorboard_scalars(out: Path) -> list[tuple[str, int, float]]:
    """Every scalar in every TensorBoard event file (TFRecord framing: length, its CRC, the
    Event, the Event's CRC), timings left out."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for path in (out / "tensorboard").iterdir():
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                        if not v.tag.endswith("images_per_s")]
    return sorted(scalars)


def checkpoint_step(framework: str, out: Path) -> int | None:
    """The step of the newest complete checkpoint in `out`, after reading it back; None if
    there is none."""
    path = str(out / CHECKPOINTS[framework])
    if framework == "torch":
        from vqvae_torch import checkpoint

        return checkpoint.load(path, "cpu")[0].step if checkpoint.has_checkpoint(path) else None
    from vqvae_jax import checkpoint

    return checkpoint.read_record(path).step if checkpoint.has_checkpoint(path) else None


def checkpoint_arrays(framework: str, out: Path) -> dict[str, np.ndarray]:
    """Every array of the checkpoint, model and optimizer state, by name."""
    model_cfg, train_cfg = cfg.from_json((out / "config.json").read_text())
    if framework == "torch":
        import torch

        payload = torch.load(out / "checkpoint.pt", weights_only=True)
        flat = {f"model.{k}": v.numpy() for k, v in payload["model"].items()}
        for index, state in payload["optimizer"]["state"].items():
            flat.update({f"adam.{index}.{k}": v.numpy() for k, v in state.items()})
        return flat
    import jax

    from vqvae_jax import checkpoint
    from vqvae_jax.train import JaxTwin

    like = JaxTwin(model_cfg, cfg.TrainConfig(device="cpu", lr=train_cfg.lr,
                                              lr_schedule=train_cfg.lr_schedule)).state
    _, state = checkpoint.load(str(out / "checkpoint"), model_cfg, like)
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def layout(out: Path) -> list[str]:
    """The names in `out` and in its checkpoint folder (orbax's step folders)."""
    names = [p.name for p in out.iterdir()]
    if (out / "checkpoint").is_dir():
        names += [f"checkpoint/{p.name}" for p in (out / "checkpoint").iterdir()]
    return sorted(names)


@pytest.fixture(scope="module", params=["torch", "jax"])
def uninterrupted(request, train, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"whole-{request.param}")
    finished(train(request.param, out))
    return request.param, out


def test_same_seed_gives_identical_metrics(uninterrupted, train, tmp_path):
    framework, whole = uninterrupted
    finished(train(framework, tmp_path))
    assert rows(tmp_path) == rows(whole)
    assert [r["step"] for r in rows(whole) if r["split"] == "train"] == LOGGED_STEPS


# One run's life, stopped again and again. Each entry: the signals for one process (see
# tests/mock_train.py; SIGKILL unless named), its exit status, and the step of the newest
# complete checkpoint it leaves. Each process is started the documented way: with --resume
# once a complete checkpoint exists, else afresh. Checkpoints are due after steps 3, 4 (the
# first epoch's end), 6 and 8 (the end).
LIFE = [
    ("build:1", KILLED, None),                  # building the model
    ("step:1", KILLED, None),                   # the first step
    ("save:1", KILLED, None),                   # inside the first checkpoint write
    ("step:4", KILLED, 3),                      # mid-epoch, after a checkpoint
    ("evaluate:1", KILLED, 3),                  # the epoch's evaluation
    ("write:interpolation.gif:1", KILLED, 3),   # the epoch's artifacts
    ("save:1", KILLED, 3),                      # inside the epoch's checkpoint write
    ("step:1:SIGINT,save:1:SIGINT", 130, 3),    # Ctrl-C, and again while that step is saved
    ("step:2:SIGTERM", 143, 5),                 # SIGTERM: a checkpoint at the step it is in
    ("write:metrics.jsonl:1", KILLED, 5),       # the start, keeping the rows up to step 5
    ("write:reconstruction.png:1", KILLED, 6),  # the last epoch's artifacts
    ("save:1", KILLED, 6),                      # inside the last checkpoint write
    ("prune:1", KILLED, 8),                     # orbax deleting an old step (Flax only)
    ("", 0, 8),                                 # the rest of the run
]
# The entries only one twin's runs take. Orbax's pruning is the Flax twin's alone. A kill
# while the model is built or takes its first step (no checkpoint yet), or while the loop
# evaluates or writes its own files, finds no write of either twin under way,
# so one twin proves the instant for both: torch, as a Flax process costs 2 to 3 s more
# (most of it tracing). Each leaves the checkpoint the entry before it left, so skipping it
# changes no later entry.
ONE_TWIN = {"prune:1": "jax", "build:1": "torch", "step:1": "torch", "evaluate:1": "torch",
            "write:interpolation.gif:1": "torch", "write:metrics.jsonl:1": "torch"}


def test_a_run_killed_at_any_instant_ends_as_the_uninterrupted_one(uninterrupted, train,
                                                                     tmp_path):
    framework, whole = uninterrupted
    resume: list[str] = []
    for signals, status, step in LIFE:
        if ONE_TWIN.get(signals, framework) != framework:
            continue
        run = train(framework, tmp_path, *resume, signals=signals)
        assert run.returncode == status, f"{signals}: {run.stderr[-2000:]}"
        assert checkpoint_step(framework, tmp_path) == step, signals
        last_line = run.stderr.splitlines()[-1] if status > 0 else ""
        if status == 130:
            assert last_line.startswith("stopped at once by a second SIGINT")
        if status == 143:
            assert last_line.startswith(f"stopped by SIGTERM at step {step} of {TOTAL_STEPS}")
            assert "--resume" in last_line
        for name in PICTURES:  # old or new, never truncated
            if (tmp_path / name).exists():
                Image.open(tmp_path / name).load()
        if step is None and signals == "save:1":  # the first checkpoint write, cut short
            refused = train(framework, tmp_path, "--resume")
            assert refused.returncode == 2
            assert "no complete checkpoint" in refused.stderr.splitlines()[-1]
            assert "without --resume" in refused.stderr.splitlines()[-1]
        resume = ["--resume"] if step is not None else []

    assert rows(tmp_path) == rows(whole)
    assert tensorboard_scalars(tmp_path) == tensorboard_scalars(whole)
    expected, actual = checkpoint_arrays(framework, whole), checkpoint_arrays(framework, tmp_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    for name in PICTURES:
        assert (tmp_path / name).read_bytes() == (whole / name).read_bytes(), name
    assert layout(tmp_path) == layout(whole)  # no leftovers; an interrupted prune finished


class FakeTwin:
    """A numpy stand-in for a framework, to drive the shared loop's bookkeeping."""

    checkpoint_name = "fake.json"
    num_devices, device_kind = 1, "cpu"
    nan_at: int | None = None
    signal_at: int | None = None

    def __init__(self, model_cfg: cfg.ModelConfig, train_cfg: cfg.TrainConfig,
                 total_steps: int | None = None) -> None:
        self.step, self.config = 0, model_cfg

    @staticmethod
    def has_checkpoint(path: str) -> bool:
        return os.path.isfile(path)

    @staticmethod
    def remove_partial_checkpoints(path: str) -> None:
        pass

    def initialize_codebook(self, images: np.ndarray, seed: int, iterations: int,
                            show_progress: bool = True) -> None:
        pass

    def train_step(self, batch: np.ndarray) -> dict[str, float]:
        self.step += 1
        if self.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
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


def test_sigterm_saves_the_step_it_stopped_at_and_resumes_from_it(fake_data, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(FakeTwin, "signal_at", 6)  # not a logged step, not a checkpoint's
    handler = signal.getsignal(signal.SIGTERM)
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1, log_every=4,
                                checkpoint_every=100)
    with pytest.raises(Stopped, match="stopped by SIGTERM at step 6 of 16") as stop:
        loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    assert stop.value.exit_status == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "fake.json").read_text()) == {"step": 6}
    assert [r["step"] for r in rows(tmp_path)] == [4]

    monkeypatch.setattr(FakeTwin, "signal_at", None)
    loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, resume=True))
    assert [r["step"] for r in rows(tmp_path)] == [4, 8, 12, 16, 16]
    assert signal.getsignal(signal.SIGTERM) is handler  # put back

    capsys.readouterr()
    record = (tmp_path / "config.json").read_text()
    loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, resume=True,
                                                              max_steps=10, lr=1e-4))
    err = capsys.readouterr().err
    assert "holds step 16, where this run ends: nothing to train" in err
    assert "train:" not in err  # no progress bar of no steps
    assert [r["step"] for r in rows(tmp_path)] == [4, 8, 12, 16, 16]
    assert (tmp_path / "config.json").read_text() == record  # the flags took no effect


def test_sigterm_in_the_last_step_says_the_run_is_complete(fake_data, tmp_path, monkeypatch):
    monkeypatch.setattr(FakeTwin, "signal_at", 16)  # the run's last step
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1, log_every=4)
    with pytest.raises(Stopped, match="holds step 16, the run's last: it is complete"):
        loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    assert json.loads((tmp_path / "fake.json").read_text()) == {"step": 16}


class SignalledWhileBuilt(FakeTwin):
    """A FakeTwin that gets SIGTERM while it is built, inside a gc callback (as jax's own in
    gc.callbacks), where the Stopped that StopSignals raises is printed as ignored and lost."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # Python's handler runs here, inside the callback

        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_stop_was_lost_still_stops_the_run_before_its_first_step(fake_data,
                                                                                 tmp_path):
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1)
    with pytest.raises(Stopped, match="stopped by SIGTERM at step 0 of 16; no step was "
                                      "taken: rerun the same command") as stop:
        loop.fit(SignalledWhileBuilt, cfg.ModelConfig(), train_cfg)
    assert stop.value.exit_status == 128 + signal.SIGTERM
    assert not (tmp_path / "fake.json").exists() and rows(tmp_path) == []


class GroupingTwin(FakeTwin):
    """A FakeTwin that takes up to 5 steps a call and records how many each call took."""

    steps_per_call = 5
    calls: list[int] = []

    def train_step(self, batch: np.ndarray) -> dict[str, float]:
        self.calls.append(1)
        return super().train_step(batch)

    def train_steps(self, batches: list[np.ndarray]) -> dict[str, float]:
        self.calls.append(len(batches))
        return [FakeTwin.train_step(self, batch) for batch in batches][-1]


def test_steps_taken_several_at_a_call_keep_every_log_and_checkpoint_step(fake_data, tmp_path):
    train_cfg = cfg.TrainConfig(out=str(tmp_path / "one"), batch_size=4, epochs=2,
                                log_every=8, checkpoint_every=7)  # 16 steps an epoch
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    loop.fit(GroupingTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, out=str(tmp_path)))
    assert rows(tmp_path) == rows(tmp_path / "one")
    # each call takes 5 steps or ends at the next logged step: 7, 8, 14, 16 (the epoch's
    # end), 21, 24, 28, 32
    assert list(np.cumsum(GroupingTwin.calls)) == [5, 7, 8, 13, 14, 16, 21, 24, 28, 32]


@pytest.mark.parametrize("eval_images, noted", [(65, True), (64, False), (None, False)])
def test_more_eval_images_than_the_test_split_has_is_noted(fake_data, tmp_path, capsys,
                                                           eval_images, noted):
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, max_steps=1,
                                eval_images=eval_images)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    note = "the test split has 64 images, all of them evaluated"
    assert (note in capsys.readouterr().err) == noted


def test_a_second_trainer_on_the_same_out_stops_at_once_and_changes_nothing(fake_data,
                                                                            tmp_path):
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    first = RunLock(str(tmp_path))  # the first trainer, still running
    try:
        with pytest.raises(UserError, match=f"in use by another trainer \\(pid {os.getpid()}\\)"):
            loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, resume=True))
    finally:
        first.release()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


class OtherKindTwin(FakeTwin):
    """A FakeTwin of another kind of run: the other twin's, or a prior's."""

    checkpoint_name = "other.json"


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_of_another_kind_in_the_same_out_is_refused_and_changes_nothing(
        fake_data, tmp_path, resume):
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    (tmp_path / "train.lock").unlink()  # as in a run copied without it (trained_models/)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="another kind of run \\(its checkpoint: fake.json"):
        loop.fit(OtherKindTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, resume=resume))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("checkpoint_name, kind, start", [
    ("fake.pt", "vqvae", "--init-from {out}/model.pt, and another --out"),
    ("fake", "vqvae",
     "python convert.py --from-torch {out}/model.pt --out DIR, then --init-from DIR"),
    ("fake.pt", "prior", "--vqvae {out}/model.pt, and another --out")])
def test_a_copy_of_a_shipped_model_is_refused_with_how_to_train_from_it(
        fake_data, tmp_path, monkeypatch, checkpoint_name, kind, start):
    monkeypatch.setattr(FakeTwin, "checkpoint_name", checkpoint_name)
    task = types.SimpleNamespace(kind=kind, pictures=cfg.PICTURES[kind], first_step_flags=())
    shutil.copytree(os.path.join(ROOT, "trained_models", "mnist_torch"), tmp_path / "copy")
    out = tmp_path / "copy"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=re.escape(
            f"{out} holds a trained model (model.pt, as trained_models/ ship them), not a run "
            f"to go on with: to train from it, {start.format(out=out)}")):
        loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(out), batch_size=4),
                 task)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_files_of_a_runs_names_that_no_run_wrote_are_never_written_over(fake_data, tmp_path):
    (tmp_path / "config.json").write_text('{"my": "notes"}')
    (tmp_path / "reconstruction.png").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds config.json, reconstruction.png, which no run "
                                        "wrote and this one would write over"):
        loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(tmp_path), batch_size=4))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "config.json").unlink()  # a picture alone: still no run's
    with pytest.raises(UserError, match=f"{tmp_path} holds reconstruction.png, which no run"):
        loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(tmp_path), batch_size=4))
    (tmp_path / "reconstruction.png").unlink()  # a tensorboard/ folder of the user's own,
    (tmp_path / "tensorboard" / "sub").mkdir(parents=True)  # which the logbook would rebuild
    (tmp_path / "tensorboard" / "sub" / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{tmp_path} holds tensorboard, which no run"):
        loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(tmp_path), batch_size=4))
    assert (tmp_path / "tensorboard" / "sub" / "mine.txt").read_text() == "mine"
    # the files of a run killed before its first checkpoint: a fresh start writes over them
    loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(tmp_path / "run"), batch_size=4,
                                                          max_steps=2))
    (tmp_path / "run" / "fake.json").unlink()  # killed before its first checkpoint
    loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(tmp_path / "run"), batch_size=4,
                                                          max_steps=2))


def test_a_resume_takes_no_other_value_of_a_flag_that_acted_at_the_first_step(fake_data,
                                                                              tmp_path):
    """helper-25: --codebook-init uniform beside --resume was taken and recorded, though the
    run had started with k-means and no resume runs it again."""
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1, max_steps=5)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    record = (tmp_path / "config.json").read_text()
    resume = dataclasses.replace(train_cfg, resume=True, max_steps=None)
    with pytest.raises(UserError, match="started with --codebook-init kmeans, which acts at a "
                                        "run's first step only: leave --codebook-init out"):
        loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(resume, codebook_init="uniform"))
    assert (tmp_path / "config.json").read_text() == record
    old = json.loads(record)  # an older version's record, out of today's bounds: given anew
    old["train"]["kmeans_images"] = 20_000
    (tmp_path / "config.json").write_text(json.dumps(old))
    loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(resume, kmeans_images=500))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["kmeans_images"] == 500


@pytest.mark.parametrize("flag,value", [("batch_size", 8), ("seed", 1), ("dataset", "cifar10")])
def test_a_resume_with_another_data_order_is_refused(fake_data, tmp_path, flag, value):
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1, max_steps=5)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    changed = dataclasses.replace(train_cfg, resume=True, max_steps=None, **{flag: value})
    option = "--" + flag.replace("_", "-")
    with pytest.raises(UserError, match=f"was trained with {option} {getattr(train_cfg, flag)}"):
        loop.fit(FakeTwin, cfg.ModelConfig(), changed)


def test_an_out_that_cannot_be_made_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    """The folder is made once the data and any k-means or code extraction are done (bad
    input leaves nothing behind), so whether it can be made is asked first."""
    def unread(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(loop.data, "load", unread)
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "is a file, not a directory"),
             (tmp_path / "file" / "run", "file is not a directory"),
             ("", "--out is empty"),
             (tmp_path / ("r" * 300) / "run", r"the name r+\.\.\. is 300 bytes, over")]
    if os.path.isdir("/proc/self"):  # takes no new file, whatever its permission bits say
        cases.append(("/proc/run", "no file can be made in /proc"))
    for out, says in cases:
        with pytest.raises(UserError, match=says):
            loop.fit(FakeTwin, cfg.ModelConfig(), cfg.TrainConfig(out=str(out)))
    assert os.listdir(tmp_path) == ["file"]


def test_an_out_inside_another_run_is_refused_and_changes_nothing(fake_data, tmp_path):
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    before = layout(tmp_path), sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    for inner in (tmp_path / "tensorboard", tmp_path / "new" / "deeper"):
        with pytest.raises(UserError, match=re.escape(f"--out {inner} is inside the run in "
                                                      f"{tmp_path}, whose files")):
            loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, out=str(inner)))
    assert (layout(tmp_path), sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
            ) == before


def test_an_out_that_is_or_lies_inside_a_flax_checkpoint_is_refused(fake_data, tmp_path):
    """Any trainer's, PyTorch's too: a folder made in a Flax checkpoint passes for its newest
    step and hides the complete ones; one holding steps is not a run's folder."""
    flax = tmp_path / "converted"
    (flax / "5" / checkpoint_record.FLAX_RECORD_ITEM).mkdir(parents=True)
    train_cfg = cfg.TrainConfig(batch_size=4, epochs=1)
    for out, says in [(flax, f"--out {flax} is a checkpoint, not a run's folder"),
                      (flax / "99", f"--out {flax / '99'} is inside the Flax checkpoint {flax}"),
                      (flax / "5" / "x", f"is inside the Flax checkpoint {flax}")]:
        with pytest.raises(UserError, match=re.escape(says)):
            loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, out=str(out)))
    assert sorted(str(p.relative_to(flax)) for p in flax.rglob("*")) == ["5", "5/meta"]


def test_an_older_versions_run_is_told_apart_by_its_checkpoint(fake_data, tmp_path,
                                                                monkeypatch):
    """Its config.json names no checkpoint: the one it holds tells. A run of this kind
    resumes (and its config.json then names it); one of another kind is refused."""
    monkeypatch.setitem(checkpoint_record.CHECKPOINT_NAMES, ("fake", "vqvae"), "fake.json")
    train_cfg = cfg.TrainConfig(out=str(tmp_path), batch_size=4, epochs=1, max_steps=5)
    loop.fit(FakeTwin, cfg.ModelConfig(), train_cfg)
    older = json.loads((tmp_path / "config.json").read_text())
    del older["checkpoint"]
    (tmp_path / "config.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match="another kind of run \\(its checkpoint: fake.json"):
        loop.fit(OtherKindTwin, cfg.ModelConfig(), train_cfg)
    loop.fit(FakeTwin, cfg.ModelConfig(), dataclasses.replace(train_cfg, resume=True,
                                                                 max_steps=None))
    assert json.loads((tmp_path / "config.json").read_text())["checkpoint"] == "fake.json"


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
    with pytest.raises(UserError, match="No space left on device$"):  # none to keep
        checkpoint.save(str(tmp_path / "first.pt"), {"framework": "torch", "step": 1})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not os.path.exists(path + atomic.SUFFIX)


def test_an_unwritable_output_directory_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/vqvae-cannot-write-here"  # even root cannot create this
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "run")
    with pytest.raises(UserError, match="output directory"):
        loop.prepare_out_dir(target)

