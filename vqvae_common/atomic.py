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


def cannot_make(path: str, file: bool = True) -> str | None:
    """Why `path` (a `file`, else a folder) cannot be made, with any folders missing above
    it: the nearest existing one above is not a directory, a name is longer than its file
    system allows (a file's with SUFFIX, the name it is first written under), or no file can
    be made in it, found by making (and removing) one, as permission bits do not tell for
    root, nor for file systems such as /proc. None where it can."""
    start = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(start):
        start = os.path.dirname(start)
    if not os.path.isdir(start):
        return f"{start} is not a directory"
    names = os.path.relpath(os.path.abspath(path), start).split(os.sep)
    longest = os.pathconf(start, "PC_NAME_MAX")
    for depth, name in enumerate(names, 1):
        temporary = file and depth == len(names)  # first written under name + SUFFIX
        size = len(os.fsencode(name + SUFFIX if temporary else name))
        if size > longest:
            written = f" written as {name[:8]}...{SUFFIX}" if temporary else ""
            return (f"the name {name[:20]}... is {size} bytes{written}, over the {longest} "
                    f"that {start} allows")
    try:
        with tempfile.NamedTemporaryFile(dir=start, prefix=".", suffix=SUFFIX):
            return None
    except OSError as e:
        return f"no file can be made in {start} ({e.strerror or e})"


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (a power cut could otherwise undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
