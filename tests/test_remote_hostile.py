"""Hostile remote storage (issue 14, FORMAT.md section 12): servers that send fewer or more bytes than
asked [RS2], change the object between requests [RS4], fail, hang or ignore Range; each must end
in a named error (RemoteError, ObjectChangedError, ChecksumError; FileNotFoundError for an object
that is gone) within a bounded time, and a load either returns every tensor of one version of the
object or raises, never a mix.

The servers are tests/servers.py's (HTTP on 127.0.0.1, and moto's S3 server); the first tests here
check that the servers themselves answer as they say, so that a hostile test cannot pass against
a server that was not hostile.
"""

import http.client
import sys
import threading
import time
import uuid

import numpy as np
import pytest

import safeckpt
import servers
from safeckpt.errors import (ChecksumError, ObjectChangedError, RemoteError, SafeckptError)

from conftest import need

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("backend")]

HEAD = 64 << 10  # [RS1] the first ranged request of an open
CLIENT_TIMEOUT = 2.0  # seconds the client waits for a hanging server (fsspec http, aiohttp)
# a hang must end well before this; 15x the client's timeout, and under servers.HANG_LIMIT, so a
# hang ended by the server giving up (not by the client's timeout) fails the test
HANG_BOUND = 30.0
assert HANG_BOUND < servers.HANG_LIMIT


