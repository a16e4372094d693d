import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from vqvae_common import cli, config, loop
from vqvae_common.errors import UserError
from vqvae_common.prior import PriorConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_json_round_trip_keeps_every_field():
    model = config.ModelConfig(in_channels=3, hidden=32, num_codes=64, beta=0.25)
    train = config.TrainConfig(dataset="cifar10", data_dir="/data", epochs=3, max_steps=7,
                               batch_size=16, lr=1e-3, seed=5, out="/tmp/x", device="cpu",
                               resume=True, log_every=2, checkpoint_every=9)
    assert config.from_json(config.to_json(model, train)) == (model, train)


def test_defaults_are_the_mnist_preset_and_the_tuned_recipe():
    model, train = cli.parse("torch", [])
    assert model == config.DATASETS["mnist"].preset
    assert (model.in_channels, model.hidden, model.num_codes, model.beta) == (1, 128, 512, 0.25)
    assert (model.codebook_update, train.codebook_init, model.restart_below) == (
        "ema", "kmeans", 0.01)
    assert (train.lr, train.lr_schedule) == (2e-3, "cosine")
    assert train == config.TrainConfig(out="runs/latest_torch")
    assert cli.parse("jax", [])[1].out == "runs/latest_jax"  # the twins' runs apart
    assert cli.parse_prior("jax", ["--vqvae", "tests"])[1].out == "runs/prior_jax"


def test_cifar10_preset():
    model, train = cli.parse("torch", ["--dataset", "cifar10"])
    assert (model.hidden, model.in_channels) == (256, 3)
    assert train.dataset == "cifar10"


def test_model_overrides():
    model, _ = cli.parse("torch", ["--beta", "0.25", "--hidden", "64", "--num-codes", "32",
                                   "--restart-below", "0", "--codebook-update", "ema",
                                   "--ema-decay", "0.9", "--ema-epsilon", "1e-3"])
    assert dataclasses.astuple(model) == (1, 64, 32, 0.25, 0.0, 0.99, "ema", 0.9, 1e-3)


def test_codebook_init_flags_reach_the_config():
    _, train = cli.parse("torch", ["--codebook-init", "kmeans", "--kmeans-images", "256",
                                   "--kmeans-iterations", "3"])
    assert (train.codebook_init, train.kmeans_images, train.kmeans_iterations) == (
        "kmeans", 256, 3)


def test_eval_images_keeps_the_first_test_images_and_every_training_image(monkeypatch):
    _, train = cli.parse("torch", ["--eval-images", "5"])
    split_images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    monkeypatch.setattr(loop.data, "load", lambda name, split, data_dir=None: split_images)
    task = loop.Reconstruction(train)
    np.testing.assert_array_equal(task.load("test"), split_images[:5])
    np.testing.assert_array_equal(task.load("train"), split_images)


def test_a_checkpoint_from_before_the_ema_option_holds_a_gradient_codebook():
    recorded = dataclasses.asdict(config.ModelConfig())
    del recorded["codebook_update"]
    assert config.model_config(recorded).codebook_update == "grad"


def test_train_flags_reach_the_config():
    _, train = cli.parse("torch", ["--batch-size", "8", "--lr", "0.001", "--max-steps", "30",
                                   "--out", "/tmp/o", "--resume", "--data-dir", "/d"])
    assert (train.batch_size, train.lr, train.max_steps, train.out, train.resume,
            train.data_dir) == (8, 0.001, 30, "/tmp/o", True, "/d")


def test_resume_takes_the_flags_the_run_recorded(tmp_path):
    model, train = cli.parse("torch", ["--out", str(tmp_path), "--dataset", "cifar10",
                                       "--max-steps", "400", "--batch-size", "32",
                                       "--beta", "1.0", "--lr-schedule", "constant",
                                       "--device", "cpu"])
    (tmp_path / "config.json").write_text(config.to_json(model, train))
    resumed_model, resumed = cli.parse("torch", ["--out", str(tmp_path), "--resume"])
    assert resumed_model == model  # where it runs is this command's: --device auto
    assert resumed == dataclasses.replace(train, resume=True, device="auto")
    longer_model, longer = cli.parse("torch", ["--out", str(tmp_path), "--resume",
                                               "--max-steps", "800", "--hidden", "64"])
    assert (longer.max_steps, longer.batch_size, longer.lr_schedule) == (800, 32, "constant")
    assert (longer_model.hidden, longer_model.beta) == (64, 1.0)  # the loop refuses hidden


