"""Hostile remote storage (issue 14, FORMAT.md section 12): servers that send fewer or more bytes than
asked, change the object between requests, fail, hang or ignore Range; each must end in a named
SafeckptError subclass (RemoteError, ObjectChangedError, ChecksumError) within a bounded time, and
a load either returns every tensor or raises.

The servers are tests/servers.py's (HTTP on 127.0.0.1, and moto's S3 server); the first tests here
check that the servers themselves answer as they say, so that a hostile test cannot pass against
a server that was not hostile.
"""

import http.client
import sys
import threading
import time

import pytest

import servers


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
    """The guard sees connections and lookups (raised here as audit events: no packet is sent)."""
    with servers.LoopbackOnly() as guard:
        sys.audit("socket.getaddrinfo", "example.com", 443, 0, 0, 0)
        sys.audit("socket.connect", None, ("192.0.2.1", 9))
        sys.audit("socket.connect", None, (servers.LOOPBACK, 9))
        sys.audit("socket.connect", None, "/tmp/unix-socket")
    sys.audit("socket.connect", None, ("192.0.2.2", 9))  # not watched any more
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
