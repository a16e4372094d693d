"""One report of what a machine does with this project: the parity suite on its accelerator,
the training-step benchmark, and a short real training run of each twin, written as JSON and
as Markdown tables.

    python bench/accelerator_report.py [--dataset mnist|cifar10] [--steps 500] [--out bench]
                                       [--quick]

On a GPU: `pytest parity_tests --parity-device gpu`, `bench/train_step.py --device cuda
--compile`, and train_torch.py / train_jax.py for --steps steps on the real dataset
($TFDS_DATA_DIR). Each variant's achieved FLOP/s is set against the GPU's peak dense float32
FLOP/s (PEAK_TFLOPS: the vendors' datasheet figures without tensor cores, since the parity
suite turns TF32 off and the benchmark trains in float32). Without a GPU it runs on the CPU
as a smoke test of itself; --quick makes that short (the quantizer level of the parity
suite, one window of the benchmark, 20 training steps), and CI runs it so. The exit status
is 1 when a part failed or left a figure out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# float32 without tensor cores, TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 67.0, "H100 PCIe": 51.0, "H100 NVL": 60.0, "H100": 67.0, "A100": 19.5,
               "L40S": 91.6, "L4": 30.3, "A10": 31.2, "T4": 8.1, "V100": 15.7}


def accelerator() -> tuple[str, str, float | None]:
    """(device flag, device name, peak float32 FLOP/s or None when not known)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", "cpu", None
    name = torch.cuda.get_device_name(0)
    peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
    return "cuda", name, peak and peak * 1e12


def run(command: list[str], what: str, failures: list[str]) -> subprocess.CompletedProcess:
    print(f"{what}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        failures.append(f"{what} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done


def parity(device: str, quick: bool, tmp: Path, failures: list[str]) -> dict:
    report = tmp / "parity.json"
    done = run([sys.executable, "-m", "pytest", "parity_tests", "-q", "-n", "0",
                "-p", "no:cacheprovider", "--parity-device", "gpu" if device == "cuda" else "cpu",
                f"--parity-report={report}", *(["-k", "test_quantizer"] if quick else [])],
               "parity suite", failures)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    worst = json.loads(report.read_text()) if report.exists() else {}
    return {"summary": re.sub(r"=+", "", summary).strip(), "worst": worst}


def benchmark(device: str, dataset: str, quick: bool, tmp: Path, peak: float | None,
              failures: list[str]) -> dict:
    out = tmp / "bench.json"
    run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--dataset", dataset,
         "--device", device, "--json", str(out), *(["--quick"] if quick else ["--compile"])],
        "benchmark", failures)
    if not out.exists():
        return {}
    results = json.loads(out.read_text())
    for row in results["variants"].values():
        row["fraction_of_peak"] = peak and row["gflops_per_s"] * 1e9 / peak
    return results


def train(framework: str, device: str, dataset: str, steps: int, quick: bool, tmp: Path,
          failures: list[str]) -> dict:
    out = tmp / framework
    run([sys.executable, str(ROOT / f"train_{framework}.py"), "--dataset", dataset,
         "--device", device, "--max-steps", str(steps), "--log-every", str(max(steps // 10, 1)),
         "--out", str(out), *(["--eval-images", "256", "--kmeans-images", "256"] if quick
                              else [])], f"training ({framework})", failures)
    rows = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            if (out / "metrics.jsonl").exists() else [])
    speeds = [r["images_per_s"] for r in rows if r["split"] == "train"][1:]  # 1st: compiles
    test = [r for r in rows if r["split"] == "test"]
    if not speeds or not test:
        failures.append(f"training ({framework}) logged no speed or no test metrics")
        return {}
    return {"steps": steps, "images_per_s": statistics.median(speeds), "psnr": test[-1]["psnr"],
            "codes_used": test[-1]["codes_used"]}


def markdown(report: dict) -> str:
    lines = [f"# {report['device_name']}: {report['dataset']}", "",
             f"Peak float32 FLOP/s assumed: {report['peak_flops'] or 'not known'}", "",
             "| training step | ms/step | images/s | GFLOP/s | fraction of peak |",
             "|---|---|---|---|---|"]
    for name, row in report["benchmark"].get("variants", {}).items():
        fraction = row["fraction_of_peak"]
        lines.append(f"| {name} | {row['ms_per_step']:.1f} | {row['images_per_s']:.0f} | "
                     f"{row['gflops_per_s']:.1f} | "
                     f"{'-' if fraction is None else f'{fraction:.1%}'} |")
    lines += ["", "| short training run | steps | images/s | test PSNR dB | codes used |",
              "|---|---|---|---|---|"]
    for name, row in report["training"].items():
        if row:
            lines.append(f"| {name} | {row['steps']} | {row['images_per_s']:.0f} | "
                         f"{row['psnr']:.2f} | {row['codes_used']:.1%} |")
    lines += ["", f"Parity suite: {report['parity']['summary']}", "",
              "| device | quantity | worst relative difference (or count) |", "|---|---|---|"]
    for device, quantities in report["parity"]["worst"].items():
        lines += [f"| {device} | {q} | {v:.3g} |" for q, v in sorted(quantities.items())]
    lines += ["", *[f"- FAILED: {failure}" for failure in report["failures"]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--steps", type=int, default=500, help="steps of each training run")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="folder of the report")
    parser.add_argument("--quick", action="store_true", help="the CPU smoke run CI makes")
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps
    device, name, peak = accelerator()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        report = {"device_name": name, "dataset": args.dataset, "peak_flops": peak,
                  "parity": parity(device, args.quick, tmp, failures),
                  "benchmark": benchmark(device, args.dataset, args.quick, tmp, peak, failures),
                  "training": {fw: train(fw, device, args.dataset, steps, args.quick, tmp,
                                         failures) for fw in ("torch", "jax")},
                  "failures": failures}
    if not report["parity"]["worst"] or not report["benchmark"]:
        failures.append("the parity report or the benchmark's figures are missing")
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    os.makedirs(args.out, exist_ok=True)
    base = Path(args.out) / f"accelerator_report_{slug}_{args.dataset}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2))
    base.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"written to {base}.json and .md", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
