"""The one command line both train_torch.py and train_jax.py accept, and the main() wrapper
that turns a UserError into one line on stderr and exit status 2.

    train_X.py [flags]          train a VQ-VAE
    train_X.py prior [flags]    train a PixelCNN prior over a trained VQ-VAE's codes

The flags are the fields of TrainConfig and ModelConfig (PriorConfig for a prior) that carry
flag metadata (vqvae_common.config.flag): name, type, default, help and bounds come from
there alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

from vqvae_common import atomic, host_memory, prior
from vqvae_common import config as cfg
from vqvae_common.checkpoint_record import checkpoint_around, run_files
from vqvae_common.errors import UserError, one_line
from vqvae_common.stop_signals import Stopped, exit_at_once


class UserErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> Any:
        # argparse reads "--lr -1e-3" as a flag missing its value ("expected one argument"):
        # only -5 and -.5 pass for numbers. Joined as --lr=-1e-3, the bounds refuse it by name.
        joined: list[str] = []
        for token in sys.argv[1:] if args is None else args:
            if joined and joined[-1].startswith("--") and "=" not in joined[-1] \
                    and token.startswith("-") and _is_number(token):
                joined[-1] += "=" + token
            else:
                joined.append(token)
        return super().parse_known_args(joined, namespace)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class InBounds(argparse.Action):
    """Stores a flag's value; a UserError when it is not finite or not in [low, high]."""

    def __init__(self, option_strings: list[str], dest: str,
                 bounds: tuple[float, float], **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.bounds = bounds

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 value: Any, option_string: str | None = None) -> None:
        low, high = self.bounds
        if not cfg.within(value, self.bounds):
            raise UserError(f"{self.option_strings[0]} {value} is out of range: "
                            f"expected {low} to {high}")
        setattr(namespace, self.dest, value)


def flag_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line flags."""
    return [f for f in dataclasses.fields(config_class) if "help" in f.metadata]


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type,
             name: str, option: str | None = None, default: Any = dataclasses.MISSING,
             default_text: str | None = None, help_text: str | None = None) -> None:
    """Add the flag of `config_class`'s field `name` (as `option`, by default --field-name),
    with the field's type, default, help, choices and bounds. `default`, `default_text` and
    `help_text` replace the field's default, how `--help` shows it, and its help."""
    field = next(f for f in flag_fields(config_class) if f.name == name)
    help_text, bounds = help_text or field.metadata["help"], field.metadata["bounds"]
    option = option or cfg.option(name)
    value_type = cfg.field_types(config_class)[name]
    if value_type is bool:
        parser.add_argument(option, dest=name, action="store_true", help=help_text,
                            **({"default": default} if default is argparse.SUPPRESS else {}))
        return
    default = field.default if default is dataclasses.MISSING else default
    shown = default_text or (None if default in (None, argparse.SUPPRESS) else default)
    if shown is not None:  # a None default is explained by the help text itself
        help_text += f" (default: {shown})"
    choices = field.metadata["choices"]
    metavar = None if choices else option.lstrip("-").replace("-", "_").upper()
    in_bounds = {"action": InBounds, "bounds": bounds} if bounds else {}
    parser.add_argument(option, dest=name, type=value_type, default=default, metavar=metavar,
                        choices=choices, help=help_text, **in_bounds)


def _preset_defaults(name: str) -> str:
    """How --help shows a model flag's default: the presets' value, or each preset's."""
    values = {d.name: getattr(d.preset, name) for d in cfg.DATASETS.values()}
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{value} for {dataset}" for dataset, value in values.items())


def build_parser(framework: str, defaults: bool = True) -> argparse.ArgumentParser:
    """train_X.py's parser; `defaults` False: every flag left out is absent (what a command
    line gives)."""
    p = UserErrorParser(
        prog=f"train_{framework}.py",
        description=f"Train a VQ-VAE (van den Oord et al. 2017) in {framework} on MNIST or "
                    "CIFAR-10. Writes config.json, metrics.jsonl, TensorBoard events, a "
                    "checkpoint, reconstruction.png, interpolation.gif and loss_curves.png "
                    "into --out.",
        epilog=f"train_{framework}.py prior --help: train a PixelCNN prior over the codes of "
               "a trained VQ-VAE")
    training = p.add_argument_group("training")
    for field in flag_fields(cfg.TrainConfig):  # each twin's runs in a folder of their own
        default = f"runs/latest_{framework}" if field.name == "out" else dataclasses.MISSING
        add_flag(training, cfg.TrainConfig, field.name,
                 default=default if defaults else argparse.SUPPRESS)
    model = p.add_argument_group("model", "a flag left out takes the dataset's preset")
    for field in flag_fields(cfg.ModelConfig):
        add_flag(model, cfg.ModelConfig, field.name, default=argparse.SUPPRESS,
                 default_text=_preset_defaults(field.name))
    return p


