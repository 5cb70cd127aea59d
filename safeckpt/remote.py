"""Remote storage through fsspec: URLs (``s3://``, ``gs://``, ``http(s)://``, ``memory://``) and
fsspec filesystem objects, read with exact ranged requests (FORMAT.md section 12, [RS1]-[RS7]).

Every fsspec call of safeckpt goes through this module, so that one place turns the storage's
errors into :class:`safeckpt.RemoteError` (naming the URL and the byte range) and keeps a missing
object a :class:`FileNotFoundError`. fsspec is imported only when a URL or a filesystem is given:
local paths (and ``file://`` URLs, and fsspec's local filesystem) never import it and go to the
local code (mmap, pread, rename) unchanged.

- :func:`resolve` turns what a caller passed (a path, ``storage_options=``, ``fs=``) into a local
  path (a str) or a :class:`RemotePath`; :func:`is_url` tells a remote URL from a path, cheaply.
- :class:`RemotePath` is an object (or a directory) in a filesystem: listing, size, removal,
  small whole reads and writes, and streamed writes that never leave a partial object visible.
- :class:`RemoteFile` is one object opened for ranged reads: exact lengths [RS2], padding checked
  [RS3], CRC32C as the bytes arrive [RS4], bounded memory [RS5], neighbours coalesced [RS6].

Example:
    >>> resolve("model.sckpt"), is_url("s3://bucket/model.sckpt")
    ('model.sckpt', True)
    >>> rp = resolve("memory://docs/x.bin")          # doctest: +SKIP
    >>> rp.write_small(b"0123456789"); RemoteFile(rp).read(2, 3)  # doctest: +SKIP
    b'234'
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import io
import os
import re
import sys
import threading
from typing import (Any, BinaryIO, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union,
                    cast)

import numpy as np

from . import _backend
from .errors import Code, InvalidValueError, LimitError, RemoteError, error_for

# "scheme://": a URL (RFC 3986 scheme characters). "file://" is a local path.
_URL = re.compile(r"\A([A-Za-z][A-Za-z0-9+.\-]*)://")
_FILE = "file://"
INSTALL_HINT = ("pip install 'safeckpt[remote]' (fsspec), and the filesystem's own package: "
                "s3fs for s3://, gcsfs for gs://, adlfs for az://, aiohttp for http(s)://")

CHUNK_SIZE = 16 << 20  # [RS5] the longest single ranged request; longer ranges are cut in chunks
MAX_GAP = 1 << 20  # [RS6] ranges this close are fetched in one request (the gap is read and dropped)
MAX_IN_FLIGHT = 64 << 20  # [RS5] response bytes held at once, at most (one batch of requests)


def is_url(path: object) -> bool:
    """Whether ``path`` is a remote URL: a str (or bytes, or path-like) that starts with
    ``scheme://``, the scheme not ``file``. Imports nothing.

    Example:
        >>> is_url("s3://b/k"), is_url("file:///tmp/x"), is_url("/tmp/x"), is_url(3)
        (True, False, False, False)
    """
    try:
        text = os.fsdecode(cast(Any, path))
    except TypeError:
        return False
    match = _URL.match(text)
    return match is not None and match.group(1).lower() != "file"


def resolve(path: Any, *, storage_options: Optional[dict] = None,
            fs: Any = None) -> Union[str, "RemotePath"]:
    """Where ``path`` is: a local path (a str) or a :class:`RemotePath`.

    Local: a path without a scheme, a ``file://`` URL, or a path inside an fsspec
    ``LocalFileSystem`` given as ``fs``; these go to safeckpt's local code unchanged.

    Parameters:
        path: a str, bytes or path-like; a URL (``s3://bucket/key``); a path inside ``fs``; or a
            :class:`RemotePath` (returned as it is).
        storage_options: passed to fsspec to build the URL's filesystem (credentials, endpoint).
        fs: an fsspec filesystem object; ``path`` is then a path inside it.

    Raises:
        InvalidValueError: ``storage_options`` or ``fs`` with a local path (nothing would use
            them), both at once, or a URL fsspec does not know.
        ImportError: fsspec, or the filesystem's package, is missing (the message says what to
            install).
        TypeError: ``path`` is not a str, bytes or path-like object.

    Example:
        >>> resolve("file:///tmp/model.sckpt")
        '/tmp/model.sckpt'
        >>> resolve("s3://bucket/ckpt/step-1.sckpt", storage_options={"anon": True})  # doctest: +SKIP
        RemotePath(fs=<s3fs...>, path='bucket/ckpt/step-1.sckpt', url='s3://bucket/ckpt/step-1.sckpt')
    """
    if isinstance(path, RemotePath):
        if storage_options is not None or fs is not None:
            raise InvalidValueError(f"{path.url}: a RemotePath carries its filesystem already; "
                                    "pass no storage_options= or fs= with it")
        return path
    text = os.fsdecode(path)
    if fs is not None:
        if storage_options is not None:
            raise InvalidValueError(f"{text!r}: pass storage_options= or fs=, not both (give the "
                                    "options to the filesystem when you build it)")
        return _in_fs(fs, text)
    if not is_url(text):
        if storage_options is not None:
            raise InvalidValueError(f"{text!r} is a local path: storage_options= is for remote "
                                    "URLs (s3://, gs://, http(s)://, ...); remove it, or give a URL")
        return text[len(_FILE):] if text.lower().startswith(_FILE) else text
    fsspec = _import_fsspec(text)
    try:
        found, inner = fsspec.core.url_to_fs(text, **(storage_options or {}))
    except ImportError as exc:  # fsspec knows the scheme; its package (s3fs, gcsfs) is missing
        raise ImportError(f"{text!r}: {exc}; {INSTALL_HINT}") from exc
    except ValueError as exc:  # "Protocol not known"
        raise InvalidValueError(f"{text!r}: fsspec cannot open this URL: {exc}") from exc
    return _in_fs(found, inner)


def _import_fsspec(what: str) -> Any:
    """fsspec, imported now (a URL or a filesystem was given), or an ImportError saying what to
    install."""
    try:
        import fsspec
    except ImportError as exc:
        raise ImportError(f"{what!r} is remote and needs fsspec: {INSTALL_HINT}") from exc
    return fsspec


def _in_fs(fs: Any, path: str) -> Union[str, "RemotePath"]:
    """``path`` inside the filesystem ``fs``: a local str for fsspec's local filesystem; through
    a ``DirFileSystem`` (a prefix view), the path in the filesystem under it."""
    if not hasattr(fs, "_strip_protocol"):
        raise InvalidValueError(f"fs= must be an fsspec filesystem object, not "
                                f"{type(fs).__name__}")
    from fsspec.implementations.dirfs import DirFileSystem  # fs is fsspec's: fsspec is loaded
    from fsspec.implementations.local import LocalFileSystem

    # a prefix view: the filesystem under it sets the rules (local paths; how a write becomes
    # visible [RS7]), which the view passes on inconsistently (autocommit)
    while isinstance(fs, DirFileSystem):
        try:
            path = fs._join(path)
        except ValueError as exc:  # a local path escaping the view's root
            raise InvalidValueError(f"{path!r}: {exc}") from exc
        fs = fs.fs
    inner = fs._strip_protocol(path)
    if isinstance(fs, LocalFileSystem):
        return cast(str, inner)
    return RemotePath(fs, inner, fs.unstrip_protocol(inner))


@contextlib.contextmanager
def _storage(url: str, what: str) -> Iterator[None]:
    """Run fsspec calls: a missing object stays a FileNotFoundError; every other failure of the
    storage (fsspec, botocore, aiohttp, asyncio: an error status, a timeout, a lost connection)
    becomes a RemoteError naming ``url`` and ``what`` (the operation and the byte range)."""
    try:
        yield
    except FileNotFoundError as exc:
        raise FileNotFoundError(errno.ENOENT, f"no such object ({what})", url) from exc
    except (MemoryError, RemoteError):
        raise
    except Exception as exc:
        detail = str(exc) or "no detail"  # a timeout's str() is empty
        raise RemoteError(f"{url}: {what} failed: {type(exc).__name__}: {detail}; "
                          "check the URL, the credentials or endpoint in storage_options, and "
                          "the storage itself, then try again") from exc


class RemotePath(NamedTuple):
    """An object (or a directory) in an fsspec filesystem: ``fs``, the ``path`` inside it, and
    the ``url`` that messages name it by. Made by :func:`resolve`.

    Example:
        >>> rp = resolve("memory://ckpt")                                # doctest: +SKIP
        >>> rp.join("step-1.sckpt").write_small(b"..."); rp.listdir()     # doctest: +SKIP
        ['step-1.sckpt']
    """

    fs: Any
    path: str
    url: str

    def join(self, name: str) -> "RemotePath":
        """The child ``name`` of this directory."""
        path = self.path.rstrip("/") + "/" + name
        return RemotePath(self.fs, path, self.fs.unstrip_protocol(path))

    @property
    def parent(self) -> "RemotePath":
        """The directory that holds this object."""
        path = self.fs._parent(self.path)
        return RemotePath(self.fs, path, self.fs.unstrip_protocol(path))

    @property
    def name(self) -> str:
        """The object's base name (the last part of its path)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def _fresh(self) -> None:
        """Drop fsspec's cached listings of this path and its directory, so that what another
        writer did since is seen."""
        self.fs.invalidate_cache(self.path)
        self.fs.invalidate_cache(self.fs._parent(self.path))

    def _info(self) -> Optional[dict]:
        """fsspec's info for the path, fresh; None when nothing is there. Over HTTP, one HEAD of
        safeckpt's own (fsspec's info takes any failure for "missing" [RS2])."""
        with _storage(self.url, "info"):
            if _is_http(self.fs):
                return cast(Optional[dict], _sync(self.fs, _http_head, self.fs, self.path))
            self._fresh()
            try:
                return cast(dict, self.fs.info(self.path))
            except FileNotFoundError:
                return None

    def exists(self) -> bool:
        """Whether an object or a directory is at this path (listing caches dropped first).

        Raises:
            RemoteError: the storage failed (a failure is never taken for "missing").
        """
        return self._info() is not None

    def isdir(self) -> bool:
        """Whether this path is a directory (an object store: a prefix with objects under it)."""
        info = self._info()
        return info is not None and info.get("type") == "directory"

    def listdir(self) -> List[str]:
        """The base names of the objects in this directory, sorted (subdirectories left out),
        listed afresh.

        Raises:
            FileNotFoundError: no such directory; RemoteError: the storage failed.
        """
        return sorted(self.sizes())

    def sizes(self) -> Dict[str, int]:
        """``{base name: size}`` of the objects in this directory (subdirectories left out), from
        one fresh listing: :meth:`listdir` with each object's size.

        Raises:
            FileNotFoundError: no such directory; RemoteError: the storage failed.
        """
        with _storage(self.url, "listing"):
            self._fresh()
            entries = self.fs.ls(self.path, detail=True)
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
                for entry in entries if entry.get("type") == "file"}

    def size(self) -> int:
        """The object's size in bytes (one metadata request: fsspec's ``info``; over HTTP a HEAD).

        Raises:
            FileNotFoundError: no such object; IsADirectoryError: a directory; RemoteError: the
                storage failed or did not say the size.
        """
        info = self._info()
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.url)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.url)
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise RemoteError(f"{self.url}: the storage gives no size for the object "
                              f"(info says {size!r}); a server must answer HEAD with a "
                              "Content-Length (and no Content-Encoding)")
        return size

    def remove(self) -> None:
        """Remove the object; nothing there is fine (removal is idempotent).

        Raises:
            RemoteError: the storage failed.
        """
        with _storage(self.url, "removal"):
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self._fresh()

    def read_small(self, limit: int) -> bytes:
        """The whole of a small object (a shard index, a commit object): its size is checked
        against ``limit`` before it is read.

        Raises:
            LimitError: the object is larger than ``limit`` (it is not read).
            FileNotFoundError: no such object; RemoteError: the storage failed, or the object
                changed size while read [RS2].
        """
        size = self.size()
        if size > limit:
            raise LimitError(f"{self.url}: the object is {size} bytes, more than the {limit} "
                             "that this small object may be; it was not read")
        if not size:
            return b""
        with _storage(self.url, f"read of bytes 0-{size - 1}"):
            data = _cat_ranges(self, [(0, size)])[0]
            if isinstance(data, BaseException):
                raise data
        _check_length(self.url, 0, size, data)
        return bytes(data)

    def check_writable(self) -> None:
        """Raise unless safeckpt writes to this filesystem: never over HTTP (fsspec's http
        filesystem has no object write that becomes visible only once complete [RS7]).

        Raises:
            InvalidValueError: an ``http(s)://`` object.
        """
        protocols = self.fs.protocol
        if {"http", "https"} & set([protocols] if isinstance(protocols, str) else protocols):
            raise InvalidValueError(f"{self.url}: safeckpt saves nothing over HTTP (fsspec's "
                                    "http filesystem has no object write that is visible only "
                                    "once complete); save to an object store (s3://, gs://, "
                                    "az://) or a local path, and serve that over HTTP")

    def write_small(self, data: bytes) -> None:
        """Write ``data`` as the whole object, in one request (an object store makes it visible
        whole, or not at all).

        Raises:
            InvalidValueError: an ``http(s)://`` object (:meth:`check_writable`).
            RemoteError: the storage failed.
        """
        self.check_writable()
        with _storage(self.url, f"write of {len(data)} bytes"):
            self.fs.pipe_file(self.path, bytes(data))
            self._fresh()

    @contextlib.contextmanager
    def open_write(self) -> Iterator[BinaryIO]:
        """A file to stream the object into; it becomes visible only when the block ends without
        an exception [RS7].

        fsspec's memory filesystem makes a file visible (replacing the object) as soon as it is
        opened, so there the stream is gathered in memory and stored whole at the end. Elsewhere
        the file is opened with fsspec's ``autocommit=False``: nothing is visible before the
        ``commit()`` that follows a clean close (s3fs: the multipart upload is completed then).
        On an exception the file's ``discard()`` throws the upload away (s3fs: the multipart
        upload is aborted); a filesystem that ignores ``autocommit`` (fsspec's memory one makes
        the object visible at open) has the object removed instead.

        Raises:
            InvalidValueError: an ``http(s)://`` object (:meth:`check_writable`).
            RemoteError: the storage failed, also inside a ``write`` (s3fs uploads a part
                there); the upload is discarded first.

        Example:
            >>> with resolve("memory://x.bin").open_write() as out:    # doctest: +SKIP
            ...     out.write(b"data")
        """
        self.check_writable()
        from fsspec.implementations.memory import MemoryFileSystem  # fs is fsspec's: loaded
        if isinstance(self.fs, MemoryFileSystem):  # its objects are in memory anyway
            gathered = io.BytesIO()
            yield gathered
            self.write_small(gathered.getvalue())
            return
        with _storage(self.url, "opening for writing"):
            out = self.fs.open(self.path, "wb", autocommit=False)
        try:
            yield cast(BinaryIO, _Upload(out, self.url))
            with _storage(self.url, "upload"):
                out.close()
                out.commit()
                self._fresh()
        except BaseException:
            _abandon(out, self)
            raise


