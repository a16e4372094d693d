"""Where one twin's CPU train step spends its CPU time, by Linux perf's sampling profiler.

    python bench/profile_step.py --twin flax|torch [--dataset mnist|cifar10] [--seconds 6]
                                 [--top 15]

Runs the twin's train step in this process (fixed batch of 64, after a warm-up that also
compiles), attaches `perf record` to the process for --seconds while it steps, and prints the
share of the samples in each shared object and the top symbols, with the step time of the
profiled window. oneDNN names its JIT-compiled kernels for perf (DNNL_JIT_PROFILE=2, set here
before either framework loads oneDNN); other JIT code (XLA's fused kernels) shows as
addresses, and oneDNN leaves its map in /tmp/perf-<pid>.map. Needs Linux `perf` on PATH;
kernel samples (page clearing) need kernel.perf_event_paranoid <= 1. A measurement, never a
test: run one twin at a time, with nothing else running.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time

os.environ.setdefault("DNNL_JIT_PROFILE", "2")  # perf map of oneDNN's JIT kernels

import numpy as np  # noqa: E402

from vqvae_common import host_memory  # noqa: E402
from vqvae_common.config import DATASETS, TrainConfig  # noqa: E402


def make_twin(name: str, dataset: str):
    config = TrainConfig(device="cpu", batch_size=64)
    if name == "flax":
        from vqvae_jax.train import JaxTwin
        return JaxTwin(DATASETS[dataset].preset, config)
    from vqvae_torch.train import TorchTwin
    return TorchTwin(DATASETS[dataset].preset, config)


def perf_report(data: str, sort: str, top: int) -> list[str]:
    report = subprocess.run(["perf", "report", "-i", data, "--sort", sort, "--stdio"],
                            capture_output=True, text=True)
    if report.returncode:
        raise SystemExit(f"perf report failed: {report.stderr.strip()}")
    rows = [line.strip() for line in report.stdout.splitlines()
            if "%" in line and not line.startswith("#")]
    return [row[:150] for row in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twin", choices=("flax", "torch"), required=True,
                        help="which twin's train step to profile")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long perf samples")
    parser.add_argument("--top", type=int, default=15, help="symbols to print")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        parser.error("needs Linux perf on PATH (the linux-tools package)")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    host_memory.keep_freed_memory()
    twin = make_twin(args.twin, args.dataset)
    batch = np.random.default_rng(0).uniform(
        -1, 1, (64, *DATASETS[args.dataset].image_shape)).astype(np.float32)
    for _ in range(3):
        twin.fetch(twin.train_step(batch))

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(os.getpid()),
                                 "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        steps, start = 0, time.perf_counter()
        try:  # the step runs in the main thread, as in the trainers
            while time.perf_counter() - start < args.seconds and perf.poll() is None:
                twin.fetch(twin.train_step(batch))
                steps += 1
            elapsed = time.perf_counter() - start
        finally:
            perf.send_signal(signal.SIGINT)  # perf record stops and writes its file
            perf.wait()
        if not os.path.exists(data) or not steps:
            raise SystemExit(f"perf record failed: {perf.stderr.read().decode().strip()}")
        print(f"{args.twin} {args.dataset}: {steps} steps, "
              f"{elapsed / steps * 1e3:.1f} ms/step while profiled")
        print("share of samples by shared object:")
        print("\n".join(perf_report(data, "dso", 8)))
        print("top symbols:")
        print("\n".join(perf_report(data, "dso,sym", args.top)))


if __name__ == "__main__":
    main()
