"""One trainer per output directory: an exclusive flock(2) on OUT/train.lock, held for the
whole run. The kernel releases it however the process ends, SIGKILL included, so a lock
file left behind never blocks the next run. (flock may not be honoured across machines on
some network file systems.)"""
from __future__ import annotations

import fcntl
import os

from vqvae_common.errors import UserError

LOCK_NAME = "train.lock"


class RunLock:
    """Held from construction until `release`; a second trainer on the same directory gets a
    UserError at once and changes nothing there."""

    def __init__(self, out: str) -> None:
        path = self.path = os.path.join(out, LOCK_NAME)
        while True:  # until the lock held is the file at `path` (see release)
            self.created = not os.path.lexists(path)
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"output directory {out} is not writable ({e.strerror})") from e
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(self._fd)
                raise UserError(f"{out} is in use by another trainer (pid {holder}): wait for "
                                f"it to end, or choose another --out") from None
            if self._holds(path):
                break
            os.close(self._fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _holds(self, path: str) -> bool:
        """Whether the file locked is still the one at `path`: a trainer that opened it just
        before a refused one removed it (release) locks a file no other trainer will open."""
        try:
            return os.stat(path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def release(self, discard: bool = False) -> None:
        """`discard`: a run refused before it wrote anything also takes away the lock file it
        created, so that nothing is left behind in a folder it was not allowed to use."""
        if discard and self.created:
            try:
                os.unlink(self.path)  # while still held
            except OSError:
                pass
        os.close(self._fd)
