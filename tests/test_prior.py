"""The prior's framework-free parts (vqvae_common/prior.py), its command line, and one tiny
training run of each twin through the shared loop."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest

import sample
import train_jax
import train_torch
from vqvae_common import checkpoint_record
from vqvae_common import config as cfg
from vqvae_common import loop
from vqvae_common import prior
from vqvae_common.errors import UserError


def test_the_first_layers_masks_hide_the_centre_and_later_ones_show_it():
    vertical, horizontal = prior.masks(5, first=True)
    np.testing.assert_array_equal(vertical, [[1] * 5, [1] * 5, [0] * 5, [0] * 5, [0] * 5])
    np.testing.assert_array_equal(horizontal, [[1, 1, 0, 0, 0]])
    vertical, horizontal = prior.masks(5, first=False)
    np.testing.assert_array_equal(vertical.sum(1), [5, 5, 5, 0, 0])
    np.testing.assert_array_equal(horizontal, [[1, 1, 1, 0, 0]])


def test_the_marginal_baseline_is_each_positions_smoothed_code_frequency():
    train = np.zeros((8, 1, 2), np.int32)
    train[:6, 0, 1] = 3  # position 1: code 3 six times, code 0 twice
    test = np.array([[[0, 3]]], np.int32)
    k = 4
    p0 = (8 + 1) / (8 + k)  # position 0 always saw code 0
    p1 = (6 + 1) / (8 + k)
    assert prior.marginal_nll(train, test, k) == pytest.approx(-(math.log(p0) + math.log(p1)) / 2)


def test_bits_per_image_count_every_code_of_the_map():
    assert prior.bits_per_image(math.log(2), (7, 7)) == pytest.approx(49)


def test_gumbel_noise_is_the_seeds_and_standard():
    a = prior.gumbel_noise(3, 200, (7, 7), 16)
    assert a.shape == (200, 7, 7, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, prior.gumbel_noise(3, 200, (7, 7), 16))
    assert abs(a.mean() - np.euler_gamma) < 0.01  # the standard Gumbel's mean
    assert not np.array_equal(a, prior.gumbel_noise(4, 200, (7, 7), 16))


def test_a_priors_vqvae_is_compared_by_the_file_its_path_names(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)  # a prior recorded before stop 39 holds the path as given
    record = checkpoint_record.CheckpointRecord(
        "torch", prior.PriorConfig(vqvae="tests", num_codes=8), 1, kind="prior")
    record.check_config(prior.PriorConfig(vqvae=os.path.join(root, "tests"), num_codes=8), "p")
    with pytest.raises(UserError, match="holds a model with config vqvae"):
        record.check_config(prior.PriorConfig(vqvae=os.path.join(root, "bench"), num_codes=8),
                            "p")


def test_sample_labels_give_each_class_a_row():
    np.testing.assert_array_equal(prior.sample_labels(6, 3), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(prior.sample_labels(3, 0), [0, 0, 0])


@pytest.mark.parametrize("entry", [train_torch, train_jax])
def test_prior_help_explains_every_flag(entry, capsys):
    with pytest.raises(SystemExit):
        entry.cli.main(entry.__name__[6:], entry.fit, ["prior", "--help"], entry.fit_prior)
    text = capsys.readouterr().out
    for flag in ("--vqvae", "--channels", "--layers", "--kernel-size", "--conditional",
                 "--epochs", "--resume"):
        assert flag in text
    assert "--codebook-init" not in text


TINY_VQVAE = cfg.ModelConfig(in_channels=1, hidden=8, num_codes=16)
TINY_PRIOR = dict(channels=4, layers=2, conditional=True)


@pytest.fixture
def tiny_data(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    split = {"image": rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, 40)}
    monkeypatch.setattr(loop.data, "load", lambda name, s, data_dir=None, feature="image":
                        split[feature])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("argv,message", [
    (["prior"], "--vqvae is required"),
    (["prior", "--vqvae", "/nonexistent.pt"], "no VQ-VAE checkpoint there"),
    (["prior", "--vqvae", "tests"], "tests is a directory, not a PyTorch checkpoint file"),
    (["prior", "--vqvae", "x", "--layers", "0"], "--layers 0 is out of range"),
])
def test_a_users_mistake_is_one_line_and_exit_2(argv, message, capsys, tmp_path, tiny_data):
    code = train_torch.cli.main("torch", train_torch.fit,
                                argv + ["--out", str(tmp_path / "o"), "--batch-size", "8"],
                                train_torch.fit_prior)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def prior_twins(framework: str) -> tuple[type, type]:
    """(prior twin, VQ-VAE twin) classes of `framework`."""
    if framework == "torch":
        from vqvae_torch.prior_train import TorchPriorTwin
        from vqvae_torch.train import TorchTwin
        return TorchPriorTwin, TorchTwin
    from vqvae_jax.prior_train import JaxPriorTwin
    from vqvae_jax.train import JaxTwin
    return JaxPriorTwin, JaxTwin


def weights(twin: object) -> list[np.ndarray]:
    """A prior twin's weights, as numpy arrays in a fixed order."""
    if hasattr(twin, "model"):  # PyTorch
        return [t.detach().cpu().numpy() for t in twin.model.state_dict().values()]
    import jax
    from flax import nnx
    return [np.asarray(a) for a in jax.tree.leaves(nnx.merge(twin.graphdef, twin.state)[0])]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_prior_checkpoint_resumes_and_loads_the_same_model(framework, tmp_path):
    """Saved at step 7 by a prior from seed 1: resuming it into a prior from seed 2, and
    loading it for sampling, both give seed 1's weights."""
    PriorTwin, Twin = prior_twins(framework)
    vqvae = str(tmp_path / Twin.checkpoint_name)
    Twin(TINY_VQVAE, cfg.TrainConfig()).save(vqvae, 0)
    prior_cfg = prior.PriorConfig(vqvae=vqvae, **TINY_PRIOR)
    saved, resumed = (PriorTwin(prior_cfg, cfg.TrainConfig(seed=seed)) for seed in (1, 2))
    path = str(tmp_path / PriorTwin.checkpoint_name)
    saved.save(path, 7)
    want = weights(saved)
    assert not all(np.array_equal(a, b) for a, b in zip(weights(resumed), want))
    assert resumed.load(path) == 7
    for twin in (resumed, PriorTwin.from_checkpoint(path)):
        got = weights(twin)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="holds a PixelCNN prior, not a VQ-VAE"):
        Twin.from_checkpoint(path)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_prior_over_a_vqvae_of_other_weights_warns_when_sampled_and_is_not_resumed(
        framework, tmp_path, capsys):
    PriorTwin, Twin = prior_twins(framework)
    vqvae, other = (str(tmp_path / name / Twin.checkpoint_name) for name in ("a", "b"))
    for seed, path in enumerate((vqvae, other)):
        os.makedirs(os.path.dirname(path))
        Twin(TINY_VQVAE, cfg.TrainConfig(seed=seed)).save(path, 0)
    trained = PriorTwin(prior.PriorConfig(vqvae=vqvae, **TINY_PRIOR), cfg.TrainConfig())
    assert (trained.num_devices, trained.device_kind) == (1, trained.vqvae.device_kind)
    path = str(tmp_path / PriorTwin.checkpoint_name)
    trained.save(path, 1)
    PriorTwin.from_checkpoint(path)
    assert "warning" not in capsys.readouterr().err
    over_other = PriorTwin.from_checkpoint(path, vqvae=other)
    assert over_other.config.vqvae_weights != trained.config.vqvae_weights
    assert capsys.readouterr().err == (
        f"warning: the VQ-VAE {other} is not the one the prior was trained over (other "
        f"weights: trained on since, or another model): its samples decode codes this VQ-VAE "
        f"did not learn\n")
    with pytest.raises(UserError, match="was trained over another VQ-VAE than"):
        PriorTwin(prior.PriorConfig(vqvae=other, **TINY_PRIOR), cfg.TrainConfig()).load(path)
    fewer = str(tmp_path / "c" / Twin.checkpoint_name)  # a VQ-VAE of another codebook size
    os.makedirs(os.path.dirname(fewer))
    Twin(dataclasses.replace(TINY_VQVAE, num_codes=TINY_VQVAE.num_codes // 2),
         cfg.TrainConfig()).save(fewer, 0)
    with pytest.raises(UserError, match=f"the prior models {TINY_VQVAE.num_codes} codes and "
                                        f"the VQ-VAE {fewer} has {TINY_VQVAE.num_codes // 2}"):
        PriorTwin.from_checkpoint(path, vqvae=fewer)


def test_a_vqvae_and_its_conversions_have_one_fingerprint(tmp_path):
    """A trained EMA model (BatchNorm counts and EMA state set), to Flax and back."""
    import convert
    from vqvae_jax.prior_train import vqvae_fingerprint as flax_fingerprint
    from vqvae_jax.train import JaxTwin
    from vqvae_torch.prior_train import vqvae_fingerprint as torch_fingerprint
    from vqvae_torch.train import TorchTwin

    source, flax, back = (str(tmp_path / name) for name in ("t.pt", "flax", "back.pt"))
    twin = TorchTwin(dataclasses.replace(TINY_VQVAE, codebook_update="ema"), cfg.TrainConfig())
    twin.train_step(np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32))
    twin.save(source, 1)
    convert.torch_to_flax(source, flax)
    convert.flax_to_torch(flax, back)
    fingerprint = torch_fingerprint(TorchTwin.from_checkpoint(source))
    assert flax_fingerprint(JaxTwin.from_checkpoint(flax)) == fingerprint
    assert torch_fingerprint(TorchTwin.from_checkpoint(back)) == fingerprint
    twin.train_step(np.random.default_rng(1).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32))
    assert torch_fingerprint(twin) != fingerprint  # trained on: another VQ-VAE