def test_resume_keeps_a_recorded_zero(tmp_path):
    """0 == False in Python: a recorded --restart-below 0 (the paper's codebook, no
    restarts) or --kmeans-iterations 0 must not fall back to the preset's value."""
    zeros = ["--restart-below", "0", "--beta", "0", "--kmeans-iterations", "0"]
    model, train = cli.parse("torch", ["--out", str(tmp_path), *zeros])
    (tmp_path / "config.json").write_text(config.to_json(model, train))
    resumed_model, resumed = cli.parse("torch", ["--out", str(tmp_path), "--resume"])
    assert (resumed_model.restart_below, resumed_model.beta) == (0.0, 0.0)
    assert resumed.kmeans_iterations == 0


def test_resume_in_a_priors_out_leaves_the_refusal_to_the_loop(tmp_path):
    prior_cfg, train = cli.parse_prior("jax", ["--vqvae", "tests", "--out", str(tmp_path)])
    prior_cfg = dataclasses.replace(prior_cfg, num_codes=512)  # as `complete` records it
    (tmp_path / "config.json").write_text(config.to_json(prior_cfg, train))
    assert cli.parse("jax", ["--out", str(tmp_path), "--resume"])[1].resume  # then the
    #   loop refuses: "holds another kind of run"


def test_a_recorded_flag_out_of_todays_bounds_is_named_and_can_be_given_anew(tmp_path):
    model, train = cli.parse("torch", ["--out", str(tmp_path), "--eval-images", "2"])
    recorded = json.loads(config.to_json(model, train))
    recorded["train"]["eval_images"] = 1  # a bound an earlier version did not have
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match="--eval-images 1 is out of range: expected 2 to "
                                        ".*, as .*config.json records it: give that flag anew"):
        cli.parse("torch", ["--out", str(tmp_path), "--resume"])
    resumed = cli.parse("torch", ["--out", str(tmp_path), "--resume", "--eval-images", "5"])
    assert resumed[1].eval_images == 5


def test_a_prior_records_its_vqvae_absolute_and_resumes_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    prior_cfg, train = cli.parse_prior("jax", ["--vqvae", "tests", "--out", str(tmp_path),
                                               "--channels", "16", "--max-steps", "9"])
    assert prior_cfg.vqvae == os.path.join(ROOT, "tests")  # found from any directory
    (tmp_path / "config.json").write_text(config.to_json(prior_cfg, train))
    monkeypatch.chdir(tmp_path)
    resumed_cfg, resumed = cli.parse_prior("jax", ["--out", str(tmp_path), "--resume"])
    assert (resumed_cfg, resumed.max_steps, resumed.resume) == (prior_cfg, 9, True)


@pytest.mark.parametrize("argv", [
    ["--dataset", "nope"], ["--batch-size", "0"], ["--batch-size", "-3"], ["--lr", "nan"],
    ["--lr", "5"], ["--lr", "inf"], ["--frobnicate"], ["--epochs", "two"], ["--beta", "-1"],
    ["--restart-below", "-0.1"], ["--restart-below", "0.9"], ["--codebook-update", "sgd"],
    ["--ema-decay", "1"], ["--ema-epsilon", "0"], ["--codebook-init", "random"],
    ["--kmeans-images", "0"], ["--eval-images", "1"], ["--steps-per-call", "0"],
])
def test_bad_input_is_a_user_error(argv):
    with pytest.raises(UserError):
        cli.parse("torch", argv)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0 is out of range: expected 1 to 65536"),
    (["--lr", "nan"], "--lr nan is out of range: expected 1e-08 to 1.0"),
    (["--hidden", "5000"], "--hidden 5000 is out of range: expected 1 to 4096"),
    (["--lr", "-1e-3"], "--lr -0.001 is out of range: expected 1e-08 to 1.0"),  # not a flag
    # one batch through the encoder: 50000 CIFAR-10 images would take about 60 GB in Flax
    (["--kmeans-images", "50000"], "--kmeans-images 50000 is out of range: expected 1 to 10000"),
    # too large for a float: an OverflowError's traceback before
    (["--batch-size", "1" + "0" * 400], f"--batch-size 1{'0' * 400} is out of range: expected "
                                        f"1 to 65536"),
])
def test_out_of_range_message_names_the_flag_and_its_bounds(argv, message):
    with pytest.raises(UserError) as error:
        cli.parse("torch", argv)
    assert str(error.value) == message


