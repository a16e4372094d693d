"""Data-parallel training of the PyTorch twin (vqvae_torch.distributed): 2 gloo processes on
the CPU compute the step that 1 process computes on the same global batch, and a run that
loses a process stops with one line and resumes to the uninterrupted run's losses.

Each run's processes are forked from a server (this file as a script: `serve`) that has
imported the twin once, with the environment torchrun gives its workers (RANK, WORLD_SIZE,
MASTER_ADDR/PORT). A process runs either the float64 steps of `f64_worker` or
train_torch.py's command line on random images (`cli_worker`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
CHILD_TIMEOUT_S = 120
GLOBAL_BATCH = 16
SEED = 3
IMAGES = np.random.default_rng(0).integers(0, 256, (320, 28, 28, 1), dtype=np.uint8)
# the two codebook updates, each with what it exercises: grad from the uniform start (the
# first step restarts nearly every code: the gathered restart rows); EMA from k-means (every
# process's local k-means; the all-reduced EMA counts and sums)
SETTINGS = {"grad": {"codebook_update": "grad", "kmeans": False},
            "ema": {"codebook_update": "ema", "kmeans": True}}
LOSS_RTOL = 1e-9  # each step's loss terms (measured: 9e-16)
STATE_RTOL = 1e-11  # each final array (weights, BatchNorm statistics, usage, EMA state),
#                     relative to its largest magnitude (measured: 5e-13) ...
NOISE_TOL = 1e-8  # ... but the conv biases that the next BatchNorm cancels (their gradient is
#                   rounding noise: they stay ~1e-10, different noise in a different sum order)
#                   and the running means that carry them: relative to max(magnitude, 1)
#                   (measured: 2.2e-9)


def is_noise(key: str) -> bool:
    """A conv bias or a running mean: the arrays held to NOISE_TOL."""
    *_, layer, name = key.split(".")
    return name == "running_mean" or (name == "bias" and not layer.startswith("bn"))


def serve() -> None:
    """Imports the twin once, then for each JSON line {"world", "args", "kill", "timeout_s"}
    on stdin forks `world` processes of the run `args` asks for, as torchrun starts them
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT; one process: none of these, a plain run), and answers
    [[exit status, stderr], ...] in rank order. "kill": {rank: step}, the step at which that
    process SIGKILLs itself. The children skip ~5 s of imports each; no process group and no
    thread pool exists before the fork."""
    import tempfile

    import torch._inductor  # noqa: F401  torch.use_deterministic_algorithms imports it
    from matplotlib import pyplot

    import vqvae_common.cli  # noqa: F401
    import vqvae_common.loop  # noqa: F401
    import vqvae_torch.train  # noqa: F401

    pyplot.close(pyplot.figure())
    for line in sys.stdin:
        request = json.loads(line)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        children = []
        for rank in range(request["world"]):
            stderr = tempfile.TemporaryFile()
            pid = os.fork()
            if pid == 0:
                _child(rank, port, request, stderr)
            children.append((pid, stderr))
        answer = []
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        for pid, stderr in children:
            while not (done := os.waitpid(pid, os.WNOHANG))[0]:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)
            status = os.waitstatus_to_exitcode(done[1])
            stderr.seek(0)
            answer.append([status, stderr.read().decode(errors="replace")])
            stderr.close()
        print(json.dumps(answer), flush=True)


def _child(rank: int, port: int, request: dict, stderr) -> None:
    """One process of a run, in the forked child; never returns."""
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(stderr.fileno(), 2)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ["VQVAE_DDP_TIMEOUT_S"] = str(request.get("timeout_s", 20))
        if request["world"] > 1:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank),
                              WORLD_SIZE=str(request["world"]),
                              LOCAL_WORLD_SIZE=str(request["world"]),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import vqvae_torch.distributed as distributed

        distributed.TIMEOUT_S = float(os.environ["VQVAE_DDP_TIMEOUT_S"])
        mode, *args = request["args"]
        if mode == "f64":
            f64_worker(*args)
            code = 0
        else:
            code = cli_worker(int(request.get("kill", {}).get(str(rank), 0)), args)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


@pytest.fixture(scope="module")
def launch():
    """launch(world, *args, kill={rank: step}) -> [(exit status, stderr)] of each process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, __file__, "serve"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(world: int, *args: str, kill: dict[int, int] | None = None
            ) -> list[tuple[int, str]]:
        request = {"world": world, "args": list(args),
                   "kill": {str(k): v for k, v in (kill or {}).items()}}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, "the test server died"
        return [tuple(result) for result in json.loads(line)]

    yield run
    server.stdin.close()
    server.wait(timeout=60)


