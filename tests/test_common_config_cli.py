import dataclasses

import pytest

from vqvae_common import cli, config
from vqvae_common.errors import UserError


def test_json_round_trip_keeps_every_field():
    model = config.ModelConfig(in_channels=3, hidden=32, num_codes=64, beta=0.25)
    train = config.TrainConfig(dataset="cifar10", data_dir="/data", epochs=3, max_steps=7,
                               batch_size=16, lr=1e-3, seed=5, out="/tmp/x", device="cpu",
                               resume=True, log_every=2, checkpoint_every=9)
    assert config.from_json(config.to_json(model, train)) == (model, train)


def test_defaults_are_the_mnist_preset_with_beta_one():
    model, train = cli.parse("torch", [])
    assert model == config.PRESETS["mnist"]
    assert (model.in_channels, model.hidden, model.num_codes, model.beta) == (1, 128, 512, 1.0)
    assert train == config.TrainConfig()


def test_cifar10_preset():
    model, train = cli.parse("torch", ["--dataset", "cifar10"])
    assert (model.hidden, model.in_channels) == (256, 3)
    assert train.dataset == "cifar10"


def test_model_overrides():
    model, _ = cli.parse("torch", ["--beta", "0.25", "--hidden", "64", "--num-codes", "32",
                                   "--restart-below", "0"])
    assert dataclasses.astuple(model) == (1, 64, 32, 0.25, 0.0, 0.99)


def test_train_flags_reach_the_config():
    _, train = cli.parse("torch", ["--batch-size", "8", "--lr", "0.001", "--max-steps", "30",
                                   "--out", "/tmp/o", "--resume", "--data-dir", "/d"])
    assert (train.batch_size, train.lr, train.max_steps, train.out, train.resume,
            train.data_dir) == (8, 0.001, 30, "/tmp/o", True, "/d")


@pytest.mark.parametrize("argv", [
    ["--dataset", "nope"], ["--batch-size", "0"], ["--batch-size", "-3"], ["--lr", "nan"],
    ["--lr", "5"], ["--lr", "inf"], ["--frobnicate"], ["--epochs", "two"], ["--beta", "-1"],
    ["--restart-below", "-0.1"], ["--restart-below", "0.9"],
])
def test_bad_input_is_a_user_error(argv):
    with pytest.raises(UserError):
        cli.parse("torch", argv)


def test_main_reports_a_bad_flag_as_one_line(capsys):
    calls = []
    assert cli.main("torch", lambda m, t: calls.append((m, t)), ["--frobnicate"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("error:") and "--frobnicate" in err
    assert calls == []


def test_main_runs_fit_with_the_parsed_configs(capsys):
    calls = []
    assert cli.main("torch", lambda m, t: calls.append((m, t)), ["--beta", "0.5"]) == 0
    assert calls == [cli.parse("torch", ["--beta", "0.5"])]
    assert capsys.readouterr().err == ""


def test_main_turns_a_user_error_from_fit_into_status_2(capsys):
    def fit(model, train):
        raise UserError("no data here")

    assert cli.main("torch", fit, []) == 2
    assert capsys.readouterr().err == "error: no data here\n"