def test_every_config_field_is_a_flag_explained_in_help():
    parser = cli.build_parser("jax")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    model_fields = {"hidden", "num_codes", "beta", "restart_below", "codebook_update",
                    "ema_decay", "ema_epsilon"}
    assert set(actions) == {f.name for f in dataclasses.fields(config.TrainConfig)} | model_fields
    assert all(action.help for action in actions.values())
    text = " ".join(parser.format_help().split())
    assert "None" not in text and "SUPPRESS" not in text
    assert "(default: 64)" in text  # --batch-size
    assert "(default: 128 for mnist, 256 for cifar10)" in text  # --hidden, from the presets


def test_every_default_lies_within_its_bounds():
    presets = [d.preset for d in config.DATASETS.values()]
    for config_class, instances in ((config.TrainConfig, [config.TrainConfig()]),
                                    (config.ModelConfig, presets)):
        for field in cli.flag_fields(config_class):
            if field.metadata["bounds"]:
                low, high = field.metadata["bounds"]
                for instance in instances:
                    value = getattr(instance, field.name)
                    assert value is None or low <= value <= high, field.name


@pytest.mark.parametrize("build, message", [
    (lambda: config.TrainConfig(batch_size=0),
     r"TrainConfig.batch_size must be a whole number in \[1, 65536\], not 0"),
    (lambda: dataclasses.replace(config.TrainConfig(), epochs=0), r"TrainConfig.epochs"),
    (lambda: config.TrainConfig(lr_schedule="step"),
     "TrainConfig.lr_schedule must be one of constant, cosine, not 'step'"),
    (lambda: config.ModelConfig(beta=float("nan")), r"ModelConfig.beta must be a number in "
                                                    r".*not nan"),
    (lambda: config.ModelConfig(num_codes="512"), r"ModelConfig.num_codes .*not '512'"),
    (lambda: PriorConfig(channels=0), r"PriorConfig.channels must be a whole number in "
                                      r"\[1, 4096\]"),
    (lambda: config.TrainConfig(lr=None), r"TrainConfig.lr must be a number in .*not None"),
    (lambda: config.TrainConfig(batch_size=32.5), r"batch_size must be a whole number"),
    (lambda: config.TrainConfig(batch_size=True), r"batch_size must be a whole number"),
    (lambda: config.TrainConfig(epochs=np.float64(2.0)), r"epochs must be a whole number"),
    (lambda: config.ModelConfig(beta=10**400), r"ModelConfig.beta must be a number"),
    (lambda: config.TrainConfig(kmeans_images=10**400), r"kmeans_images must be a whole"),
], ids=["batch_size", "replace", "choices", "nan", "type", "prior", "none", "fraction", "bool",
        "numpy-float", "huge-float", "huge-int"])