class _Upload:
    """The stream :meth:`RemotePath.open_write` hands out: the filesystem's file, whose
    ``write`` (which may upload a part) turns a storage failure into a RemoteError naming the
    URL and the bytes written so far."""

    def __init__(self, out: Any, url: str) -> None:
        self._out, self._url, self._written = out, url, 0

    def write(self, data: Any) -> int:
        with _storage(self._url, f"upload (after {self._written} bytes)"):
            self._out.write(data)
        self._written += memoryview(data).nbytes
        return memoryview(data).nbytes


def _abandon(out: Any, rp: RemotePath) -> None:
    """Throw away an unfinished upload so that no partial object becomes visible; errors while
    doing so are dropped (the first error is the one raised).

    A file that took ``autocommit=False`` (it says so: ``out.autocommit`` is False) made nothing
    visible: its ``discard()`` drops the upload. A file of a filesystem that ignores autocommit
    may be visible already: it is closed and the object removed.
    """
    with contextlib.suppress(Exception):
        if getattr(out, "autocommit", True) is not False:
            out.close()
            rp.remove()
            return
        out.discard()
        # A buffered fsspec file closed later (by the garbage collector) would flush what it
        # holds, and s3fs would start a new multipart upload: mark it flushed, then close.
        if hasattr(out, "forced"):
            out.forced = True
        out.close()


