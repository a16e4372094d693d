"""The real trainer on tfds's mock data (random images of the real shapes), so that tests can
run, kill and resume whole training processes without the real dataset or its decoding time.

    python tests/mock_train.py {torch|jax} [train flags]     one run
    python tests/mock_train.py --serve                        many runs, forked

--serve imports both twins once, then for each JSON line {"framework", "argv", "signals"} on
stdin forks a child that makes one run, and answers {"status", "stderr"} on stdout (status as
subprocess gives it: the exit code, or -N for a child ended by signal N). A forked child is a
process like any other; it only skips the ~5 s of imports. No JAX backend exists before the
fork (the child makes its own), which is what makes forking safe here.

Signals (MOCK_TRAIN_SIGNALS for one run): "PHASE:N[:SIGNAL],..." makes the process send itself
SIGNAL (default SIGKILL) the N-th time, counted from its start, that it enters PHASE:
  build      the twin's constructor (the model build)
  step       a training step, before it runs
  evaluate   an eval-mode forward (the test-split batches, then the artifacts' one)
  save       the twin's checkpoint write, half done: torch: half of the temporary file on
             disk; orbax: the step's temporary folder written but not renamed
  prune      orbax deleting a step beyond the newest two, half of its files gone
  write:F    an atomic write of the file F (write:interpolation.gif, ...), half of its
             temporary file on disk
The hooks wrap functions from outside: the product code holds no test switch.
"""
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback

import tensorflow_datasets as tfds

from vqvae_common import atomic, cli, data, loop

MOCK_IMAGES = 256
CHILD_TIMEOUT_S = 300


class Triggers:
    """The signals asked for, and how often each phase was entered."""

    def __init__(self, spec: str) -> None:
        self.wanted: dict[tuple[str, int], signal.Signals] = {}
        for item in filter(None, spec.split(",")):
            parts = item.split(":")
            signum = signal.Signals[parts.pop()] if parts[-1].startswith("SIG") else signal.SIGKILL
            self.wanted[":".join(parts[:-1]), int(parts[-1])] = signum
        self.calls: dict[str, int] = {}

    def due(self, phase: str) -> bool:
        """Whether the next entry into `phase` sends a signal."""
        return (phase, self.calls.get(phase, 0) + 1) in self.wanted

    def enter(self, phase: str, half_written: str | None = None) -> None:
        """Count an entry into `phase`; at a chosen count, cut the file `half_written` to half
        its size, then send the signal."""
        self.calls[phase] = self.calls.get(phase, 0) + 1
        signum = self.wanted.get((phase, self.calls[phase]))
        if signum is not None:
            if half_written is not None:
                os.truncate(half_written, os.path.getsize(half_written) // 2)
            os.kill(os.getpid(), signum)


def traced(triggers: Triggers, phase: str, function):
    def entering(*args, **kwargs):
        triggers.enter(phase)
        return function(*args, **kwargs)
    return entering


def install_hooks(twin, triggers: Triggers) -> None:
    for phase, method in (("build", "__init__"), ("step", "train_step"),
                          ("evaluate", "evaluate")):
        setattr(twin, method, traced(triggers, phase, getattr(twin, method)))

    replacing = atomic.replacing

    @contextlib.contextmanager
    def replacing_traced(path):
        with replacing(path) as tmp:
            yield tmp
            triggers.enter(f"write:{os.path.basename(path)}", half_written=tmp)
    atomic.replacing = replacing_traced

    if twin.checkpoint_name == "checkpoint.pt":
        import torch

        torch_save = torch.save

        def torch_save_traced(obj, f, *args, **kwargs):
            torch_save(obj, f, *args, **kwargs)
            f.flush()
            triggers.enter("save", half_written=f.name)
        torch.save = torch_save_traced
    else:
        import orbax.checkpoint as ocp

        renaming = ocp.path.atomicity.AtomicRenameTemporaryPath
        finalize = renaming.finalize

        async def finalize_traced(self, *args, **kwargs):
            triggers.enter("save")
            return await finalize(self, *args, **kwargs)
        renaming.finalize = finalize_traced

        deleter = ocp.path.deleter.StandardCheckpointDeleter
        delete = deleter._delete_step_permanently

        def delete_traced(self, step, target, *args, **kwargs):
            if triggers.due("prune"):
                files = sorted(os.path.join(folder, name)
                               for folder, _, names in os.walk(str(target)) for name in names)
                for path in files[:len(files) // 2]:
                    os.remove(path)
            triggers.enter("prune")
            return delete(self, step, target, *args, **kwargs)
        deleter._delete_step_permanently = delete_traced


def twin_class(framework: str):
    if framework == "torch":
        from vqvae_torch.train import TorchTwin
        return TorchTwin
    from vqvae_jax.train import JaxTwin
    return JaxTwin


def run(framework: str, argv: list[str], signals: str) -> int:
    """One training run, as `python train_{framework}.py ARGV` would make it."""
    twin = twin_class(framework)
    install_hooks(twin, Triggers(signals))
    data._prepare = lambda *args: None  # mock data is "prepared" everywhere
    with tfds.testing.mock_data(num_examples=MOCK_IMAGES, policy=tfds.testing.MockPolicy.USE_CODE):
        return cli.main(framework, lambda m, t: loop.fit(twin, m, t), argv)


def serve() -> None:
    from jax._src import xla_bridge
    from matplotlib import pyplot

    for framework in ("torch", "jax"):
        twin_class(framework)
    import torch._inductor  # noqa: F401  torch.use_deterministic_algorithms imports it: 1.5 s
    figure = pyplot.figure()  # the first figure's setup (fonts) is paid here, once
    figure.savefig(io.BytesIO(), format="png")
    pyplot.close(figure)
    assert not xla_bridge.backends_are_initialized(), "a JAX backend must not cross a fork"
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryFile() as stderr:
            child = os.fork()
            if child == 0:
                _child(stderr, request)
            status = _wait(child)
            stderr.seek(0)
            answer = {"status": status, "stderr": stderr.read().decode(errors="replace")}
        print(json.dumps(answer), flush=True)


def _child(stderr, request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(stderr.fileno(), 2)
        code = run(request["framework"], request["argv"], request["signals"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _wait(child: int) -> int:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
        time.sleep(0.01)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        sys.exit(run(sys.argv[1], sys.argv[2:], os.environ.get("MOCK_TRAIN_SIGNALS", "")))
