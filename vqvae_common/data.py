"""Input pipeline: tfds array_record data -> uint8 NHWC in memory -> seeded float batches.

    load(name, split)                  -> uint8  (N, H, W, C), decoded once, then cached
    load(name, split, feature="label") -> int64  (N,), the same way
    batches(images, B, seed, epoch)    -> float32 (B, H, W, C) in [-1, 1], x / 127.5 - 1

The order of epoch e is the permutation drawn by numpy's generator seeded with (seed, e), so
it is the same for both twins and can be re-entered mid-epoch on resume (`skip`). Reading
goes through `tfds.data_source`, which needs no TensorFlow; only preparing a dataset that
is not on disk yet does (the `prepare` extra).

Decoding a split's PNGs takes seconds (MNIST's train split: 14 s on a 2-core CPU), so the
decoded array is kept in $XDG_CACHE_HOME/vqvae_twins (else ~/.cache/vqvae_twins), one file
per data directory, split and feature, keyed by the split's record files' names, sizes and
modification times: a re-prepared dataset is decoded again, and its new file replaces the
old. The cache is best effort: where it cannot be written, nothing fails.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import socket
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from vqvae_common import atomic
from vqvae_common.config import DATASETS
from vqvae_common.errors import UserError

_DOWNLOAD_HOST = ("storage.googleapis.com", 443)


def resolve_data_dir(data_dir: str | None) -> str:
    """--data-dir, else $TFDS_DATA_DIR, else tfds's default ~/tensorflow_datasets."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                              or "~/tensorflow_datasets")


def load(name: str, split: str, data_dir: str | None = None, feature: str = "image"
         ) -> np.ndarray:
    """All images of one split as uint8 (N, H, W, C) (or another feature of its records,
    such as "label"), preparing the dataset first if needed."""
    import tensorflow_datasets as tfds  # deferred: a slow import the CLI's --help need not pay

    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    root = resolve_data_dir(data_dir)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"data directory {root} is not a directory")
    if os.path.isdir(root) and not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"data directory {root} is not readable")
    builder = tfds.builder(name, data_dir=root)
    if not _quietly(builder.is_prepared):
        _prepare(builder, name, root)
    cache = _cache_path(builder.data_dir, name, split, feature)
    images = read_cache(cache)
    if images is None:
        images = _decode(tfds, name, split, root, feature)
        write_cache(cache, images)
    if feature == "image" and images.shape[1:] != DATASETS[name].image_shape:
        raise UserError(f"{name}/{split} in {root} has images of shape {images.shape[1:]}, "
                        f"expected {DATASETS[name].image_shape}")
    return images


def _quietly(make):
    """make(), with absl's warnings off: asking whether a dataset is prepared logs one when it
    is not ("Variant folder ... has no dataset_info.json"), ahead of our one-line message."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return make()
    finally:
        logging.set_verbosity(level)


def _decode(tfds, name: str, split: str, root: str, feature: str) -> np.ndarray:
    try:
        source = tfds.data_source(name, split=split, data_dir=root, download=False)
        # One record at a time: tfds's mock data source breaks `__getitems__` (tfds 4.9.10).
        with tqdm(range(len(source)), desc=f"decoding {name}/{split}", unit="img",
                  leave=False) as progress:
            return np.stack([source[i][feature] for i in progress])
    except (OSError, RuntimeError, ValueError, NotImplementedError) as e:
        raise UserError(f"cannot read {name}/{split} from {root} (is it damaged? prepare it "
                        f"again): {e}") from e


def _cache_path(dataset_dir: str, name: str, split: str, feature: str) -> str | None:
    """Where the decoded split is cached; None when it has no record files (mock data)."""
    records = sorted(glob.glob(os.path.join(dataset_dir, f"{name}-{split}.*")))
    if not records:
        return None
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in records]
    what = split if feature == "image" else f"{split}-{feature}"
    return cache_file(f"{name}-{what}", os.path.realpath(dataset_dir), stats)


def cache_file(kind: str, source: object, version: object) -> str:
    """The path of the cached array of `kind` (e.g. "mnist-test") made from `source` (what
    it is read from: a dataset directory) as it is now (`version`: its files' sizes and
    times): kind-HASH(source)-HASH(version).npy. A new version of a source replaces the
    old one's file when written (write_cache), so the cache holds one file per source."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "vqvae_twins", f"{kind}-{_digest(source)}-{_digest(version)}.npy")


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _older_versions(path: str) -> list[str]:
    """The cache files of other versions of `path`'s kind and source, those its kind had
    under the names of before stop 40 (kind-HASH.npy, one per version), and what writes of
    either that a kill cut short left (atomic's temporaries); none for a path not named by
    cache_file."""
    folder, name = os.path.split(path)
    named = re.fullmatch(r"(.+)-([0-9a-f]{16})-[0-9a-f]{16}\.npy", name)
    if named is None:
        return []
    kind, source = named.groups()
    older = re.compile(rf"{re.escape(kind)}-({source}-)?[0-9a-f]{{16}}\.npy"
                       rf"({re.escape(atomic.SUFFIX)})?")
    return [os.path.join(folder, other) for other in os.listdir(folder)
            if other not in (name, name + atomic.SUFFIX) and older.fullmatch(other)]