# ---- the float64 comparison -----------------------------------------------------------------

def f64_worker(out: str) -> None:
    """Both SETTINGS, STEPS steps each from the same seed, in float64: every step's loss terms
    and the final state, saved as OUT.npz (rank r: OUT.r.npz)."""
    import torch

    from vqvae_common import data
    from vqvae_common.config import ModelConfig, TrainConfig
    from vqvae_torch.train import TorchTwin

    torch.set_num_threads(1)
    train_cfg = TrainConfig(device="cpu", batch_size=GLOBAL_BATCH, seed=SEED, lr=1e-3)
    rank, _ = TorchTwin.join_processes(train_cfg)
    saved = {}
    for name, setting in SETTINGS.items():
        model_cfg = ModelConfig(in_channels=1, hidden=16, num_codes=32,
                                codebook_update=setting["codebook_update"])
        twin = TorchTwin(model_cfg, train_cfg)
        twin.model.double()
        if setting["kmeans"]:
            twin.initialize_codebook(data.first_images(IMAGES, 64, SEED).astype(np.float64),
                                     SEED, 3)
        losses = []
        for batch in list(data.batches(IMAGES, GLOBAL_BATCH, SEED, 0))[:STEPS]:
            losses.append(twin.fetch(twin.train_step(batch.astype(np.float64))))
        for key in losses[0]:
            saved[f"{name}/loss/{key}"] = np.array([row[key] for row in losses])
        for key, value in twin.model.state_dict().items():
            saved[f"{name}/state/{key}"] = value.numpy().copy()
    np.savez(out if rank == 0 else f"{out}.{rank}.npz", **saved)


@pytest.fixture(scope="module")
def f64_runs(launch, tmp_path_factory) -> tuple[dict, dict, dict]:
    """(1 process, rank 0 of 2, rank 1 of 2): the arrays f64_worker saved."""
    tmp = tmp_path_factory.mktemp("f64")
    one, two = str(tmp / "one.npz"), str(tmp / "two.npz")
    for world, out in ((1, one), (2, two)):
        for status, err in launch(world, "f64", out):
            assert status == 0, err[-3000:]
    return tuple(dict(np.load(path)) for path in (one, two, f"{two}.1.npz"))


