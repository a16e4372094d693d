"""The training loop both twins share. A twin supplies only what depends on its framework.

Bookkeeping done here, once: the output directory, resume, the seeded data order, logging
cadence, images/s, the NaN guard, checkpoint cadence, evaluation on the test split, the
artifacts (config.json, metrics.jsonl, TensorBoard events, and the Task's pictures) and
stopping on SIGTERM or Ctrl-C. What is trained on and measured is a `Task`: a VQ-VAE on
images (`Reconstruction`, the default: reconstruction.png, interpolation.gif,
loss_curves.png) or a prior on a VQ-VAE's codes (vqvae_common.prior.PriorTask).

A kill at any instant leaves a run that `--resume` (or, before the first complete checkpoint,
a fresh start) continues to the uninterrupted run's results, because:
- one trainer at a time holds --out (run_lock); the next start deletes the temporary files
  and folders of writes a kill interrupted;
- every file is replaced atomically (atomic), and each twin writes checkpoints atomically;
- a checkpoint at step s is written only after every row and artifact of the steps up to s,
  so resuming from it replays exactly the steps after s: the logbook keeps the rows up to s.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator, Sized
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vqvae_common import atomic, data, images, metrics
from vqvae_common import config as cfg
from vqvae_common.atomic import write_atomic
from vqvae_common.checkpoint_record import (TRAINED_MODEL_NAME, checkpoint_around,
                                            checkpoint_in, is_flax_checkpoint)
from vqvae_common.errors import UserError
from vqvae_common.logbook import Logbook
from vqvae_common.run_lock import RunLock
from vqvae_common.stop_signals import StopSignals, Stopped

INTERPOLATION_FRAMES = 16
GRID_PAIRS = 32


class Twin(Protocol):
    """What a framework implements for `fit` and evaluate.py. Images are NHWC float32 numpy
    in [-1, 1]. A prior's twin implements a part of it, and its own evaluate: the list is in
    vqvae_common.prior; it runs in one process on one device.

    Data-parallel training: `fit` runs in every process of the run (one per device under
    torchrun; one per host in JAX) and hands each the same global batch; the twin steps on
    its share of it, so that N devices compute the same step as one. Only the main process
    (`join_processes`' index 0) writes logs, pictures and config.json."""

    checkpoint_name: str  # file or directory name inside --out
    config: cfg.ModelConfig
    num_devices: int  # devices one step runs on, over all processes
    device_kind: str  # what they are, e.g. "cpu" or the accelerator's model name

    @staticmethod
    def join_processes(train_cfg: cfg.TrainConfig) -> tuple[int, int]:
        """(this process's index, the number of processes): joins the framework's
        multi-process runtime first when the run has several processes."""

    def __init__(self, model_cfg: cfg.ModelConfig, train_cfg: cfg.TrainConfig,
                 total_steps: int | None = None) -> None:
        """total_steps: the run's optimizer steps, over which --lr-schedule moves the rate
        (vqvae_common.config.learning_rate); None when the twin will not train."""

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto") -> Twin:
        """The model saved in `path` (optimizer state not needed), ready to evaluate."""

    @staticmethod
    def has_checkpoint(path: str) -> bool:
        """Whether `path` holds a complete checkpoint (what an interrupted write left is not
        one)."""

    @staticmethod
    def remove_partial_checkpoints(path: str) -> None:
        """Delete what checkpoint writes interrupted by a kill left at `path`."""

    def initialize_codebook(self, images: np.ndarray, seed: int, iterations: int,
                            show_progress: bool = True) -> None:
        """The quantizer's initialize_kmeans on the encoder outputs of `images`, computed
        with batch statistics (as the first steps will) and leaving every state but the
        codebook's as it was; show_progress: the k-means's progress bars."""

    def train_step(self, batch: np.ndarray) -> Any:
        """One optimizer step; returns the loss terms on the device, not synced."""

    def train_steps(self, batches: list[np.ndarray]) -> Any:
        """len(batches) optimizer steps in one call, when the twin's `steps_per_call` (the
        most it takes at once; 1 when absent) asks for more than one; returns the last
        step's loss terms."""

    def fetch(self, step_metrics: Any) -> dict[str, float]:
        """Device loss terms -> Python floats (the only host sync of a training step)."""

    def evaluate(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Eval-mode forward: (reconstruction NHWC, code indices (B, h, w), loss terms)."""

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Encoder output z_e, (B, h, w, D), before quantization."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Quantize (B, h, w, D) latents and decode them to images."""

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Decode code indices (B, h, w) to images: the codebook's vectors, then the decoder."""

    def save(self, path: str, step: int) -> None:
        """Write model and optimizer state atomically: a kill leaves the previous one. Called
        in every process of a run; the twin decides which of them write."""

    def load(self, path: str) -> int:
        """Restore model and optimizer state, refusing a checkpoint of another config or a
        weights-only one; returns the step it was saved at."""

    def init_weights(self, path: str) -> None:
        """--init-from: the model state (weights, BatchNorm statistics, codebook, its EMA
        and usage averages) of this twin's checkpoint at `path`, weights-only ones
        included, refusing another config; the optimizer state stays fresh."""


def prepare_out_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from e
    if (cannot := atomic.cannot_make(os.path.join(out, "config.json"))) is not None:
        raise UserError(f"output directory {out}: {cannot}")


def evaluate(twin: Twin, test_images: np.ndarray, batch_size: int, num_codes: int,
             progress: str | None = None) -> dict[str, float]:
    """Loss terms, MSE, PSNR (of the split's MSE, and per 8-bit image averaged), SSIM and
    codebook usage over the whole split; `progress` labels a progress bar (None: none)."""
    sums: dict[str, float] = {}
    counts = np.zeros(num_codes, np.int64)
    for batch in data.eval_batches(test_images, batch_size, progress):
        recons, indices, losses = twin.evaluate(batch)
        losses["ssim"] = float(metrics.ssim_per_image(batch, recons).mean())
        losses["psnr_8bit"] = float(metrics.psnr_8bit_per_image(batch, recons).mean())
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value * len(batch)
        counts += metrics.code_counts(indices, num_codes)
    result = {key: value / len(test_images) for key, value in sums.items()}
    result["mse"] = result["recon"]
    result["psnr"] = metrics.psnr(result["mse"])
    result["perplexity"] = metrics.perplexity(counts)
    result["codes_used"] = metrics.codes_used(counts)
    return result


class Task(Protocol):
    """What a run trains on and measures; `fit` keeps the books around it."""

    kind: str  # what it trains: "vqvae" or "prior" (checkpoint_record.KINDS)
    progress_keys: tuple[str, ...]  # the train terms the progress bar shows
    pictures: tuple[str, ...]  # the files write_artifacts writes into --out
    first_step_flags: tuple[str, ...]  # TrainConfig fields `start` acts on at step 0 only

    def load(self, split: str) -> Any:
        """The split's data as read from disk (before `start`)."""

    def start(self, twin: Any, train: Any, test: Any, resume: bool, main: bool
              ) -> tuple[Sized, Sized]:
        """What the twin computes before the first step: the (train, test) examples. Only
        the `main` process of a data-parallel run reports on it."""

    def batches(self, train: Any, epoch: int, skip: int) -> Iterator[Any]:
        """The seeded batches of `epoch` from batch `skip` on, as the twin's train_step
        takes them."""

    def evaluate(self, twin: Any, test: Any) -> dict[str, float]:
        """The test metrics of the epoch's end."""

    def summary(self, metrics: dict[str, float]) -> str:
        """`evaluate`'s metrics in one line."""

    def write_artifacts(self, twin: Any, test: Any, out: str) -> None:
        """The pictures of the epoch's end."""


class Reconstruction:
    """The VQ-VAE's Task: images in, reconstruction metrics and pictures out."""

    kind = "vqvae"
    progress_keys = ("loss", "recon")
    pictures = cfg.PICTURES[kind]
    first_step_flags = ("codebook_init", "kmeans_images", "kmeans_iterations")

    def __init__(self, train_cfg: cfg.TrainConfig) -> None:
        self.train_cfg = train_cfg

    def load(self, split: str) -> np.ndarray:
        split_images = data.load(self.train_cfg.dataset, split, self.train_cfg.data_dir)
        return split_images[:self.train_cfg.eval_images] if split == "test" else split_images

    def start(self, twin: Twin, train: np.ndarray, test: np.ndarray, resume: bool, main: bool
              ) -> tuple[np.ndarray, np.ndarray]:
        train_cfg = self.train_cfg
        fresh = not resume and train_cfg.init_from is None
        if fresh and train_cfg.codebook_init == "kmeans":
            first = data.first_images(train, train_cfg.kmeans_images, train_cfg.seed)
            if main:
                print(f"codebook: k-means ({train_cfg.kmeans_iterations} Lloyd iterations) "
                      f"on the encoder outputs of {len(first)} training images",
                      file=sys.stderr)
                warn_of_repeated_centres(len(first), cfg.DATASETS[train_cfg.dataset],
                                         twin.config.num_codes)
            twin.initialize_codebook(first, train_cfg.seed, train_cfg.kmeans_iterations,
                                     show_progress=main)
        return train, test

    def batches(self, train: np.ndarray, epoch: int, skip: int) -> Iterator[np.ndarray]:
        return data.batches(train, self.train_cfg.batch_size, self.train_cfg.seed, epoch, skip)

    def evaluate(self, twin: Twin, test: np.ndarray) -> dict[str, float]:
        return evaluate(twin, test, self.train_cfg.eval_batch_size, twin.config.num_codes)

    def summary(self, metrics: dict[str, float]) -> str:
        return (f"test mse {metrics['mse']:.5f} psnr {metrics['psnr']:.2f} dB "
                f"(per 8-bit image {metrics['psnr_8bit']:.2f}) ssim {metrics['ssim']:.3f} "
                f"perplexity {metrics['perplexity']:.1f} "
                f"codes used {metrics['codes_used']:.1%}")

    def write_artifacts(self, twin: Twin, test: np.ndarray, out: str) -> None:
        grid, gif, curves = (os.path.join(out, name) for name in self.pictures)
        targets = data.to_float(test[:GRID_PAIRS])
        recons, _, _ = twin.evaluate(targets)
        images.reconstruction_grid(targets, recons, grid)
        z = twin.encode(targets[:2])
        frames = twin.decode(images.interpolation_latents(z[0], z[1], INTERPOLATION_FRAMES))
        images.interpolation_gif(frames, gif)
        images.loss_curves(os.path.join(out, "metrics.jsonl"), curves)


def warn_of_repeated_centres(num_images: int, dataset: cfg.Dataset, num_codes: int) -> None:
    """A line on stderr where the k-means start has fewer encoder vectors than codes: its
    seeding then repeats centres, left to the dead-code restarts to separate."""
    per_image = math.prod(dataset.code_shape)
    if num_images * per_image < num_codes:
        print(f"warning: {num_images} images give {num_images * per_image} encoder vectors "
              f"for {num_codes} codes, so k-means repeats centres: --kmeans-images "
              f"{-(-num_codes // per_image)} or more gives each code one of its own",
              file=sys.stderr)


def fit(make_twin: type[Twin], model_cfg: Any, train_cfg: cfg.TrainConfig,
        task: Task | None = None) -> dict[str, float]:
    """Train, evaluating each epoch; returns the last test-split metrics. `make_twin` is a
    Twin class, `task` what it learns (default: Reconstruction). An --out that exists is
    locked before anything is read from it; one that does not is created only once the
    data, the device and any checkpoint to resume have passed, so that bad input leaves
    nothing behind."""
    task = task or Reconstruction(train_cfg)
    out = train_cfg.out
    ckpt = os.path.join(out, make_twin.checkpoint_name)
    main = getattr(make_twin, "join_processes", lambda _: (0, 1))(train_cfg)[0] == 0
    lock = RunLock(out) if main and os.path.isdir(out) else None
    wrote = False  # into --out: until then, a refusal leaves it as it was
    try:
        with StopSignals() as stop:
            _check_out(make_twin, ckpt, train_cfg, out, task)
            train, test = task.load("train"), task.load("test")
            schedule = Schedule.of(len(train), train_cfg)
            twin = make_twin(model_cfg, train_cfg, total_steps=schedule.total)
            run_record = _run_record(twin, make_twin.checkpoint_name)
            if main:
                print(f"devices: {run_record['num_devices']} x {run_record['device_kind']}, "
                      f"global batch {train_cfg.batch_size}", file=sys.stderr)
                if (train_cfg.eval_images or 0) > len(test):
                    print(f"note: --eval-images {train_cfg.eval_images}: the test split has "
                          f"{len(test)} images, all of them evaluated", file=sys.stderr)
            step = twin.load(ckpt) if train_cfg.resume else 0
            if train_cfg.init_from is not None:
                twin.init_weights(train_cfg.init_from)
            train, test = task.start(twin, train, test, train_cfg.resume, main)
            if main:
                if step >= schedule.total:  # a start that only finishes the clean-up below
                    limit = ("--max-steps" if schedule.total == train_cfg.max_steps
                             else "--epochs")
                    print(f"{ckpt} holds step {step}, where this run ends: nothing to train "
                          f"(raise {limit} to go on)", file=sys.stderr)
                if lock is None:
                    prepare_out_dir(out)
                    lock = RunLock(out)
                atomic.remove_leftovers(out)
                make_twin.remove_partial_checkpoints(ckpt)
                if step < schedule.total:  # a run with nothing to train keeps its record:
                    #   the flags of this command took no effect
                    write_atomic(os.path.join(out, "config.json"),
                                 cfg.to_json(twin.config, train_cfg, run_record))
                wrote = True
            records = (Logbook(out, resume_step=step if train_cfg.resume else None) if main
                       else _NoRecords())
            with records as logbook:
                run = _Run(twin, task, train_cfg, test, schedule, logbook, stop, ckpt,
                           saved_step=step if train_cfg.resume else None, main=main)
                stop.defer()
                return run.train(train, step)
    finally:
        if lock is not None:
            lock.release(discard=not wrote)


def _run_record(twin: Twin, checkpoint_name: str) -> dict[str, Any]:
    """What config.json records of the run beside its flags: where it trained and its
    checkpoint's name, which tells the kinds of run apart."""
    return {"num_devices": twin.num_devices, "device_kind": twin.device_kind,
            "checkpoint": checkpoint_name}


class _NoRecords:
    """The Logbook of a process other than the main one: it writes nothing."""

    def __enter__(self) -> _NoRecords:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        pass

    def sync(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When each thing happens, by step count s (s steps taken so far)."""

    steps_per_epoch: int
    total: int
    log_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, num_images: int, train_cfg: cfg.TrainConfig) -> Schedule:
        per_epoch = data.steps_per_epoch(num_images, train_cfg.batch_size)
        if per_epoch == 0:
            raise UserError(f"--batch-size {train_cfg.batch_size} is larger than the "
                            f"{num_images} training images")
        total = per_epoch * train_cfg.epochs
        if train_cfg.max_steps is not None:
            total = min(total, train_cfg.max_steps)
        return cls(per_epoch, total, train_cfg.log_every, train_cfg.checkpoint_every)

    def steps_to_take(self, step: int, most: int) -> int:
        """How many steps to take at once from `step`: at most `most`, and none past the next
        logged step (every checkpoint and epoch end is one)."""
        return next((n for n in range(1, most) if self.logs(step + n)), most)

    def ends_epoch(self, step: int) -> bool:
        """The epoch's evaluation, artifacts and checkpoint follow this step."""
        return step % self.steps_per_epoch == 0 or step == self.total

    def saves(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or self.ends_epoch(step)

    def logs(self, step: int) -> bool:
        # every save is logged: the row's fetch is the NaN guard, and a checkpoint never
        # holds non-finite weights
        return step % self.log_every == 0 or self.saves(step)


class Throughput:
    """Images/s over the training steps since the last `restart`."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def count_steps(self, steps: int) -> None:
        self.steps += steps

    def images_per_s(self) -> float:
        return self.steps * self.batch_size / (time.perf_counter() - self.start)


class _Run:
    """The step loop of one fit, from a given step, and its bookkeeping."""

    def __init__(self, twin: Twin, task: Task, train_cfg: cfg.TrainConfig, test: Any,
                 schedule: Schedule, logbook: Logbook | _NoRecords, stop: StopSignals,
                 ckpt: str, saved_step: int | None, main: bool = True) -> None:
        self.twin, self.task, self.train_cfg, self.test = twin, task, train_cfg, test
        self.schedule, self.logbook, self.stop, self.ckpt = schedule, logbook, stop, ckpt
        self.main = main  # writes the pictures and shows progress
        self.saved_step = saved_step  # the step of the checkpoint on disk, None if none
        self.throughput = Throughput(train_cfg.batch_size)
        self.last_eval: dict[str, float] = {}

    def train(self, train: Any, step: int) -> dict[str, float]:
        self.bar = tqdm(total=self.schedule.total, initial=step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not self.main or step >= self.schedule.total)
        try:
            self._stop_if_asked(step, None)
            while step < self.schedule.total:
                step = self._epoch(train, step)
        finally:
            self.bar.close()
        return self.last_eval

    def _epoch(self, train: Any, step: int) -> int:
        """The rest of the epoch that `step` is in; returns the step count at its end."""
        epoch, done = divmod(step, self.schedule.steps_per_epoch)
        batches = self.task.batches(train, epoch, done)
        most = getattr(self.twin, "steps_per_call", 1)
        while group := list(itertools.islice(batches, self.schedule.steps_to_take(step, most))):
            step_metrics = (self.twin.train_step(group[0]) if len(group) == 1
                            else self.twin.train_steps(group))
            step += len(group)
            self.throughput.count_steps(len(group))
            self.bar.update(len(group))
            if self.schedule.logs(step):
                self._log_train(step, epoch, step_metrics)
            if self.schedule.ends_epoch(step):
                break
            if self.schedule.saves(step):
                self._save(step)
            self._stop_if_asked(step, step_metrics)
        self._end_epoch(step, epoch)
        self._stop_if_asked(step, None)
        return step

    def _log_train(self, step: int, epoch: int, step_metrics: Any) -> None:
        record = self._finite(step_metrics, step)
        record["images_per_s"] = self.throughput.images_per_s()
        self.logbook.write({"step": step, "epoch": epoch, **record})
        self.bar.set_postfix({key: f"{record[key]:.4f}" for key in self.task.progress_keys})
        self.throughput.restart()

    def _end_epoch(self, step: int, epoch: int) -> None:
        """Evaluation, artifacts, then the checkpoint that covers them all."""
        self.last_eval = self.task.evaluate(self.twin, self.test)
        self.logbook.write({"step": step, "epoch": epoch, **self.last_eval}, prefix="test")
        if self.main:
            self.bar.write(f"epoch {epoch} step {step}: {self.task.summary(self.last_eval)}")
            self.task.write_artifacts(self.twin, self.test, self.train_cfg.out)
        self._save(step)
        self.throughput.restart()

    def _save(self, step: int) -> None:
        self.logbook.sync()  # the rows this checkpoint covers reach the disk before it
        self.twin.save(self.ckpt, step)
        self.saved_step = step

    def _stop_if_asked(self, step: int, step_metrics: Any) -> None:
        """After a signal: a checkpoint at `step` (unless there is one), then Stopped."""
        if self.stop.received is None:
            return
        if self.saved_step != step and step_metrics is not None:
            self._finite(step_metrics, step)
            self._save(step)
        if self.saved_step == step and step >= self.schedule.total:  # the signal came as
            #   the last step's work ended
            where = f"{self.ckpt} holds step {step}, the run's last: it is complete"
        elif self.saved_step == step:
            where = f"{self.ckpt} holds step {step}: rerun with --resume to continue"
        else:
            where = "no step was taken: rerun the same command"
        raise Stopped(f"stopped by {self.stop.name} at step {step} of {self.schedule.total}; "
                      f"{where}", self.stop.received)

    def _finite(self, step_metrics: Any, step: int) -> dict[str, float]:
        record = self.twin.fetch(step_metrics)
        bad = [k for k, v in record.items() if not math.isfinite(v)]
        if bad:
            raise UserError(f"training diverged: {', '.join(bad)} not finite at step {step}; "
                            f"stopped, the last good checkpoint {self.ckpt} is kept")
        return record


def _check_out(make_twin: type[Twin], ckpt: str, train_cfg: cfg.TrainConfig,
               out: str, task: Task) -> None:
    """--resume needs a complete checkpoint of this twin's kind, and the flags that fix the
    data order; a fresh run must not write over a checkpoint, nor over the records of a run
    of another kind (the other twin, or a prior in a VQ-VAE's --out), which config.json
    names by its checkpoint (an older version's config.json does not: then the checkpoint
    that --out holds tells), nor over files of its names (config.json, metrics.jsonl,
    tensorboard/, the task's pictures) where no run's config.json says a run wrote them.
    --out must be a folder that exists or can be made, outside any other run and not a
    checkpoint itself. A resume takes no other value of a flag that acted at its run's first
    step only (the task's first_step_flags): it could not take effect."""
    if train_cfg.resume and train_cfg.init_from is not None:
        raise UserError("--resume continues the run in --out, --init-from starts a new one "
                        "from another run's model: pass one of them")
    if not out:
        raise UserError("--out is empty: name the run's folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a directory")
    if not os.path.exists(out) and (cannot := atomic.cannot_make(out, file=False)) is not None:
        # made only once the data has loaded, so asked here
        raise UserError(f"cannot create output directory {out}: {cannot}")
    if (around := cfg.run_around(out)) is not None:
        if os.path.join(around, make_twin.checkpoint_name) == os.path.realpath(out):
            raise UserError(f"--out {out} is the checkpoint of the run in {around}: to go on "
                            f"with that run, pass --out {around} with --resume")
        raise UserError(f"--out {out} is inside the run in {around}, whose files and "
                        f"checkpoints are its own (a resume there rewrites its tensorboard/): "
                        f"choose a folder outside it")
    if (inside := checkpoint_around(out)) is not None:
        raise UserError(f"--out {out} is inside the Flax checkpoint {inside}, whose folders "
                        f"are its steps: choose a folder outside it")
    if is_flax_checkpoint(out):  # either twin's run (a PyTorch checkpoint, a file: above)
        raise UserError(f"--out {out} is a checkpoint, not a run's folder: choose a new folder "
                        f"(a VQ-VAE to start from goes to --init-from, or to --vqvae for a "
                        f"prior)")
    recorded, ours = cfg.read_run(out), make_twin.checkpoint_name
    name = recorded.get("checkpoint")
    if not isinstance(name, str):  # no config.json, or an older version's: the files tell
        held = checkpoint_in(out)
        name = ours if held is None or os.path.exists(ckpt) else os.path.basename(held)
    if name == TRAINED_MODEL_NAME:  # a PyTorch checkpoint of a VQ-VAE, weights only
        shipped = os.path.join(out, name)
        flag = "--vqvae" if task.kind == "prior" else "--init-from"
        start = (f"{flag} {shipped}" if ours.endswith(".pt") else
                 f"python convert.py --from-torch {shipped} --out DIR, then {flag} DIR")
        raise UserError(f"{out} holds a trained model ({name}, as trained_models/ ship them), "
                        f"not a run to go on with: to train from it, {start}, and another "
                        f"--out")
    if name != ours:
        raise UserError(f"{out} holds another kind of run (its checkpoint: {name}, this "
                        f"trainer's: {ours}): choose another --out")
    complete = make_twin.has_checkpoint(ckpt)
    if train_cfg.resume and not complete:
        raise UserError(f"--resume: {out} holds no complete checkpoint to resume from; run "
                        f"without --resume to start there afresh")
    if not train_cfg.resume and complete:
        raise UserError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                        f"or choose another --out")
    ran = cfg.is_run(out)
    ours_to_write = [name for name in (*cfg.RUN_RECORDS, *task.pictures)
                     if os.path.lexists(os.path.join(out, name))]
    if not train_cfg.resume and not ran and ours_to_write:
        raise UserError(f"{out} holds {', '.join(ours_to_write)}, which no run wrote and this "
                        f"one would write over: choose another --out")
    flags = recorded.get("train") if train_cfg.resume else None
    for flag in ("dataset", "batch_size", "seed"):  # the data order the steps replay
        if isinstance(flags, dict) and flag in flags and flags[flag] != getattr(train_cfg, flag):
            raise UserError(f"--resume: {out} was trained with {cfg.option(flag)} "
                            f"{flags[flag]}; resume it with that one")
    for flag in task.first_step_flags:
        if isinstance(flags, dict) and flags.get(flag, getattr(train_cfg, flag)) != getattr(
                train_cfg, flag) and _valid(train_cfg, flag, flags[flag]):
            raise UserError(f"--resume: {out} started with {cfg.option(flag)} {flags[flag]}, "
                            f"which acts at a run's first step only: leave "
                            f"{cfg.option(flag)} out")


def _valid(train_cfg: cfg.TrainConfig, flag: str, value: Any) -> bool:
    """Whether `value` is one that today's TrainConfig takes for `flag` (a record of an
    older version may hold one it refuses, which a resume must then give anew)."""
    try:
        dataclasses.replace(train_cfg, **{flag: value})
    except ValueError:
        return False
    return True
