"""Run the parity suite under settings that change the arithmetic as another machine would.

    python parity_tests/matrix.py [--only NAME ...] [--json OUT] [-- PYTEST_ARGS...]

Each setting runs `pytest parity_tests` in one fresh process (`-n 0`: the default's two
PyTorch threads stay two) with its environment, then the
table gives its result, its wall time and the worst differences from its parity report. A
suite tuned to one machine's rounding fails here: PyTorch's SIMD level, XLA's instruction
set, the thread count and the order of the batch each move the last bits of every sum.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "torch SIMD avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "torch SIMD none": {"ATEN_CPU_CAPABILITY": "default"},
    "XLA ISA AVX": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX"},
    "one thread": ONE_THREAD,
    "batch reversed": {"PARITY_BATCH_ORDER": "reversed"},
    # what CI runs besides the default: every change at once
    "ci": {"ATEN_CPU_CAPABILITY": "avx2", "PARITY_BATCH_ORDER": "reversed", **ONE_THREAD,
           "XLA_FLAGS": "--xla_cpu_max_isa=AVX2 " + ONE_THREAD["XLA_FLAGS"]},
}
GROUPS = {  # column -> the report quantities whose worst value it shows
    "quantizer": r"quantizer (z_q|codebook|commitment)", "forward": r"forward ",
    "gradients": r"gradient (?!of a bias)", "batchnorm": r"batchnorm ",
    "train f64 terms": r"training float64 \w+ \(", "train f64 weights": r"training float64 final",
    "train f32 loss": r"training float32 loss", "2 devices": r"data-parallel float64",
    "near-ties aligned": r"argmin near-ties",
    "ReLU ties aligned": r"ReLU kink ties",
}


def run(name: str, pytest_args: list[str], report: Path) -> dict:
    env = {**os.environ, **SETTINGS[name]}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "parity_tests", "-q", "-n", "0",
                           "-p", "no:cacheprovider", "--parity-device", "cpu",
                           f"--parity-report={report}", *pytest_args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    worst = json.loads(report.read_text()).get("cpu", {}) if report.exists() else {}
    return {"setting": name, "env": SETTINGS[name], "exit": done.returncode,
            "summary": re.sub(r"=+", "", summary).strip(),
            "wall_s": round(time.perf_counter() - start, 1), "worst": worst,
            "failures": [line for line in done.stdout.splitlines()
                         if line.startswith(("FAILED", "ERROR"))]}


def worst(report: dict[str, float], pattern: str) -> float:
    values = [v for quantity, v in report.items() if re.match(pattern, quantity)]
    return max(values, default=float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SETTINGS, help="run these settings only")
    parser.add_argument("--json", help="also write every result here")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.only or SETTINGS):
            result = run(name, pytest_args, Path(tmp) / f"report{i}.json")
            results.append(result)
            print(f"{name:16} exit {result['exit']}  {result['wall_s']:7.1f} s  "
                  f"{result['summary']}", flush=True)
            for failure in result["failures"]:
                print(f"    {failure}")
    print("\n| setting | result | wall s | " + " | ".join(GROUPS) + " |")
    print("|---" * (3 + len(GROUPS)) + "|")
    for r in results:
        figures = " | ".join(f"{worst(r['worst'], pattern):.3g}" for pattern in GROUPS.values())
        print(f"| {r['setting']} | {r['summary']} | {r['wall_s']} | {figures} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return max(r["exit"] for r in results)


if __name__ == "__main__":
    sys.exit(main())
