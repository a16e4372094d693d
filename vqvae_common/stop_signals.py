"""SIGTERM (what a cluster scheduler sends before it preempts a job) and SIGINT (Ctrl-C)
stop a training run between two steps, with a checkpoint, instead of where it stands.

Before the first step a signal stops the run at once: nothing new needs saving. (Where its
Stopped is raised inside a gc callback, jax's among them, Python prints it as ignored and
goes on; `received` stays set, and the loop stops before its first step.) Once the
loop has called `defer`, the first signal only sets `received`; the loop finishes its step,
saves a checkpoint at that step and raises Stopped. A second signal stops the process at
once, even in the middle of that save: checkpoints are written atomically, so the previous
one is still complete.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import NoReturn

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_at_once(signum: int, frame: FrameType | None) -> NoReturn:
    """SIGINT in the command-line tools outside a training run's StopSignals (cli.report_errors
    installs it): one line, and exit status 128 + signum now. Not a KeyboardInterrupt: one
    raised while jax's gc callback runs (in gc.callbacks) is printed as ignored and lost
    (Ctrl-C 1.5 and 2.2 s into convert.py did nothing), and the interpreter's exit after one,
    with XLA's or tensorstore's threads at work, segfaulted (3 of 13 tries 2.8-5.5 s in). The
    tools write every file atomically (vqvae_common.atomic, orbax), so no exit leaves one
    half written."""
    _exit_now("interrupted", signum)


def _exit_now(message: str, signum: int) -> NoReturn:
    """`message` on stderr, then exit status 128 + signum, without Python's clean-up."""
    with contextlib.suppress(OSError):  # a closed stderr must not keep it running
        print(message, file=sys.stderr, flush=True)
    os._exit(128 + signum)


class Stopped(BaseException):
    """Training stopped on a signal; the message says where and how to go on. Like
    KeyboardInterrupt, not an Exception: no `except Exception` on the way may swallow it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum  # the shell's convention for "ended by a signal"


class StopSignals:
    """A context manager that handles SIGTERM and SIGINT as described above while it is
    entered (on the main thread only: Python delivers signals there)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def defer(self) -> None:
        """From now on a first signal waits for the loop (`received`) instead of stopping."""
        self._deferred = True

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            _exit_now(f"\nstopped at once by a second {signal.Signals(signum).name}; the last "
                      f"complete checkpoint is kept: rerun with --resume to continue from it",
                      signum)
        self.received = signum
        if not self._deferred:
            raise Stopped(f"stopped by {self.name} before the first step; nothing needed "
                          f"saving: rerun the same command", signum)
