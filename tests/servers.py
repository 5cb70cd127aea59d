"""Servers for the remote-storage tests (issue 14): on 127.0.0.1 only, stopped in bounded time.

:class:`ObjectServer` is an HTTP/1.1 server from the standard library serving objects from a dict:
HEAD, and GET of the whole object (200) or of one byte range (206 with Content-Range; 416 when the
range cannot be satisfied), Content-Length and ETag always. :class:`MotoServer` is moto's
S3-compatible server (moto's own WSGI application on werkzeug, as ``moto.server.ThreadedMotoServer``
runs it, but on a port the system picks and with a bounded start). Both count requests and response
body bytes per method (:class:`Traffic`), and both misbehave on demand (``misbehave``: a short or
long body, a body cut short of its Content-Length, an error status, a hang, an ignored Range; the
HTTP server also replaces an object after N requests), so that tests can check that safeckpt names
every such failure (FORMAT.md [R2], [R4]) and never hangs.

:class:`LoopbackOnly` records every connection or name lookup to a host other than 127.0.0.1 (an
audit hook): the fixtures in tests/conftest.py fail a test whose code tried the network.
benchmarks/bench_remote.py uses these servers too.

Example:
    >>> with ObjectServer() as server:
    ...     server.objects["a.bin"] = b"0123456789"
    ...     with urllib.request.urlopen(urllib.request.Request(
    ...             server.url("a.bin"), headers={"Range": "bytes=2-4"})) as r:
    ...         print(r.status, r.read(), r.headers["Content-Range"])
    206 b'234' bytes 2-4/10
"""

from __future__ import annotations

import collections
import http.server
import re
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds a server may take to answer its first request (moto imports a lot)
STOP_TIMEOUT = 10.0  # seconds a server's threads get to end at teardown; more is a failure
HANG_LIMIT = 60.0  # a hanging answer gives up (closes) after this even if the server is not stopped
MODES = ("short", "cut", "long", "status", "hang", "full", "huge", "endless")
HUGE = 1 << 30  # bytes of the body of a "huge" or "endless" answer, made as it is sent
# the environment of botocore in the tests: dummy credentials, a region, no instance metadata
# lookups, no profile from the machine's ~/.aws, and no proxy for the loopback address
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE":
    "/nonexistent/aws-credentials", "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK,
}
_S3_ERRORS = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}


class Request(NamedTuple):
    """One request a server answered: its method, path, Range header and status."""

    method: str
    path: str
    range: Optional[str]
    status: int


class Traffic:
    """Requests and response body bytes per method, and the log of requests; thread-safe.

    Example:
        >>> t = Traffic(); t.record("GET", "/a", "bytes=0-9", 206, 10); (t.requests, t.bytes)
        (1, 10)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every request counted so far."""
        with self._lock:
            self.by_method: collections.Counter[str] = collections.Counter()
            self.bytes_by_method: collections.Counter[str] = collections.Counter()
            self.log: List[Request] = []

    def record(self, method: str, path: str, range_: Optional[str], status: int,
               nbytes: int) -> None:
        """Count one request and the body bytes sent for it."""
        with self._lock:
            self.by_method[method] += 1
            self.bytes_by_method[method] += nbytes
            self.log.append(Request(method, path, range_, status))

    def add_bytes(self, method: str, nbytes: int) -> None:
        """Count body bytes sent for a request already recorded (a streamed body)."""
        with self._lock:
            self.bytes_by_method[method] += nbytes

    @property
    def requests(self) -> int:
        """Requests of every method."""
        return sum(self.by_method.values())

    @property
    def bytes(self) -> int:
        """Response body bytes of every method."""
        return sum(self.bytes_by_method.values())


class Fault(NamedTuple):
    """How to answer the requests a fault applies to (see :meth:`Faults.add`)."""

    mode: str
    by: int
    status: int
    name: Optional[str] = None  # "replace": the object to replace
    data: bytes = b""  # "replace": its new bytes


