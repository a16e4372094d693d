"""The prior level: the gated PixelCNN's logits, loss and every gradient across the twins,
its causality in each twin, and sampling from the same Gumbel noise.

Causality (vqvae_common/prior.py's masks): changing the code at position q changes the logits
at exactly the positions after q in raster order, in both twins. "Exactly": a later position
that the change does not reach is a blind spot, which the original PixelCNN's single stack of
masked convolutions has (test_a_pixelcnn_with_the_blind_spot_fails_the_causality_check).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from parity_tests import tolerances as tol
from vqvae_common import layout
from vqvae_common import prior as common
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax import prior as jax_prior
from vqvae_torch import checkpoint as torch_checkpoint
from vqvae_torch import prior as torch_prior

# K = 16 codes on 4 x 4 maps; 3 layers of k = 3 reach every earlier position of the map
TINY = common.PriorConfig(vqvae="unused", channels=8, layers=3, kernel_size=3,
                          dataset="mnist", num_codes=16)
CONFIGS = {"unconditional": TINY, "conditional": dataclasses.replace(TINY, conditional=True)}
SHAPE = (4, 4)
# a logit "changes" when it moves by more than this, relative to the largest |logit|: masked
# weights contribute exact zeros, a real path changes logits by far more
CHANGED = 1e-6


class PriorPair:
    """A PyTorch PixelCNN and the Flax one converted from its weights, on one device."""

    def __init__(self, config: common.PriorConfig, seed: int, device: str) -> None:
        torch.manual_seed(seed)
        self.torch_device = torch.device("cuda" if device == "gpu" else "cpu")
        self.jax_device = jax.devices(device)[0]
        self.torch = torch_prior.PixelCNN(config).to(self.torch_device)
        with jax.default_device(self.jax_device):  # abstract: every weight is PyTorch's
            self.flax = nnx.eval_shape(lambda: jax_prior.PixelCNN(config, rngs=nnx.Rngs(seed)))
            jax_checkpoint.import_arrays(
                self.flax, layout.torch_to_flax(torch_checkpoint.export_arrays(self.torch)))

    def torch_logits(self, codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.torch(*self._t(codes, labels))
        return logits.permute(0, 2, 3, 1).cpu().numpy()

    def flax_logits(self, codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(nnx.jit(lambda m, c, l: m(c, l))(self.flax, *self._f(codes, labels)))

    def _t(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(a.astype(np.int64)).to(self.torch_device) for a in arrays]

    def _f(self, *arrays: np.ndarray) -> list[jax.Array]:
        return [jax.device_put(a.astype(np.int32), self.jax_device) for a in arrays]

    def losses_and_grads(self, codes: np.ndarray, labels: np.ndarray
                         ) -> tuple[tuple[float, dict], tuple[float, dict]]:
        """(torch (loss, gradients), flax (loss, gradients)), gradients by PyTorch key."""
        tc, tl = self._t(codes, labels)
        self.torch.zero_grad(set_to_none=True)
        loss = torch_prior.nll(self.torch(tc, tl), tc)
        loss.backward()
        t_grads = {k: p.grad.cpu().numpy() for k, p in self.torch.named_parameters()}
        fc, fl = self._f(codes, labels)
        f_loss, grads = nnx.value_and_grad(lambda m: jax_prior.nll(m(fc, fl), fc))(self.flax)
        as_model = nnx.clone(self.flax)
        nnx.update(as_model, grads)
        f_grads = layout.flax_to_torch(jax_checkpoint.export_arrays(as_model))
        return (loss.item(), t_grads), (float(f_loss), f_grads)

    def samples(self, labels: np.ndarray, gumbel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(torch codes, flax codes) from the same labels and noise: each twin's sampler."""
        (tl,) = self._t(labels)
        t = torch_prior.sample(self.torch, tl, torch.from_numpy(gumbel).to(self.torch_device))
        graphdef, state = nnx.split(self.flax)
        f = jax.jit(lambda s, l, g: jax_prior.sample(nnx.merge(graphdef, s), l, g))(
            state, *self._f(labels), jax.device_put(gumbel, self.jax_device))
        return t.cpu().numpy(), np.asarray(f)


def inputs(config: common.PriorConfig, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.num_codes, (batch, *SHAPE)),
            rng.integers(0, max(config.num_classes, 1), batch))


def reach(logits_of, config: common.PriorConfig, seed: int = 0) -> np.ndarray:
    """(h w, h w) bool: [q, p] is whether changing the code at position q (raster order)
    changes the logits at position p, for one random code map."""
    codes, labels = inputs(config, 1, seed)
    n = SHAPE[0] * SHAPE[1]
    variants = np.repeat(codes, n + 1, axis=0).reshape(n + 1, n)
    variants[np.arange(1, n + 1), np.arange(n)] += 1
    variants %= config.num_codes
    logits = logits_of(variants.reshape(n + 1, *SHAPE), np.repeat(labels, n + 1))
    moved = np.abs(logits[1:] - logits[:1]).max(-1).reshape(n, n)
    return moved > CHANGED * np.abs(logits).max()