def test_a_prior_of_before_the_fingerprint_fits_any_vqvae_weights():
    record = checkpoint_record.CheckpointRecord(
        "torch", prior.PriorConfig(vqvae="/v", num_codes=8), 1, kind="prior")
    record.check_config(prior.PriorConfig(vqvae="/v", num_codes=8, vqvae_weights="0" * 16), "p")


# PyTorch only: the Flax run compiles five functions twice (70 s on a busy 2-core CPU); the
# Flax step and sampler are held to PyTorch's by parity_tests/test_prior.py, its checkpoints
# by the test above
def test_a_tiny_prior_trains_resumes_and_samples(tiny_data, tmp_path, capsys):
    PriorTwin, Twin = prior_twins("torch")
    vqvae = str(tmp_path / Twin.checkpoint_name)
    Twin(TINY_VQVAE, cfg.TrainConfig()).save(vqvae, 0)
    prior_cfg = prior.PriorConfig(vqvae=vqvae, **TINY_PRIOR)
    train_cfg = cfg.TrainConfig(out=str(tmp_path / "run"), batch_size=8, epochs=2,
                                max_steps=6, eval_batch_size=16)
    task = prior.PriorTask("torch", prior_cfg, train_cfg)
    loop.fit(PriorTwin, prior_cfg, dataclasses.replace(train_cfg, max_steps=3), task)
    result = loop.fit(PriorTwin, prior_cfg, dataclasses.replace(train_cfg, resume=True),
                      prior.PriorTask("torch", prior_cfg, train_cfg))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["split"] == "test"] == [3, 5, 6]
    assert result["nll_bits_per_image"] == pytest.approx(
        result["nll_nats_per_code"] * 49 / math.log(2))
    assert (tmp_path / "run" / "samples.png").exists()
    twin = PriorTwin.from_checkpoint(str(tmp_path / "run" / PriorTwin.checkpoint_name))
    assert twin.config.num_codes == 16 and twin.config.num_classes == 10
    with pytest.raises(UserError, match="holds a PixelCNN prior, not a VQ-VAE"):
        Twin.from_checkpoint(str(tmp_path / "run" / PriorTwin.checkpoint_name))
    # sample.py on it: a grid, or one line before any work where --out cannot be written
    checkpoint, grid = str(tmp_path / "run" / PriorTwin.checkpoint_name), str(tmp_path / "s.png")
    assert sample.main(["--prior", checkpoint, "--num", "10", "--out", grid]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert sample.main(["--prior", checkpoint, "--out", str(tmp_path / "s.png" / "x.png")]) == 2
    capsys.readouterr()
    assert sample.main(["--prior", checkpoint, "--out", vqvae]) == 2  # a checkpoint stays
    assert "is not a PNG file, so it is not written over" in capsys.readouterr().err
    assert sample.main(["--prior", checkpoint, "--num", "15", "--out", grid]) == 2
    assert "one row of samples per class: choose a multiple of 10" in capsys.readouterr().err
    os.rename(vqvae, vqvae + ".moved")  # the VQ-VAE the prior records is gone: --vqvae
    assert sample.main(["--prior", checkpoint, "--out", str(tmp_path / "s.png")]) == 2
    assert "which is not there: pass --vqvae" in capsys.readouterr().err
    assert sample.main(["--prior", checkpoint, "--vqvae", vqvae + ".moved", "--num", "10",
                        "--out", str(tmp_path / "s.png")]) == 0  # a PNG is written over
