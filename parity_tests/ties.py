"""Ties that rounding may break either way, and how every level of the suite compares the
twins across them: argmin near-ties in the quantizer, and ReLU inputs at the kink.

For an encoder vector z (one of N) and the codebook e (K, D), codes a and b are a near-tie
when, with float64 distances d_k = ||z - e_k||^2 and d* = min_k d_k,

    d_a - d* <= NEAR_TIE * max(d*, 1)   and   d_b - d* <= NEAR_TIE * max(d*, 1)

Float32 rounding decides such a tie, and rounding differs between CPUs, SIMD levels, thread
counts and GPUs: one flipped index sends a different code to the decoder, and every quantity
downstream differs. So at every level the Flax twin's quantizer runs under `follow`: it
computes its own argmin, the `Audit` records it, and the step goes on with the PyTorch twin's
index for that vector. `Audit.verify` then proves that each index where the twins differed
was a near-tie (counted in the report) and fails on any other difference. Nothing downstream
is excused: with the indices aligned, every other check runs at its full tolerance.

ReLU has the same kind of tie at 0: an input within rounding of 0 may fall on either side,
and with a batch of one a single such element moves a weight gradient by ~1%. Under
`follow_relus` each ReLU of the Flax twin takes the side PyTorch's input fell on, and the
audit fails on any sign that differs farther than FORWARD x the layer's largest |input| from 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from unittest import mock

import jax
import torch
import jax.numpy as jnp
import numpy as np

from parity_tests import tolerances as tol
from vqvae_jax import model as jax_model


def near_tie(flat: np.ndarray, codebook: np.ndarray, a: np.ndarray, b: np.ndarray
             ) -> np.ndarray:
    """For vectors flat (M, D) and code pairs a, b (M,): is each pair a near-tie? (M,) bool."""
    flat, codebook = np.asarray(flat, np.float64), np.asarray(codebook, np.float64)
    d = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)  # (M, K), M small: only disputes
    best = d.min(1)
    margin = tol.NEAR_TIE * np.maximum(best, 1.0)
    rows = np.arange(len(flat))
    return (d[rows, a] - best <= margin) & (d[rows, b] - best <= margin)


@dataclasses.dataclass
class Audit:
    """What the Flax twin's own argmin chose, against the PyTorch index it was given."""

    compared: int = 0  # vectors quantized under `follow`
    relu_flips: int = 0  # ReLU inputs on opposite sides of 0, within rounding of 0
    tie_steps: list[int] = dataclasses.field(default_factory=list)  # per index that differed
    #                at a proven near-tie: its training step, or -1
    disagreements: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    #                (training step or -1, what differed) for differences that are not ties

    def record(self, own: np.ndarray, reference: np.ndarray, flat: np.ndarray,
               codebook: np.ndarray, step: np.ndarray) -> None:
        own, reference = np.ravel(np.asarray(own)), np.ravel(np.asarray(reference))
        flat = np.asarray(flat)
        self.compared += own.size
        differ = np.flatnonzero(own != reference)
        if differ.size:
            tie = near_tie(flat[differ], codebook, own[differ], reference[differ])
            self.tie_steps += [int(step)] * int(tie.sum())
            self.disagreements += [
                (int(step), f"vector {n}: flax code {own[n]}, torch code {reference[n]}")
                for n in differ[~tie]]

    @property
    def aligned(self) -> int:
        """Indices that differed at a proven near-tie."""
        return len(self.tie_steps)

    def record_relu(self, own: np.ndarray, reference: np.ndarray) -> None:
        own, reference = np.asarray(own), np.asarray(reference)
        differ = (own > 0) != (reference > 0)
        far = differ & (np.abs(reference) > tol.FORWARD * np.abs(reference).max())
        self.relu_flips += int(differ.sum() - far.sum())
        if far.any():
            self.disagreements.append((-1, f"{int(far.sum())} ReLU inputs have opposite signs "
                                           f"away from 0"))

    def verify(self, note=None, drift_from_step: int | None = None) -> None:
        """Fail on an index difference that is not a near-tie; count the near-ties.

        drift_from_step: for float32 training, whose trajectories drift apart by design
        (test_training.py), differences from that step on are counted, not failed."""
        jax.effects_barrier()  # the callbacks of asynchronous (jitted) calls have all run
        assert self.compared > 0, "the Flax quantizer never ran under follow()"
        wrong = [message for step, message in self.disagreements
                 if drift_from_step is None or step < drift_from_step]
        drift = len(self.disagreements) - len(wrong)
        ties = [s for s in self.tie_steps if drift_from_step is None or s < drift_from_step]
        assert not wrong, (f"{len(wrong)} disagreements away from any tie (code indices, "
                           f"ReLU sides), e.g. {wrong[:3]}")
        if note is not None:
            note("argmin near-ties aligned to PyTorch's index (count)", len(ties))
            note("ReLU kink ties aligned to PyTorch's side (count)", self.relu_flips)
            if drift_from_step is not None:
                note("float32 training: indices followed after drift, not ties (count)", drift)
                note("float32 training: near-ties after drift (count)",
                     len(self.tie_steps) - len(ties))


@contextlib.contextmanager
def follow(reference: np.ndarray | jax.Array, audit: Audit,
           step: int | jax.Array = -1) -> Iterator[None]:
    """While active (and in whatever is traced meanwhile), vqvae_jax.model.nearest_codes
    records its own indices in `audit` and returns `reference`, the PyTorch twin's (N,)
    indices for the same call. Under jit, pass `reference` (and `step`, the training step
    it belongs to) as arguments: the traced function then follows each call's own."""
    own_argmin = jax_model.nearest_codes

    def nearest_codes(flat: jax.Array, codebook: jax.Array) -> jax.Array:
        own = own_argmin(flat, codebook)
        jax.debug.callback(audit.record, own, reference, flat, codebook, step)
        return jnp.asarray(reference, own.dtype).reshape(own.shape)

    with mock.patch.object(jax_model, "nearest_codes", nearest_codes):
        yield


@contextlib.contextmanager
def torch_relu_inputs() -> Iterator[list[np.ndarray]]:
    """Record the input of every ReLU call of the PyTorch twin, as NHWC numpy (its model calls
    F.relu by attribute, so patching it sees every call)."""
    inputs: list[np.ndarray] = []
    relu = torch.nn.functional.relu

    def spy(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        inputs.append(x.detach().permute(0, 2, 3, 1).cpu().numpy())
        return relu(x, *args, **kwargs)

    with mock.patch.object(torch.nn.functional, "relu", spy):
        yield inputs


@contextlib.contextmanager
def follow_relus(reference: list[np.ndarray], audit: Audit) -> Iterator[None]:
    """While active, the i-th jax.nn.relu call of the Flax twin records its input in `audit`
    and keeps the elements where reference[i], PyTorch's input to its i-th ReLU, is > 0."""
    calls = iter(reference)

    def relu(x: jax.Array) -> jax.Array:
        torch_x = next(calls, None)
        assert torch_x is not None and torch_x.shape == x.shape, "the twins' ReLUs differ"
        jax.debug.callback(audit.record_relu, x, torch_x)
        return jnp.where(torch_x > 0, x, 0)

    with mock.patch.object(jax.nn, "relu", relu):
        yield
    assert next(calls, None) is None, "the Flax twin ran fewer ReLUs than PyTorch"
