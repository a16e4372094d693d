"""convert.py and vqvae_common.layout: the lossless weight mapping between the twins' flat
numpy dicts (each twin's export_arrays / import_arrays), and the command line."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from vqvae_common import layout
from vqvae_common.config import DATASETS, ModelConfig, TrainConfig
from vqvae_common.checkpoint_record import CheckpointRecord
from vqvae_common.errors import UserError
from vqvae_common.prior import PriorConfig
from vqvae_jax import checkpoint as jax_checkpoint
from vqvae_jax.model import VQVAE
from vqvae_jax import prior_train as jax_prior_train
from vqvae_jax.train import JaxTwin
from vqvae_torch import checkpoint as torch_checkpoint
from vqvae_torch import prior as torch_prior
from vqvae_torch.train import TorchTwin, to_numpy, to_tensor

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("convert", ROOT / "convert.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)
SMALL = {"mnist": ModelConfig(in_channels=1, hidden=16, num_codes=32),
         "cifar10": ModelConfig(in_channels=3, hidden=16, num_codes=32)}
TINY = ModelConfig(in_channels=1, hidden=8, num_codes=16)
SIZE = {1: 28, 3: 32}


def _batch(config, n=4, seed=0):
    size = SIZE[config.in_channels]
    return np.random.default_rng(seed).uniform(
        -1, 1, (n, size, size, config.in_channels)).astype(np.float32)


def _trained_torch(config, steps=2):
    """A TorchTwin after `steps` Adam steps: weights moved, BatchNorm statistics non-trivial."""
    twin = TorchTwin(config, TrainConfig(device="cpu", seed=0))
    for step in range(steps):
        twin.train_step(_batch(config, seed=step))
    return twin


def _state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _torch_to_flax(state_dict, model):
    jax_checkpoint.import_arrays(model, layout.torch_to_flax(state_dict))


def _flax_to_torch(model):
    return layout.flax_to_torch(jax_checkpoint.export_arrays(model))


def _assert_bit_identical(expected, actual):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert np.array_equal(actual[key], value), key


@pytest.mark.parametrize("preset", ["mnist small", "cifar10 small", "mnist"])
def test_torch_flax_torch_round_trip_is_bit_identical(preset):
    config = DATASETS["mnist"].preset if preset == "mnist" else SMALL[preset.split()[0]]
    state_dict = _state_dict(_trained_torch(config).model)
    assert state_dict["encoder.bn1.num_batches_tracked"].dtype == np.int64
    assert state_dict["encoder.bn1.num_batches_tracked"] == 2
    assert not np.allclose(state_dict["decoder.res1.bn2.running_var"], 1.0)

    model = VQVAE(config, rngs=nnx.Rngs(1))
    _torch_to_flax(state_dict, model)
    np.testing.assert_array_equal(np.asarray(model.encoder.conv1.kernel[...]),
                                  state_dict["encoder.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.decoder.deconv1.kernel[...]),
                                  state_dict["decoder.deconv1.weight"].transpose(2, 3, 0, 1))
    assert int(model.decoder.bn1.count[...]) == 2
    _assert_bit_identical(state_dict, _flax_to_torch(model))


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
def test_converted_model_reconstructs_like_torch(preset):
    config = SMALL[preset]
    twin = _trained_torch(config, steps=3)
    model = VQVAE(config, rngs=nnx.Rngs(1))
    _torch_to_flax(_state_dict(twin.model), model)
    model.eval()
    twin.model.eval()

    x = _batch(config, n=3, seed=10)
    with torch.no_grad():
        expected = twin.model(to_tensor(x, torch.device("cpu")))
    out = model(x)
    np.testing.assert_array_equal(np.asarray(out.indices), expected.indices.numpy())
    recon, recon_ref = np.asarray(out.recon), to_numpy(expected.recon)
    assert np.abs(recon - recon_ref).max() <= 1e-4 * np.abs(recon_ref).max()
    assert float(out.losses["loss"]) == pytest.approx(expected.losses["loss"].item(), rel=1e-4)


def test_missing_or_unexpected_key_is_a_user_error():
    config = SMALL["mnist"]
    state_dict = _state_dict(TorchTwin(config, TrainConfig(device="cpu")).model)
    model = VQVAE(config, rngs=nnx.Rngs(0))
    missing = dict(state_dict)
    del missing["decoder.bn1.running_var"]
    with pytest.raises(UserError, match="missing.*decoder.bn1.running_var"):
        torch_checkpoint.import_arrays(TorchTwin(config, TrainConfig(device="cpu")).model,
                                       missing)
    with pytest.raises(UserError, match="missing.*decoder.bn1.var"):  # its Flax name
        _torch_to_flax(missing, model)
    extra = {**state_dict, "decoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(UserError, match="unexpected.*decoder.extra.weight"):
        _torch_to_flax(extra, model)


def test_wrong_shape_is_a_user_error():
    other = dataclasses.replace(SMALL["mnist"], hidden=8)
    state_dict = _state_dict(TorchTwin(other, TrainConfig(device="cpu")).model)
    with pytest.raises(UserError, match="shape"):
        _torch_to_flax(state_dict, VQVAE(SMALL["mnist"], rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def convert_cli(child_env):
    """convert_cli(*args) -> the CompletedProcess of `python convert.py ARGS`."""
    def run(*args, timeout=120):
        return subprocess.run([sys.executable, "convert.py", *args], cwd=ROOT, env=child_env,
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="module")
def converted(tmp_path_factory, convert_cli):
    """(trained TorchTwin, its checkpoint.pt at step 5, that file converted by the CLI)."""
    tmp = tmp_path_factory.mktemp("convert")
    twin = _trained_torch(TINY)
    ckpt, flax_dir = tmp / "ckpt.pt", tmp / "flax"
    twin.save(str(ckpt), 5)
    run = convert_cli("--from-torch", str(ckpt), "--out", str(flax_dir))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"wrote {flax_dir}"
    return twin, ckpt, flax_dir


def test_cli_round_trip_is_bit_identical(tmp_path, converted, convert_cli):
    twin, _, flax_dir = converted
    record = jax_checkpoint.read_record(str(flax_dir))
    assert record.step == 5 and record.weights_only is True
    assert record.model_config == TINY
    with pytest.raises(UserError, match="weights only"):  # converted: evaluate, never resume
        JaxTwin(TINY, TrainConfig(device="cpu")).load(str(flax_dir))

    back = tmp_path / "back.pt"
    run = convert_cli("--from-jax", str(flax_dir), "--out", str(back))
    assert run.returncode == 0, run.stderr[-2000:]
    payload = torch.load(back, weights_only=True)
    assert payload["framework"] == "torch" and payload["step"] == 5
    assert payload["model_config"] == dataclasses.asdict(TINY)
    _assert_bit_identical(_state_dict(twin.model),
                          {k: v.numpy() for k, v in payload["model"].items()})
    with pytest.raises(UserError, match="weights only"):
        TorchTwin(TINY, TrainConfig(device="cpu")).load(str(back))


def test_converted_checkpoint_evaluates_like_torch(converted):
    twin, _, flax_dir = converted
    flax_twin = JaxTwin.from_checkpoint(str(flax_dir), device="cpu")
    assert flax_twin.config == TINY
    x = _batch(TINY, n=3, seed=20)
    recon, indices, losses = flax_twin.evaluate(x)
    recon_ref, indices_ref, losses_ref = twin.evaluate(x)
    np.testing.assert_array_equal(indices, indices_ref)
    assert np.abs(recon - recon_ref).max() <= 1e-4 * np.abs(recon_ref).max()
    assert losses["loss"] == pytest.approx(losses_ref["loss"], rel=1e-4)


def test_cli_write_failure_exits_2_with_one_line(tmp_path, converted, convert_cli):
    _, _, flax_dir = converted
    (tmp_path / "file").write_text("a file, not a directory")
    run = convert_cli("--from-jax", str(flax_dir), "--out", str(tmp_path / "file" / "back.pt"))
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error:"), run.stderr
    assert "cannot write" in run.stderr


def test_an_existing_out_is_never_written_over_and_a_new_one_gets_its_folders(
        converted, capsys, tmp_path):
    _, ckpt, flax_dir = converted
    before = {p: p.read_bytes() for p in flax_dir.rglob("*") if p.is_file()}
    for argv in (["--from-torch", str(ckpt), "--out", str(flax_dir)],
                 ["--from-jax", str(flax_dir), "--out", str(ckpt)]):
        assert convert.main(argv) == 2
        assert "is never written over" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in flax_dir.rglob("*") if p.is_file()} == before
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    for argv in (["--from-torch", str(ckpt), "--out", str(tmp_path / "runs" / "a" / "flax")],
                 ["--from-jax", str(flax_dir), "--out", str(tmp_path / "runs" / "b" / "x.pt")]):
        assert convert.main(argv) == 0, capsys.readouterr().err


def test_an_out_inside_a_flax_checkpoint_is_refused(converted, capsys):
    """A folder made in a Flax checkpoint passes for its newest step, hiding the complete
    ones from --resume and evaluate.py (a converted checkpoint at RUN/checkpoint/99 did)."""
    _, ckpt, flax_dir = converted
    before = sorted(os.listdir(flax_dir))
    for out in (flax_dir / "99", flax_dir / "sub" / "99"):
        assert convert.main(["--from-torch", str(ckpt), "--out", str(out)]) == 2
        assert f"it lies inside the Flax checkpoint {flax_dir}" in capsys.readouterr().err
    assert sorted(os.listdir(flax_dir)) == before
    assert jax_checkpoint.has_checkpoint(str(flax_dir))


@pytest.mark.parametrize("source, out, says", [
    ("--from-jax", "x/", "a PyTorch checkpoint is a file"),
    ("--from-torch", "x.pt", "a Flax checkpoint is a directory")])
def test_an_out_of_the_other_format_is_refused(tmp_path, capsys, source, out, says):
    assert convert.main([source, str(tmp_path), "--out", os.path.join(tmp_path, out)]) == 2
    assert says in capsys.readouterr().err
    assert not os.path.lexists(tmp_path / "x") and not os.path.lexists(tmp_path / "x.pt")


def test_a_prior_converts_both_ways_bit_identically(tmp_path, capsys):
    """A PixelCNN prior (told apart by its record) torch -> flax -> torch: the same tensors,
    a weights-only prior record on each side, and the same logits in the Flax twin."""
    config = PriorConfig(vqvae="/v.pt", channels=8, layers=3, kernel_size=3, dataset="mnist",
                         num_codes=16, conditional=True, vqvae_weights="ab" * 8)
    torch.manual_seed(0)
    model = torch_prior.PixelCNN(config)
    record = CheckpointRecord("torch", config, 7, kind="prior")
    source, flax_dir, back = tmp_path / "prior.pt", tmp_path / "flax", tmp_path / "back.pt"
    torch_checkpoint.save(str(source), {**record.to_dict(), "model": model.state_dict()})
    assert convert.main(["--from-torch", str(source), "--out", str(flax_dir)]) == 0
    assert "pass sample.py --vqvae" in capsys.readouterr().err
    converted = jax_checkpoint.read_record(str(flax_dir), kind="prior")
    assert (converted.model_config, converted.step, converted.weights_only) == (config, 7, True)
    assert convert.main(["--from-jax", str(flax_dir), "--out", str(back)]) == 0
    back_record, payload = torch_checkpoint.load(str(back), torch.device("cpu"), kind="prior")
    assert (back_record.model_config, back_record.weights_only) == (config, True)
    _assert_bit_identical(_state_dict(model), {k: v.numpy() for k, v in payload["model"].items()})

    flax_model, optimizer = jax_prior_train.create(config, lr=1e-3, seed=1)
    _, state = jax_checkpoint.load(str(flax_dir), config, nnx.state((flax_model, optimizer)),
                                   kind="prior")
    nnx.update((flax_model, optimizer), state)
    codes = np.random.default_rng(0).integers(0, 16, (2, 7, 7))
    labels = np.array([3, 8])
    with torch.no_grad():  # (B, K, h, w) -> (B, h, w, K), the Flax twin's
        want = model(torch.from_numpy(codes), torch.from_numpy(labels)).permute(0, 2, 3, 1)
    got = np.asarray(flax_model(codes.astype(np.int32), labels.astype(np.int32)))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_damaged_prior_is_reported_as_a_prior(tmp_path, capsys):
    """The record tells the kind, so a prior's own fault is what the error names (read as a
    VQ-VAE first, it said 'holds a PixelCNN prior, not a VQ-VAE')."""
    newer = tmp_path / "newer.pt"
    torch.save({"framework": "torch", "kind": "prior", "step": 1, "model": {},
                "model_config": {"channels": 8, "colour": "red"}}, newer)
    assert convert.main(["--from-torch", str(newer), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and "prior" in err and "not a VQ-VAE" not in err, err


def _bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 20)
    foreign = tmp_path / "foreign.pt"
    torch.save({"framework": "jax", "model_config": {}, "step": 1, "model": {}}, foreign)
    odd = tmp_path / "odd.pt"
    torch.save({"framework": "torch", "model_config": {"hidden": 8, "colour": "red"},
                "step": 1, "model": {}}, odd)
    odd_dir = str(tmp_path / "odd")
    jax_checkpoint.save(odd_dir, 1, nnx.state(VQVAE(TINY, rngs=nnx.Rngs(0))), {
        "framework": "jax", "model_config": {"hidden": 8, "colour": "red"}, "step": 1})
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "torch: nonexistent file": ["--from-torch", str(tmp_path / "nope.pt")],
        "torch: garbage file": ["--from-torch", str(garbage)],
        "torch: a directory": ["--from-torch", str(tmp_path)],
        "torch: a foreign checkpoint": ["--from-torch", str(foreign)],
        "torch: an unknown model config": ["--from-torch", str(odd)],
        "jax: nonexistent dir": ["--from-jax", str(tmp_path / "nope")],
        "jax: garbage file": ["--from-jax", str(garbage)],
        "jax: empty dir": ["--from-jax", str(empty)],
        "jax: an unknown model config": ["--from-jax", odd_dir],
    }


@pytest.mark.parametrize("case", ["torch: nonexistent file", "torch: garbage file",
                                  "torch: a directory", "torch: a foreign checkpoint",
                                  "torch: an unknown model config", "jax: nonexistent dir",
                                  "jax: garbage file", "jax: empty dir",
                                  "jax: an unknown model config"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    source = tmp_path / "in"
    source.mkdir()
    argv = _bad_inputs(source)[case] + ["--out", str(tmp_path / "out")]
    assert convert.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error:")
    assert not os.path.exists(tmp_path / "out")


def test_cli_garbage_file_exits_2_with_one_line(tmp_path, convert_cli):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 100)
    run = convert_cli("--from-torch", str(garbage), "--out", str(tmp_path / "out"), timeout=60)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error:")
    assert "garbage.pt" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
