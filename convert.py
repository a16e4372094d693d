#!/usr/bin/env python
"""Convert a checkpoint of one twin into the other's format, losslessly: the model weights,
BatchNorm statistics and code usage (not the optimizer state), of a VQ-VAE or of a PixelCNN
prior (told apart by the checkpoint's record).

    python convert.py --from-torch runs/t/checkpoint.pt --out runs/t_as_flax
    python convert.py --from-jax runs/j/checkpoint --out runs/j_as_torch.pt

The source twin's checkpoint is loaded into its own model and exported as a flat numpy dict
in its own convention, vqvae_common.layout translates the dict, and the other twin imports
it into its model, each import checking every key and shape. The converted checkpoint
records the source's model config and step, and is weights-only: it can be evaluated, never
resumed.
"""
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vqvae_common import cli, layout
from vqvae_common.checkpoint_record import CheckpointRecord
from vqvae_common.errors import UserError


def models(kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(the PyTorch model's class, the Flax twin's create) of a `kind` checkpoint."""
    if kind == "prior":
        from vqvae_jax.prior_train import create
        from vqvae_torch.prior import PixelCNN
        return PixelCNN, create
    from vqvae_jax.train import create
    from vqvae_torch.model import VQVAE
    return VQVAE, create


def torch_to_flax(source: str, out: str) -> str:
    """Writes `out`; returns the kind of model converted."""
    import torch  # after parsing, as in the trainers: --help and a bad flag need neither twin
    from flax import nnx

    from vqvae_jax import checkpoint as jax_checkpoint
    from vqvae_torch import checkpoint as torch_checkpoint

    record, payload = torch_checkpoint.load(source, torch.device("cpu"), kind=None)
    kind = record.kind  # a VQ-VAE's or a prior's
    torch_model, flax_create = models(kind)
    model = torch_model(record.model_config)
    torch_checkpoint.import_arrays(model, {k: v.numpy() for k, v in payload["model"].items()})
    # an optimizer state rides along only because a Flax checkpoint's state includes one
    flax_model, optimizer = flax_create(record.model_config, lr=1e-3, seed=0)
    jax_checkpoint.import_arrays(flax_model,
                                 layout.torch_to_flax(torch_checkpoint.export_arrays(model)))
    converted = CheckpointRecord("jax", record.model_config, record.step, kind=kind,
                                 weights_only=True)
    jax_checkpoint.save(out, record.step, nnx.state((flax_model, optimizer)),
                        converted.to_dict())
    return kind


def flax_to_torch(source: str, out: str) -> str:
    """Writes `out`; returns the kind of model converted."""
    from flax import nnx

    from vqvae_jax import checkpoint as jax_checkpoint
    from vqvae_torch import checkpoint as torch_checkpoint

    source_record = jax_checkpoint.read_record(source, kind=None)
    kind, config = source_record.kind, source_record.model_config  # a VQ-VAE's or a prior's
    torch_model, flax_create = models(kind)
    flax_model, optimizer = flax_create(config, lr=1e-3, seed=0,
                                        schedule=source_record.lr_schedule)
    record, state = jax_checkpoint.load(source, config, nnx.state((flax_model, optimizer)),
                                        kind=kind)
    nnx.update((flax_model, optimizer), state)
    model = torch_model(config)
    torch_checkpoint.import_arrays(model,
                                   layout.flax_to_torch(jax_checkpoint.export_arrays(flax_model)))
    converted = CheckpointRecord("torch", config, record.step, kind=kind, weights_only=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # as orbax does
    torch_checkpoint.save(out, {**converted.to_dict(), "model": model.state_dict()})
    return kind


def run(argv: Sequence[str] | None) -> None:
    parser = cli.UserErrorParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-torch", metavar="FILE",
                        help="a PyTorch checkpoint file: a VQ-VAE's (checkpoint.pt, model.pt) "
                             "or a prior's (prior.pt)")
    source.add_argument("--from-jax", metavar="DIR",
                        help="a Flax checkpoint directory: a VQ-VAE's (checkpoint) or a "
                             "prior's (prior)")
    parser.add_argument("--out", required=True,
                        help="where to write the converted checkpoint (a new path: an existing "
                             "file or directory is never written over)")
    args = parser.parse_args(argv)
    if args.from_jax and args.out.endswith(("/", os.sep)):
        raise UserError(f"--out {args.out}: a PyTorch checkpoint is a file: give a file name")
    if args.from_torch and args.out.endswith(".pt"):
        raise UserError(f"--out {args.out}: a Flax checkpoint is a directory: give it a name "
                        f"without .pt")
    cli.check_output_file(args.out, "--out", new=True, file=bool(args.from_jax))
    converter = torch_to_flax if args.from_torch else flax_to_torch
    kind = converter(args.from_torch or args.from_jax, args.out)
    print(f"wrote {args.out}")
    if kind == "prior":
        print("a prior decodes through a VQ-VAE of its own framework: pass sample.py "
              "--vqvae, the VQ-VAE it was trained over, converted too", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.report_errors(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
