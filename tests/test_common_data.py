import logging
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vqvae_common import atomic, data
from vqvae_common.errors import UserError

N = 50


@pytest.fixture
def mock_load(monkeypatch, tmp_path):
    """data.load under tfds mock data. mock_data leaves builder.is_prepared() False, so
    load would try to prepare (download) the dataset: that step is replaced by a no-op."""
    monkeypatch.setattr(data, "_prepare", lambda *args: None)

    def load(name, split="train"):
        with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
            return data.load(name, split, str(tmp_path))
    return load


@pytest.fixture
def mnist(mock_load):
    return mock_load("mnist")


def _indices(batch, images):
    """Which rows of `images` a float batch holds, recovered from its pixels."""
    row = {img.tobytes(): i for i, img in enumerate(images)}
    as_uint8 = np.rint((batch + 1.0) * 127.5).astype(np.uint8)
    return [row[img.tobytes()] for img in as_uint8]


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_mock_data(mock_load, name, shape):
    images = mock_load(name)
    assert images.dtype == np.uint8
    assert images.shape == (N, *shape)
    assert images.std() > 0


def test_to_float_maps_0_255_onto_minus1_1():
    out = data.to_float(np.array([0, 255, 51], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 1.0, -0.6], atol=1e-7)
    assert out[0] == -1.0 and out[1] == 1.0


def test_batches_are_full_float_batches_of_distinct_images(mnist):
    out = list(data.batches(mnist, 8, seed=0, epoch=0))
    assert len(out) == N // 8 == data.steps_per_epoch(N, 8)
    for batch in out:
        assert batch.dtype == np.float32 and batch.shape == (8, 28, 28, 1)
        assert batch.min() >= -1.0 and batch.max() <= 1.0
    seen = [i for batch in out for i in _indices(batch, mnist)]
    assert len(set(seen)) == len(seen) == 48


def test_order_depends_on_seed_and_epoch_only(mnist):
    def order(seed, epoch):
        return [i for b in data.batches(mnist, 8, seed, epoch) for i in _indices(b, mnist)]

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2)
    assert order(3, 1) != order(4, 1)
    assert order(3, 1) != sorted(order(3, 1))


def test_skip_resumes_mid_epoch(mnist):
    full = list(data.batches(mnist, 8, seed=1, epoch=2))
    resumed = list(data.batches(mnist, 8, seed=1, epoch=2, skip=4))
    assert len(resumed) == len(full) - 4
    for a, b in zip(resumed, full[4:]):
        np.testing.assert_array_equal(a, b)


def test_eval_batches_cover_every_image_in_order(mnist):
    out = list(data.eval_batches(mnist, 16))
    assert [len(b) for b in out] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate(out), data.to_float(mnist))


class BarRecorder:  # tqdm, recorded
    bars: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates = kwargs, []
        BarRecorder.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def update(self, n):
        self.updates.append(n)


@pytest.mark.parametrize("progress", ["evaluate", None])
def test_eval_batches_count_their_images_on_a_progress_bar(monkeypatch, mnist, progress):
    """evaluate.py's pass over a test split and a prior's code extraction take minutes on a
    CPU: the bar counts images, and shows only where a label is given."""
    monkeypatch.setattr(data, "tqdm", BarRecorder)
    BarRecorder.bars = []
    list(data.eval_batches(mnist, 16, progress))
    [bar] = BarRecorder.bars
    assert (bar.kwargs["total"], bar.kwargs["desc"], bar.kwargs["disable"]) == (
        50, progress, progress is None)
    assert bar.updates == [16, 16, 16, 2]


def test_missing_data_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_online", lambda *args: False)
    start = time.perf_counter()
    with pytest.raises(UserError, match="--data-dir") as info:
        data.load("mnist", "test", str(tmp_path))
    assert time.perf_counter() - start < 3.0
    assert "TFDS_DATA_DIR" in str(info.value) and str(tmp_path) in str(info.value)


