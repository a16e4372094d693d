"""The prior over a trained VQ-VAE's codes, framework-free: its config and flags, the masks of
its convolutions, code extraction (cached), the marginal baseline, units, the sampling noise,
and the Task through which vqvae_common.loop.fit trains it. Each twin's prior.py holds the
gated PixelCNN itself and its equations; prior_train.py its PriorTwin.

A prior twin implements, beside the Twin basics of vqvae_common.loop (checkpoint_name,
config, has_checkpoint, remove_partial_checkpoints, train_step, fetch, save, load):

    codes(images (B, H, W, C) in [-1, 1]) -> (B, h, w) int32, the frozen VQ-VAE's code maps
    evaluate((codes, labels)) -> {"loss": mean NLL in nats per code}
    sample(labels (N,), gumbel (N, h, w, K)) -> (N, h, w) int32 codes
    decode_codes(codes (N, h, w)) -> images (N, H, W, C) in [-1, 1]

Units: the NLL of a code map is reported in nats per code (the training loss) and in bits
per image, the code map's h * w codes together: nats * h * w / ln 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vqvae_common import config as cfg
from vqvae_common import data, images
from vqvae_common.config import flag
from vqvae_common.errors import UserError

SAMPLES_PER_ROW = 8
SAMPLE_SEED = 0
# Laplace smoothing of the marginal baseline's counts: a code never seen at a position in
# training still has a finite NLL in test
BASELINE_PSEUDOCOUNT = 1.0
# What `train_X.py prior` defaults to where a VQ-VAE's training default does not fit
TRAIN_DEFAULTS = {"lr": 1e-3, "lr_schedule": "constant", "epochs": 20}


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The gated PixelCNN's shape, and the VQ-VAE and dataset whose codes it models.

    dataset, num_codes and vqvae_weights are not flags: `complete` takes them from --dataset
    and the VQ-VAE.
    """

    vqvae: str | None = flag(
        None, "the trained VQ-VAE whose codes the prior models (required): a PyTorch "
              "checkpoint file for train_torch.py, a Flax checkpoint directory for "
              "train_jax.py (python convert.py makes either from the other)")
    channels: int = flag(32, "width F of the vertical and horizontal stacks", (1, 4096))
    layers: int = flag(8, "gated layers (the receptive field grows by (k - 1) / 2 rows "
                           "and columns per layer)", (1, 200))
    kernel_size: int = flag(3, "odd k: the vertical stack's masked k x k and the horizontal "
                               "stack's masked 1 x k convolutions", (3, 31))
    conditional: bool = flag(False, "condition on the class label (a learned bias per class "
                                    "in every gated layer): sample grids then hold one class "
                                    "per row")
    dataset: str = "mnist"
    num_codes: int = 0
    # fingerprint() of the VQ-VAE's weights: a VQ-VAE trained on, or another one at the same
    # path, gives its codes other meanings. "" (unknown) in priors saved before it existed.
    vqvae_weights: str = ""

    def __post_init__(self) -> None:
        cfg.check_flags(self)

    @property
    def code_shape(self) -> tuple[int, int]:
        return cfg.DATASETS[self.dataset].code_shape

    @property
    def num_classes(self) -> int:
        """Classes conditioned on, 0 when unconditional."""
        return cfg.DATASETS[self.dataset].classes if self.conditional else 0


def prior_config(raw: Any) -> PriorConfig:
    """The PriorConfig a checkpoint recorded; a UserError if it is not one of this project's."""
    try:
        return PriorConfig(**raw)
    except (TypeError, ValueError) as e:
        raise UserError(f"the checkpoint records an unknown prior config {raw!r}") from e


