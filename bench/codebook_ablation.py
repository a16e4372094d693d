"""Which codebook recipe trains best (--study codebook): every combination of

    --codebook-update grad | ema      --restart-below 0 | 0.01      --codebook-init uniform | kmeans

or which settings around the EMA recipe (--study tuning): the commitment weight (--beta 1.0,
the seed model's, or 0.25, the paper's), --restart-below 0.01 or 0.1, a constant rate or
--lr-schedule cosine, and --lr 3e-4, 1e-3 or 2e-3 -- trained with one twin from the same seed
for the same number of epochs on the same dataset, each run's test-split figures (PSNR of
the split's MSE at each epoch's end, PSNR per 8-bit image, SSIM, perplexity, codes used) and
wall time in one table.

    python bench/codebook_ablation.py [--study codebook|tuning] [--framework torch|jax]
                                      [--dataset mnist] [--epochs 1] [--data-dir DIR]
                                      [--out runs/ablation]

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
import time

import timing  # bench/timing.py, beside this script
from vqvae_common import loop
from vqvae_common.atomic import write_atomic
from vqvae_common.config import DATASETS, ModelConfig, TrainConfig

COLUMNS = ("psnr", "psnr_8bit", "ssim", "perplexity", "codes_used")


def codebook_recipes(preset: ModelConfig) -> dict[str, tuple[ModelConfig, dict]]:
    """name -> (model config, TrainConfig fields), for every combination, at the settings
    the study was run under (the defaults of its day): beta 1.0, lr 3e-4 constant."""
    result = {}
    for update, restarts, init in itertools.product(("grad", "ema"), (False, True),
                                                    ("uniform", "kmeans")):
        name = f"{update}, {'restarts' if restarts else 'no restarts'}, {init}"
        below = 0.01 if restarts else 0.0
        result[name] = (dataclasses.replace(preset, codebook_update=update, beta=1.0,
                                            restart_below=below),
                        {"codebook_init": init, "lr": 3e-4, "lr_schedule": "constant"})
    return result


def tuning_recipes(preset: ModelConfig) -> dict[str, tuple[ModelConfig, dict]]:
    """name -> (model config, TrainConfig fields): the EMA recipe (k-means start, restarts)
    at beta 1.0, lr 3e-4 constant, then one or more of those changed."""
    ema = dataclasses.replace(preset, codebook_update="ema", restart_below=0.01, beta=1.0)
    base = {"codebook_init": "kmeans", "lr": 3e-4, "lr_schedule": "constant"}
    variants = {
        "beta 1.0, lr 3e-4 constant": ({}, {}),
        "beta 1.0, lr 3e-4 cosine": ({}, {"lr_schedule": "cosine"}),
        "beta 1.0, restart-below 0.1": ({"restart_below": 0.1}, {}),
        "beta 0.25": ({"beta": 0.25}, {}),
        "beta 0.25, restart-below 0.1, cosine": ({"beta": 0.25, "restart_below": 0.1},
                                                 {"lr_schedule": "cosine"}),
        "beta 0.25, lr 1e-3": ({"beta": 0.25}, {"lr": 1e-3}),
        "beta 0.25, lr 2e-3": ({"beta": 0.25}, {"lr": 2e-3}),
    }
    return {name: (dataclasses.replace(ema, **model), {**base, **train})
            for name, (model, train) in variants.items()}


STUDIES = {"codebook": codebook_recipes, "tuning": tuning_recipes}


def psnr_by_epoch(out: str) -> list[float]:
    """The test PSNR at each epoch's end, from the run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [row["psnr"] for row in rows if row.get("split") == "test"]


def wall_time(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def table(results: dict[str, dict[str, float]], epochs: int) -> str:
    lines = [f"| recipe (after {epochs} epoch{'s' * (epochs > 1)}) | test PSNR (dB) | "
             "PSNR per 8-bit image (dB) | SSIM | perplexity | codes used | wall time | "
             "test PSNR by epoch (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        by_epoch = ", ".join(f"{p:.2f}" for p in r.get("psnr_by_epoch", []))
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['psnr_8bit']:.2f} | {r['ssim']:.3f} | "
                     f"{r['perplexity']:.1f} | {r['codes_used']:.1%} | "
                     f"{wall_time(r.get('wall_s'))} | {by_epoch} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=tuple(STUDIES), default="codebook")
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
    for name, (model_cfg, train_fields) in STUDIES[args.study](
            DATASETS[args.dataset].preset).items():
        if name in results:
            continue
        print(f"== {name}", flush=True)
        train_cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir,
                                epochs=args.epochs, seed=args.seed, **train_fields,
                                out=os.path.join(args.out, name.replace(", ", "_")
                                                 .replace(" ", "-")))
        start = time.perf_counter()
        last = loop.fit(Twin, model_cfg, train_cfg)
        results[name] = {**{k: last[k] for k in COLUMNS},
                         "wall_s": time.perf_counter() - start,
                         "psnr_by_epoch": psnr_by_epoch(train_cfg.out)}
        write_atomic(results_path, json.dumps({
            "study": args.study, "framework": args.framework, "dataset": args.dataset,
            "epochs": args.epochs,
            "seed": args.seed, "machine": timing.machine(),
            "runs": results}, indent=2))
    text = table(results, args.epochs)
    write_atomic(os.path.join(args.out, "results.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