class Faults:
    """Faults waiting for their request: each skips ``after`` requests, then applies ``times``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: List[List[Any]] = []  # [method, after, times, fault]
        self.applied = 0  # requests answered with a fault, for tests to check that one was hit

    def add(self, fault: Fault, method: str, after: int, times: Optional[int]) -> None:
        """Apply ``fault`` to the requests of ``method`` after the next ``after`` of them."""
        with self._lock:
            self._pending.append([method, after, times, fault])

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._pending.clear()

    def take(self, method: str) -> List[Fault]:
        """The faults that apply to this request of ``method``, in the order they were added."""
        hits = []
        with self._lock:
            for entry in self._pending:
                if entry[0] != method:
                    continue
                if entry[1] > 0:
                    entry[1] -= 1
                elif entry[2] is None or entry[2] > 0:
                    entry[2] = None if entry[2] is None else entry[2] - 1
                    hits.append(entry[3])
            self._pending = [e for e in self._pending if e[2] is None or e[2] > 0]
            self.applied += bool(hits)
        return hits


def make_fault(mode: str, by: int, status: int) -> Fault:
    """Check a fault's mode and numbers (a test's typo must not pass as a well-behaved server)."""
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}: one of {', '.join(MODES)}")
    if by < 1 or not 400 <= status <= 599:
        raise ValueError(f"by must be >= 1 and status an error status, not {by!r}, {status!r}")
    return Fault(mode, by, status)


class _Misbehaving:
    """``misbehave`` and ``behave``, shared by both servers."""

    def __init__(self) -> None:
        self.traffic = Traffic()
        self.faults = Faults()
        self._release = threading.Event()  # set: hanging answers end (behave, stop)

    def _hang(self) -> None:
        """Answer nothing until ``behave()`` or ``stop()``, or HANG_LIMIT."""
        self._release.wait(HANG_LIMIT)

    def misbehave(self, mode: str, *, after: int = 0, times: Optional[int] = None, by: int = 1,
                  status: int = 500, method: str = "GET") -> None:
        """Answer badly the requests of ``method`` that come after the next ``after`` of them.

        Parameters:
            mode: "short": ``by`` bytes fewer than the range asked, Content-Length (and
                Content-Range) saying so; "cut": the Content-Length of the whole range, then ``by``
                bytes fewer and the connection closed; "long": ``by`` bytes more than asked (the
                object's next bytes, zeros past its end), Content-Length saying so; "status": the
                error ``status`` and no object; "hang": the request is read and never answered
                (until the server stops, or HANG_LIMIT); "full": the Range is ignored (200 and the
                whole object); "huge": the Range is ignored, 200 and a body of HUGE zero bytes
                (Content-Length saying so); "endless": no Content-Length (the body ends when the
                connection closes), HUGE zero bytes, with 206 and the Content-Range of the range
                asked for (200 without Range; HEAD: 200 and no body). "huge" and "endless" make
                their body as it is sent (the server holds 1 MiB) and stop when the client goes.
            after: requests of ``method`` answered well first, counted from now.
            times: requests answered badly; None: all from then on.

        Example:
            >>> with ObjectServer() as server:
            ...     server.misbehave("status", status=503)
            ...     urllib.request.urlopen(server.url("x"))
            Traceback (most recent call last):
            urllib.error.HTTPError: HTTP Error 503: Injected
        """
        self.faults.add(make_fault(mode, by, status), method, after, times)

    def behave(self) -> None:
        """Drop every fault not applied yet, and end the hanging answers."""
        self.faults.clear()
        self._release.set()
        self._release = threading.Event()


def byte_range(header: str, size: int) -> Optional[range]:
    """The bytes one ``Range: bytes=...`` header asks of an object of ``size`` bytes, or None.

    None when the range is unsatisfiable (starts at or past the end) or is not one range of the
    forms ``a-b``, ``a-`` or ``-n`` (this server answers 416 then).

    Example:
        >>> byte_range("bytes=2-4", 10), byte_range("bytes=-3", 10), byte_range("bytes=10-", 10)
        (range(2, 5), range(7, 10), None)
    """
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:
        count = int(last)
        return range(max(size - count, 0), size) if count and size else None
    start = int(first)
    stop = size if not last else min(int(last) + 1, size)
    return range(start, stop) if start < stop else None


def etag(data: bytes) -> str:
    """An ETag that changes whenever the object does."""
    return f'"{zlib.crc32(data):08x}-{len(data)}"'


class ObjectServer(_Misbehaving):
    """An HTTP/1.1 server on 127.0.0.1 serving ``objects`` (name -> bytes); see the module.

    Use it as a context manager (started on enter, stopped on exit) or call start/stop.
    ``traffic`` counts what it answered; ``faults.applied`` how many answers were faulty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.objects: Dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._connections: Set[socket.socket] = set()
        self._handlers: Set[threading.Thread] = set()
        self._httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"ObjectServer:{self.port}", daemon=True)

    def url(self, name: str) -> str:
        """``http://127.0.0.1:<port>/<name>``."""
        return f"http://{LOOPBACK}:{self.port}/{urllib.parse.quote(name)}"

    def replace_after(self, name: str, data: bytes, after: int) -> None:
        """Serve ``data`` as ``name`` from the GET after the next ``after`` GETs on."""
        self.faults.add(Fault("replace", 1, 500, name, bytes(data)), "GET", after, 1)

    def start(self) -> "ObjectServer":
        """Serve in a daemon thread; the socket is listening already."""
        self._thread.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving and end every connection; RuntimeError if a thread outlives ``timeout``.

        Hanging answers end at once, and idle keep-alive connections are shut down, so that no
        handler thread stays behind.
        """
        self._release.set()
        if self._thread.is_alive():
            self._httpd.shutdown()
        with self._lock:
            connections, handlers = list(self._connections), list(self._handlers)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already
        self._httpd.server_close()
        deadline = time.monotonic() + timeout
        for thread in [self._thread, *handlers]:
            thread.join(max(deadline - time.monotonic(), 0))
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not stop within {timeout} s")

    def __enter__(self) -> "ObjectServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
                self._handlers.add(threading.current_thread())
            else:
                self._connections.discard(conn)
                self._handlers.discard(threading.current_thread())


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers one connection's requests for an :class:`ObjectServer`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as fsspec's aiohttp client expects
    timeout = HANG_LIMIT  # an idle connection's thread ends after this

    def setup(self) -> None:
        super().setup()
        self._owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._owner._track(self.connection, False)

    @property
    def _owner(self) -> ObjectServer:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read ``traffic``, not stderr."""

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        owner, method = self._owner, self.command
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        asked = self.headers.get("Range")
        faults = owner.faults.take(method)
        for hit in faults:
            if hit.mode == "replace" and hit.name is not None:
                owner.objects[hit.name] = hit.data
        fault = next((f for f in faults if f.mode != "replace"), None)
        data = owner.objects.get(name)
        if fault is not None and fault.mode == "hang":
            owner.traffic.record(method, self.path, asked, 0, 0)
            owner._hang()
            self.close_connection = True
            return
        if fault is not None and fault.mode == "status":
            self._send(method, fault.status, b"injected failure\n", {}, asked)
            return
        if data is None:
            self._send(method, 404, b"no such object\n", {}, asked)
            return
        headers = {"ETag": etag(data), "Accept-Ranges": "bytes"}
        if fault is not None and fault.mode in ("huge", "endless"):
            self._send_huge(method, fault.mode, asked, len(data), headers)
            return
        if asked is None or (fault is not None and fault.mode == "full"):
            self._send(method, 200, data, headers, asked)
            return
        span = byte_range(asked, len(data))
        if span is None:
            headers["Content-Range"] = f"bytes */{len(data)}"
            self._send(method, 416, b"", headers, asked)
            return
        body = data[span.start:span.stop]
        declared = len(body)
        if fault is not None and fault.mode == "short":
            body = body[:max(len(body) - fault.by, 0)]
            declared = len(body)
        elif fault is not None and fault.mode == "long":
            body = data[span.start:span.stop + fault.by]
            body += bytes(len(span) + fault.by - len(body))
            declared = len(body)
        elif fault is not None and fault.mode == "cut":
            body = body[:max(len(body) - fault.by, 0)]
            self.close_connection = True
        last = span.start + max(declared, 1) - 1
        headers["Content-Range"] = f"bytes {span.start}-{last}/{len(data)}"
        self._send(method, 206, body, headers, asked, declared)

    def _send_huge(self, method: str, mode: str, asked: Optional[str], size: int,
                   headers: Dict[str, str]) -> None:
        """A "huge" or "endless" answer (see misbehave): HUGE bytes, sent 1 MiB at a time."""
        span = byte_range(asked, size) if asked and mode == "endless" else None
        self.send_response(200 if span is None else 206)
        for key, value in headers.items():
            self.send_header(key, value)
        if span is not None:
            self.send_header("Content-Range", f"bytes {span.start}-{span.stop - 1}/{size}")
        if mode == "huge":
            self.send_header("Content-Length", str(HUGE))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._owner.traffic.record(method, self.path, asked, 200 if span is None else 206, 0)
        piece, left = bytes(1 << 20), HUGE if method == "GET" else 0
        try:
            while left:
                self.wfile.write(piece[:min(left, len(piece))])
                self._owner.traffic.add_bytes(method, min(left, len(piece)))
                left -= min(left, len(piece))
        except OSError:  # the client went away, as it should
            pass

    def _send(self, method: str, status: int, body: bytes, headers: Dict[str, str],
              asked: Optional[str], declared: Optional[int] = None) -> None:
        self.send_response(status, "Injected" if status >= 500 or status == 403 else None)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        sent = 0 if method == "HEAD" else len(body)
        # counted before the body goes out: a client that has the answer finds it counted
        self._owner.traffic.record(method, self.path, asked, status, sent)
        try:
            self.wfile.write(body[:sent])
        except OSError:  # the client went away (it timed out, or was stopped)
            self._owner.traffic.add_bytes(method, -sent)
            self.close_connection = True