def causality_violations(reached: np.ndarray) -> dict[str, list[tuple[int, int]]]:
    """Against the causal order, where p is reached from q exactly when q < p: positions
    that see a later one or themselves (leaks), and earlier ones never seen (blind)."""
    n = len(reached)
    causal = np.triu(np.ones((n, n), bool), k=1)  # [q, p]: q < p
    return {"leaks": list(zip(*np.nonzero(reached & ~causal))),
            "blind": list(zip(*np.nonzero(~reached & causal)))}


@pytest.mark.parametrize("kind", CONFIGS)
def test_logits_and_loss_match(kind, device, check):
    config = CONFIGS[kind]
    pair = PriorPair(config, 0, device)
    codes, labels = inputs(config, 8, 1)
    check(f"prior logits ({kind})", pair.flax_logits(codes, labels),
          pair.torch_logits(codes, labels), tol.FORWARD)


@pytest.mark.parametrize("kind", CONFIGS)
def test_every_gradient_matches(kind, device, check):
    config = CONFIGS[kind]
    pair = PriorPair(config, 1, device)
    (t_loss, t_grads), (f_loss, f_grads) = pair.losses_and_grads(*inputs(config, 8, 2))
    check(f"prior loss ({kind})", f_loss, t_loss, tol.FORWARD)
    assert f_grads.keys() == t_grads.keys()
    # embed_codes; per layer 5 convs (the last without its residual) of weight and bias, and
    # an embed_class when conditional; conv_out1 and conv_out2
    assert len(t_grads) == 1 + 3 * (10 + config.conditional) - 2 + 4
    for key in t_grads:
        check(f"prior gradient ({kind})", f_grads[key], t_grads[key], tol.GRADIENT,
              scale=float(np.abs(t_grads[key]).max()))


@pytest.mark.parametrize("framework", ["torch", "flax"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_each_position_sees_exactly_the_earlier_ones(framework, kind, device):
    pair = PriorPair(CONFIGS[kind], 2, device)
    logits_of = pair.torch_logits if framework == "torch" else pair.flax_logits
    assert causality_violations(reach(logits_of, CONFIGS[kind])) == {"leaks": [], "blind": []}


class BlindSpotPixelCNN(torch.nn.Module):
    """The original PixelCNN (van den Oord et al. 2016a): one stack of k x k convolutions
    masked to the rows above and the left of the row (mask A, then B with the centre)."""

    def __init__(self, config: common.PriorConfig, layers: int = 6) -> None:
        super().__init__()
        k, c, f = config.kernel_size, config.kernel_size // 2, config.channels
        self.embed = torch.nn.Embedding(config.num_codes, f)
        self.convs = torch.nn.ModuleList()
        for i in range(layers):
            mask = np.zeros((k, k), np.float32)
            mask[:c] = 1
            mask[c, :c + (i > 0)] = 1
            self.convs.append(torch_prior.MaskedConv2d(f, f, mask))
        self.out = torch.nn.Conv2d(f, config.num_codes, 1)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)
        for conv in self.convs:
            x = torch.tanh(conv(x))
        return self.out(x)


def test_a_pixelcnn_with_the_blind_spot_fails_the_causality_check():
    torch.manual_seed(0)
    model = BlindSpotPixelCNN(TINY)

    def logits_of(codes, labels):
        with torch.no_grad():
            return model(torch.from_numpy(codes), None).permute(0, 2, 3, 1).numpy()

    violations = causality_violations(reach(logits_of, TINY))
    assert violations["leaks"] == []
    # e.g. position (1, 1) = 5 never sees (0, 3) = 3, up and to the right beyond its cone
    assert (3, 5) in violations["blind"]


def test_sampling_from_the_same_noise_draws_the_same_codes(device, note):
    config = CONFIGS["conditional"]  # the unconditional path differs only in the logits
    pair = PriorPair(config, 3, device)
    count = 12
    labels = common.sample_labels(count, config.num_classes)
    gumbel = common.gumbel_noise(4, count, SHAPE, config.num_codes)
    t_codes, f_codes = pair.samples(labels, gumbel)
    assert t_codes.shape == f_codes.shape == (count, *SHAPE)
    assert len(np.unique(t_codes)) > 1
    ties = near_ties_at_first_difference(pair, labels, gumbel, t_codes, f_codes)
    note("prior sampling near-ties (count)", ties)


def near_ties_at_first_difference(pair: PriorPair, labels: np.ndarray, gumbel: np.ndarray,
                                  t_codes: np.ndarray, f_codes: np.ndarray) -> int:
    """How many samples first differ at a near-tie; fails on a first difference that is not
    one. After a sample's first difference its codes may differ anywhere: they condition on
    different prefixes."""
    scores = (pair.torch_logits(t_codes, labels) + gumbel).reshape(len(t_codes), -1,
                                                                   gumbel.shape[-1])
    t_flat, f_flat = t_codes.reshape(len(t_codes), -1), f_codes.reshape(len(f_codes), -1)
    ties = 0
    for n in np.flatnonzero((t_flat != f_flat).any(1)):
        p = np.argmax(t_flat[n] != f_flat[n])
        s = scores[n, p]
        gap = s[t_flat[n, p]] - s[f_flat[n, p]]
        assert gap <= tol.SAMPLE_TIE * np.abs(s).max(), (
            f"sample {n} position {p}: torch code {t_flat[n, p]}, flax code {f_flat[n, p]}, "
            f"score gap {gap:.3g}: not a near-tie")
        ties += 1
    return ties
