"""Training throughput of both twins, measured in one run on the same model, batch and device.

    python bench/train_step.py [--dataset mnist|cifar10] [--device cpu|cuda|gpu]
                               [--compile] [--quantizer] [--quick] [--json OUT]

(Run it as a script: it imports bench/quantizer.py and bench/core_distance.py from beside
itself.)

Variants, timed in interleaved windows (A, B, C, A, B, C, ...) after a warm-up; each window
runs `--steps` optimizer steps and syncs once, as the trainers do between log points, and
each twin's windows follow an untimed window of its own (`measure`):

    torch_eager      vqvae_torch.train.TorchTwin.train_step
    torch_compile    the same step with the model under torch.compile (--compile; minutes to
                     compile on a CPU): forward and backward compiled, Adam and the code
                     restart eager
    flax_jit         vqvae_jax.train.JaxTwin.train_step (one jitted call, buffers donated)

Each is timed on a fixed batch and again fed by the real input pipeline (vqvae_common.data
.batches over an in-memory uint8 split of the dataset's size), so the pipeline's share of a
step shows as a percentage. FLOPs per image come from torch's FlopCounterMode and from XLA's
compiled cost analysis (--quick: of the step before optimization, within 1%, sparing a second
compile). With --quantizer, then the quantizer alone as K and N grow
(bench/quantizer.py: about 20 minutes on a 2-core CPU, one small case with --quick).
The Flax / PyTorch-eager ratio is printed twice: of the two medians, and round by round
(each Flax window over the PyTorch window of its round), whose median and range show how much
of a ratio near 1.0 is the machine's noise. Each window also counts the process's CPU time
(all threads) and context switches, printed per step as `cores` (CPU time over wall time)
and `switches`: how each twin's runtime uses the cores it has (a twin's windows run with the
other idle). On a CPU, each timed window is bracketed by measurements of how far apart two
of the process's CPUs are (bench/core_distance.py), printed beside each round's ratio: on a
virtual machine whose host moves the vCPUs, the Flax step moves with them. Prints tables
and writes JSON (every window's seconds and probes included); a measurement, never a test.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

try:
    import resource  # POSIX: CPU time and context switches of the whole process
except ImportError:
    resource = None

import core_distance  # bench/core_distance.py, beside this script
import jax
import numpy as np
import quantizer  # bench/quantizer.py, beside this script
import timing  # bench/timing.py, beside this script
import torch
from torch.utils.flop_counter import FlopCounterMode

from vqvae_common import data, host_memory
from vqvae_common.config import DATASETS, TrainConfig
from vqvae_jax.train import JaxTwin
from vqvae_torch.train import TorchTwin, to_tensor


def fixed_batches(batch: np.ndarray) -> Iterator[np.ndarray]:
    while True:
        yield batch


def pipeline_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    epoch = 0
    while True:
        yield from data.batches(images, batch_size, seed=0, epoch=epoch)
        epoch += 1


def torch_flops(twin: TorchTwin, batch: np.ndarray) -> float:
    """FLOPs of one forward + backward, counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        twin.model(to_tensor(batch, twin.device)).losses["loss"].backward()
    twin.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def jax_flops(twin: JaxTwin, batch: np.ndarray, compiled: bool = True) -> float:
    """FLOPs of the whole jitted step (optimizer included), from XLA's cost analysis of the
    compiled step, or of its HLO before optimization (`compiled` False: no compile, which
    the step's own first call cannot share)."""
    lowered = twin._train_step.lower(twin.state, batch)
    analysis = (lowered.compile() if compiled else lowered).cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


class Usage(NamedTuple):
    cpu_seconds: float  # user + system, every thread of the process
    context_switches: float  # voluntary + involuntary; NaN where the OS does not count them