class MotoServer(_Misbehaving):
    """moto's S3-compatible server on 127.0.0.1 (a free port), counting and misbehaving on demand.

    Its faults ("status", "short", "long", "hang", "huge", "endless") apply to S3 requests (not to moto's own
    /moto-api/ requests, which are not counted either). Start and stop are bounded.
    """

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        super().__init__()
        app = _CountingApp(DomainDispatcherApplication(create_backend_app), self)
        quiet = type("QuietMotoHandler", (MotoRequestHandler,), {"log_request": _quiet})
        self._httpd = make_server(LOOPBACK, 0, app, threaded=True, request_handler=quiet)
        self.port: int = self._httpd.server_address[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"MotoServer:{self.port}", daemon=True)

    def start(self, timeout: float = START_TIMEOUT) -> "MotoServer":
        """Serve in a daemon thread; return once it answers, or raise RuntimeError after ``timeout``."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._api("data.json", "GET", max(deadline - time.monotonic(), 0.1))
                return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's server on {self.endpoint} did not answer within "
                                       f"{timeout} s") from exc
                time.sleep(0.05)

    def reset(self) -> None:
        """Forget every bucket, object, fault and count (moto's /moto-api/reset)."""
        self.behave()
        self._api("reset", "POST", STOP_TIMEOUT)
        self.traffic.reset()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving; RuntimeError if the serving thread outlives ``timeout``."""
        self._release.set()
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} did not stop within {timeout} s")

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _api(self, name: str, method: str, timeout: float) -> bytes:
        # no proxy, whatever the environment says: only 127.0.0.1 is ever contacted
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"{self.endpoint}/moto-api/{name}", method=method)
        with opener.open(request, timeout=timeout) as response:
            return response.read()  # type: ignore[no-any-return]


def _quiet(*args: Any) -> None:
    """A request handler's log_request that logs nothing (the tests read ``traffic``)."""


class _CountingApp:
    """WSGI middleware around moto's application: counts S3 requests and bytes, injects faults."""

    def __init__(self, app: Callable[..., Iterable[bytes]], owner: MotoServer) -> None:
        self._app = app
        self._owner = owner

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/moto-api/"):
            return self._app(environ, start_response)
        owner, method, asked = self._owner, environ["REQUEST_METHOD"], environ.get("HTTP_RANGE")
        fault = next(iter(owner.faults.take(method)), None)
        if fault is not None and fault.mode == "hang":
            owner.traffic.record(method, path, asked, 0, 0)
            owner._hang()
            fault = Fault("status", 1, 503)
        if fault is not None and fault.mode == "status":
            error = _S3_ERRORS.get(fault.status, "InternalError")
            body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{error}</Code>"
                    f"<Message>injected</Message></Error>").encode()
            start_response(f"{fault.status} Injected", [
                ("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            owner.traffic.record(method, path, asked, fault.status, len(body))
            return [body]
        answer: List[Any] = []

        def keep(status: str, headers: List[Any], exc_info: Any = None) -> Callable[..., Any]:
            answer[:] = [status, headers, exc_info]
            return lambda data: None  # moto never writes through it

        chunks = self._app(environ, keep)
        status, headers, exc_info = answer
        code = int(status.split()[0])
        if fault is not None and fault.mode in ("huge", "endless") and code in (200, 206):
            getattr(chunks, "close", lambda: None)()
            return self._huge(fault.mode, status, headers, method, path, asked, start_response)
        if fault is None or fault.mode not in ("short", "long") or code not in (200, 206):
            start_response(status, headers, exc_info)
            owner.traffic.record(method, path, asked, code, 0)
            return _counted(chunks, method, owner.traffic)
        body = b"".join(chunks)
        getattr(chunks, "close", lambda: None)()
        body = body[:-fault.by] if fault.mode == "short" else body + bytes(fault.by)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, headers + [("Content-Length", str(len(body)))], exc_info)
        owner.traffic.record(method, path, asked, code, len(body))
        return [body]


    def _huge(self, mode: str, status: str, headers: List[Any], method: str, path: str,
              asked: Optional[str], start_response: Callable[..., Any]) -> Iterator[bytes]:
        """A "huge" or "endless" answer (see misbehave) in place of moto's: HUGE zero bytes,
        made 1 MiB at a time as they are sent ("endless": moto's status and Content-Range, no
        Content-Length, so werkzeug sends the body chunked)."""
        drop = {"content-length", "content-range"} if mode == "huge" else {"content-length"}
        headers = [(k, v) for k, v in headers if k.lower() not in drop]
        if mode == "huge":
            status, headers = "200 OK", headers + [("Content-Length", str(HUGE))]
        start_response(status, headers)
        self._owner.traffic.record(method, path, asked, int(status.split()[0]), 0)
        piece = bytes(1 << 20)
        for _ in range(HUGE // len(piece) if method == "GET" else 0):
            self._owner.traffic.add_bytes(method, len(piece))
            yield piece


def _counted(chunks: Iterable[bytes], method: str, traffic: Traffic) -> Iterator[bytes]:
    """``chunks``, counting their bytes as the server sends them."""
    try:
        for chunk in chunks:
            traffic.add_bytes(method, len(chunk))
            yield chunk
    finally:
        getattr(chunks, "close", lambda: None)()


class S3Bucket:
    """A bucket of its own on a :class:`MotoServer`, and the s3fs filesystem that reaches it.

    ``storage_options`` reach the same server from a ``s3://<bucket>/...`` URL (``url(key)``).
    """

    def __init__(self, server: MotoServer, *, name: Optional[str] = None,
                 **config: Any) -> None:
        import s3fs

        self.server = server
        self.name = name or f"t-{uuid.uuid4().hex[:16]}"
        self.storage_options = s3_options(server.endpoint, **config)
        self.fs = s3fs.S3FileSystem(**self.storage_options)
        self.fs.invalidate_cache()
        # not fs.mkdir: it would send us-east-1 as a LocationConstraint, which S3 refuses
        self.fs.call_s3("create_bucket", Bucket=self.name)

    @property
    def traffic(self) -> Traffic:
        """The server's counts (shared by every bucket on it)."""
        return self.server.traffic

    def url(self, key: str = "") -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.name}/{key}"

    def options(self, **config: Any) -> Dict[str, Any]:
        """Storage options for the same server with other botocore settings (read_timeout=...)."""
        return s3_options(self.server.endpoint, **config)


def s3_options(endpoint: str, **config: Any) -> Dict[str, Any]:
    """s3fs storage options for ``endpoint``: dummy keys, us-east-1, short timeouts, 2 tries.

    ``config`` overrides botocore's Config (connect_timeout, read_timeout, retries).
    """
    botocore_config = {"connect_timeout": 5, "read_timeout": 20,
                       "retries": {"max_attempts": 2, "mode": "standard"}, **config}
    return {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"}, "config_kwargs": botocore_config}


def http_options(timeout: float = 60.0) -> Dict[str, Any]:
    """fsspec http storage options whose requests give up after ``timeout`` seconds in all."""
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}


class LoopbackOnly:
    """Records, while active, each connection or name lookup to a host other than 127.0.0.1.

    An audit hook (installed once, for the process; it does nothing while no LoopbackOnly is
    active) sees ``socket.connect`` and ``socket.getaddrinfo`` from every thread. ``outbound``
    lists what was tried.

    Example:
        >>> with LoopbackOnly() as guard:
        ...     _ = socket.getaddrinfo("127.0.0.1", 80)
        >>> guard.outbound
        []
    """

    _active: List["LoopbackOnly"] = []
    _installed = False

    def __init__(self) -> None:
        self.outbound: List[str] = []

    def __enter__(self) -> "LoopbackOnly":
        if not LoopbackOnly._installed:
            sys.addaudithook(_audit)
            LoopbackOnly._installed = True
        LoopbackOnly._active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        LoopbackOnly._active.remove(self)


_LOOPBACK_HOSTS = {LOOPBACK, b"127.0.0.1", None, ""}


def _audit(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    if not LoopbackOnly._active:
        return
    if event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else None  # AF_UNIX: a path
    elif event in ("socket.getaddrinfo", "socket.gethostbyname"):
        host = args[0]
    else:
        return
    if host not in _LOOPBACK_HOSTS:
        for guard in LoopbackOnly._active:
            guard.outbound.append(f"{event} {host!r}")
