"""The quantizer's nearest-code search alone, in both twins, as K and N grow (D = 256).

    python bench/quantizer.py [--device cpu|cuda|gpu] [--quick] [--json OUT]

Each (twin, N, K) runs in a fresh process, so that one case's memory cannot hide another's:

    seconds   median over repeats of vqvae_torch.model.nearest_codes (eager) and of
              vqvae_jax.model.nearest_codes (jitted), after one warm-up call; for the
              largest case (minutes a call on a CPU) the first call's time alone
    peak MiB  memory the search needs beyond its input and output:
              torch: growth of the process's peak RSS (VmHWM) over the first call (CPU), or
                     torch.cuda.max_memory_allocated over the call (CUDA)
              flax:  XLA's own plan for the compiled call (memory_analysis temp bytes)

Both twins compute the (N, K) distances in blocks of config.DISTANCE_BLOCK entries, so the
peak stays near one block (64 MiB) however large N * K grows, against N * K * 4 bytes for the
whole distance matrix and N * K * D * 4 for a broadcast difference. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import timing  # bench/timing.py, beside this script

DIM = 256
SWEEP_K = [(16_384, k) for k in (512, 2_048, 8_192, 32_768, 65_536)]
SWEEP_N = [(n, 512) for n in (4_096, 65_536, 262_144, 1_048_576)]
HEADLINE = [(1_048_576, 65_536)]
QUICK = [(4_096, 8_192)]  # distances in blocks (DISTANCE_BLOCK), as at every large K
MIB = 1 << 20
CASE_TIMEOUT_S = 1800


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kib) * 1024


def _reset_peak_rss() -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so the next peak is the call's own; getrusage's
    ru_maxrss cannot serve, as it keeps the parent's peak across fork and exec. Where the
    kernel refuses (some sandboxes), the peak since start is the bound reported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _torch_case(n: int, k: int, device: str, repeats: int) -> dict[str, float]:
    import torch

    from vqvae_torch.model import nearest_codes

    dev = torch.device("cuda" if device in ("cuda", "gpu") else "cpu")
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(n, DIM, generator=gen).to(dev)
    codebook = torch.randn(k, DIM, generator=gen).to(dev)

    def call() -> None:
        nearest_codes(flat, codebook)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        first = timing.seconds(call)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
        first = timing.seconds(call)
        peak = _status_bytes("VmHWM") - base
    return {"seconds": timing.median_seconds(call, repeats) if repeats else first,
            "peak_bytes": float(peak)}


def _flax_case(n: int, k: int, device: str, repeats: int) -> dict[str, float]:
    import jax

    from vqvae_jax.model import nearest_codes

    dev = jax.devices("gpu" if device in ("cuda", "gpu") else "cpu")[0]
    keys = jax.random.split(jax.random.key(0))
    flat = jax.device_put(jax.random.normal(keys[0], (n, DIM)), dev)
    codebook = jax.device_put(jax.random.normal(keys[1], (k, DIM)), dev)
    compiled = jax.jit(nearest_codes).lower(flat, codebook).compile()
    peak = compiled.memory_analysis().temp_size_in_bytes
    call = lambda: compiled(flat, codebook).block_until_ready()  # noqa: E731
    first = timing.seconds(call)
    return {"seconds": timing.median_seconds(call, repeats) if repeats else first,
            "peak_bytes": float(peak)}


def measure_case(twin: str, n: int, k: int, device: str, repeats: int) -> dict[str, float]:
    """One case in a fresh interpreter; its measurements."""
    run = subprocess.run(
        [sys.executable, __file__, "--case", twin, str(n), str(k), str(repeats),
         "--device", device], capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    if run.returncode:
        raise RuntimeError(f"{twin} N={n} K={k} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def sweep(device: str, quick: bool) -> list[dict[str, float]]:
    """Both twins over the sweep (QUICK when quick); prints a table as it goes. --quick, a
    smoke run, runs both twins' case at once: mostly interpreter start-ups, its seconds are no
    measurement anyway."""
    cases = [(twin, n, k) for n, k in (QUICK if quick else SWEEP_K + SWEEP_N + HEADLINE)
             for twin in ("torch", "flax")]

    def measure(case: tuple[str, int, int]) -> dict[str, float]:
        twin, n, k = case
        repeats = 0 if n * k > 1 << 32 else 3  # 0: the first call's time alone
        return measure_case(twin, n, k, device, repeats)

    print(f"quantizer nearest-code search, D = {DIM}, device {device}")
    print(f"{'twin':6} {'N':>9} {'K':>7} {'seconds':>9} {'peak MiB':>9} "
          f"{'N*K*4 MiB':>10} {'N*K*D*4 MiB':>12}")
    rows = []
    with ThreadPoolExecutor(max_workers=2 if quick else 1) as pool:
        for (twin, n, k), figures in zip(cases, pool.map(measure, cases)):
            row = {"twin": twin, "n": n, "k": k, "dim": DIM, **figures}
            rows.append(row)
            print(f"{twin:6} {n:9} {k:7} {row['seconds']:9.3f} {row['peak_bytes'] / MIB:9.1f} "
                  f"{n * k * 4 / MIB:10.0f} {n * k * DIM * 4 / MIB:12.0f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda/gpu where present")
    parser.add_argument("--quick", action="store_true", help="one small case (CI smoke)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--case", nargs=4, metavar=("TWIN", "N", "K", "REPEATS"),
                        help=argparse.SUPPRESS)  # the child process of measure_case
    args = parser.parse_args()
    if args.case:
        twin, n, k, repeats = args.case[0], *map(int, args.case[1:])
        case = _torch_case if twin == "torch" else _flax_case
        print(json.dumps(case(n, k, args.device, repeats)))
        return
    rows = sweep(args.device, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