def test_a_config_built_in_python_is_held_to_its_flags_bounds(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_numbers_become_python_numbers_and_the_none_defaults_pass(tmp_path):
    train = config.TrainConfig(batch_size=np.int64(32), lr=np.float32(1e-3), max_steps=None)
    assert (train.batch_size, train.max_steps) == (32, None)
    assert type(train.batch_size) is int and type(train.lr) is float
    assert config.from_json(config.to_json(config.ModelConfig(beta=np.float64(1.0)), train)
                            )[1] == train  # config.json holds them


def test_a_recorded_model_config_out_of_bounds_is_a_user_error():
    for raw in ({"hidden": 0}, {"num_codes": 10**400}):
        with pytest.raises(UserError, match="unknown model config"):
            config.model_config(raw)


def test_each_preset_takes_its_datasets_channels():
    for dataset in config.DATASETS.values():
        assert dataset.preset.in_channels == dataset.image_shape[2]
    assert config.DATASETS["cifar10"].preset.hidden == 256


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate", os.path.join(ROOT, "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_config(directory, model, dataset, **train):
    record = json.loads(config.to_json(model, config.TrainConfig()))
    record["train"].update(dataset=dataset, **train)  # by hand: a dataset a test added may
    #   be one that TrainConfig's choices do not hold
    (directory / "config.json").write_text(json.dumps(record))


def test_evaluate_takes_the_dataset_from_the_runs_config(evaluate, tmp_path, monkeypatch):
    # a second greyscale dataset: the channel count alone can no longer tell
    monkeypatch.setitem(config.DATASETS, "fashion_mnist", config.Dataset(
        "fashion_mnist", image_shape=(28, 28, 1), train_size=60_000, test_size=10_000,
        hidden=128))
    model = dataclasses.replace(config.DATASETS["mnist"].preset, hidden=16)
    checkpoint = str(tmp_path / "checkpoint")
    with pytest.raises(UserError, match="pass --dataset"):
        evaluate.choose_dataset(None, checkpoint, model)
    _run_config(tmp_path, model, "fashion_mnist")
    assert evaluate.choose_dataset(None, checkpoint, model).name == "fashion_mnist"
    _run_config(tmp_path, model, "fashion_mnist", eval_images=1)  # a bound added later
    assert evaluate.choose_dataset(None, checkpoint, model).name == "fashion_mnist"
    assert evaluate.choose_dataset("mnist", checkpoint, model).name == "mnist"  # --dataset wins


def test_evaluate_ignores_a_config_json_of_another_model(evaluate, tmp_path):
    _run_config(tmp_path, config.DATASETS["cifar10"].preset, "cifar10")
    mnist_model = config.DATASETS["mnist"].preset
    checkpoint = str(tmp_path / "model.pt")
    assert evaluate.trained_on(checkpoint, mnist_model) is None
    assert evaluate.choose_dataset(None, checkpoint, mnist_model).name == "mnist"
    (tmp_path / "config.json").write_text(json.dumps(["not", "a", "run"]))
    assert evaluate.trained_on(checkpoint, mnist_model) is None
    (tmp_path / "model.pt").touch()
    prior, train = cli.parse_prior("torch", ["--vqvae", checkpoint])  # a prior run's record
    (tmp_path / "config.json").write_text(config.to_json(prior, train))
    assert evaluate.trained_on(checkpoint, mnist_model) is None


def test_evaluate_refuses_a_dataset_the_model_cannot_take(evaluate, tmp_path):
    checkpoint = str(tmp_path / "model.pt")
    with pytest.raises(UserError, match="3-channel images, mnist has 1"):
        evaluate.choose_dataset("mnist", checkpoint, config.DATASETS["cifar10"].preset)
    with pytest.raises(UserError, match="2-channel images"):
        evaluate.choose_dataset(None, checkpoint, config.ModelConfig(in_channels=2))


def _names(requirements):
    return {re.match(r"[\w.-]+", requirement).group() for requirement in requirements}


def test_only_the_make_install_brings_tensorflow():
    """The README's test command installs '.[test]', which must stay free of TensorFlow (a
    quarter of a GB, for CI); `make install` adds the 'prepare' extra, which brings it for
    tfds's first preparation of a dataset."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    tensorflow = {"tensorflow", "tensorflow-cpu"}
    assert not tensorflow & _names(project["dependencies"] + extras["test"])
    assert tensorflow <= _names(extras["prepare"])
    if shutil.which("make"):
        plan = subprocess.run(["make", "-n", "-C", ROOT, "install", "VENV=/nonexistent/venv"],
                              capture_output=True, text=True, check=True).stdout
        assert "pip install -e '.[test,prepare]'" in plan


SEED_ERA = config.ModelConfig(in_channels=1, hidden=64, beta=1.0)  # a gradient codebook


def test_init_from_takes_the_model_flags_its_checkpoint_records():
    read = []
    model, train = cli.parse("torch", ["--init-from", "m.pt", "--hidden", "64"],
                             lambda path: read.append(path) or SEED_ERA)
    assert read == ["m.pt"] and model == SEED_ERA and train.init_from == "m.pt"
    assert cli.parse("torch", ["--hidden", "64"])[0] != SEED_ERA  # the preset, without


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0.25"], "--beta 0.25: --init-from m.pt holds a model with beta 1.0, which a "
                         "run from it keeps (leave --beta out)"),
    (["--dataset", "cifar10"], "--init-from m.pt holds a model of 1-channel images, and "
                               "--dataset cifar10's have 3: start it on the dataset it was "
                               "trained on (--dataset mnist)"),
])
def test_init_from_refuses_another_model_before_any_data(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cli.parse("torch", ["--init-from", "m.pt", *argv], lambda path: SEED_ERA)


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


# A tool's work that gets Ctrl-C inside a gc callback, where jax's own (in gc.callbacks)
# lost a KeyboardInterrupt ("Exception ignored in") and let the tool run on
CTRL_C_IN_A_GC_CALLBACK = """
import gc, os, signal, sys
from vqvae_common import cli
def callback(phase, info):
    if phase == "start":
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # Python's handler runs here, inside the callback
def work():
    gc.callbacks.append(callback)
    gc.collect()
    print("ran on")
sys.exit(cli.report_errors(work))
"""


def test_ctrl_c_stops_a_tool_at_once_even_inside_a_gc_callback():
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_A_GC_CALLBACK], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


def test_a_tool_restores_the_ctrl_c_handler_it_found():
    from vqvae_common.stop_signals import exit_at_once

    before, seen = signal.getsignal(signal.SIGINT), []
    assert cli.report_errors(lambda: seen.append(signal.getsignal(signal.SIGINT))) == 0
    assert seen == [exit_at_once] and signal.getsignal(signal.SIGINT) is before


def test_a_subcommand_after_the_flags_is_told_where_it_goes(capsys):
    assert cli.main("torch", lambda model, train: None, ["--epochs", "2", "prior"],
                    fit_prior=lambda prior_cfg, train: None) == 2
    assert capsys.readouterr().err == ("error: unrecognized arguments: prior (the subcommand "
                                       "comes first: train_torch.py prior [flags])\n")


def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for path, reason in [(tmp_path / "file" / "e.json", "is not a directory"),
                         (tmp_path / "nodir" / "e.json", "is not a directory"),
                         (tmp_path, "it is a directory")]:
        with pytest.raises(UserError, match=f"cannot write --json {path}: .*{reason}"):
            cli.check_output_file(str(path), "--json")
    cli.check_output_file(str(tmp_path / "file"), "--json")  # written over: allowed
    (tmp_path / "e.json").write_text("{}")
    (tmp_path / "empty").write_text("")
    os.mkfifo(tmp_path / "pipe")  # not a regular file: not opened, so no wait for a writer
    for path in ("e.json", "empty", "new.json", "pipe"):  # what evaluate.py wrote, or nothing
        cli.check_output_file(str(tmp_path / path), "--json", kind="JSON")
    with pytest.raises(UserError, match="it exists and is not a JSON file, so it is not "
                                        "written over"):  # a checkpoint given by mistake
        cli.check_output_file(str(tmp_path / "file"), "--json", kind="JSON")
    with pytest.raises(UserError, match="it exists, and is never written over"):
        cli.check_output_file(str(tmp_path / "file"), "--out", new=True)
    cli.check_output_file(str(tmp_path / "a" / "b" / "new.pt"), "--out", new=True)  # made
    with pytest.raises(UserError, match="file is not a directory"):
        cli.check_output_file(str(tmp_path / "file" / "b" / "new.pt"), "--out", new=True)
    with pytest.raises(UserError, match="--out is empty"):
        cli.check_output_file("", "--out", kind="PNG")
    for too_long, says in [(tmp_path / ("x" * 300) / "new.pt", "is 300 bytes, over"),
                           (tmp_path / ("x" * 250 + ".png"),
                            r"is 264 bytes written as x{8}\.\.\.\.vqvae-tmp, over")]:
        with pytest.raises(UserError, match=rf"the name x{{20}}\.\.\. {says} the \d+ that "
                                            rf"{tmp_path} allows"):
            cli.check_output_file(str(too_long), "--out", new=True)
    cli.check_output_file(str(tmp_path / ("x" * 250)), "--out", new=True, file=False)  # a
    #   folder (convert.py's Flax checkpoint) is made under its own name


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc here")
def test_a_folder_where_no_file_can_be_made_is_refused_before_any_work():
    """/proc passes the permission check (for root too), yet takes no new file: the check
    makes one. evaluate.py used to evaluate the whole split first, then fail in a traceback."""
    for new in (False, True):
        with pytest.raises(UserError, match="cannot write --json /proc/e.json: no file can be "
                                            "made in /proc"):
            cli.check_output_file("/proc/e.json", "--json", new=new)


def test_an_output_inside_a_runs_folders_is_refused(tmp_path):
    """A run's checkpoint/ and tensorboard/ are its own: a converted checkpoint written into
    a Flax run's checkpoint/ hid the run's steps from --resume."""
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (tmp_path / "checkpoint").mkdir()
    for path, new in [(tmp_path / "checkpoint" / "99", True),
                      (tmp_path / "tensorboard" / "x" / "99", True),
                      (tmp_path / "checkpoint" / "s.png", False)]:
        with pytest.raises(UserError, match=re.escape(f"it lies inside the run in {tmp_path}")):
            cli.check_output_file(str(path), "--out", new=new)
    cli.check_output_file(str(tmp_path / "as_flax"), "--out", new=True)  # beside its files
    cli.check_output_file(str(tmp_path / "as_flax") + os.sep, "--out", new=True)
    cli.check_output_file(str(tmp_path / "samples.png"), "--out", kind="PNG")


@pytest.mark.parametrize("checkpoint, theirs, not_theirs", [
    ("checkpoint.pt", "reconstruction.png", "samples.png"),  # a VQ-VAE's run
    ("prior", "samples.png", "reconstruction.png"),  # a prior's
    (None, "loss_curves.png", "samples.png"),  # an older version's: a VQ-VAE's (model.pt)
])
def test_a_runs_records_and_pictures_are_never_written_over(tmp_path, checkpoint, theirs,
                                                            not_theirs):
    """A run's config.json and metrics.jsonl begin as JSON, its pictures are PNGs: what
    evaluate.py and sample.py may write over elsewhere."""
    run = {"model": {}, "train": {}, **({"checkpoint": checkpoint} if checkpoint else {})}
    (tmp_path / "config.json").write_text(json.dumps(run))
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    for name in (theirs, not_theirs):
        (tmp_path / name).write_bytes(cli.OUTPUT_SIGNATURES["PNG"])
    for name, kind in [("config.json", "JSON"), ("metrics.jsonl", "JSON"), (theirs, "PNG")]:
        with pytest.raises(UserError, match=re.escape(f"it is a file of the run in {tmp_path}, "
                                                      f"which wrote it")):
            cli.check_output_file(str(tmp_path / name), "--out", kind=kind)
    cli.check_output_file(str(tmp_path / not_theirs), "--out", kind="PNG")
    (tmp_path / "config.json").write_text("{}")  # not a run's record: any JSON file
    cli.check_output_file(str(tmp_path / "config.json"), "--json", kind="JSON")


def test_evaluate_checks_its_json_path_first(evaluate, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt"),
                          "--json", str(tmp_path / "file" / "e.json")]) == 2
    assert "cannot write --json" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt"), "--json", ""]) == 2
    assert "--json is empty" in capsys.readouterr().err  # not silently left unwritten


def test_evaluate_on_a_runs_directory_names_the_checkpoint_in_it(evaluate, tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert evaluate.main(["--checkpoint", str(tmp_path)]) == 2
    assert f"pass the checkpoint in it, {tmp_path / 'checkpoint.pt'}" in capsys.readouterr().err


def test_the_tools_drop_the_late_event_loop_errors_of_a_failed_restore_and_no_others(
        monkeypatch):
    """A failed orbax restore leaves reads in flight that print a traceback each after the
    one-line error, unless report_errors' hook drops them; any other error still passes."""
    passed = []
    monkeypatch.setattr(sys, "unraisablehook", passed.append)
    assert cli.report_errors(lambda: None) == 0
    assert cli.report_errors(lambda: None) == 0  # one hook, however often the tools run
    late, other = (types.SimpleNamespace(exc_value=error) for error in (
        RuntimeError("Event loop is closed"), ValueError("another")))
    sys.unraisablehook(late)
    sys.unraisablehook(other)
    assert passed == [other]