def _check_length(url: str, start: int, length: int, data: Any) -> None:
    """[RS2]: a ranged response must be exactly the length asked for."""
    if len(data) != length:
        raise _wrong_answer(url, start, length, f"{len(data)} bytes")


def _wrong_answer(url: str, start: int, length: int, got: str) -> RemoteError:
    """[RS2]: the error for a ranged response that is not exactly the range asked for."""
    return RemoteError(f"{url}: asked for bytes {start}-{start + length - 1} ({length} bytes), "
                       f"got {got} [RS2]; the object changed or the server misbehaves (a short "
                       "or long answer is never used)")


def _is_http(fs: Any) -> bool:
    """Whether ``fs`` is fsspec's HTTP filesystem (imports nothing: it is loaded if ``fs`` is
    one), which safeckpt sends its own bounded requests through."""
    http = sys.modules.get("fsspec.implementations.http")
    return http is not None and isinstance(fs, http.HTTPFileSystem)


def _is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's filesystem (imports nothing: it is loaded if ``fs`` is one),
    which safeckpt sends its own bounded ranged requests through."""
    s3fs = sys.modules.get("s3fs")
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


def _sync(fs: Any, coroutine: Any, *args: Any) -> Any:
    """Run ``coroutine(*args)`` on the filesystem's event loop, from this (sync) thread."""
    from fsspec.asyn import sync  # fs is fsspec's: loaded

    return sync(fs.loop, coroutine, *args)


