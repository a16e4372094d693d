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
    for name, (distance,) in results["core_round_trip_ns"].items():  # one window each
        assert distance is None if single_cpu() else math.isfinite(distance) and distance > 0
    cases = {(c["twin"], c["n"], c["k"]) for c in results["quantizer"]}
    assert cases == {(twin, 4096, k) for twin in ("torch", "flax") for k in (512, 8192)}
    assert all(c["seconds"] > 0 and c["peak_bytes"] > 0 for c in results["quantizer"])


def single_cpu() -> bool:
    return len(os.sched_getaffinity(0)) < 2


def import_core_distance():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import core_distance
    finally:
        sys.path.pop(0)
    return core_distance


def test_core_distance_probe_measures_and_stops_its_responder():
    core_distance = import_core_distance()
    affinity = os.sched_getaffinity(0)
    with core_distance.CoreDistance() as probe:
        first, second = probe.round_trip_ns(), probe.round_trip_ns()  # it waits between
        assert os.sched_getaffinity(0) == affinity  # pinned only while it probes
        responder = probe._responder
    if single_cpu():
        assert first is second is None
        return
    for ns in (first, second):
        assert math.isfinite(ns) and ns > 0
    assert responder.returncode == 0


def test_core_distance_placements_split_two_levels_and_keep_one():
    placements = import_core_distance().placements
    # stop 36's runs: two probes near and five far; five near and two far, nearer ones
    assert placements([209, 438, 226, 444, 460, 413, 388]) == [[0, 2], [1, 3, 4, 5, 6]]
    assert placements([342, 195, 206, 199, 338, 201, 197]) == [[1, 2, 3, 5, 6], [0, 4]]
    assert placements([181, 256, 200, 230]) == [[0, 1, 2, 3]]  # near only, 1.4x spread
    assert placements([420]) == [[0]]
