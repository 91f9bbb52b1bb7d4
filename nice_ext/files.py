"""Files that are never left half-written: each is written to a temporary file in the same folder, flushed
and fsync'ed, then renamed over the target (an atomic step on POSIX), and the folder is fsync'ed too. A
crash at any moment leaves either the old file or the new one, and at worst a ``.tmp-<name>-*`` file that
the next run clears (``stale_temporaries``)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
import threading
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence


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
    if os.path.isdir(path):  # checked first: the rename at the end would fail only once all is written
        raise IsADirectoryError(errno.EISDIR, "is a folder: name a file to write", path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        fd, tmp_path = tempfile.mkstemp(prefix=temporary_prefix(path), dir=folder)
    except OSError as error:  # a folder one may not write in: name the file asked for, not the temporary one
        raise OSError(error.errno, error.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            # a failed write or fsync (a full disk) names no file: name the one it was for
            raise OSError(error.errno, error.strerror, path) from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_can_write_in(folder: str, path: str) -> None:
    """Make and remove a temporary file in ``folder`` for ``path``, as ``atomic_file`` will: a folder one may
    not write in (its permissions, a read-only file system) raises the OSError now, naming ``folder``, rather
    than once the work whose result was to go there is done."""
    try:
        fd, probe = tempfile.mkstemp(prefix=temporary_prefix(path), dir=folder)
    except OSError as error:
        raise OSError(error.errno, error.strerror, folder) from None
    os.close(fd)
    os.unlink(probe)


def write_bytes(data: bytes, path: str) -> None:
    with atomic_file(path) as f:
        f.write(data)


def stale_temporaries(folder: str, names: List[str]) -> List[str]:
    """Temporary files that interrupted writes of ``names`` left in ``folder``."""
    prefixes = tuple(temporary_prefix(name) for name in names)
    return [os.path.join(folder, entry) for entry in os.listdir(folder) if entry.startswith(prefixes)]


class BackgroundWriter:
    """Runs batches of file writes on a worker thread, so that training does not wait for the disk.

    ``submit(jobs)`` first waits for the batch before it (one batch in flight: a disk slower than training
    holds training back rather than piling up copies of the state in memory), then starts ``jobs`` in
    order on a new thread. ``wait()`` returns once everything submitted is written, and raises the first
    error a job met (a full disk, a folder gone), so a failed write is reported at the next ``submit``,
    ``poll`` or ``wait``. The thread is not a daemon: a process that exits while a batch is being written
    finishes it first. Each job should write through ``atomic_file``, so a file is never seen half-written.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, jobs: Sequence[Callable[[], None]]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(list(jobs),), name="nice_ext-writer")
        self._thread.start()

    def _run(self, jobs: List[Callable[[], None]]) -> None:
        try:
            for job in jobs:
                job()
        except BaseException as error:  # handed to the thread that waits, which reports it
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def poll(self) -> None:
        """Raise the error of a batch that has failed already, without waiting for one under way."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait_quietly(self) -> None:
        """``wait``, for a caller that is already failing: a write's own error is then printed, not raised, so
        it does not hide the failure under way."""
        try:
            self.wait()
        except Exception as error:
            print(f"error: a file write failed too: {type(error).__name__}: {error}", file=sys.stderr)