def _http_request(fs: Any) -> Dict[str, Any]:
    """The keyword arguments of one request, as fsspec's own: the filesystem's request options
    (``fs.kwargs``: headers, timeout, auth...), the body asked for as it is stored (its lengths
    are those of the object)."""
    kw = dict(fs.kwargs)
    kw["headers"] = dict(kw.get("headers") or {}, **{"Accept-Encoding": "identity"})
    return kw


def _encoded(headers: Any) -> Optional[str]:
    """The Content-Encoding of a response when it is not the identity (its lengths are then not
    the object's), else None."""
    encoding = headers.get("Content-Encoding", "").strip().lower()
    return encoding if encoding not in ("", "identity") else None


async def _http_head(fs: Any, url: str) -> Optional[dict]:
    """The info of ``url`` from one HEAD (redirects followed): None for 404 or 410; an error
    status raises aiohttp's ClientResponseError; ``size`` is None without a Content-Length."""
    kw = _http_request(fs)
    kw.setdefault("allow_redirects", True)  # aiohttp's HEAD does not follow them by default
    session = await fs.set_session()
    async with session.head(fs.encode_url(url), **kw) as r:
        if r.status in (404, 410):
            return None
        r.raise_for_status()
        length = r.headers.get("Content-Length", "")
        sized = length.isdigit() and _encoded(r.headers) is None
        return {"name": url, "type": "file", "size": int(length) if sized else None}