def get(server, name, headers=None, method="GET"):
    """One request to an ObjectServer with http.client (no proxy): (status, headers, body)."""
    conn = http.client.HTTPConnection(servers.LOOPBACK, server.port, timeout=30)
    try:
        conn.request(method, "/" + name, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


DATA = bytes(range(256)) * 4  # 1024 bytes


@pytest.mark.parametrize("asked, status, body, content_range", [
    (None, 200, DATA, None),
    ("bytes=2-4", 206, DATA[2:5], "bytes 2-4/1024"),
    ("bytes=1000-", 206, DATA[1000:], "bytes 1000-1023/1024"),
    ("bytes=1000-5000", 206, DATA[1000:], "bytes 1000-1023/1024"),
    ("bytes=-10", 206, DATA[-10:], "bytes 1014-1023/1024"),
    ("bytes=1024-", 416, b"", "bytes */1024"),
    ("bytes=5-2", 416, b"", "bytes */1024"),
    ("bytes=0-1,4-5", 416, b"", "bytes */1024"),
])
def test_ranges(http_server, asked, status, body, content_range):
    http_server.objects["a.bin"] = DATA
    got_status, headers, got = get(http_server, "a.bin", {"Range": asked} if asked else {})
    assert (got_status, got) == (status, body)
    assert headers.get("Content-Range") == content_range
    assert int(headers["Content-Length"]) == len(body)
    if status != 416:
        assert headers["ETag"] == servers.etag(DATA)


def test_head_missing_and_traffic(http_server):
    http_server.objects["a.bin"] = DATA
    status, headers, body = get(http_server, "a.bin", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "1024", b"")
    assert get(http_server, "nothing.bin")[0] == 404
    get(http_server, "a.bin", {"Range": "bytes=0-99"})
    traffic = http_server.traffic
    assert dict(traffic.by_method) == {"HEAD": 1, "GET": 2}
    assert traffic.bytes_by_method["GET"] == 100 + len(b"no such object\n")
    assert traffic.log[-1] == servers.Request("GET", "/a.bin", "bytes=0-99", 206)
    traffic.reset()
    assert (traffic.requests, traffic.bytes, traffic.log) == (0, 0, [])


def test_faults(http_server):
    """Each mode does what misbehave() says, to the requests it names only."""
    http_server.objects["a.bin"] = DATA
    ask = {"Range": "bytes=10-19"}
    http_server.misbehave("short", by=3, after=1, times=1)
    assert get(http_server, "a.bin", ask)[2] == DATA[10:20]  # after=1: this one is fine
    status, headers, body = get(http_server, "a.bin", ask)
    assert (status, body, headers["Content-Length"]) == (206, DATA[10:17], "7")
    assert get(http_server, "a.bin", ask)[2] == DATA[10:20]  # times=1: over
    http_server.misbehave("long", by=5, times=1)
    assert get(http_server, "a.bin", ask)[2] == DATA[10:25]
    http_server.misbehave("long", by=5, times=1)
    assert get(http_server, "a.bin", {"Range": "bytes=1020-"})[2] == DATA[1020:] + bytes(5)
    http_server.misbehave("full", times=1)
    assert get(http_server, "a.bin", ask)[:3:2] == (200, DATA)
    http_server.misbehave("status", status=403, times=1)
    assert get(http_server, "a.bin", ask)[0] == 403
    http_server.misbehave("cut", by=4, times=1)
    with pytest.raises(http.client.IncompleteRead):
        get(http_server, "a.bin", ask)
    http_server.replace_after("a.bin", b"other" * 10, after=1)
    assert get(http_server, "a.bin", ask)[2] == DATA[10:20]
    assert get(http_server, "a.bin", ask)[2] == (b"other" * 10)[10:20]
    assert http_server.faults.applied == 7
    with pytest.raises(ValueError, match="unknown fault mode"):
        http_server.misbehave("slow")


def test_hang_ends_at_stop():
    """A hanging answer holds its client until the server stops, and stop() is bounded."""
    server = servers.ObjectServer().start()
    server.objects["a.bin"] = DATA
    server.misbehave("hang")
    outcome = []

    def client():
        try:
            outcome.append(get(server, "a.bin"))
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and not outcome  # no answer yet
    started = time.monotonic()
    server.stop()
    thread.join(servers.STOP_TIMEOUT)
    assert not thread.is_alive() and isinstance(outcome[0], (OSError, http.client.HTTPException))
    assert time.monotonic() - started < servers.HANG_LIMIT


def test_loopback_only_records_other_hosts():
    """The guard sees connections and lookups (raised here as audit events: no packet is sent).
    The guards of the fixtures (moto's lives for the whole session) are set aside meanwhile: these
    made-up events are not the session's traffic."""
    others = servers.LoopbackOnly._active[:]
    servers.LoopbackOnly._active.clear()
    try:
        with servers.LoopbackOnly() as guard:
            sys.audit("socket.getaddrinfo", "example.com", 443, 0, 0, 0)
            sys.audit("socket.connect", None, ("192.0.2.1", 9))
            sys.audit("socket.connect", None, (servers.LOOPBACK, 9))
            sys.audit("socket.connect", None, "/tmp/unix-socket")
        sys.audit("socket.connect", None, ("192.0.2.2", 9))  # not watched any more
    finally:
        servers.LoopbackOnly._active[:] = others
    assert guard.outbound == ["socket.getaddrinfo 'example.com'", "socket.connect '192.0.2.1'"]


def test_s3_fixture(s3):
    """The s3 fixture's filesystem and its storage_options reach the same moto server, counted."""
    import fsspec

    s3.fs.pipe(s3.url("a.bin"), DATA)
    fs, path = fsspec.core.url_to_fs(s3.url("a.bin"), **s3.storage_options)
    s3.traffic.reset()
    assert fs.cat_file(path, start=2, end=5) == DATA[2:5]
    assert s3.traffic.log == [servers.Request("GET", f"/{s3.name}/a.bin", "bytes=2-4", 206)]
    assert s3.traffic.bytes == 3
    s3.server.misbehave("short", by=1, times=1)
    assert fs.cat_file(path, start=2, end=5) == DATA[2:4]
    s3.server.misbehave("status", status=403, times=1)
    with pytest.raises(PermissionError):
        fs.cat_file(path, start=2, end=5)


# -- the model and its two versions ----------------------------------------------------------------

def state(version):
    """Version 0 or 1 of a small model: the same names, shapes and dtypes, other values. The
    file is over 64 KiB, so that opening asks for a strict range [RS1]."""
    v = version
    return {
        "emb": (np.arange(40_000, dtype=np.float32) + v).reshape(400, 100),  # 160,000 bytes
        "ln": np.linspace(0, 1, 100, dtype=np.float32) * (v + 1),
        "w": ((np.arange(30_000) + v) % 251).astype(np.int16),  # 60,000 bytes
        "step": np.array(7 + v, np.int64),
    }


FORMATS = ["sckpt", "nocrc", "safetensors"]  # with CRC32Cs; checksum=False; Hugging Face's


def file_bytes(fmt, version, grown=False):
    """The bytes of version ``version`` of the model in format ``fmt``; ``grown``: one tensor more
    (another size). Each version's header differs (CRCs, or metadata for the formats without)."""
    tensors = dict(state(version), **({"extra": np.ones(5000, np.float64)} if grown else {}))
    if fmt == "safetensors":
        need("safetensors")
        import safetensors.numpy

        return safetensors.numpy.save(tensors, metadata={"version": str(version)})
    return safeckpt.save_bytes(tensors, metadata={"version": version},
                               checksum=fmt == "sckpt")


def same(got, want):
    """Whether ``got`` holds exactly the tensors of ``want`` (names, dtypes, values)."""
    return sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


LOADS = {  # how a test loads everything: one call, a reader's load_all, tensor by tensor
    "load_file": lambda url, options: safeckpt.load_file(url, storage_options=options),
    "load_all": lambda url, options: _with_reader(url, options, lambda f: f.load_all()),
    "each": lambda url, options: _with_reader(url, options, lambda f: {k: f[k] for k in f.keys()}),
}


def _with_reader(url, options, read):
    with safeckpt.open(url, storage_options=options) as f:
        return read(f)


@pytest.fixture(params=FORMATS)
def fmt(request):
    return request.param


@pytest.fixture
def served(http_server, request):
    """Version 0 of the model on the HTTP server, as ``m.<fmt>`` (the test's ``fmt``, else
    "sckpt"): (server, name, options)."""
    fmt = request.getfixturevalue("fmt") if "fmt" in request.fixturenames else "sckpt"
    name = "m.safetensors" if fmt == "safetensors" else "m.sckpt"
    http_server.objects[name] = file_bytes(fmt, 0)
    return http_server, name, servers.http_options(CLIENT_TIMEOUT * 30)


# -- [RS2]: answers of the wrong length --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["short", "cut", "long", "full"])
@pytest.mark.parametrize("stage", ["open", "one", "all"])
def test_wrong_length(served, fmt, mode, stage):
    """Fewer bytes (with an honest or a lying Content-Length), more bytes, or the whole object for
    a range: RemoteError naming the URL and the range, at open or at a load; the reader still
    loads everything right once the server behaves (nothing of the bad answer was kept)."""
    server, name, options = served
    url = server.url(name)
    if stage == "open":
        server.misbehave(mode, by=7)
        with pytest.raises(RemoteError) as info:
            safeckpt.open(url, storage_options=options)
        asked = f"bytes 0-{HEAD - 1}"
    else:
        with safeckpt.open(url, storage_options=options) as f:
            server.misbehave(mode, by=7)
            with pytest.raises(RemoteError) as info:
                f["w"] if stage == "one" else f.load_all()
            first = f.info("w" if stage == "one" else next(iter(f.keys()), None)).offset
            asked = f"bytes {min(first, f.info('w').offset)}-"
            server.behave()
            assert same(f.load_all(), state(0))
    assert server.faults.applied >= 1
    message = str(info.value)
    assert url in message and asked in message, message
    assert ("[RS2]" in message) != (mode == "cut"), message  # cut: the client's own error


# -- failures of the storage -------------------------------------------------------------------------

@pytest.mark.parametrize("status", [403, 404, 500, 503])
@pytest.mark.parametrize("stage", ["open", "one", "all"])
def test_error_status(served, status, stage):
    """An error status on a ranged GET: RemoteError naming the URL, the range and the status; a
    404 (the object is gone) is FileNotFoundError naming the URL, as for a missing local file."""
    server, name, options = served
    url = server.url(name)
    error = FileNotFoundError if status == 404 else RemoteError
    if stage == "open":
        server.misbehave("status", status=status)
        with pytest.raises(error) as info:
            safeckpt.open(url, storage_options=options)
    else:
        with safeckpt.open(url, storage_options=options) as f:
            server.misbehave("status", status=status)
            with pytest.raises(error) as info:
                f["w"] if stage == "one" else f.load_all()
    message = str(info.value)
    assert url in message, message
    if status != 404:
        assert str(status) in message and "bytes " in message, message
        assert not isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("stage", ["open", "one", "all"])
def test_hang_ends_with_the_client_timeout(served, stage):
    """A server that takes the request and never answers: the client's timeout (storage_options)
    ends it with RemoteError, long before the server would give up."""
    server, name, _ = served
    url, options = server.url(name), servers.http_options(CLIENT_TIMEOUT)
    started = time.monotonic()
    if stage == "open":
        server.misbehave("hang")
        with pytest.raises(RemoteError) as info:
            safeckpt.open(url, storage_options=options)
    else:
        with safeckpt.open(url, storage_options=options) as f:
            server.misbehave("hang")
            started = time.monotonic()
            with pytest.raises(RemoteError) as info:
                f["w"] if stage == "one" else f.load_all()
    assert time.monotonic() - started < HANG_BOUND
    assert server.faults.applied >= 1
    assert url in str(info.value) and "Timeout" in str(info.value), str(info.value)


# -- [RS4]: another object between requests ----------------------------------------------------------

@pytest.mark.parametrize("load", ["one", "all", "slice"])
def test_replaced_after_open(served, fmt, load):
    """The object replaced between open and a load: with CRC32Cs, ChecksumError naming the tensor
    and saying that the object may have changed; without (checksum=False, .safetensors), the header
    read again after the load differs: ObjectChangedError. Opened again, the new version loads."""
    server, name, options = served
    url = server.url(name)
    with safeckpt.open(url, storage_options=options) as f:
        server.objects[name] = file_bytes(fmt, 1)
        expected = ChecksumError if fmt == "sckpt" and load != "slice" else ObjectChangedError
        with pytest.raises(expected) as info:
            if load == "one":
                f["w"]
            elif load == "all":
                f.load_all()
            else:
                f.get_slice("emb")[10:20]
    message = str(info.value)
    assert url in message and "changed" in message and "[RS4]" in message, message
    if expected is ChecksumError:
        assert "tensor 'w'" in message or load == "all", message
    assert same(LOADS["load_file"](url, options), state(1))


@pytest.mark.parametrize("grown", [False, True], ids=["same-size", "grown"])
@pytest.mark.parametrize("load", sorted(LOADS))
def test_replaced_at_any_request(served, fmt, load, grown):
    """The object replaced before each GET in turn, during a whole load: every outcome is one
    version whole (the replacement came before the open read anything, or was never seen) or a
    named error, never a mix; once the open has read the header, every replacement is caught."""
    server, name, options = served
    url, old, new = server.url(name), state(0), dict(state(1))
    replacement = file_bytes(fmt, 1, grown)
    if grown:
        new["extra"] = np.ones(5000, np.float64)
    server.traffic.reset()
    assert same(LOADS[load](url, options), old)
    gets = server.traffic.by_method["GET"]
    assert gets >= 2  # the open's, then the tensors'
    for after in range(gets + 1):
        server.objects[name] = file_bytes(fmt, 0)
        server.replace_after(name, replacement, after)
        try:
            got = LOADS[load](url, options)
        except SafeckptError as exc:
            assert url in str(exc), (after, exc)
            assert after > 0 or grown, (after, exc)  # replaced before the open read: consistent
        else:
            assert same(got, new if after == 0 else old), after
            assert after in (0, gets), after  # replaced after the header was read: always caught
        server.behave()


# -- S3 (moto) ---------------------------------------------------------------------------------------

@pytest.fixture
def on_s3(s3, request):
    """Version 0 of the model in the test's bucket (the test's ``fmt``, else "sckpt"):
    (bucket, url)."""
    fmt = request.getfixturevalue("fmt") if "fmt" in request.fixturenames else "sckpt"
    url = s3.url("m.safetensors" if fmt == "safetensors" else "m.sckpt")
    s3.fs.pipe_file(url, file_bytes(fmt, 0))
    return s3, url


def test_s3_replaced_after_open(on_s3, fmt):
    """[RS4] on S3: an object overwritten between open and load (a new save to the same key)."""
    s3, url = on_s3
    with safeckpt.open(url, storage_options=s3.storage_options) as f:
        s3.fs.pipe_file(url, file_bytes(fmt, 1))
        with pytest.raises(ChecksumError if fmt == "sckpt" else ObjectChangedError,
                           match=r"changed.*\[RS4\]"):
            f.load_all()
    assert same(safeckpt.load_file(url, storage_options=s3.storage_options), state(1))


def test_s3_deleted_after_open(on_s3):
    s3, url = on_s3
    with safeckpt.open(url, storage_options=s3.storage_options) as f:
        s3.fs.rm_file(url)
        with pytest.raises(FileNotFoundError, match=url.split("://")[1]):
            f.load_all()


@pytest.mark.parametrize("mode", ["short", "long"])
def test_s3_wrong_length(on_s3, mode):
    """[RS2] on S3: s3fs hands over what it got; safeckpt refuses it."""
    s3, url = on_s3
    with safeckpt.open(url, storage_options=s3.storage_options) as f:
        s3.server.misbehave(mode, by=3)
        with pytest.raises(RemoteError, match=r"\[RS2\]"):
            f.load_all()
        s3.server.behave()
        assert same(f.load_all(), state(0))


@pytest.mark.parametrize("status", [403, 500])
def test_s3_error_status(on_s3, status):
    """An error status on every GET (botocore and s3fs retry a 500 a bounded number of times):
    RemoteError naming the URL and the range."""
    s3, url = on_s3
    with safeckpt.open(url, storage_options=s3.storage_options) as f:
        s3.server.misbehave("status", status=status)
        with pytest.raises(RemoteError) as info:
            f["w"]
    assert url in str(info.value) and "bytes " in str(info.value), str(info.value)


# -- [RS2], [RS5] over HTTP and S3: a body larger than asked is never held -------------------------

MEMORY_BOUND = 64 << 20  # bytes a 4 KiB read may allocate, at most; the server sends servers.HUGE


@pytest.mark.parametrize("mode", ["huge", "endless"])
@pytest.mark.parametrize("where", ["http", "s3"])
def test_huge_body_is_not_read(request, where, mode):
    """A GET answered with 1 GiB for 4 KiB asked ("huge": 200 and its Content-Length, the Range
    ignored; "endless": 206 with the right Content-Range and no Content-Length, the body running
    on), over fsspec's HTTP filesystem and over s3fs: RemoteError naming the URL and the range
    [RS2], and the process allocates far less than the body meanwhile (at most one byte more
    than asked is read [RS5])."""
    import tracemalloc

    from safeckpt.remote import RemoteFile, resolve

    if where == "http":
        server = request.getfixturevalue("http_server")
        server.objects["big.bin"] = bytes(1 << 20)
        url, options = server.url("big.bin"), servers.http_options(CLIENT_TIMEOUT * 30)
    else:
        bucket = request.getfixturevalue("s3")
        server, url, options = bucket.server, bucket.url("big.bin"), bucket.storage_options
        bucket.fs.pipe_file(url, bytes(1 << 20))
    f = RemoteFile(resolve(url, storage_options=options))
    applied = server.faults.applied  # moto's server lives for the whole session
    server.misbehave(mode)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteError) as info:
            f.read(8192, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert server.faults.applied == applied + 1
    assert peak < MEMORY_BOUND < servers.HUGE, peak
    message = str(info.value)
    assert url in message and "bytes 8192-12287" in message and "[RS2]" in message, message
    assert ("status 200" in message) == (mode == "huge"), message
    assert ("a longer body" in message) == (mode == "endless"), message
    assert (f.requests, f.bytes_read) == (1, 0)
    server.behave()
    assert f.read(8192, 4096) == bytes(4096) and (f.requests, f.bytes_read) == (2, 4096)


# -- the size lookup (HEAD) over HTTP: a failure is never "missing" [RS2] ----------------------------

@pytest.mark.parametrize("fault", ["403", "500", "hang", "endless", "404", "410"])
def test_head_failure_at_open(served, fault):
    """The HEAD of an open fails (GETs fine): an error status or a hang is RemoteError naming the
    URL and the status (or the timeout), also from RemotePath.exists(); a HEAD without a
    Content-Length is RemoteError saying so; 404 or 410 is FileNotFoundError, and exists() False."""
    from safeckpt.remote import resolve

    server, name, _ = served
    url, options = server.url(name), servers.http_options(CLIENT_TIMEOUT)
    if fault.isdigit():
        server.misbehave("status", status=int(fault), method="HEAD")
    else:
        server.misbehave(fault, method="HEAD")
    missing = fault in ("404", "410")
    started = time.monotonic()
    with pytest.raises(FileNotFoundError if missing else RemoteError) as info:
        safeckpt.open(url, storage_options=options)
    assert time.monotonic() - started < HANG_BOUND
    message = str(info.value)
    assert url in message, message
    expected = {"hang": "Timeout", "endless": "gives no size"}.get(fault, fault)
    assert expected in message or missing, message
    assert not isinstance(info.value, FileNotFoundError) or missing
    rp = resolve(url, storage_options=options)
    if missing:
        assert rp.exists() is False
    elif fault != "endless":
        with pytest.raises(RemoteError, match=expected):
            rp.exists()
    assert server.traffic.by_method["GET"] == 0  # no GET stood in for the failed HEAD
    server.behave()
    assert rp.exists() and same(LOADS["load_file"](url, options), state(0))


# -- [RS7] through a prefix view: the filesystem under it sets the rules -----------------------------

def test_dirfs_failed_save_keeps_the_previous_object(tmp_path):
    """fsspec's DirFileSystem (a prefix view) passes autocommit on inconsistently; safeckpt goes
    to the filesystem under it. Over memory://, a save is gathered and stored whole [RS7]: while
    it runs a reader sees the previous object, and a save that fails (a ChecksumError: the array
    changed between the CRC pass and the write) keeps it. Over a local directory, the path is a
    local one."""
    need("fsspec")
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem

    from safeckpt.remote import resolve
    from safeckpt.writer import LazyArray

    mem = fsspec.filesystem("memory")
    root = f"/dirfs-{uuid.uuid4().hex}"
    fs = DirFileSystem(path=root, fs=mem)
    old = {"w": np.ones(4, np.float32)}
    seen = []

    def load():
        seen.append(mem.cat_file(f"{root}/model.sckpt"))  # what a reader sees meanwhile
        return np.full(1 << 20, len(seen), np.uint8)  # other bytes at each load

    try:
        safeckpt.save_file(old, "model.sckpt", fs=fs)
        before = mem.cat_file(f"{root}/model.sckpt")
        with pytest.raises(ChecksumError):
            safeckpt.save_file({"w": LazyArray(np.uint8, (1 << 20,), load)}, "model.sckpt",
                               fs=fs)
        assert seen == [before, before]  # the CRC pass, then the write
        assert mem.cat_file(f"{root}/model.sckpt") == before
        assert same(safeckpt.load_file("model.sckpt", fs=fs), old)
    finally:
        mem.rm(root, recursive=True)
    local = DirFileSystem(path=str(tmp_path), fs=fsspec.filesystem("file"))
    assert resolve("model.sckpt", fs=local) == str(tmp_path / "model.sckpt")
