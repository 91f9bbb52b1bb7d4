"""Files that are never left half-written: each is written to a temporary file in the same folder, flushed
and fsync'ed, then renamed over the target (an atomic step on POSIX), and the folder is fsync'ed too. A
crash at any moment leaves either the old file or the new one, and at worst a ``.tmp-<name>-*`` file that
the next run clears (``stale_temporaries``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator, List


def temporary_prefix(path: str) -> str:
    return ".tmp-" + os.path.basename(path) + "-"


def file_mode(path: str) -> int:
    """The permissions ``path`` should get: those of the file it replaces, else what ``open()`` would give a
    new file (0666 less the umask). mkstemp makes its file private (0600), which would hide a run's outputs
    from the other users of a shared machine."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)  # the only portable way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` gets all of it, or stays as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=temporary_prefix(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def stale_temporaries(folder: str, names: List[str]) -> List[str]:
    """Temporary files that interrupted writes of ``names`` left in ``folder``."""
    prefixes = tuple(temporary_prefix(name) for name in names)
    return [os.path.join(folder, entry) for entry in os.listdir(folder) if entry.startswith(prefixes)]