def _check_answer(url: str, start: int, end: int, status: int, declared: Any,
                  span: Optional[str]) -> None:
    """[RS2], before a ranged response's body is read: anything but a 206 whose Content-Length
    (``declared``) and Content-Range (``span``), when given, are the range is refused."""
    length = end - start
    if status != 206:
        raise _wrong_answer(url, start, length, f"status {status}, not 206 Partial Content" + (
            " (the whole object: the server ignores Range; serve the file from one that "
            "answers ranged requests)" if status == 200 else ""))
    if declared is not None and str(declared).strip() != str(length):
        raise _wrong_answer(url, start, length, f"a Content-Length of {declared}")
    if span is not None and not span.strip().startswith(f"bytes {start}-{end - 1}/"):
        raise _wrong_answer(url, start, length, f"Content-Range {span!r}")


async def _bounded_body(read: Any, url: str, start: int, length: int) -> bytearray:
    """A response body of ``length`` bytes from ``read(n)`` (at most ``n`` bytes a call, b""
    at its end), reading at most one byte more [RS2], [RS5]: a longer body is refused."""
    body = bytearray()
    while len(body) <= length:
        piece = await read(length + 1 - len(body))
        if not piece:
            break
        body += piece
    if len(body) > length:
        raise _wrong_answer(url, start, length, "a longer body")
    return body


async def _http_range(rp: RemotePath, start: int, end: int) -> bytearray:
    """Bytes ``[start, end)`` of an object of fsspec's HTTP filesystem by one ranged GET whose
    answer is checked before its body is read (:func:`_check_answer`, and no Content-Encoding),
    reading at most one byte more than asked; 404 or 410 is FileNotFoundError, another error
    status aiohttp's ClientResponseError."""
    fs, length = rp.fs, end - start
    kw = _http_request(fs)
    kw["headers"]["Range"] = f"bytes={start}-{end - 1}"
    session = await fs.set_session()
    async with session.get(fs.encode_url(rp.path), **kw) as r:
        if r.status in (404, 410):
            raise FileNotFoundError(errno.ENOENT, "no such object", rp.url)
        r.raise_for_status()
        _check_answer(rp.url, start, end, r.status, r.headers.get("Content-Length"),
                      r.headers.get("Content-Range"))
        if _encoded(r.headers):
            raise _wrong_answer(rp.url, start, length, f"a body of Content-Encoding "
                                f"{_encoded(r.headers)!r}")
        return await _bounded_body(r.content.read, rp.url, start, length)


