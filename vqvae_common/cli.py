"""The one command line both train_torch.py and train_jax.py accept, and the main() wrapper
that turns a UserError into one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, NoReturn, Sequence

from vqvae_common import config as cfg
from vqvae_common.errors import UserError

_DEFAULT = cfg.TrainConfig()
_MODEL = cfg.ModelConfig()


class UserErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser(framework: str) -> argparse.ArgumentParser:
    p = UserErrorParser(
        prog=f"train_{framework}.py",
        description=f"Train a VQ-VAE (van den Oord et al. 2017) in {framework} on MNIST or "
                    "CIFAR-10. Writes config.json, metrics.jsonl, TensorBoard events, a "
                    "checkpoint, reconstruction.png and interpolation.gif into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=cfg.DATASETS, default=_DEFAULT.dataset,
                   help="dataset and model preset (mnist: D=128, cifar10: D=256)")
    p.add_argument("--data-dir", default=None,
                   help="tfds data directory holding the prepared dataset "
                        "(default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    p.add_argument("--epochs", type=int, default=_DEFAULT.epochs)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=_DEFAULT.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=_DEFAULT.eval_batch_size)
    p.add_argument("--lr", type=float, default=_DEFAULT.lr, help="Adam learning rate")
    p.add_argument("--beta", type=float, default=argparse.SUPPRESS,
                   help=f"commitment weight (default {_MODEL.beta} as the seed; the paper "
                        f"uses 0.25)")
    p.add_argument("--num-codes", type=int, default=argparse.SUPPRESS,
                   help=f"codebook size K (default {_MODEL.num_codes})")
    p.add_argument("--hidden", type=int, default=argparse.SUPPRESS,
                   help="hidden and embedding width D (default: the preset's)")
    p.add_argument("--restart-below", type=float, default=argparse.SUPPRESS,
                   help="after each step, move a code onto an encoder output of the batch "
                        "when its moving-average share of the vectors is below this fraction "
                        f"of the uniform share 1/K (default {_MODEL.restart_below}; the first "
                        "step so re-initialises the codebook from data); 0 never restarts, "
                        "as in the paper")
    p.add_argument("--seed", type=int, default=_DEFAULT.seed)
    p.add_argument("--out", default=_DEFAULT.out, help="output directory")
    p.add_argument("--device", default=_DEFAULT.device,
                   help="auto (an accelerator when present), cpu, cuda or gpu")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out")
    p.add_argument("--log-every", type=int, default=_DEFAULT.log_every,
                   help="steps between logged metrics (the only host syncs)")
    p.add_argument("--checkpoint-every", type=int, default=_DEFAULT.checkpoint_every,
                   help="steps between checkpoints (one is also written each epoch)")
    return p


_BOUNDS = {  # flag: (low, high), inclusive; an absurd value is as wrong as a negative one
    "epochs": (1, 100_000), "max_steps": (1, 10**9), "batch_size": (1, 65_536),
    "eval_batch_size": (1, 65_536), "lr": (1e-8, 1.0), "beta": (0.0, 100.0),
    "restart_below": (0.0, 0.5),
    "num_codes": (1, 1 << 20), "hidden": (1, 4096), "seed": (0, 2**32 - 1),
    "log_every": (1, 10**9), "checkpoint_every": (1, 10**9),
}


def parse(framework: str, argv: Sequence[str] | None = None
          ) -> tuple[cfg.ModelConfig, cfg.TrainConfig]:
    args = vars(build_parser(framework).parse_args(argv))
    for name, (low, high) in _BOUNDS.items():
        value = args.get(name)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value} is out of range: expected {low} to {high}")
    preset = cfg.PRESETS[args["dataset"]]
    model_flags = {k: args.pop(k) for k in ("hidden", "num_codes", "beta", "restart_below")
                   if k in args}  # absent unless given: the preset's value stands
    model = dataclasses.replace(preset, **model_flags)
    return model, cfg.TrainConfig(**args)


def one_line(error: Exception) -> str:
    """The message with every run of whitespace, newlines included, made one space."""
    return " ".join(str(error).split())


def report_errors(run: Callable[[], object]) -> int:
    """Call `run`: a UserError becomes one line on stderr and exit status 2, Ctrl-C status 130."""
    try:
        run()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


def main(framework: str, fit: Callable[[cfg.ModelConfig, cfg.TrainConfig], object],
         argv: Sequence[str] | None = None) -> int:
    """A trainer's entry point: parse the flags, then `fit`, reporting user errors."""
    return report_errors(lambda: fit(*parse(framework, argv)))
