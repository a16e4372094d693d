"""The benchmarks' CI smoke run: bench/train_step.py --quick runs end to end and writes every
figure it promises, and bench/core_distance.py's probe measures and cleans up after itself.
Never a timing: the values are only checked to be measured (finite, positive), not fast."""
import json
import math
import os
import subprocess
import sys

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
    (distance,) = results["core_round_trip_ns_by_round"]  # one round
    assert distance is None if len(os.sched_getaffinity(0)) < 2 else 0 < distance < 1e6
    cases = {(c["twin"], c["n"], c["k"]) for c in results["quantizer"]}
    assert cases == {(twin, 4096, k) for twin in ("torch", "flax") for k in (512, 8192)}
    assert all(c["seconds"] > 0 and c["peak_bytes"] > 0 for c in results["quantizer"])


def test_core_distance_probe_measures_and_leaves_nothing_behind():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from core_distance import CoreDistance
    finally:
        sys.path.pop(0)
    affinity = os.sched_getaffinity(0)
    with CoreDistance() as probe:
        first, second = probe.round_trip_ns(), probe.round_trip_ns()  # the far side waits
        assert os.sched_getaffinity(0) == affinity  # the probe pins itself only meanwhile
        pong, path = probe._pong, getattr(probe, "_path", None)
    if len(affinity) < 2:
        assert first is second is None
        return
    assert 0 < first < 1e6 and 0 < second < 1e6
    assert pong.returncode == 0 and not os.path.exists(path)