async def _s3_range(rp: RemotePath, start: int, end: int) -> bytearray:
    """Bytes ``[start, end)`` of an s3fs object by one ranged ``get_object``, as s3fs's own
    ``cat_file`` makes it (the filesystem's request options, its retries, its errors: NoSuchKey
    is FileNotFoundError), but checked before its body is read (:func:`_check_answer`) and
    reading at most one byte more than asked."""
    retrying = _s3_retries()
    fs = rp.fs
    bucket, key, version = fs.split_path(rp.path)

    async def get() -> bytearray:
        answer = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                   Range=f"bytes={start}-{end - 1}",
                                   **({"VersionId": version} if version else {}))
        body = answer["Body"]
        try:
            _check_answer(rp.url, start, end, answer["ResponseMetadata"]["HTTPStatusCode"],
                          answer.get("ContentLength"), answer.get("ContentRange"))
            return await _bounded_body(body.read, rp.url, start, end - start)
        finally:
            body.close()  # unread bytes are dropped with the connection

    if retrying is None:
        return await get()
    return cast(bytearray, await retrying(get, retries=fs.retries))


def _s3_retries() -> Any:
    """s3fs's retry helper of its own ``cat_file`` (retries, and botocore errors translated:
    NoSuchKey is FileNotFoundError), or None: it is private to s3fs, and a release without it
    gets one try per request."""
    try:
        from s3fs.core import _error_wrapper
    except ImportError:
        return None
    return _error_wrapper


def _cat_ranges(rp: RemotePath, spans: List[Tuple[int, int]]) -> List[Any]:
    """The bytes of each ``(start, end)`` of ``rp``, or the exception that its request ended in:
    concurrent requests on async filesystems; over HTTP and S3 (s3fs), safeckpt's own bounded
    ones (:func:`_http_range`, :func:`_s3_range`), elsewhere fsspec's ``cat_ranges``."""
    fs = rp.fs
    fetch = _http_range if _is_http(fs) else _s3_range if _is_s3(fs) else None
    if fetch is None:
        # on_error="return" (fsspec's default): each failed range is its exception, whichever
        # fsspec version (some ignore on_error="raise" when async)
        return cast(List[Any], fs.cat_ranges([rp.path] * len(spans), [s for s, _ in spans],
                                             [e for _, e in spans], on_error="return"))

    async def gather() -> List[Any]:
        import asyncio

        return await asyncio.gather(*(fetch(rp, start, end) for start, end in spans),
                                    return_exceptions=True)

    return cast(List[Any], _sync(fs, gather))


def _byte_view(dest: Any, length: int) -> memoryview:
    """The first ``length`` bytes of a writable C-contiguous buffer (a numpy array of any dtype,
    a bytearray), as a writable memoryview of bytes."""
    if isinstance(dest, np.ndarray):
        if not (dest.flags.c_contiguous and dest.flags.writeable):
            raise ValueError("read_into: a destination is not a writable C-contiguous array")
        dest = dest.reshape(-1).view(np.uint8)
    view = memoryview(dest).cast("B")
    if view.readonly or view.nbytes < length:
        raise ValueError(f"read_into: a destination of {view.nbytes} bytes (read-only: "
                         f"{view.readonly}) for a range of {length} bytes")
    return view[:length]


class _Range(NamedTuple):
    """One range of a read_into call: ``[start, end)`` goes into ``view``, then ``pad`` bytes
    that must be zero [RS3]."""

    k: int  # its index in the call
    start: int
    end: int
    pad: int
    view: memoryview


