"""vqvae_common.kmeans: the codebook start both twins share."""
import numpy as np
import pytest
from tqdm.auto import tqdm

from vqvae_common import config, loop
from vqvae_common import kmeans as kmeans_module
from vqvae_common.kmeans import kmeans, kmeans_plus_plus, squared_distances_argmin

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def blobs(per_centre: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + rng.normal(scale=0.5, size=(per_centre, 2)) for c in CENTRES])


def test_finds_well_separated_clusters_and_their_means():
    z = blobs()
    centres = kmeans(z, 3, seed=0)
    nearest_true = ((centres[:, None] - CENTRES) ** 2).sum(-1).argmin(1)
    assert sorted(nearest_true) == [0, 1, 2]
    means = np.stack([z[50 * i:50 * (i + 1)].mean(0) for i in nearest_true])
    np.testing.assert_allclose(centres, means, rtol=1e-12)


def test_the_same_vectors_and_seed_give_the_same_centres_bit_for_bit():
    z = np.random.default_rng(1).normal(size=(500, 4)).astype(np.float32)
    np.testing.assert_array_equal(kmeans(z, 16, seed=3), kmeans(z.copy(), 16, seed=3))
    assert not np.array_equal(kmeans(z, 16, seed=3), kmeans(z, 16, seed=4))


def test_lloyd_iterations_never_raise_the_distortion():
    z = np.random.default_rng(2).normal(size=(400, 3))

    def distortion(centres):
        return ((z - centres[squared_distances_argmin(z, centres)]) ** 2).sum()

    values = [distortion(kmeans(z, 8, seed=0, iterations=i)) for i in range(6)]
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]


def test_seeding_draws_centres_from_the_vectors():
    z = blobs(10)
    centres = kmeans_plus_plus(z, 3, np.random.default_rng(0))
    assert all((z == c).all(1).any() for c in centres)
    # proportional to the squared distance: three well-separated blobs get one centre each
    assert len({tuple(np.round(c / 10)) for c in centres}) == 3


def test_more_centres_than_distinct_vectors_still_gives_k_centres():
    z = np.ones((4, 2))
    centres = kmeans(z, 6, seed=0)
    assert centres.shape == (6, 2) and (centres == 1).all()


def test_blocked_argmin_matches_the_direct_one(monkeypatch):
    from vqvae_common import config
    monkeypatch.setattr(config, "DISTANCE_BLOCK", 7 * 37)
    rng = np.random.default_rng(3)
    z, centres = rng.normal(size=(1000, 5)), rng.normal(size=(37, 5))
    direct = ((z[:, None] - centres) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(squared_distances_argmin(z, centres), direct)


def test_seeding_reports_each_centre_it_draws():  # the progress bar of a long k-means
    drawn = []
    vectors = np.random.default_rng(0).normal(size=(100, 4))
    kmeans_plus_plus(vectors, 8, np.random.default_rng(0), lambda: drawn.append(1))
    assert len(drawn) == 7  # the first centre is a uniform draw, before any pass


def test_no_vectors_is_an_error():
    with pytest.raises(ValueError):
        kmeans(np.zeros((0, 3)), 2, seed=0)


@pytest.mark.parametrize("images, warned", [(10, True), (11, False)])
def test_a_start_with_fewer_encoder_vectors_than_codes_is_warned_of(capsys, images, warned):
    loop.warn_of_repeated_centres(images, config.DATASETS["mnist"], 512)  # 49 vectors each
    assert ("--kmeans-images 11 or more" in capsys.readouterr().err) == warned


class CodebookRecorder:  # the Twin's initialize_codebook, recorded
    config = config.ModelConfig(in_channels=1, hidden=8, num_codes=16)

    def initialize_codebook(self, images, seed, iterations, show_progress=True):
        self.show_progress = show_progress


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_reports_its_kmeans(capsys, main):
    """A data-parallel run's other processes compute the same codebook, silently: one line
    and one pair of k-means progress bars on the terminal, not one per process."""
    twin, images = CodebookRecorder(), np.zeros((40, 28, 28, 1), np.uint8)
    task = loop.Reconstruction(config.TrainConfig(kmeans_images=4))
    task.start(twin, images, images, resume=False, main=main)
    assert twin.show_progress == main
    assert ("codebook: k-means" in capsys.readouterr().err) == main


@pytest.mark.parametrize("shown", [True, False])
def test_kmeans_progress_bars_follow_show_progress(monkeypatch, shown):
    disabled = []
    monkeypatch.setattr(kmeans_module, "tqdm",
                        lambda **kwargs: disabled.append(kwargs["disable"]) or tqdm(**kwargs))
    kmeans(np.random.default_rng(0).normal(size=(50, 3)), 4, seed=0, show_progress=shown)
    assert disabled == [not shown, not shown]
