"""The one table between the twins' weight conventions, on flat numpy dicts.

Each twin exports and imports its state as {dotted path: array} in its own convention
(vqvae_torch.checkpoint and vqvae_jax.checkpoint: export_arrays, import_arrays). Module
paths are the same in both (encoder.res1.conv1, decoder.deconv2, quantizer, ...); only some
leaves differ, by name, layout or integer width:

    module       PyTorch leaf (layout)              Flax leaf (layout)
    conv*        weight (O, I, kh, kw)              kernel (kh, kw, I, O)
    deconv*      weight (I, O, kh, kw)              kernel (kh, kw, I, O)
    bn*          weight                             scale
                 running_mean, running_var          mean, var
                 num_batches_tracked (int64)        count (int32)
    embed_*      weight (rows, features)            embedding (rows, features)
    any other    the same name and layout (conv and BatchNorm biases, quantizer.codebook
                 (K, D), quantizer.usage (K,), and an EMA codebook's quantizer.ema_counts
                 (K,) and quantizer.ema_sums (K, D))

A module's kind is read from its name (conv1, deconv2, bn1, and the prior's conv_vertical,
embed_codes, ...), as both twins name their modules. Only `weight` needs it: a convolution's
kernel, a BatchNorm's scale, an embedding's table, or a transposed convolution's kernel, the
one leaf whose layout depends on the module kind (deconv*: its PyTorch weight is
(I, O, kh, kw), where a convolution's is (O, I, kh, kw)). Every change is
a transpose or an exact integer cast, so torch -> flax -> torch returns bit-identical arrays.
A leaf the table does not name keeps its name and layout; an importing twin refuses any key
its model lacks.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from vqvae_common.errors import UserError


class Leaf(NamedTuple):
    torch: str
    flax: str
    torch_to_flax_axes: tuple[int, ...] | None = None
    dtypes: tuple[str, str] | None = None  # (torch's, Flax's) for an integer leaf


LEAVES: dict[str, tuple[Leaf, ...]] = {
    "conv": (Leaf("weight", "kernel", (2, 3, 1, 0)),),
    "deconv": (Leaf("weight", "kernel", (2, 3, 0, 1)),),
    "bn": (Leaf("weight", "scale"), Leaf("running_mean", "mean"), Leaf("running_var", "var"),
           Leaf("num_batches_tracked", "count", dtypes=("int64", "int32"))),
    "embed": (Leaf("weight", "embedding"),),
}


def _leaf(key: str, name_of: str) -> Leaf | None:
    """The table's Leaf for `key` (a dotted path whose leaf is named in the `name_of`
    convention, "torch" or "flax"), or None when it keeps its name and layout."""
    module, _, name = key.rpartition(".")
    kind = re.fullmatch(r"(deconv|conv|bn|embed)(\d*|_[a-z0-9_]+)", module.rpartition(".")[2])
    leaves = LEAVES[kind.group(1)] if kind else ()
    return next((leaf for leaf in leaves if getattr(leaf, name_of) == name), None)


def torch_to_flax(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch state_dict arrays -> the Flax twin's arrays (vqvae_jax.checkpoint)."""
    return _translate(arrays, to_flax=True)


def flax_to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Flax twin's arrays -> PyTorch state_dict arrays (vqvae_torch.checkpoint)."""
    return _translate(arrays, to_flax=False)


def _translate(arrays: Mapping[str, np.ndarray], to_flax: bool) -> dict[str, np.ndarray]:
    result = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        leaf = _leaf(key, "torch" if to_flax else "flax")
        if leaf is not None:
            axes = leaf.torch_to_flax_axes
            if axes:
                value = value.transpose(axes if to_flax else np.argsort(axes))
            if leaf.dtypes:
                value = value.astype(leaf.dtypes[to_flax])
            key = key.rpartition(".")[0] + "." + (leaf.flax if to_flax else leaf.torch)
        result[key] = value
    return result


def check_fits(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A one-line UserError unless `arrays` has exactly the keys of `shapes` (a model's
    arrays in the same convention), each of that shape."""
    missing, unexpected = shapes.keys() - arrays.keys(), arrays.keys() - shapes.keys()
    if missing or unexpected:
        raise UserError(f"the arrays do not fit this model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    for key, shape in shapes.items():
        if np.shape(arrays[key]) != tuple(shape):
            raise UserError(f"{key}: shape {np.shape(arrays[key])} does not fit the model's "
                            f"{tuple(shape)}; is it another config?")