class RemoteFile:
    """One remote object opened for ranged reads ([RS1]-[RS6]); a :class:`safeckpt.Reader` reads
    through it (``Reader(RemoteFile(rp))``).

    The size is read once (one metadata request) when it is made. ``requests`` and
    ``bytes_read`` count the ranged requests made and the response bytes received.

    Parameters:
        rp: the object.
        chunk_size: the longest single request [RS5]; a longer range is cut in chunks, each
            written straight into its destination.
        max_gap: ranges at most this far apart are fetched in one request [RS6].
        max_in_flight: response bytes held at once, at most [RS5]: requests go out in batches
            (concurrently on async filesystems: s3fs, http) of at most this many bytes.

    Raises:
        InvalidValueError: a size option is not a positive int.
        FileNotFoundError, IsADirectoryError, RemoteError: as :meth:`RemotePath.size`.

    Example:
        >>> f = RemoteFile(resolve("s3://bucket/model.sckpt"))         # doctest: +SKIP
        >>> f.read(0, 32), f.requests                                   # doctest: +SKIP
        (b'SCKPT...', 1)
    """

    def __init__(self, rp: RemotePath, *, chunk_size: int = CHUNK_SIZE, max_gap: int = MAX_GAP,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        for key, value in (("chunk_size", chunk_size), ("max_in_flight", max_in_flight)):
            if not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{key} must be a positive int of bytes, not {value!r}")
        if not isinstance(max_gap, int) or max_gap < 0:
            raise InvalidValueError(f"max_gap must be an int of bytes >= 0, not {max_gap!r}")
        self.rp = rp
        self.where = rp.url
        # a request fits in one of the two batches held at once [RS5]
        self.chunk_size, self.max_gap = max(1, min(chunk_size, max_in_flight // 2)), max_gap
        self.max_in_flight = max_in_flight
        self.requests = 0
        self.bytes_read = 0
        self._lock = threading.Lock()  # the counters, under reads from several threads
        self.size = rp.size()

    def __repr__(self) -> str:
        return f"<safeckpt.remote.RemoteFile {self.where} ({self.size} bytes)>"

    def read(self, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset``, by one exact ranged request [RS2] (none for 0).

        Raises:
            ValueError: the range is not inside the object.
            FileNotFoundError, RemoteError: as :meth:`read_into`.
        """
        out = bytearray(length)
        self.read_into([offset], [length], [out], False)
        return bytes(out)

    def read_into(self, offsets: Sequence[int], lengths: Sequence[int], dests: Sequence[Any],
                  checksum: Union[bool, Sequence[bool]] = False,
                  zero_after: Optional[Sequence[int]] = None,
                  padding_where: Optional[Sequence[str]] = None) -> Optional[np.ndarray]:
        """Read ``lengths[i]`` bytes at ``offsets[i]`` into ``dests[i]``, for each ``i``: the
        contract of the backends' ``read_into``, over ranged requests.

        Ranges at most ``max_gap`` apart share one request [RS6]; a request is at most
        ``chunk_size`` bytes [RS5], and batches of them (concurrent on async filesystems) hold at
        most ``max_in_flight`` bytes; each response is checked for its exact length [RS2], then
        copied straight into the destinations and checksummed as it arrives.

        Parameters:
            dests: writable C-contiguous buffers (numpy arrays of any dtype) of at least
                ``lengths[i]`` bytes.
            checksum: ``False``, ``True``, or one flag per range.
            zero_after: for each range, how many bytes after it must be zero (padding [RS3]);
                they are fetched with it and checked, never copied.
            padding_where: for each range, what a padding error names (default: the URL).

        Returns:
            ``None`` unless ``checksum``; else a uint32 array: the CRC32C of each range asked
            for, 0 for the others.

        Raises:
            LayoutError: a padding byte is not zero [T9].
            RemoteError: the storage failed, or a response had the wrong length [RS2].
            FileNotFoundError: the object is gone.
            ValueError: the lists differ in length, a range is outside the object, or a
                destination is unusable.
        """
        n = len(dests)
        if not len(offsets) == len(lengths) == n:
            raise ValueError("read_into: offsets, lengths and dests must have the same length")
        want = [bool(checksum)] * n if isinstance(checksum, (bool, np.bool_)) else list(checksum)
        pads = [0] * n if zero_after is None else list(zero_after)
        if len(want) != n or len(pads) != n:
            raise ValueError("read_into: one checksum flag and one zero_after per range")
        ranges = []
        for k in range(n):
            start, end = int(offsets[k]), int(offsets[k]) + int(lengths[k])
            if start < 0 or end < start or end + pads[k] > self.size or pads[k] < 0:
                raise ValueError(f"read_into: range {start}+{lengths[k]} (and {pads[k]} bytes "
                                 f"of padding) is not inside {self.where} ({self.size} bytes)")
            if end + pads[k] > start:
                ranges.append(_Range(k, start, end, pads[k], _byte_view(dests[k], end - start)))
        ranges.sort(key=lambda r: r.start)
        crcs = np.zeros(n, np.uint32)
        crc32c = _backend.backend.crc32c
        for batch, answers in self._fetched(self._batches(self._requests(ranges))):
            for (start, end, members), data in zip(batch, answers):
                for r in members:
                    lo, hi = max(start, r.start), min(end, r.end)
                    if lo < hi:
                        piece = memoryview(data)[lo - start:hi - start]
                        _backend.copy_into(r.view[lo - r.start:hi - r.start], piece)
                        if want[r.k]:
                            crcs[r.k] = crc32c(piece, int(crcs[r.k]))
                    lo, hi = max(start, r.end), min(end, r.end + r.pad)
                    if lo < hi and np.frombuffer(data, np.uint8, hi - lo, lo - start).any():
                        where = self.where if padding_where is None else padding_where[r.k]
                        raise error_for(Code.PADDING, where, f" (in bytes {lo}-{hi - 1}) [RS3]")
        return crcs if any(want) else None

    def _fetched(self, batches: Iterator[List[Tuple[int, int, List[_Range]]]]
                 ) -> Iterator[Tuple[List[Tuple[int, int, List[_Range]]], List[bytes]]]:
        """Each batch with its answers, the next batch fetched (on one helper thread) while the
        caller copies and checks this one, so the network never waits on the copies; two
        batches of at most ``max_in_flight / 2`` bytes are held at once [RS5]."""
        spans = lambda batch: [r[:2] for r in batch]  # noqa: E731 - the requests' (start, end)
        batch = next(batches, None)
        if batch is None:
            return
        following = next(batches, None)
        if following is None:  # one batch: no thread
            yield batch, self._fetch(spans(batch))
            return
        with concurrent.futures.ThreadPoolExecutor(1, "safeckpt-fetch") as pool:
            answers = pool.submit(self._fetch, spans(batch))
            try:
                while batch is not None:
                    ready = answers.result()
                    if following is not None:
                        answers = pool.submit(self._fetch, spans(following))
                    yield batch, ready
                    batch, following = following, next(batches, None)
            finally:
                answers.cancel()

    def _requests(self, ranges: List[_Range]) -> List[Tuple[int, int, List[_Range]]]:
        """The requests for ``ranges`` (sorted by start): ``(start, end, members)``. Ranges at
        most ``max_gap`` apart join one span [RS6]; a span is cut in requests of at most
        ``chunk_size`` bytes [RS5]; ``members`` are the ranges each request may touch."""
        spans: List[Tuple[int, int, List[_Range]]] = []
        for r in ranges:
            end = r.end + r.pad
            if spans and r.start - spans[-1][1] <= self.max_gap:
                first, last, members = spans[-1]
                spans[-1] = (first, max(last, end), members + [r])
            else:
                spans.append((r.start, end, [r]))
        requests = []
        for first, last, members in spans:
            for at in range(first, last, self.chunk_size):
                stop = min(at + self.chunk_size, last)
                requests.append((at, stop, [r for r in members
                                            if r.start < stop and r.end + r.pad > at]))
        return requests

    def _batches(self, requests: List[Tuple[int, int, List[_Range]]]
                 ) -> Iterator[List[Tuple[int, int, List[_Range]]]]:
        """The requests in batches of at most half ``max_in_flight`` bytes (at least one request
        each): :meth:`_fetched` holds two at once [RS5]."""
        batch: List[Tuple[int, int, List[_Range]]] = []
        held, limit = 0, max(1, self.max_in_flight // 2)
        for request in requests:
            length = request[1] - request[0]
            if batch and held + length > limit:
                yield batch
                batch, held = [], 0
            batch.append(request)
            held += length
        if batch:
            yield batch

    def _fetch(self, spans: List[Tuple[int, int]]) -> List[bytes]:
        """The bytes of each ``(start, end)``, by :func:`_cat_ranges` (concurrent requests on
        async filesystems), each checked for its exact length [RS2]."""
        what = (f"read of bytes {spans[0][0]}-{spans[0][1] - 1}" if len(spans) == 1 else
                f"read of {len(spans)} ranges within bytes {spans[0][0]}-{spans[-1][1] - 1}")
        with _storage(self.where, what):
            out = _cat_ranges(self.rp, spans)
        with self._lock:
            self.requests += len(spans)
            self.bytes_read += sum(len(data) for data in out if not isinstance(data, BaseException))
        for (start, end), data in zip(spans, out):
            if isinstance(data, BaseException):
                with _storage(self.where, f"read of bytes {start}-{end - 1}"):
                    raise data
            _check_length(self.where, start, end - start, data)
        return out
