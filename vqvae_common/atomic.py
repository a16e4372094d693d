"""Files written whole or not at all: each is written to `PATH.vqvae-tmp` in the same
directory, flushed to disk, then renamed over PATH (a rename within one file system is
atomic). A kill at any moment leaves PATH old or new, never truncated, plus at worst a
temporary file that the next run removes (`remove_leftovers`). The suffix is this project's
own, so that removing leftovers never touches anyone else's files."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

SUFFIX = ".vqvae-tmp"


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields the temporary path to write; on success it becomes `path`. If the write
    raises, the temporary file is removed and `path` is left as it was."""
    tmp = path + SUFFIX
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _sync_directory(os.path.dirname(path) or ".")


def write_atomic(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def remove_leftovers(directory: str) -> None:
    """Delete the temporary files that writes interrupted by a kill left in `directory`."""
    for entry in os.scandir(directory):
        if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
            os.remove(entry.path)


def nearest_existing(path: str) -> str:
    """`path`, or the nearest folder above it that exists: where a writer of `path` starts
    making folders."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def cannot_create_in(directory: str) -> str | None:
    """Why no file can be made in the existing `directory`, found by making (and removing)
    one: permission bits do not tell for root, nor for file systems such as /proc."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".", suffix=SUFFIX):
            return None
    except OSError as e:
        return f"no file can be made in {directory} ({e.strerror or e})"


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (a power cut could otherwise undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