def relative_difference(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """max|a - b| / max(max|a|, max|b|, floor)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(initial=0), np.abs(b).max(initial=0), floor)
    return float(np.abs(a - b).max(initial=0) / scale) if scale else 0.0


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_processes_take_the_steps_of_one_on_the_global_batch(f64_runs, setting):
    one, rank0, rank1 = f64_runs
    prefix = f"{setting}/"
    losses = {k: relative_difference(one[k], rank0[k]) for k in one
              if k.startswith(prefix + "loss/")}
    state = {k: relative_difference(one[k], rank0[k]) for k in one
             if k.startswith(prefix + "state/") and not is_noise(k)}
    noise = {k: relative_difference(one[k], rank0[k], 1.0) for k in one
             if k.startswith(prefix + "state/") and is_noise(k)}
    assert len(losses) == 4 and state and noise
    assert prefix + "state/quantizer.usage" in state
    print(f"\n{setting}, {STEPS} float64 steps, 2 processes vs 1, worst relative differences: "
          + "; ".join(f"{name} {max(d.values()):.1e} ({max(d, key=d.get).split('/')[-1]})"
                      for name, d in (("loss terms", losses), ("final arrays", state),
                                      ("BatchNorm-cancelled biases, running means", noise))))
    for key, diff in losses.items():
        assert diff <= LOSS_RTOL, (key, diff)
    for key, diff in state.items():
        assert diff <= STATE_RTOL, (key, diff)
    for key, diff in noise.items():
        assert diff <= NOISE_TOL, (key, diff)
    for key in rank0:  # every process holds the same model, bit for bit
        np.testing.assert_array_equal(rank1[key], rank0[key], err_msg=f"ranks differ: {key}")
    if setting == "ema":
        assert prefix + "state/quantizer.ema_sums" in state
        # usage moved away from the uniform share that k-means gives every code
        assert np.ptp(one[prefix + "state/quantizer.usage"]) > 0


# ---- a lost process, then --resume ---------------------------------------------------------

def cli_worker(kill_at: int, argv: list[str]) -> int:
    """train_torch.py ARGV on IMAGES (both splits), SIGKILLing this process when it enters
    training step `kill_at` (0: never)."""
    from vqvae_common import cli, loop
    from vqvae_torch.train import TorchTwin

    loop.data.load = lambda name, split, data_dir=None: IMAGES
    if kill_at:
        step = TorchTwin.train_step

        def train_step(self, batch):
            if self.step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch)
        TorchTwin.train_step = train_step
    return cli.main("torch", lambda m, t: loop.fit(TorchTwin, m, t), argv)


FLAGS = ["--hidden", "16", "--num-codes", "32", "--batch-size", "32", "--epochs", "1",
         "--log-every", "1", "--checkpoint-every", "4", "--eval-images", "32",
         "--kmeans-images", "64", "--kmeans-iterations", "2", "--seed", str(SEED),
         "--device", "cpu"]  # 10 steps


def rows(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def test_a_killed_process_stops_the_run_in_one_line_and_resume_continues_it(launch, tmp_path):
    start = time.perf_counter()
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    [(s0, e0), (s1, e1)] = launch(2, "cli", *FLAGS, "--out", str(whole))
    assert s0 == 0 and s1 == 0, e0[-2000:] + e1[-2000:]
    config = json.loads((whole / "config.json").read_text())
    assert (config["num_devices"], config["device_kind"]) == (2, "cpu")
    assert [r["step"] for r in rows(whole) if "loss" in r and "mse" not in r] == list(range(1, 11))

    [(s0, e0), (s1, _)] = launch(2, "cli", *FLAGS, "--out", str(cut), kill={1: 7})
    assert s1 == -signal.SIGKILL
    lines = e0.strip().splitlines()
    print(f"\nrank 0 after rank 1's kill (exit {s0}): {lines[-1]}")
    assert s0 == 2, e0[-3000:]
    assert "Traceback" not in e0, e0[-3000:]
    assert lines[-1].startswith("error: process 0 of 2: another process of the run died")
    assert "during step 7" in lines[-1]
    assert f"{cut / 'checkpoint.pt'} holds step 4" in lines[-1]
    assert "--resume" in lines[-1]

    [(s0, e0), (s1, e1)] = launch(2, "cli", *FLAGS, "--out", str(cut), "--resume")
    assert s0 == 0 and s1 == 0, e0[-2000:] + e1[-2000:]
    assert rows(cut) == rows(whole)
    print(f"3 two-process runs: {time.perf_counter() - start:.1f} s")


def test_a_batch_that_does_not_split_over_the_processes_is_a_user_error(monkeypatch):
    from vqvae_common.config import TrainConfig
    from vqvae_common.errors import UserError
    from vqvae_torch.train import TorchTwin

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--batch-size 15 .* over 2 processes"):
        TorchTwin.join_processes(TrainConfig(device="cpu", batch_size=15))
    with pytest.raises(UserError, match="--num-devices 4 differs from the 2 processes"):
        TorchTwin.join_processes(TrainConfig(device="cpu", batch_size=16, num_devices=4))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="torchrun --nproc_per_node 2"):
        TorchTwin.join_processes(TrainConfig(device="cpu", num_devices=2))
    assert TorchTwin.join_processes(TrainConfig(device="cpu", num_devices=1)) == (0, 1)


if __name__ == "__main__":
    serve()
