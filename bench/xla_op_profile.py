"""Where the Flax CPU train step's time goes, op by op, by XLA's own trace.

    python bench/xla_op_profile.py [--dataset mnist|cifar10] [--steps 10] [--top 30]
                                   [--json OUT]

Compiles JaxTwin's train step with `xla_cpu_enable_xprof_traceme` added to its compile
options (only this step is traced), runs --steps steps under jax.profiler after a warm-up,
and reads the trace's .trace.json.gz: each XLA op's wall time on the thread that ran it,
joined to the optimized HLO for the op's shape, the JAX operation it came from and the line
of this project's Flax code that made it (the innermost frame in vqvae_jax/ of the op's
stack in the HLO). Each op runs once a step: its figure is its events' total divided by
--steps. Prints the ops by time, the totals by kind, and the totals by source line: which
line of the model costs what.

Read with care:
- XLA:CPU runs its (Eigen) convolutions asynchronously on its thread pool: their events time
  the launch, not the work (encoder.conv2's forward, 1.6 GFLOP, read 0.33 ms on a 2-core
  machine), so they are listed, and totalled apart, as launches. bench/layers_vs_torch.py
  times the convolutions, layer by layer.
- Ops on XLA's two threads overlap; the totals are thread time, not the step's wall time.
- Events that match no op of the optimized HLO (the runtime's own) are left out.
- What a fused transpose costs, and why: vqvae_jax.xla_cpu._strided_conv_kernel_grad.

A measurement, never a test: run it with nothing else running.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from vqvae_common import data, host_memory
from vqvae_common.config import DATASETS, TrainConfig
from vqvae_jax import xla_cpu
from vqvae_jax.train import JaxTwin

KINDS = (("convolution (launch only)", re.compile(r"^conv(olution|_general)")),
         ("YNNPACK fusion", re.compile(r"^ynn_fusion")),
         ("transpose or copy", re.compile(r"^(transpose|copy)")),
         ("other", re.compile(r"")))


def kind(op: str) -> str:
    return next(name for name, pattern in KINDS if pattern.search(op))


def traced_twin(dataset: str) -> JaxTwin:
    """JaxTwin whose jits get the traceme option beside xla_cpu.COMPILER_OPTIONS, which
    JaxTwin reads when it is made."""
    options = xla_cpu.COMPILER_OPTIONS
    xla_cpu.COMPILER_OPTIONS = {**options, "xla_cpu_enable_xprof_traceme": True}
    try:
        return JaxTwin(DATASETS[dataset].preset, TrainConfig(dataset=dataset, device="cpu"))
    finally:
        xla_cpu.COMPILER_OPTIONS = options


def trace_events(trace_dir: str, ops: dict) -> list[dict]:
    """The complete events ('X') of the optimized HLO's ops, on whichever thread ran them
    (XLA's pool, or the client thread that started the program)."""
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"] in ops]


def hlo_facts(hlo: str) -> dict[str, tuple[str, str]]:
    """Op name -> (result shape, the JAX operation it came from) in the optimized HLO."""
    facts = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ", line)
        if m:
            source = re.search(r'op_name="jit\(train_step\)/([^"]*)"', line)
            shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # the layouts left out
            facts[m.group(1)] = (shape, source.group(1) if source else "")
    return facts


def _numbered(hlo: str, section: str) -> dict[int, str]:
    """The HLO's `section` (FileNames, FunctionNames, FileLocations, StackFrames): id -> the
    rest of its line."""
    block = re.search(rf"^{section}\n((?:\d+ .*\n)*)", hlo, re.M)
    return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1]
            for line in (block.group(1).splitlines() if block else [])}


