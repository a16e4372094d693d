import json
import math

import numpy as np
import pytest
from PIL import Image

from vqvae_common import images, metrics


def test_mse():
    assert metrics.mse(np.zeros(4), np.array([1.0, 3.0, -1.0, 1.0])) == pytest.approx(3.0)
    assert metrics.mse(np.ones((2, 3)), np.ones((2, 3))) == 0.0


def test_psnr_of_one_grey_level_per_pixel():
    # an error of one grey level (2/255 on [-1, 1]) everywhere: MSE_255 = 1, PSNR = 20 log10 255
    unit_mse = metrics.mse(np.zeros((2, 4, 4, 1)), np.full((2, 4, 4, 1), 2 / 255))
    assert unit_mse == pytest.approx((2 / 255) ** 2)
    assert metrics.psnr(unit_mse) == pytest.approx(48.1308036, abs=1e-6)


def test_psnr_of_unit_mse():
    # MSE 1 on [-1, 1] is 127.5^2 on [0, 255]: PSNR = 20 log10(255 / 127.5) = 20 log10 2
    assert metrics.psnr(1.0) == pytest.approx(6.0205999, abs=1e-6)
    assert metrics.psnr(0.25) == pytest.approx(metrics.psnr(1.0) + 6.0205999, abs=1e-6)


def test_psnr_of_a_perfect_reconstruction_is_infinite():
    assert metrics.psnr(0.0) == math.inf


def test_psnr_8bit_scores_the_rounded_levels():
    # equal after rounding to 8 bits: the cap; one level apart everywhere: 20 log10 255
    target = np.full((2, 4, 4, 1), -1.0)
    recon = target + np.array([0.4, 1.0]).reshape(2, 1, 1, 1) * 2 / 255
    np.testing.assert_allclose(metrics.psnr_8bit_per_image(target, recon),
                               [metrics.PSNR_CAP_DB, 48.1308036], atol=1e-6)


def test_ssim_of_an_image_with_itself_is_one_and_of_noise_less():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 28, 28, 1))
    np.testing.assert_allclose(metrics.ssim_per_image(x, x), 1.0, atol=1e-12)
    noisy = metrics.ssim_per_image(x, np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1))
    assert np.all(noisy < 0.99)


def test_ssim_of_two_flat_images_is_its_luminance_term():
    # no variance, no covariance: SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    mu_x, mu_y, c1 = 127.5, 191.25, (0.01 * 255) ** 2
    got = metrics.ssim_per_image(np.zeros((1, 16, 16, 3)), np.full((1, 16, 16, 3), 0.5))
    assert got[0] == pytest.approx((2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1))


def test_code_counts():
    counts = metrics.code_counts(np.array([[0, 2], [2, 2]]), 4)
    np.testing.assert_array_equal(counts, [1, 0, 3, 0])


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_perplexity_of_uniform_usage_is_k(k):
    counts = np.zeros(32, np.int64)
    counts[:k] = 7
    assert metrics.perplexity(counts) == pytest.approx(k)


def test_perplexity_of_skewed_usage():
    expected = math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))  # 1.7548
    assert metrics.perplexity(np.array([1, 0, 3])) == pytest.approx(expected)


def test_codes_used():
    assert metrics.codes_used(np.array([1, 0, 3, 0])) == 0.5
    assert metrics.codes_used(np.array([0, 0, 9])) == pytest.approx(1 / 3)


def test_to_uint8():
    out = images.to_uint8(np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0, -3.0]))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 64, 128, 191, 255, 255, 0])


def test_reconstruction_grid_layout(tmp_path):
    n, h, w, gap, scale = 5, 4, 6, 2, 3
    targets = np.full((n, h, w, 1), -1.0)
    recons = np.zeros((n, h, w, 1))
    path = tmp_path / "grid.png"
    images.reconstruction_grid(targets, recons, str(path), pairs_per_row=2, scale=scale)
    pic = Image.open(path)
    assert pic.format == "PNG" and pic.mode == "L"
    rows = 3
    assert pic.size == ((2 * (2 * w + gap) + gap) * scale, (rows * (h + gap) + gap) * scale)
    assert pic.getpixel((0, 0)) == 255
    assert pic.getpixel((gap * scale, gap * scale)) == 0
    assert pic.getpixel(((gap + w) * scale, gap * scale)) == 128
    second = gap + 2 * w + gap
    assert pic.getpixel((second * scale, gap * scale)) == 0
    assert pic.getpixel((second * scale, (2 * (h + gap) + gap) * scale)) == 255  # 5 of 6 slots


def test_reconstruction_grid_rgb(tmp_path):
    path = tmp_path / "grid.png"
    images.reconstruction_grid(np.zeros((3, 8, 8, 3)), np.zeros((3, 8, 8, 3)), str(path),
                               pairs_per_row=8, scale=1)
    pic = Image.open(path)
    assert pic.mode == "RGB" and pic.size == (8 * 18 + 2, 12)


def test_interpolation_latents():
    rng = np.random.default_rng(0)
    z_a, z_b = rng.normal(size=(2, 7, 7, 4)).astype(np.float32)
    out = images.interpolation_latents(z_a, z_b, 5)
    assert out.shape == (5, 7, 7, 4)
    np.testing.assert_array_equal(out[0], z_a)
    np.testing.assert_array_equal(out[-1], z_b)
    np.testing.assert_allclose(out[2], (z_a + z_b) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.75 * z_a + 0.25 * z_b, rtol=1e-5, atol=1e-6)


def test_interpolation_gif_walks_forward_and_back(tmp_path):
    frames = np.stack([np.full((5, 6, 1), v, np.float32) for v in (-1.0, -0.5, 0.5, 1.0)])
    path = tmp_path / "walk.gif"
    images.interpolation_gif(frames, str(path), scale=2)
    gif = Image.open(path)
    assert gif.format == "GIF" and gif.is_animated
    assert gif.n_frames == 6 and gif.size == (12, 10)
    shades = []
    for i in range(gif.n_frames):
        gif.seek(i)
        shades.append(gif.convert("L").getpixel((0, 0)))
    assert shades == [0, 64, 191, 255, 191, 64]


def test_loss_curves_plots_a_metrics_file(tmp_path):
    records = [{"split": "train", "step": s, "loss": 1 / s, "recon": 0.5 / s,
                "codebook": 0.2 / s, "commitment": 0.2 / s} for s in range(1, 20)]
    records += [{"split": "test", "step": s, "psnr": 20.0 + s} for s in (10, 19)]
    metrics_path = tmp_path / "metrics.jsonl"
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    images.loss_curves(str(metrics_path), str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.size == (1000, 360)
        assert len(np.unique(np.asarray(picture.convert("L")))) > 10  # something was drawn


def test_the_equal_codebook_and_commitment_terms_are_one_curve():
    rows = [{"loss": 1.0, "recon": 0.5, "codebook": 0.2, "commitment": 0.2}] * 2
    rows[0] = {**rows[0], "commitment": float(np.nextafter(np.float32(0.2), 1))}
    assert list(images.loss_curve_labels(rows)) == ["loss", "recon", "codebook = commitment"]
    rows[1] = {**rows[1], "commitment": 0.3}
    assert list(images.loss_curve_labels(rows)) == ["loss", "recon", "codebook", "commitment"]