def fingerprint(weights: Mapping[str, np.ndarray]) -> str:
    """A hash of a VQ-VAE's weights in PyTorch's convention (each twin's export_arrays, and
    vqvae_common.layout for the Flax twin's): the same for a checkpoint and its conversion,
    which is bit-identical, and different for any other weights."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        array = np.ascontiguousarray(weights[key])
        digest.update(f"{key} {array.dtype} {array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def complete(prior_cfg: PriorConfig, vqvae_cfg: cfg.ModelConfig, dataset: str,
             vqvae_weights: str) -> PriorConfig:
    """`prior_cfg` with the dataset and the VQ-VAE's K and fingerprint, checked to fit
    together (a saved prior's K must be its VQ-VAE's). A saved prior's config (its own
    fingerprint recorded) over a VQ-VAE of other weights gets a warning: sampling may go on
    (nothing is written but the samples), with codes that VQ-VAE did not learn."""
    if prior_cfg.kernel_size % 2 == 0:
        raise UserError(f"--kernel-size {prior_cfg.kernel_size} must be odd: the masks "
                        f"centre on the current position")
    channels = cfg.DATASETS[dataset].image_shape[2]
    if vqvae_cfg.in_channels != channels:
        raise UserError(f"the VQ-VAE {prior_cfg.vqvae} takes {vqvae_cfg.in_channels}-channel "
                        f"images and {dataset} has {channels}: a prior and its VQ-VAE are of "
                        f"one dataset")
    if prior_cfg.num_codes not in (0, vqvae_cfg.num_codes):  # 0: a new prior's, not yet known
        raise UserError(f"the prior models {prior_cfg.num_codes} codes and the VQ-VAE "
                        f"{prior_cfg.vqvae} has {vqvae_cfg.num_codes}: pass the VQ-VAE the "
                        f"prior was trained over (or a conversion of it)")
    if prior_cfg.vqvae_weights not in ("", vqvae_weights):
        print(f"warning: the VQ-VAE {prior_cfg.vqvae} is not the one the prior was trained over "
              f"(other weights: trained on since, or another model): its samples decode codes "
              f"this VQ-VAE did not learn", file=sys.stderr)
    return dataclasses.replace(prior_cfg, dataset=dataset, num_codes=vqvae_cfg.num_codes,
                               vqvae_weights=vqvae_weights)


def decoding_vqvae(recorded: PriorConfig, vqvae: str | None, prior_path: str) -> PriorConfig:
    """The saved prior's config over the VQ-VAE it decodes with: `vqvae` where given, else
    the one its checkpoint records, which must still be there."""
    if vqvae is None and not os.path.exists(recorded.vqvae):
        raise UserError(f"{prior_path} was trained over the VQ-VAE at {recorded.vqvae}, which "
                        f"is not there: pass --vqvae")
    return dataclasses.replace(recorded, vqvae=vqvae or recorded.vqvae)


def masks(kernel_size: int, first: bool) -> tuple[np.ndarray, np.ndarray]:
    """The 0/1 float32 masks of one gated layer's convolutions, centre c = k // 2:
    (vertical (k, k), horizontal (1, k)).

        vertical:   the rows above the centre, all k columns; in later layers the centre
                    row too (the vertical features of row i then depend on rows < i only,
                    so the horizontal stack may take them unshifted)
        horizontal: the columns left of the centre; in later layers the centre too

    In the first layer neither reaches the centre: no position sees its own code.
    """
    c = kernel_size // 2
    vertical = np.zeros((kernel_size, kernel_size), np.float32)
    vertical[:c if first else c + 1] = 1
    horizontal = np.zeros((1, kernel_size), np.float32)
    horizontal[0, :c if first else c + 1] = 1
    return vertical, horizontal


def bits_per_image(nats_per_code: float, code_shape: tuple[int, int]) -> float:
    return nats_per_code * code_shape[0] * code_shape[1] / math.log(2)


def marginal_nll(train_codes: np.ndarray, test_codes: np.ndarray, num_codes: int) -> float:
    """Nats per code of the baseline that predicts, at each position, the code frequencies
    of the training codes at that position (Laplace-smoothed by BASELINE_PSEUDOCOUNT)."""
    n, h, w = train_codes.shape
    position = np.arange(h * w)
    counts = np.zeros((h * w, num_codes))
    np.add.at(counts, (np.broadcast_to(position, (n, h * w)), train_codes.reshape(n, -1)), 1)
    p = (counts + BASELINE_PSEUDOCOUNT) / (n + BASELINE_PSEUDOCOUNT * num_codes)
    return float(-np.log(p[position, test_codes.reshape(len(test_codes), -1)]).mean())


def gumbel_noise(seed: int, count: int, code_shape: tuple[int, int],
                 num_codes: int) -> np.ndarray:
    """(count, h, w, K) float32 standard Gumbel noise from `seed`: both twins sample
    code = argmax_k(logits_k + g_k) from the same draws, which is a draw of softmax(logits)."""
    u = np.random.default_rng(seed).uniform(size=(count, *code_shape, num_codes))
    return (-np.log(-np.log(np.maximum(u, np.finfo(np.float64).tiny)))).astype(np.float32)


def sample_labels(count: int, num_classes: int) -> np.ndarray:
    """(count,) int32: class c for the c-th of num_classes equal runs (a grid's rows), or
    zeros when unconditional."""
    if num_classes == 0:
        return np.zeros(count, np.int32)
    return np.repeat(np.arange(num_classes, dtype=np.int32), -(-count // num_classes))[:count]


def write_samples(twin: Any, count: int, seed: int, path: str) -> np.ndarray:
    """Sample `count` code maps from `seed`'s noise, decode them and write the grid PNG (one
    class per row when conditional: `count` a multiple of the classes); returns the codes."""
    config: PriorConfig = twin.config
    if config.num_classes and count % config.num_classes:  # rows of unequal classes
        raise UserError(f"{count} samples: the prior is class-conditional, one row of samples "
                        f"per class: choose a multiple of {config.num_classes}")
    per_row = count // config.num_classes if config.num_classes else SAMPLES_PER_ROW
    labels = sample_labels(count, config.num_classes)
    codes = twin.sample(labels, gumbel_noise(seed, count, config.code_shape, config.num_codes))
    images.sample_grid(twin.decode_codes(codes), path, per_row)
    return codes


@dataclasses.dataclass
class Labelled:
    """A split's examples (N, ...), its uint8 images or its code maps (N, h, w) int32, and
    their class labels (N,) int32 (zeros when the prior is unconditional); its length is N."""

    examples: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.examples[rows], self.labels[rows]


def extract_codes(codes_of: Callable[[np.ndarray], np.ndarray], split_images: np.ndarray,
                  batch_size: int, cache: str | None) -> np.ndarray:
    """The code maps of a split's uint8 images, by `codes_of` in batches, kept in `cache`
    (a .npy path; None: not kept) so that each split is encoded once per VQ-VAE."""
    cached = data.read_cache(cache)
    if cached is not None and len(cached) == len(split_images):
        return cached
    codes = np.concatenate([np.asarray(codes_of(batch), np.int32) for batch in
                            data.eval_batches(split_images, batch_size, "codes")])
    data.write_cache(cache, codes)
    return codes


def codes_cache(framework: str, vqvae: str, dataset: str, split: str,
                data_dir: str | None) -> str | None:
    """Where the codes of `split` under the VQ-VAE checkpoint `vqvae` are cached: its source
    is the framework (near-ties may round apart), the checkpoint's path and the data
    directory; its version every file of the checkpoint, by path, size and modification
    time (a checkpoint trained on replaces its codes)."""
    path = os.path.realpath(vqvae)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    source = (framework, path, os.path.realpath(data.resolve_data_dir(data_dir)))
    return data.cache_file(f"codes-{dataset}-{split}", source, stats)


class PriorTask:
    """vqvae_common.loop's Task for a prior: codes of the frozen VQ-VAE in, NLL out, sample
    grids as the epoch's picture."""

    kind = "prior"
    progress_keys = ("loss",)
    pictures = cfg.PICTURES[kind]
    first_step_flags = ()

    def __init__(self, framework: str, prior_cfg: PriorConfig, train_cfg: cfg.TrainConfig
                 ) -> None:
        self.framework, self.prior_cfg, self.train_cfg = framework, prior_cfg, train_cfg
        self.baseline = math.nan

    def load(self, split: str) -> Labelled:
        """The split's uint8 images, and its labels when the prior is conditional."""
        dataset, data_dir = self.train_cfg.dataset, self.train_cfg.data_dir
        split_images = data.load(dataset, split, data_dir)
        labels = (data.load(dataset, split, data_dir, feature="label")
                  if self.prior_cfg.conditional else np.zeros(len(split_images)))
        rows = slice(self.train_cfg.eval_images) if split == "test" else slice(None)
        return Labelled(split_images[rows], labels[rows].astype(np.int32))

    def start(self, twin: Any, train: Labelled, test: Labelled, resume: bool, main: bool
              ) -> tuple[Labelled, Labelled]:
        sets = []
        for split, images_of_split in (("train", train), ("test", test)):
            if main:
                print(f"codes: {split} split through the VQ-VAE {twin.config.vqvae}",
                      file=sys.stderr)
            cache = codes_cache(self.framework, self.prior_cfg.vqvae, self.train_cfg.dataset,
                                split, self.train_cfg.data_dir)
            codes = extract_codes(twin.codes, images_of_split.examples,
                                  self.train_cfg.eval_batch_size, cache)
            sets.append(Labelled(codes, images_of_split.labels))
        self.baseline = marginal_nll(sets[0].examples, sets[1].examples,
                                     twin.config.num_codes)
        return sets[0], sets[1]

    def batches(self, train: Labelled, epoch: int, skip: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows in data.batch_rows(len(train), self.train_cfg.batch_size,
                                    self.train_cfg.seed, epoch, skip):
            yield train.batch(rows)

    def evaluate(self, twin: Any, test: Labelled) -> dict[str, float]:
        total = 0.0
        for start in range(0, len(test), self.train_cfg.eval_batch_size):
            rows = np.arange(start, min(start + self.train_cfg.eval_batch_size, len(test)))
            total += twin.evaluate(test.batch(rows))["loss"] * len(rows)
        nats = total / len(test)
        shape = twin.config.code_shape
        return {"nll_nats_per_code": nats, "nll_bits_per_image": bits_per_image(nats, shape),
                "baseline_nats_per_code": self.baseline,
                "baseline_bits_per_image": bits_per_image(self.baseline, shape)}

    def summary(self, metrics: dict[str, float]) -> str:
        return (f"test NLL {metrics['nll_nats_per_code']:.4f} nats/code, "
                f"{metrics['nll_bits_per_image']:.1f} bits/image (marginal baseline "
                f"{metrics['baseline_nats_per_code']:.4f}, "
                f"{metrics['baseline_bits_per_image']:.1f})")

    def write_artifacts(self, twin: Any, test: Labelled, out: str) -> None:
        count = (10 * twin.config.num_classes if twin.config.num_classes
                 else SAMPLES_PER_ROW * SAMPLES_PER_ROW)
        write_samples(twin, count, SAMPLE_SEED, os.path.join(out, self.pictures[0]))
