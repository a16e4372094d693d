"""The benchmarks' CI smoke run: bench/train_step.py --quick runs end to end and writes every
figure it promises, bench/core_distance.py's probe measures and cleans up after itself, and
bench/xla_op_profile.py reads which line of code made each op. Never a timing: the values
are only checked to be measured (finite, positive), not fast."""
import importlib
import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    # torch on one thread: on a busy 2-core machine, two wait a time slice at each op
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"),
                          "--quick", "--quantizer", "--json", str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert set(results["variants"]) == {"torch_eager", "flax_jit"}
    for row in results["variants"].values():
        for key in ("ms_per_step", "images_per_s", "images_per_s_with_pipeline",
                    "flops_per_image", "gflops_per_s", "first_step_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert math.isfinite(row["pipeline_overhead_pct"])
        assert 0 < row["cores_used"] <= os.cpu_count() + 0.5  # CPU time over wall time
        assert math.isfinite(row["context_switches_per_step"])  # counted on Linux, as in CI
        assert row["context_switches_per_step"] >= 0
    rounds = results["flax_over_torch_eager_by_round"]
    assert len(rounds) == len(results["windows_s"]["flax_jit"]) == 1
    assert math.isfinite(rounds[0]) and rounds[0] > 0
    one_cpu = single_cpu()
    for name, [probes] in results["core_round_trip_ns"].items():  # (before, after) one window
        for ns in probes:
            assert ns is None if one_cpu else math.isfinite(ns) and ns > 0, name
    cases = {(c["twin"], c["n"], c["k"]) for c in results["quantizer"]}
    assert cases == {(twin, 4096, 8192) for twin in ("torch", "flax")}
    assert all(c["seconds"] > 0 and c["peak_bytes"] > 0 for c in results["quantizer"])


def import_bench(name: str):
    """bench/<name>.py as a module (the scripts import each other from beside themselves)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def import_core_distance():
    return import_bench("core_distance")


def single_cpu() -> bool:
    return len(import_core_distance().CoreDistance().cpus) < 2


def test_core_distance_probe_measures_and_stops_its_responder():
    core_distance = import_core_distance()
    affinity = os.sched_getaffinity(0)
    with core_distance.CoreDistance() as probe:
        first, second = probe.round_trip_ns(), probe.round_trip_ns()
        assert os.sched_getaffinity(0) == affinity  # pinned only while it probes
        responder = probe._responder
    if single_cpu():
        assert first is second is None
        return
    for ns in (first, second):
        assert math.isfinite(ns) and ns > 0
    assert responder.returncode == 0


def test_core_distance_gives_none_once_its_responder_is_gone():
    core_distance = import_core_distance()
    if single_cpu():
        pytest.skip("one CPU: no responder to lose")
    with core_distance.CoreDistance() as probe:
        probe._responder.kill()
        start = time.perf_counter()
        assert probe.round_trip_ns() is None
        assert probe.round_trip_ns() is None
        assert time.perf_counter() - start < 2 * core_distance.PROBE_LIMIT_S


def test_xla_op_profile_names_the_line_of_our_code_behind_each_op():
    """Each op of a compiled program maps to the innermost frame of its stack in vqvae_jax/:
    a plain residual block's convolutions to the block's lines that call flax's nnx.Conv,
    not to flax's own lines below them."""
    import jax
    import numpy as np
    from flax import nnx

    from vqvae_jax.model import ResidualBlock

    graphdef, state = nnx.split(ResidualBlock(4, fast_cpu=False, rngs=nnx.Rngs(0)))
    hlo = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(
        state, np.ones((2, 4, 4, 4), np.float32)).compile().as_text()
    sources = import_bench("xla_op_profile").source_lines(hlo)
    code = ResidualBlock.__call__.__code__
    lines = range(code.co_firstlineno, code.co_firstlineno + 4)  # its def and body
    convolutions = {sources[op] for op in sources if op.startswith("conv")}
    assert convolutions and all(
        s.startswith("model.py:") and s.endswith(" (ResidualBlock.__call__)")
        and int(s.split(":")[1].split()[0]) in lines for s in convolutions), sources
    assert all(s.startswith("model.py:") for s in sources.values()), sources