# A checkpoint's recorded model config, read by the twin whose trainer runs (its format)
ReadModelConfig = Callable[[str], cfg.ModelConfig]


def parse(framework: str, argv: Sequence[str] | None = None,
          checkpoint_config: ReadModelConfig | None = None
          ) -> tuple[cfg.ModelConfig, cfg.TrainConfig]:
    """The model and training configs of train_X.py's flags `argv`. A model flag left out
    takes the dataset's preset or, under --init-from, the checkpoint's value
    (`checkpoint_config` reads it; without one, the preset's, and the twin's init_weights
    refuses a checkpoint of another config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser(framework).parse_args(argv))
    if args["resume"]:
        names = {f.name for c in (cfg.TrainConfig, cfg.ModelConfig) for f in flag_fields(c)}
        args = resumed(lambda defaults: build_parser(framework, defaults), args["out"], names,
                       argv)
    model_flags = {f.name: args.pop(f.name) for f in flag_fields(cfg.ModelConfig)
                   if f.name in args}  # absent unless given
    train, dataset = cfg.TrainConfig(**args), cfg.DATASETS[args["dataset"]]
    if train.init_from is None or train.resume or checkpoint_config is None:
        return dataclasses.replace(dataset.preset, **model_flags), train
    return init_model(train.init_from, checkpoint_config(train.init_from), dataset,
                      model_flags), train


def init_model(path: str, held: cfg.ModelConfig, dataset: cfg.Dataset,
               model_flags: dict[str, Any]) -> cfg.ModelConfig:
    """--init-from `path`: the model config `held` there, refused where its images are not
    `dataset`'s or a given model flag would change it (a new run from a model keeps its
    shape and loss, checked here, before any data is read)."""
    channels = dataset.image_shape[2]
    if held.in_channels != channels:
        fits = [name for name, d in cfg.DATASETS.items()
                if d.image_shape[2] == held.in_channels]
        raise UserError(f"--init-from {path} holds a model of {held.in_channels}-channel "
                        f"images, and --dataset {dataset.name}'s have {channels}: start it "
                        f"on the dataset it was trained on"
                        + (f" (--dataset {' or '.join(fits)})" if fits else ""))
    for name, value in model_flags.items():
        if value != getattr(held, name):
            raise UserError(f"{cfg.option(name)} {value}: --init-from {path} holds a model "
                            f"with {name} {getattr(held, name)}, which a run from it keeps "
                            f"(leave {cfg.option(name)} out)")
    return held


# Where and on what a run trains: a resumed run takes them from its command, not its record
FROM_COMMAND_ON_RESUME = ("out", "resume", "init_from", "data_dir", "device", "num_devices")


def resumed(build: Callable[[bool], argparse.ArgumentParser], out: str, names: set[str],
            argv: list[str]) -> dict[str, Any]:
    """--resume: the flags `argv` gives, over the ones --out's config.json recorded (those of
    `names`, but where and on what it runs), so that `--out X --resume` continues the run as
    it was started (its --max-steps, and so its schedule, included). The recorded flags pass
    through the parser as a command line would (`build(defaults)`, bounds and choices
    checked); the loop then refuses a given flag that the run cannot change."""
    given = vars(build(False).parse_args(argv))
    record = cfg.read_run(out)
    model = record.get("model")
    values = {**(record.get("train") if isinstance(record.get("train"), dict) else {}),
              **({**cfg.BEFORE_FIELD_EXISTED, **model} if isinstance(model, dict) else {})}
    recorded = []
    for name, value in values.items():
        # `is`, not `in (None, False)`, whose == would drop a recorded 0 (0 == False)
        if name in names and name not in given and name not in FROM_COMMAND_ON_RESUME \
                and value is not None and value is not False:
            flag = cfg.option(name)
            recorded += [flag] if value is True else [f"{flag}={value}"]
    try:
        return vars(build(True).parse_args(recorded + argv))
    except UserError as e:
        raise UserError(f"{e}, as {os.path.join(out, 'config.json')} records it: give that "
                        f"flag anew beside --resume") from None


# What a prior's run takes from TrainConfig: not the VQ-VAE's codebook start
PRIOR_TRAIN_FLAGS = ("dataset", "data_dir", "epochs", "max_steps", "batch_size",
                     "eval_images", "eval_batch_size", "lr", "lr_schedule", "seed", "out",
                     "device", "resume", "log_every", "checkpoint_every")
# ... and where its help differs from a VQ-VAE's
PRIOR_HELP = {"dataset": "dataset whose images the VQ-VAE encodes",
              "eval_images": "evaluate on the codes of the first N test images only, as "
                             "smoke runs do (default: the whole test split)",
              "lr": "Adam learning rate (of the first step, under --lr-schedule cosine)"}


def build_prior_parser(framework: str, defaults: bool = True) -> argparse.ArgumentParser:
    """train_X.py prior's parser; `defaults` as build_parser's."""
    p = UserErrorParser(
        prog=f"train_{framework}.py prior",
        description=f"Train a gated PixelCNN prior (van den Oord et al. 2016) in {framework} "
                    "over the code maps of a trained VQ-VAE, extracted once per split. Writes "
                    "config.json, metrics.jsonl (test NLL in nats per code and bits per "
                    "image, beside the per-position marginal baseline), TensorBoard events, "
                    "a checkpoint and samples.png into --out.")
    training = p.add_argument_group("training")
    prior_defaults = {**prior.TRAIN_DEFAULTS, "out": f"runs/prior_{framework}"}
    for name in PRIOR_TRAIN_FLAGS:
        add_flag(training, cfg.TrainConfig, name, help_text=PRIOR_HELP.get(name),
                 default=(prior_defaults.get(name, dataclasses.MISSING) if defaults
                          else argparse.SUPPRESS))
    model = p.add_argument_group("prior")
    for field in flag_fields(prior.PriorConfig):
        add_flag(model, prior.PriorConfig, field.name,
                 default=dataclasses.MISSING if defaults else argparse.SUPPRESS)
    return p


def parse_prior(framework: str, argv: Sequence[str] | None = None
                ) -> tuple[prior.PriorConfig, cfg.TrainConfig]:
    argv = list(sys.argv[2:] if argv is None else argv)  # the flags after "prior"
    args = vars(build_prior_parser(framework).parse_args(argv))
    if args["resume"]:
        names = set(PRIOR_TRAIN_FLAGS) | {f.name for f in flag_fields(prior.PriorConfig)}
        args = resumed(lambda defaults: build_prior_parser(framework, defaults), args["out"],
                       names, argv)
    if args["vqvae"] is not None:  # recorded as an absolute path: any directory finds it
        args["vqvae"] = os.path.abspath(args["vqvae"])
    model_flags = {f.name: args.pop(f.name) for f in flag_fields(prior.PriorConfig)}
    if model_flags["vqvae"] is None:
        raise UserError("--vqvae is required: the VQ-VAE checkpoint whose codes the prior "
                        "models")
    if not os.path.exists(model_flags["vqvae"]):
        raise UserError(f"--vqvae {model_flags['vqvae']}: no VQ-VAE checkpoint there")
    return prior.PriorConfig(**model_flags), cfg.TrainConfig(**args)


# How each kind of file a tool writes begins: an existing file is written over only if it
# is one of them (or empty), never a checkpoint or anything else given by mistake
OUTPUT_SIGNATURES = {"JSON": b"{", "PNG": b"\x89PNG\r\n\x1a\n"}


def check_output_file(path: str, flag: str, new: bool = False, kind: str | None = None,
                      file: bool = True) -> None:
    """A UserError, before any work is done, where `path` cannot be written: empty, its
    directory missing or one where no file can be made, or `path` a directory, inside a
    run's folders (checkpoint/, tensorboard/: the run's own) or a Flax checkpoint, a record
    or picture of the run in its folder, or an existing file that is not of the `kind`
    written there (OUTPUT_SIGNATURES). A `new` path must not exist, and only its nearest
    existing ancestor must be a writable directory (the writer makes the rest). `file`
    False: a folder is written there (a Flax checkpoint)."""
    if not path:
        raise UserError(f"{flag} is empty: name the file to write")
    directory = os.path.dirname(os.path.abspath(path))  # abspath: "x/" -> "x"
    around = cfg.run_around(path)
    reason = None
    if not new and not os.path.isdir(directory):
        reason = f"{directory} is not a directory"
    elif (cannot := atomic.cannot_make(path, file)) is not None:
        reason = cannot
    elif around is not None and around != os.path.realpath(directory):
        reason = (f"it lies inside the run in {around}, whose folders are its own: write "
                  f"beside the run's files or outside the run")
    elif (inside := checkpoint_around(path)) is not None:
        reason = (f"it lies inside the Flax checkpoint {inside}, whose folders are its steps: "
                  f"choose a path outside it")
    elif os.path.lexists(path) and new:
        reason = "it exists, and is never written over: remove it or choose another"
    elif os.path.isdir(path):
        reason = "it is a directory"
    elif os.path.isfile(path) and os.path.basename(path) in run_files(directory):
        reason = (f"it is a file of the run in {directory}, which wrote it: choose another "
                  f"name or folder")
    elif kind is not None and os.path.isfile(path):
        reason = _unlike(path, kind)
    if reason is not None:
        raise UserError(f"cannot write {flag} {path}: {reason}")


def _unlike(path: str, kind: str) -> str | None:
    """Why the existing regular file `path` is not written over as a `kind` file: None when
    it is empty or begins as one (OUTPUT_SIGNATURES)."""
    signature = OUTPUT_SIGNATURES[kind]
    try:
        with open(path, "rb") as f:
            head = f.read(len(signature))
    except OSError as e:
        return f"it exists and cannot be read ({e.strerror}) to tell what it holds"
    if head in (b"", signature):
        return None
    return f"it exists and is not a {kind} file, so it is not written over: remove it or " \
           f"choose another"


def report_errors(run: Callable[[], object]) -> int:
    """Call `run`: a UserError becomes one line on stderr and exit status 2; a training run
    stopped by a signal (Stopped) one line and 128 + the signal; any other Ctrl-C ends the
    process at once (stop_signals.exit_at_once), with 130."""
    _drop_late_event_loop_errors()
    main_thread = threading.current_thread() is threading.main_thread()  # Python's signals'
    previous = signal.signal(signal.SIGINT, exit_at_once) if main_thread else None
    try:
        run()
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(one_line(str(e)), file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # not from SIGINT here: off the main thread, interrupt_main()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # None: a handler that C code installed, not restorable
            signal.signal(signal.SIGINT, previous)
    return 0


def _drop_late_event_loop_errors() -> None:
    """After a failed orbax restore (a damaged Flax checkpoint), tensorstore's reads still in
    flight complete onto orbax's closed asyncio loop, each an unraisable
    RuntimeError('Event loop is closed') that Python prints as a traceback after the
    one-line error. In the command-line tools, drop those; any other unraisable goes to the
    hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_late_event_loop_errors", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_late_event_loop_errors = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _subcommand_first(framework: str, parse_flags: Callable[[], Any]) -> Any:
    """`parse_flags()`, whose error for a `prior` after the flags says where it goes."""
    try:
        return parse_flags()
    except UserError as e:
        unrecognized = str(e).partition("unrecognized arguments:")[2].split()
        if "prior" in unrecognized:
            raise UserError(f"{e} (the subcommand comes first: train_{framework}.py prior "
                            f"[flags])") from None
        raise


def main(framework: str, fit: Callable[[cfg.ModelConfig, cfg.TrainConfig], object],
         argv: Sequence[str] | None = None,
         fit_prior: Callable[[prior.PriorConfig, cfg.TrainConfig], object] | None = None,
         checkpoint_config: ReadModelConfig | None = None) -> int:
    """A trainer's entry point: parse the flags (`checkpoint_config` reads an --init-from
    checkpoint's model config), then `fit` (`fit_prior` after the `prior` subcommand),
    reporting user errors. The process keeps the memory its steps free (host_memory), set
    here, before either framework allocates."""
    host_memory.keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if fit_prior is not None and argv[:1] == ["prior"]:
        return report_errors(lambda: fit_prior(*parse_prior(framework, argv[1:])))
    return report_errors(
        lambda: fit(*_subcommand_first(framework,
                                       lambda: parse(framework, argv, checkpoint_config))))