def test_missing_data_logs_nothing_before_the_one_line_message(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(data, "_online", lambda *args: False)
    with pytest.raises(UserError):
        data.load("mnist", "test", str(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_missing_data_via_env_var(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_online", lambda *args: False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path)):
        data.load("mnist", "test")


def test_a_data_dir_that_is_a_file_is_a_user_error(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("")
    with pytest.raises(UserError, match="not a directory"):
        data.load("mnist", "test", str(path))


def test_images_of_the_wrong_shape_are_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_prepare", lambda *args: None)
    rgb = [{"image": np.zeros((28, 28, 3), np.uint8)}] * 4
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: rgb)
    with pytest.raises(UserError, match=r"shape \(28, 28, 3\), expected \(28, 28, 1\)"):
        data.load("mnist", "test", str(tmp_path))


def test_a_damaged_record_file_is_a_user_error(real_data_dir, tmp_path):
    """The real MNIST's metadata beside the first 100 kB of its test records."""
    source = os.path.join(real_data_dir("mnist"), "mnist")
    version = sorted(os.listdir(source))[-1]
    target = tmp_path / "mnist" / version
    target.mkdir(parents=True)
    for name in os.listdir(os.path.join(source, version)):
        with open(os.path.join(source, version, name), "rb") as f:
            head = f.read() if name.endswith(".json") else f.read(100_000)
        (target / name).write_bytes(head)
    with pytest.raises(UserError, match="prepare it again"):
        data.load("mnist", "test", str(tmp_path))


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="nope"):
        data.load("nope", "test")


def test_resolve_data_dir_precedence(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
    assert data.resolve_data_dir("/explicit") == "/explicit"
    assert data.resolve_data_dir(None) == "/from/env"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.resolve_data_dir(None).endswith("tensorflow_datasets")


@pytest.fixture(scope="module")
def real_mnist_test(real_data_dir):
    return data.load("mnist", "test", real_data_dir("mnist"))


def test_real_mnist_test_split(real_mnist_test):
    images = real_mnist_test
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert (images.min(), images.max()) == (0, 255)
    assert images.mean() == pytest.approx(33.79, abs=0.01)  # the official test split's mean


def test_real_mnist_seeded_order(real_mnist_test):
    first = [b for _, b in zip(range(3), data.batches(real_mnist_test, 64, seed=0, epoch=0))]
    again = [b for _, b in zip(range(3), data.batches(real_mnist_test, 64, seed=0, epoch=0))]
    order = np.random.default_rng([0, 0]).permutation(10000)  # the documented order
    for i, (a, b) in enumerate(zip(first, again)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, data.to_float(real_mnist_test[order[i * 64:(i + 1) * 64]]))
    other = next(data.batches(real_mnist_test, 64, seed=0, epoch=1))
    assert not np.array_equal(first[0], other)


def test_real_cifar10_test_split(real_data_dir):
    images = data.load("cifar10", "test", real_data_dir("cifar10"))
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_allclose(images.reshape(-1, 3).mean(0), [126.0, 123.7, 114.8], atol=1.0)


def test_a_decoded_split_is_cached_and_read_back_without_decoding(real_data_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    decoded = data.load("mnist", "test", real_data_dir("mnist"))
    (cached,) = (tmp_path / "vqvae_twins").iterdir()
    assert cached.name.startswith("mnist-test-") and cached.suffix == ".npy"

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode", no_decoding)
    np.testing.assert_array_equal(data.load("mnist", "test", real_data_dir("mnist")), decoded)


def test_a_cut_short_or_unwritable_cache_only_costs_a_decode(real_data_dir, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    decoded = data.load("mnist", "test", real_data_dir("mnist"))
    (cached,) = (tmp_path / "vqvae_twins").iterdir()
    cached.write_bytes(cached.read_bytes()[:1000])  # a copy cut short
    np.testing.assert_array_equal(data.load("mnist", "test", real_data_dir("mnist")), decoded)
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/vqvae-cannot-write-here")
    np.testing.assert_array_equal(data.load("mnist", "test", real_data_dir("mnist")), decoded)


def test_a_new_version_of_a_cached_source_replaces_only_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "vqvae_twins"
    folder.mkdir()
    (folder / "mnist-test-0123456789abcdef.npy").write_bytes(b"")  # named as before stop 40
    written = [data.cache_file(kind, source, version) for kind, source, version in [
        ("mnist-test", "/a", 1), ("mnist-test", "/b", 1), ("mnist-test-label", "/a", 1),
        ("codes-mnist-test", "/a", 1), ("mnist-test", "/a", 2)]]
    for path in written[:-1]:
        data.write_cache(path, np.zeros(3))
    cut_short = written[0] + atomic.SUFFIX  # a write of version 1 that a kill ended
    open(cut_short, "wb").close()
    data.write_cache(written[-1], np.zeros(3))
    assert set(os.listdir(folder)) == {os.path.basename(path) for path in written[1:]}
    data.write_cache(str(folder / "not-named-by-cache-file.npy"), np.zeros(3))  # no error


def test_check_floats_refuses_integers_and_takes_every_float_bfloat16_included():
    """numpy does not count bfloat16 as floating: an issubdtype check refused it."""
    import ml_dtypes

    for dtype in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16):
        data.check_floats(np.zeros(2, dtype))
    for dtype in (np.uint8, np.int32, bool, np.complex64):
        with pytest.raises(ValueError, match=f"a batch of {np.dtype(dtype)} values"):
            data.check_floats(np.zeros(2, dtype))