def source_lines(hlo: str) -> dict[str, str]:
    """Op name -> "file:line (function)" of the innermost frame of its stack in this
    project's Flax code (vqvae_jax/), else of its innermost frame; ops XLA made itself (the
    layout copies, say) have no stack and are left out. A frame's parent_frame_id reads one
    more than its parent's id, 0 for none (as XLA prints them)."""
    files = {i: text.strip('"') for i, text in _numbered(hlo, "FileNames").items()}
    functions = {i: text.strip('"') for i, text in _numbered(hlo, "FunctionNames").items()}
    where = {}
    for i, text in _numbered(hlo, "FileLocations").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", text))
        where[i] = (files.get(int(fields["file_name_id"]), "?"),
                    functions.get(int(fields.get("function_name_id", 0)), "?"),
                    fields.get("line", "?"))
    frames = {i: tuple(int(v) for v in re.findall(r"=(\d+)", text))
              for i, text in _numbered(hlo, "StackFrames").items()}  # (location, parent + 1)
    labels = {}
    for op, frame in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*stack_frame_id=(\d+)", hlo,
                                re.M):
        stack, frame = [], int(frame)
        while frame in frames and len(stack) < len(frames):
            location, parent = frames[frame]
            stack.append(where.get(location, ("?", "?", "?")))
            frame = parent - 1
        ours = [f for f in stack if f"{os.sep}vqvae_jax{os.sep}" in f[0]] or stack
        if ours:
            path, function, line = ours[0]
            labels[op] = f"{os.path.basename(path)}:{line} ({function})"
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    parser.add_argument("--steps", type=int, default=10, help="traced steps")
    parser.add_argument("--top", type=int, default=30, help="ops to print")
    parser.add_argument("--json", default=None, help="write every op's figures here")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    host_memory.keep_freed_memory()  # as the trainers do, before JAX allocates

    twin = traced_twin(args.dataset)
    rng = np.random.default_rng(0)
    batch = data.to_float(rng.integers(0, 256, (64, *DATASETS[args.dataset].image_shape),
                                       dtype=np.uint8))
    hlo = twin._train_step.lower(twin.state, twin._put(batch)).compile().as_text()
    for _ in range(5):  # compile, then settle the allocator and the thread pool
        twin.fetch(twin.train_step(batch))
    facts = hlo_facts(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(args.steps):
                twin.fetch(twin.train_step(batch))
            step_ms = (time.perf_counter() - start) / args.steps * 1e3
        events = trace_events(trace_dir, facts)

    per_step = collections.Counter()
    for e in events:
        per_step[e["name"]] += e["dur"] / 1e3 / args.steps  # us -> ms a step
    sources = source_lines(hlo)
    ops = [{"op": op, "ms_per_step": ms, "kind": kind(op), "shape": facts[op][0],
            "from": facts[op][1], "source": sources.get(op, "")} for op, ms in
           per_step.most_common()]
    totals, by_source = collections.Counter(), collections.Counter()
    for row in ops:
        totals[row["kind"]] += row["ms_per_step"]
        by_source[row["source"] or "(no stack: made by XLA)"] += row["ms_per_step"]

    print(f"{args.dataset} Flax train step, batch 64, {args.steps} traced steps: "
          f"{step_ms:.1f} ms a step (wall, tracing on)")
    print(f"{'op':32} {'ms/step':>8}  {'kind':26} {'shape':24} from")
    for row in ops[:args.top]:
        print(f"{row['op'][:32]:32} {row['ms_per_step']:8.3f}  {row['kind']:26} "
              f"{row['shape'][:24]:24} {row['from'][:60]}")
    print("thread time a step by kind: " + ", ".join(
        f"{name} {totals[name]:.1f} ms" for name, _ in KINDS))
    print(f"\n{'thread time a step by source line':60} {'ms/step':>8}")
    for source, ms in by_source.most_common(args.top):
        print(f"{source[:60]:60} {ms:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "steps": args.steps, "step_ms": step_ms,
                       "ms_per_step_by_kind": totals, "ms_per_step_by_source": by_source,
                       "ops": ops}, f, indent=2)


if __name__ == "__main__":
    main()
