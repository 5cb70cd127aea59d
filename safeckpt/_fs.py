"""File-system helpers: new files that never overwrite in place [W2], [W3], their temporary names,
full writes, a small thread fan-out, and opening an untrusted path that must be a regular file.

Example:
    >>> import os, tempfile
    >>> from safeckpt import _fs
    >>> path = os.path.join(tempfile.mkdtemp(), "x.sckpt")
    >>> with _fs.new_file(path, atomic=True) as fd:
    ...     _fs.pwrite_all(fd, b"data", 0)
    >>> open(path, "rb").read()
    b'data'
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import re
import secrets
import stat
from typing import BinaryIO, Callable, Iterable, Iterator, List, Tuple, TypeVar, Union

from .errors import HeaderError

_T = TypeVar("_T")
_R = TypeVar("_R")

MAX_WORKERS = 8  # threads of a fan-out: more gains nothing on one disk and costs memory
# ".NAME.<12 hex digits>.tmp": the temporary file of an atomic save of NAME, in the same directory.
TEMP_NAME = re.compile(r"\A\.(?P<base>.+)\.[0-9a-f]{12}\.tmp\Z", re.DOTALL)
# Opening a file to read: O_NONBLOCK so that a FIFO given as the path does not block open() until
# a writer comes (regular files ignore the flag); O_CLOEXEC so no child process inherits it.
READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def temp_name(path: str) -> str:
    """A fresh temporary path beside ``path``, matched by :data:`TEMP_NAME`."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")


def fsync_directory(path: str) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: Union[bytes, bytearray, memoryview], offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked).

    Raises:
        OSError: a pwrite wrote nothing (EIO) or failed.
    """
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written


def _check_target(path: str) -> "int | None":
    """The mode of what is at ``path`` (None if nothing), refusing what a save must not replace."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "cannot save over a directory", path)
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise FileExistsError(errno.EEXIST, "cannot save over what is not a regular file (a "
                              "FIFO, socket or device)", path)
    return mode


@contextlib.contextmanager
def new_file(path: str, atomic: bool) -> Iterator[int]:
    """The descriptor of a new, empty file that becomes ``path`` when the block ends [W2], [W3].

    Nothing is ever written into the file already at ``path``: readers may have it mapped.
    With ``atomic``, a temporary file in the same directory (:func:`temp_name`) is fsynced and
    renamed over ``path``, then the directory is fsynced. Without, the old file is unlinked first
    and the new one created at ``path``: no room for two copies is needed, and ext4 does not flush
    the new file as it does (auto_da_alloc) on a rename over a file or a truncation to zero. On an
    error the new file is removed.

    Raises:
        IsADirectoryError, FileExistsError: a directory, FIFO, socket or device is at ``path``.
        FileNotFoundError: the directory does not exist (named as such).
        OSError: from the file system, naming ``path``.
    """
    mode = _check_target(path)
    directory = os.path.dirname(os.path.abspath(path))
    target = temp_name(path) if atomic else path
    if not atomic and mode is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except FileNotFoundError:  # a hidden temporary name would only confuse: say what is missing
        raise FileNotFoundError(errno.ENOENT, f"cannot save {path!r}: the directory does not "
                                "exist", directory) from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot save {path!r} in {directory!r}: {exc.strerror}") from None
    try:
        try:
            yield fd
            if atomic:
                os.fsync(fd)
        finally:
            os.close(fd)
        if atomic:
            try:
                os.replace(target, path)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot save {path!r}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise
    if atomic:
        fsync_directory(directory)


def open_regular(path: str, where: str, hint: str) -> Tuple[BinaryIO, int]:
    """``(file, size)``: the file at ``path`` opened for reading, refused at once unless it is a
    regular file (a FIFO is not waited on); the caller closes the file.

    Parameters:
        path: the path to open.
        where: how messages name the file (e.g. its ``repr``).
        hint: the end of the message for a file that is not regular (a rule, the way out).

    Raises:
        IsADirectoryError: a directory.
        HeaderError: a FIFO, socket or device ("<where>: not a regular file (a FIFO or a
            device)<hint>").
        OSError: from the file system (a missing file, no permission).

    Example:
        >>> file, size = open_regular("m.safetensors.index.json", "the index", "")  # doctest: +SKIP
    """
    file = os.fdopen(os.open(path, READ_FLAGS), "rb")
    try:
        info = os.fstat(file.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(info.st_mode):
            raise HeaderError(f"{where}: not a regular file (a FIFO or a device){hint}")
        return file, info.st_size
    except BaseException:
        file.close()
        raise


def fan_out(function: Callable[[_T], _R], jobs: Iterable[_T]) -> List[_R]:
    """``[function(job) for job in jobs]``, in up to :data:`MAX_WORKERS` threads when there are
    several jobs (file I/O and our C core release the GIL); the first exception is raised.

    Example: ``fan_out(os.path.getsize, paths)``.
    """
    jobs = list(jobs)
    if len(jobs) <= 1:
        return [function(job) for job in jobs]
    workers = min(len(jobs), os.cpu_count() or 1, MAX_WORKERS)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, jobs))