def read_cache(path: str | None) -> np.ndarray | None:
    try:
        return np.load(path) if path else None
    except (OSError, ValueError, EOFError):  # absent, unreadable or cut short: decode again
        return None


def write_cache(path: str | None, images: np.ndarray) -> None:
    """Keep `images` at `path` (cache_file's), in place of older versions of its source."""
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            np.save(f, images)  # a file, not a name: np.save would append ".npy" to tmp
        older_versions = _older_versions(path)
    except OSError:
        return
    for older in older_versions:
        with contextlib.suppress(OSError):  # another process may have removed it first
            os.remove(older)


def _prepare(builder, name: str, root: str) -> None:
    """Download and prepare through tfds, or fail at once when that cannot work here."""
    if not _online():
        raise UserError(f"{name} is not prepared in {root} and there is no network to download "
                        f"it: set --data-dir or TFDS_DATA_DIR to a tfds data directory that "
                        f"holds it")
    try:
        import tensorflow  # noqa: F401  (tfds's builders need it to prepare, not to read)
    except ImportError as e:
        raise UserError(f"{name} is not prepared in {root}; preparing it needs TensorFlow: "
                        f"pip install -e '.[prepare]'") from e
    builder.download_and_prepare(file_format="array_record")


def _online(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection(_DOWNLOAD_HOST, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def check_floats(batch: np.ndarray) -> None:
    """A ValueError where `batch` holds booleans, integers or complex numbers: the twins take
    images in [-1, 1] (to_float's) or latents, and raw uint8 images read as [0, 255] give
    garbage. (bfloat16, which numpy does not count as floating, passes.)"""
    dtype = np.dtype(batch.dtype) if hasattr(batch, "dtype") else np.asarray(batch).dtype
    if dtype.kind in "biuc":
        raise ValueError(f"a batch of {dtype} values: the model takes float images in "
                         f"[-1, 1] (vqvae_common.data.to_float) or float latents")


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return num_images // batch_size


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the images in epoch `epoch` of a run seeded `seed`."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def batch_rows(num_examples: int, batch_size: int, seed: int, epoch: int,
               skip: int = 0) -> Iterator[np.ndarray]:
    """The rows of each full shuffled batch of epoch `epoch` (the last partial batch is
    dropped), from batch `skip` on."""
    order = epoch_order(num_examples, seed, epoch)
    for i in range(skip, steps_per_epoch(num_examples, batch_size)):
        yield order[i * batch_size:(i + 1) * batch_size]


def batches(images: np.ndarray, batch_size: int, seed: int, epoch: int,
            skip: int = 0) -> Iterator[np.ndarray]:
    """Full shuffled batches of epoch `epoch` (the last partial batch is dropped), from `skip`."""
    for rows in batch_rows(len(images), batch_size, seed, epoch, skip):
        yield to_float(images[rows])


def first_images(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The first `count` images that epoch 0 trains on (fewer if the split is smaller)."""
    return to_float(images[epoch_order(len(images), seed, 0)[:count]])


def eval_batches(images: np.ndarray, batch_size: int, progress: str | None = None
                 ) -> Iterator[np.ndarray]:
    """Every image once, in order; the last batch may be smaller. `progress`: the label of
    a progress bar, shown where the pass takes over 2 s (None: no bar)."""
    with tqdm(total=len(images), desc=progress, unit="img", delay=2, leave=False,
              disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            yield to_float(images[start:start + batch_size])
            bar.update(min(batch_size, len(images) - start))