def process_usage() -> Usage:
    if resource is None:  # not POSIX: CPU time by clock ticks, switches not counted
        times = os.times()
        return Usage(times.user + times.system, float("nan"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(usage.ru_utime + usage.ru_stime, float(usage.ru_nvcsw + usage.ru_nivcsw))


def measure(steps: dict[str, Callable[[int], None]], windows: int, per_window: int,
            probe: Callable[[], float | None] = lambda: None
            ) -> tuple[dict[str, list[float]], dict[str, list[Usage]],
                       dict[str, list[tuple[float | None, float | None]]]]:
    """Seconds of each window of `per_window` steps, the process's CPU time and context
    switches over each, and `probe()` just before and after it (core_distance). Before a
    twin's windows in each round, one untimed window of its own, so that no timed window
    pays for the switch from the other framework's, which a training run never makes: the
    first Flax window after PyTorch's measured 5-13% slower than the next (both presets),
    the same two alone equal (MNIST 143.4 and 143.6 ms). Variants named "<twin>+..." belong
    to <twin>."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    usage: dict[str, list[Usage]] = {name: [] for name in steps}
    probes: dict[str, list[tuple[float | None, float | None]]] = {name: [] for name in steps}
    for _ in range(windows):
        previous = None
        for name, run_steps in steps.items():
            twin = name.split("+")[0]
            if twin != previous:
                run_steps(per_window)
                previous = twin
            probed = probe()
            before, start = process_usage(), time.perf_counter()
            run_steps(per_window)
            times[name].append(time.perf_counter() - start)
            usage[name].append(Usage(*(b - a for a, b in zip(before, process_usage()))))
            probes[name].append((probed, probe()))
    return times, usage, probes


def round_ratios(times: dict[str, list[float]], a: str, b: str) -> np.ndarray:
    """a's window over b's window of the same round: the two ran seconds apart, so a drift
    of the machine's speed between rounds, which moves both medians, cancels in each ratio.
    Their spread says how far the ratio of the medians can be trusted."""
    return np.array(times[a]) / np.array(times[b])


def print_ratio_by_round_trip(rounds: np.ndarray,
                              round_trips: list[tuple[float | None, float | None]],
                              cpus: tuple[int, ...]) -> None:
    """Each round's ratio beside the CPUs' round trip probed before and after its Flax
    window, sorted by the slower probe: where the host moves the vCPUs, the Flax step moves
    with them (bench/core_distance.py). Rounds whose probe failed are left out."""
    probed = sorted((max(pair), pair, ratio) for pair, ratio in zip(round_trips, rounds)
                    if None not in pair)
    print(f"flax_jit / torch_eager by round, beside the cache-line round trip between CPUs "
          f"{cpus} before/after the Flax window: " + ", ".join(
              f"{before:.0f}/{after:.0f} ns {ratio:.2f}" for _, (before, after), ratio in probed))


def window(twin, batches: Iterator[np.ndarray]) -> Callable[[int], None]:
    def run(steps: int) -> None:
        for _ in range(steps):
            out = twin.train_step(next(batches))
        twin.fetch(out)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda/gpu where present")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per window")
    parser.add_argument("--windows", type=int, default=7, help="timed windows per variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--quantizer", action="store_true",
                        help="also sweep the quantizer alone over K and N (bench/quantizer.py)")
    parser.add_argument("--quick", action="store_true", help="a smoke run under a minute")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    host_memory.keep_freed_memory()  # as the trainers do, before either framework allocates
    if args.quick:
        args.steps, args.windows, args.compile = 1, 1, False

    dataset = DATASETS[args.dataset]
    model_cfg = dataset.preset
    train_cfg = TrainConfig(dataset=args.dataset, batch_size=args.batch_size, device=args.device)
    rng = np.random.default_rng(0)
    split = rng.integers(0, 256, (dataset.train_size, *dataset.image_shape), dtype=np.uint8)
    batch = data.to_float(split[:args.batch_size])

    twins = {"torch_eager": TorchTwin(model_cfg, train_cfg),
             "flax_jit": JaxTwin(model_cfg, train_cfg)}
    if args.compile:
        twins["torch_compile"] = TorchTwin(model_cfg, train_cfg)
        twins["torch_compile"].model.compile()
    flops = {"torch_eager": torch_flops(twins["torch_eager"], batch),
             "flax_jit": jax_flops(twins["flax_jit"], batch, compiled=not args.quick)}
    flops["torch_compile"] = flops["torch_eager"]

    compile_s = {}
    for name, twin in twins.items():  # warm-up: compilation, allocator, caches
        start = time.perf_counter()
        twin.fetch(twin.train_step(batch))
        compile_s[name] = time.perf_counter() - start
        twin.fetch(twin.train_step(batch))

    steps = {}
    for name, twin in twins.items():
        steps[name] = window(twin, fixed_batches(batch))
        steps[f"{name}+pipeline"] = window(twin, pipeline_batches(split, args.batch_size))
    with core_distance.CoreDistance() as cores:
        probe = cores.round_trip_ns if args.device == "cpu" else lambda: None
        times, usage, round_trips = measure(steps, args.windows, args.steps, probe)

    per_step = {k: float(np.median(v)) / args.steps for k, v in times.items()}
    results = {"machine": f"{timing.machine()}, "
                          f"{torch.get_num_threads()} torch threads, jax {jax.devices()[0]}",
               "dataset": args.dataset, "batch_size": args.batch_size, "variants": {}}
    print(f"{args.dataset}, batch {args.batch_size}, device {args.device} "
          f"({args.windows} windows of {args.steps} steps, median)")
    print(f"{'variant':24} {'ms/step':>9} {'images/s':>9} {'pipeline':>9} {'GFLOP/s':>9} "
          f"{'first step s':>12} {'cores':>6} {'switches':>9}")
    for name in twins:
        step_s, fed_s = per_step[name], per_step[f"{name}+pipeline"]
        row = {"ms_per_step": step_s * 1e3, "images_per_s": args.batch_size / step_s,
               "images_per_s_with_pipeline": args.batch_size / fed_s,
               "pipeline_overhead_pct": 100 * (fed_s - step_s) / step_s,
               "flops_per_image": flops[name] / args.batch_size,
               "gflops_per_s": flops[name] / step_s / 1e9, "first_step_s": compile_s[name],
               "cores_used": float(np.median([u.cpu_seconds / s for u, s in
                                              zip(usage[name], times[name])])),
               "context_switches_per_step": float(np.median(
                   [u.context_switches for u in usage[name]])) / args.steps}
        results["variants"][name] = row
        print(f"{name:24} {row['ms_per_step']:9.1f} {row['images_per_s']:9.0f} "
              f"{row['pipeline_overhead_pct']:8.1f}% {row['gflops_per_s']:9.1f} "
              f"{row['first_step_s']:12.2f} {row['cores_used']:6.2f} "
              f"{row['context_switches_per_step']:9.1f}")
    ratio = per_step["flax_jit"] / per_step["torch_eager"]
    rounds = round_ratios(times, "flax_jit", "torch_eager")
    results["flax_over_torch_eager_step_time"] = ratio
    results["flax_over_torch_eager_by_round"] = rounds.tolist()
    results["windows_s"] = times
    results["core_round_trip_ns"] = round_trips  # (before, after) each window, as windows_s
    print(f"flax_jit step time / torch_eager step time = {ratio:.2f}; round by round: "
          f"median {np.median(rounds):.2f}, {rounds.min():.2f}-{rounds.max():.2f} over "
          f"{len(rounds)} rounds")
    if any(None not in pair for pair in round_trips["flax_jit"]):
        print_ratio_by_round_trip(rounds, round_trips["flax_jit"], cores.cpus)
    if args.quantizer:
        results["quantizer"] = quantizer.sweep(args.device, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
