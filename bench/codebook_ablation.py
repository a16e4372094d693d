"""Which codebook recipe trains best: every combination of

    --codebook-update grad | ema      --restart-below 0 | the default      --codebook-init uniform | kmeans

trained with one twin from the same seed for the same number of epochs on the same dataset,
each run's test-split figures (PSNR of the split's MSE, PSNR per 8-bit image, SSIM,
perplexity, codes used) and wall time in one table.

    python bench/codebook_ablation.py [--framework torch|jax] [--dataset mnist] [--epochs 1]
                                      [--data-dir DIR] [--out runs/ablation]

Each run trains into --out/<name>; a run whose metrics are already in --out/results.json is
not trained again, so an interrupted ablation continues where it stopped. Prints the table and
writes results.json and results.md into --out. A measurement, never a test: run it alone on
the machine, since its wall times are part of the result.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time

from vqvae_common import loop
from vqvae_common.atomic import write_atomic
from vqvae_common.config import DATASETS, ModelConfig, TrainConfig

COLUMNS = ("psnr", "psnr_8bit", "ssim", "perplexity", "codes_used")


def recipes(preset: ModelConfig) -> dict[str, tuple[ModelConfig, str]]:
    """name -> (model config, codebook init), for every combination."""
    result = {}
    for update, restarts, init in itertools.product(("grad", "ema"), (False, True),
                                                    ("uniform", "kmeans")):
        name = f"{update}, {'restarts' if restarts else 'no restarts'}, {init}"
        below = preset.restart_below if restarts else 0.0
        result[name] = (dataclasses.replace(preset, codebook_update=update,
                                            restart_below=below), init)
    return result


def table(results: dict[str, dict[str, float]], epochs: int) -> str:
    lines = [f"| recipe (after {epochs} epoch{'s' * (epochs > 1)}) | test PSNR (dB) | "
             "PSNR per 8-bit image (dB) | SSIM | perplexity | codes used | wall time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['psnr_8bit']:.2f} | {r['ssim']:.3f} | "
                     f"{r['perplexity']:.1f} | {r['codes_used']:.1%} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=("torch", "jax"), default="torch")
    p.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/ablation")
    args = p.parse_args()
    if args.framework == "torch":
        from vqvae_torch.train import TorchTwin as Twin
    else:
        from vqvae_jax.train import JaxTwin as Twin
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)["runs"]
    for name, (model_cfg, init) in recipes(DATASETS[args.dataset].preset).items():
        if name in results:
            continue
        print(f"== {name}", flush=True)
        train_cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir,
                                epochs=args.epochs, seed=args.seed, codebook_init=init,
                                out=os.path.join(args.out, name.replace(", ", "_")
                                                 .replace(" ", "-")))
        start = time.perf_counter()
        last = loop.fit(Twin, model_cfg, train_cfg)
        results[name] = {**{k: last[k] for k in COLUMNS},
                         "wall_s": time.perf_counter() - start}
        write_atomic(results_path, json.dumps({
            "framework": args.framework, "dataset": args.dataset, "epochs": args.epochs,
            "seed": args.seed, "machine": platform.processor() or platform.machine(),
            "runs": results}, indent=2))
    text = table(results, args.epochs)
    write_atomic(os.path.join(args.out, "results.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
