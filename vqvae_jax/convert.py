"""Lossless weight conversion between the twins, and the command that converts checkpoints.

Module paths are the same in both (encoder.res1.conv1, quantizer, ...); only leaf names and
layouts differ, in this one table:

    module          PyTorch leaf (layout)              Flax leaf (layout)
    nnx.Conv        weight (O, I, kh, kw)              kernel (kh, kw, I, O)
    ConvTranspose   weight (I, O, kh, kw)              kernel (kh, kw, I, O)
    conv / convT    bias (O,)                          bias (O,)
    BatchNorm       weight, bias                       scale, bias
                    running_mean, running_var          mean, var
                    num_batches_tracked (int64)        count (int32)
    VectorQuant.    codebook (K, D), usage (K,)        codebook (K, D), usage (K,)

Every change is a transpose or an exact integer cast, so torch -> flax -> torch returns
bit-identical tensors.

    python -m vqvae_jax.convert --from-torch run/checkpoint.pt --out flax_ckpt
    python -m vqvae_jax.convert --from-jax run/checkpoint --out model.pt
"""
from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
from flax import nnx

from vqvae_common.cli import UserErrorParser, report_errors
from vqvae_common.errors import UserError
from vqvae_jax.model import VQVAE, BatchNorm, ConvTranspose, VectorQuantizer

# Flax module type -> [(torch leaf, flax leaf, torch->flax axes, dtype in torch)]
_LEAVES: dict[type, list[tuple[str, str, tuple[int, ...] | None, str | None]]] = {
    nnx.Conv: [("weight", "kernel", (2, 3, 1, 0), None), ("bias", "bias", None, None)],
    ConvTranspose: [("weight", "kernel", (2, 3, 0, 1), None), ("bias", "bias", None, None)],
    BatchNorm: [("weight", "scale", None, None), ("bias", "bias", None, None),
                ("running_mean", "mean", None, None), ("running_var", "var", None, None),
                ("num_batches_tracked", "count", None, "int64")],
    VectorQuantizer: [("codebook", "codebook", None, None), ("usage", "usage", None, None)],
}


def leaves(model: VQVAE):
    """(torch key, flax Variable, torch->flax axes, torch dtype) for every array of `model`."""
    for path, module in nnx.iter_modules(model):
        for torch_leaf, flax_leaf, axes, dtype in _LEAVES.get(type(module), []):
            key = ".".join(map(str, path + (torch_leaf,)))
            yield key, getattr(module, flax_leaf), axes, dtype


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model: VQVAE) -> None:
    """Load a PyTorch state_dict (numpy values) into `model` in place."""
    expected = {key for key, *_ in leaves(model)}
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise UserError(f"state_dict does not fit this model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    for key, variable, axes, _ in leaves(model):
        value = np.asarray(state_dict[key])
        value = value.transpose(axes) if axes else value
        if value.shape != variable[...].shape:
            raise UserError(f"{key}: shape {value.shape} (after layout change) does not fit "
                            f"the model's {variable[...].shape}; is it another config?")
        variable[...] = value.astype(variable[...].dtype)


def flax_to_torch(model: VQVAE) -> dict[str, np.ndarray]:
    """The PyTorch state_dict of `model`, as numpy arrays."""
    result = {}
    for key, variable, axes, dtype in leaves(model):
        value = np.asarray(variable[...])
        value = value.transpose(np.argsort(axes)) if axes else value
        result[key] = value.astype(dtype) if dtype else value
    return result


def _convert(argv: list[str] | None) -> None:
    import torch

    from vqvae_common.checkpoint_record import CheckpointRecord
    from vqvae_jax import checkpoint as jax_checkpoint
    from vqvae_jax.train import create
    from vqvae_torch import checkpoint as torch_checkpoint

    parser = UserErrorParser(prog="python -m vqvae_jax.convert",
                                     description="Convert VQ-VAE checkpoints between the twins "
                                                 "(model weights, BatchNorm statistics and "
                                                 "code usage).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-torch", metavar="FILE", help="a train_torch.py checkpoint.pt")
    source.add_argument("--from-jax", metavar="DIR", help="a train_jax.py checkpoint directory")
    parser.add_argument("--out", required=True, help="where to write the converted checkpoint")
    args = parser.parse_args(argv)

    if args.from_torch:
        record, payload = torch_checkpoint.load(args.from_torch, torch.device("cpu"))
        model, optimizer = create(record.model_config, lr=1e-3, seed=0)
        torch_to_flax({k: v.numpy() for k, v in payload["model"].items()}, model)
        converted = CheckpointRecord("jax", record.model_config, record.step, weights_only=True)
        jax_checkpoint.save(args.out, record.step, nnx.state((model, optimizer)),
                            converted.to_dict())
    else:
        config = jax_checkpoint.read_record(args.from_jax).model_config
        model, optimizer = create(config, lr=1e-3, seed=0)
        record, state = jax_checkpoint.load(args.from_jax, config, nnx.state((model, optimizer)))
        nnx.update((model, optimizer), state)
        converted = CheckpointRecord("torch", config, record.step, weights_only=True)
        torch_checkpoint.save(args.out, {
            **converted.to_dict(),
            "model": {k: torch.tensor(v) for k, v in flax_to_torch(model).items()}})
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    return report_errors(lambda: _convert(argv))


if __name__ == "__main__":
    sys.exit(main())
