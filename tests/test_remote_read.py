"""Reading through fsspec (issue 14, FORMAT.md section 12): safeckpt.remote (resolve, RemotePath,
RemoteFile) and Reader/open/load/load_file on memory:// and on a local HTTP server, [RS1]-[RS6].

Counts of requests and bytes come from RemoteFile's counters and from the HTTP server's own."""

import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

import safeckpt
from safeckpt import remote
from safeckpt.errors import (ChecksumError, InvalidValueError, LayoutError, ObjectChangedError,
                             RemoteError, TruncatedFileError)

from conftest import need

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("backend")]

ALIGN = 64
HEAD = 64 << 10  # [RS1] the first ranged request


class Memory:
    """A directory of its own in fsspec's memory filesystem: ``put(name, data)``, ``url(name)``."""

    def __init__(self):
        import fsspec

        self.fs = fsspec.filesystem("memory")
        self.root = f"/h1-{uuid.uuid4().hex}"

    def url(self, name=""):
        return f"memory://{self.root}/{name}"

    def put(self, name, data):
        self.fs.pipe_file(f"{self.root}/{name}", bytes(data))
        return self.url(name)


@pytest.fixture
def mem():
    need("fsspec")
    memory = Memory()
    yield memory
    if memory.fs.exists(memory.root):
        memory.fs.rm(memory.root, recursive=True)


def padding_after(data, name):
    """``(start, end)`` of the padding after tensor ``name`` of the file ``data``."""
    info = safeckpt.Reader(data).info(name)
    end = info.offset + info.nbytes
    return end, -(-end // ALIGN) * ALIGN


def flipped(data, at, value=1):
    out = bytearray(data)
    out[at] ^= value
    return bytes(out)


TENSORS = {
    "a": np.arange(10, dtype=np.float32),  # 40 bytes, 24 of padding
    "b": np.arange(15, dtype=np.int8).reshape(3, 5),  # 15 bytes, 49 of padding
    "empty": np.zeros((0, 4), np.float64),
    "c": np.arange(3000, dtype=np.int64).reshape(1000, 3),  # 24,000 bytes
}


def same_tensors(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


# -- resolve / is_url / local paths ---------------------------------------------------------------

def test_is_url_and_resolve_local():
    assert remote.is_url("s3://b/k") and remote.is_url(b"memory://x") and remote.is_url("HTTP://h/x")
    assert not remote.is_url("file:///tmp/x") and not remote.is_url("/tmp/s3://x")
    assert not remote.is_url("C:\\x") and not remote.is_url(None)
    assert remote.resolve("a/b.sckpt") == "a/b.sckpt"
    assert remote.resolve("file:///tmp/x.sckpt") == "/tmp/x.sckpt"


def test_storage_options_with_a_local_path_refused(tmp_path):
    path = tmp_path / "m.sckpt"
    safeckpt.save_file(TENSORS, path)
    for call in (safeckpt.open, safeckpt.load_file, safeckpt.load):
        with pytest.raises(InvalidValueError, match="local path: storage_options"):
            call(path, storage_options={"anon": True})
    with pytest.raises(InvalidValueError, match="storage_options= or fs=, not both"):
        need("fsspec")
        import fsspec
        safeckpt.open(str(path), fs=fsspec.filesystem("memory"), storage_options={})
    with pytest.raises(InvalidValueError, match="fsspec filesystem"):
        safeckpt.open(str(path), fs=object())


def test_file_url_and_local_filesystem_are_local(tmp_path):
    """file:// and fsspec's LocalFileSystem go to the local (mmap) path; local paths, file://
    included, never import fsspec."""
    path = tmp_path / "m.sckpt"
    safeckpt.save_file(TENSORS, path)
    with safeckpt.open(f"file://{path}") as f:
        assert f.remote is None and f._mapping is not None and f.path == str(path)
    need("fsspec")
    from fsspec.implementations.local import LocalFileSystem
    with safeckpt.open(str(path), fs=LocalFileSystem()) as f:
        assert f.remote is None and f._mapping is not None
    code = ("import sys, safeckpt; safeckpt.load_file(sys.argv[1]); "
            "safeckpt.load_file('file://' + sys.argv[1], mmap=False); "
            "print('fsspec' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


# -- RemotePath ------------------------------------------------------------------------------------

def test_remote_path(mem):
    rp = remote.resolve(mem.url("d/x.bin"))
    assert isinstance(rp, remote.RemotePath) and remote.resolve(rp) is rp
    assert rp.name == "x.bin" and rp.parent.name == "d" and rp.url.startswith("memory://")
    assert not rp.exists()
    rp.write_small(b"0123456789")
    rp.parent.join("y.bin").write_small(b"")
    assert rp.exists() and not rp.isdir() and rp.parent.isdir()
    assert rp.parent.listdir() == ["x.bin", "y.bin"] and rp.parent.sizes() == {"x.bin": 10,
                                                                             "y.bin": 0}
    assert rp.size() == 10 and rp.read_small(10) == b"0123456789"
    with pytest.raises(safeckpt.LimitError, match="10 bytes, more than the 9"):
        rp.read_small(9)
    rp.remove()
    rp.remove()  # idempotent
    assert rp.parent.listdir() == ["y.bin"]
    with pytest.raises(FileNotFoundError):
        rp.size()


def test_listing_is_fresh(mem):
    """listdir/exists see what another writer did since a listing was cached."""
    d = remote.resolve(mem.url("d"))
    mem.put("d/x.bin", b"1")
    assert d.listdir() == ["x.bin"]
    mem.fs.dircache[d.path] = []  # a stale listing, as a caching filesystem keeps one
    assert d.listdir() == ["x.bin"] and d.join("x.bin").exists()


def test_open_write_discards_on_error(mem):
    """[RS7]: an exception leaves the previous object, never a partial one."""
    rp = remote.resolve(mem.url("w.bin"))
    with rp.open_write() as out:
        out.write(b"first")
    with pytest.raises(KeyError):
        with rp.open_write() as out:
            out.write(b"partial")
            raise KeyError("boom")
    assert rp.read_small(100) == b"first"


def test_open_write_calls_discard():
    """A filesystem file that took autocommit=False is discarded on an error, never committed;
    on success it is closed, then committed."""
    calls = []

    class File:
        autocommit = False

        def write(self, data):
            calls.append("write")

        def close(self):
            calls.append("close")

        def commit(self):
            calls.append("commit")

        def discard(self):
            calls.append("discard")

    class Fs:
        protocol = "fake"

        def open(self, path, mode, autocommit):
            assert mode == "wb" and autocommit is False
            return File()

        def invalidate_cache(self, path):
            pass

        def _parent(self, path):
            return "b"

    rp = remote.RemotePath(Fs(), "b/x", "fake://b/x")
    with rp.open_write() as out:
        out.write(b"x")
    assert calls == ["write", "close", "commit"]
    calls.clear()
    with pytest.raises(RuntimeError):
        with rp.open_write() as out:
            out.write(b"x")
            raise RuntimeError("network")
    assert calls == ["write", "discard", "close"]


# -- RemoteFile ------------------------------------------------------------------------------------

class Recorder:
    """Wraps a filesystem's cat_ranges: records each call's ranges; can alter the answers."""

    def __init__(self, fs, monkeypatch, alter=None):
        self.calls = []
        original = fs.cat_ranges

        def cat_ranges(paths, starts, ends, **kwargs):
            self.calls.append(list(zip(starts, ends)))
            out = original(paths, starts, ends, **kwargs)
            return alter(out) if alter else out

        monkeypatch.setattr(fs, "cat_ranges", cat_ranges)

    def max_in_flight(self):
        return max(sum(e - s for s, e in call) for call in self.calls)


def test_read_into_chunks_and_bounds_memory(mem, monkeypatch):
    """[RS5]: a range longer than chunk_size is fetched in chunks straight into its array, in
    batches of at most half max_in_flight bytes (the next batch is fetched while one is copied:
    two are held at once); CRC32C computed across the chunks."""
    data = np.random.default_rng(0).integers(0, 256, 5 << 20, np.uint8).tobytes()
    rp = remote.resolve(mem.put("big.bin", data))
    file = remote.RemoteFile(rp, chunk_size=1 << 20, max_in_flight=2 << 20)
    recorder = Recorder(mem.fs, monkeypatch)
    dest = np.zeros(5 << 20, np.uint8)
    crcs = file.read_into([0], [len(data)], [dest], True)
    assert dest.tobytes() == data
    assert int(crcs[0]) == safeckpt._backend.backend.crc32c(data)
    assert file.requests == 5 and file.bytes_read == len(data)
    assert len(recorder.calls) == 5 and recorder.max_in_flight() <= 1 << 20


def test_read_into_coalesces(mem):
    """[RS6]: ranges at most max_gap apart share one request; the gap is not copied."""
    data = bytes(range(256)) * 40
    rp = remote.resolve(mem.put("x.bin", data))
    file = remote.RemoteFile(rp, max_gap=100)
    dests = [bytearray(10), bytearray(10), bytearray(10)]
    assert file.read_into([0, 50, 5000], [10, 10, 10], dests) is None
    assert [bytes(d) for d in dests] == [data[0:10], data[50:60], data[5000:5010]]
    assert file.requests == 2 and file.bytes_read == 60 + 10


def test_read_into_checks_zero_after(mem):
    """[RS3]: zero_after bytes are fetched with the range and must be zero (LayoutError [T9])."""
    rp = remote.resolve(mem.put("x.bin", b"\x01" * 8 + b"\x00" * 7 + b"\x05" + b"\x02" * 8))
    file = remote.RemoteFile(rp)
    out = bytearray(8)
    file.read_into([0], [8], [out], zero_after=[7])
    assert out == b"\x01" * 8 and file.bytes_read == 15
    with pytest.raises(LayoutError, match=r"tensor 'z'.*padding.*\[T9\] \(in bytes 8-15\)"):
        file.read_into([0], [8], [out], zero_after=[8], padding_where=["x, tensor 'z'"])


@pytest.mark.parametrize("answer", ["short", "long", "error", "missing"])
def test_read_into_wrong_answers(mem, monkeypatch, answer):
    """[RS2]: a response of the wrong length is a RemoteError naming the URL and the range; a
    storage error is wrapped (chained); a missing object stays FileNotFoundError."""
    rp = remote.resolve(mem.put("x.bin", bytes(100)))
    file = remote.RemoteFile(rp)
    alter = {"short": lambda out: [d[:-1] for d in out],
             "long": lambda out: [d + b"\x00" for d in out],
             "error": lambda out: [ConnectionResetError("peer reset")],
             "missing": lambda out: [FileNotFoundError(rp.path)]}[answer]
    Recorder(mem.fs, monkeypatch, alter)
    kind = FileNotFoundError if answer == "missing" else RemoteError
    with pytest.raises(kind) as info:
        file.read(10, 20)
    text = str(info.value)
    assert rp.url in text
    if answer in ("short", "long"):
        assert "bytes 10-29 (20 bytes)" in text and "[RS2]" in text
    elif answer == "error":
        assert "bytes 10-29" in text and "peer reset" in text
        assert isinstance(info.value.__cause__, ConnectionResetError)
        assert isinstance(info.value, OSError) and isinstance(info.value, safeckpt.SafeckptError)


def test_remote_file_options_checked(mem):
    rp = remote.resolve(mem.put("x.bin", b"x"))
    with pytest.raises(InvalidValueError, match="chunk_size"):
        remote.RemoteFile(rp, chunk_size=0)
    with pytest.raises(InvalidValueError, match="max_gap"):
        remote.RemoteFile(rp, max_gap=-1)
    with pytest.raises(FileNotFoundError, match="no such object"):
        remote.RemoteFile(remote.resolve(mem.url("nope.sckpt")))
    with pytest.raises(IsADirectoryError):
        remote.RemoteFile(remote.resolve(mem.url("")))


# -- Reader over a RemoteFile ----------------------------------------------------------------------

def test_one_tensor_fetches_only_its_bytes(mem):
    """[RS1] open: one info, one ranged request; [RS3] a tensor: its bytes and its padding."""
    data = safeckpt.save_bytes(dict(TENSORS, big=np.zeros(1 << 20, np.uint8)), align=ALIGN)
    url = mem.put("m.sckpt", data)
    with safeckpt.open(url) as f:
        file = f.remote
        assert isinstance(file, remote.RemoteFile) and f.path == file.where
        assert file.requests == 1 and file.bytes_read == HEAD
        assert f.keys() == list(TENSORS) + ["big"] and f.has_checksums
        assert np.array_equal(f["b"], TENSORS["b"])
        start, end = padding_after(data, "b")
        assert file.requests == 2 and file.bytes_read == HEAD + end - f.info("b").offset
        f.raw_bytes("a")
        assert file.requests == 3


def test_long_header_takes_one_more_request(mem):
    """[RS1]: a header longer than 64 KiB: one more request through the first tensor's offset."""
    tensors = {f"layer.{i:05d}.weight": np.full(2, i, np.int16) for i in range(3000)}
    data = safeckpt.save_bytes(tensors, align=ALIGN)
    first = safeckpt.Reader(data).info("layer.00000.weight").offset
    assert first > HEAD
    with safeckpt.open(mem.put("m.sckpt", data)) as f:
        assert f.remote.requests == 2 and f.remote.bytes_read == first
        same_tensors(f.load_all(), tensors)
        assert f.remote.requests == 3


def test_load_all_coalesces(mem):
    """[RS6]: a load of every tensor is one request when they lie close; [RS5] a large one is
    cut in chunks."""
    tensors = {f"t{i}": np.arange(i, i + 7, dtype=np.float32) for i in range(200)}
    data = safeckpt.save_bytes(tensors, align=ALIGN)
    url = mem.put("m.sckpt", data)
    with safeckpt.open(url) as f:
        same_tensors(f.load_all(), tensors)
        assert f.remote.requests == 2
        assert f.remote.bytes_read == len(data) + len(data) - f.info("t0").offset  # < 64 KiB
    same_tensors(safeckpt.load_file(url), tensors)
    rp = remote.resolve(url)
    with safeckpt.Reader(remote.RemoteFile(rp, chunk_size=4096)) as f:
        same_tensors(f.load_all(), tensors)
        chunks = -(-len(data) // 4096) + -(-(len(data) - f.info("t0").offset) // 4096)
        assert f.remote.requests == chunks  # opening reads the whole (small) file, in chunks too


def test_far_tensors_are_separate_requests(mem):
    tensors = {"a": np.ones(8, np.int8), "gap": np.zeros(3 << 20, np.uint8),
               "c": np.ones(8, np.int8)}
    url = mem.put("m.sckpt", safeckpt.save_bytes(tensors, align=ALIGN))
    with safeckpt.open(url) as f:
        out = f.load_indices([0, 2])
        assert [a.tolist() for a in out] == [[1] * 8] * 2
        assert f.remote.requests == 3 and f.remote.bytes_read == HEAD + ALIGN + 8  # c: no padding


def test_slices_load_and_verify(mem):
    """get_slice reads only its rows (then re-reads the header [RS4]); load(prefix) only its
    subtree; verify fetches every tensor."""
    state = {"model": {"w": np.arange(4000, dtype=np.float32).reshape(1000, 4)},
             "opt": {"m": np.ones(3, np.float64)}, "step": 7}
    url = mem.put("s.sckpt", safeckpt.api.save_tree_bytes(state, align=ALIGN))
    with safeckpt.open(url) as f:
        before = f.remote.bytes_read
        assert np.array_equal(f.get_slice("model.w")[10:12], state["model"]["w"][10:12])
        assert f.remote.requests == 3 and f.remote.bytes_read - before == 32 + f._header_end
        f.verify()
    loaded = safeckpt.load(url, prefix="opt")
    assert np.array_equal(loaded["m"], state["opt"]["m"])
    assert safeckpt.load(url)["step"] == 7


def test_threads_share_a_reader(mem):
    tensors = {f"t{i}": np.full(1000, i, np.int32) for i in range(16)}
    with safeckpt.open(mem.put("m.sckpt", safeckpt.save_bytes(tensors))) as f:
        results = {}

        def load(name):
            results[name] = f[name]

        threads = [threading.Thread(target=load, args=(n,)) for n in tensors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        same_tensors({n: results[n] for n in tensors}, tensors)


def test_safetensors_file(mem, tmp_path):
    """A remote .safetensors file: one tensor by ranges; no checksums, so each load reads the
    header again [RS4]."""
    path = tmp_path / "m.safetensors"
    safeckpt.save_file(TENSORS, path)
    data = path.read_bytes()
    url = mem.put("m.safetensors", data)
    with safeckpt.open(url) as f:
        assert f.format == "safetensors" and f.remote.requests == 1
        assert np.array_equal(f["c"], TENSORS["c"])
        assert f.remote.requests == 3
        assert f.remote.bytes_read == len(data) + TENSORS["c"].nbytes + f._header_end
    same_tensors(safeckpt.load_file(url), TENSORS)


def test_remote_directory(mem):
    """A remote directory opens its one checkpoint (a listing, afresh); commit objects and
    shards are not checkpoints."""
    data = safeckpt.save_bytes(TENSORS)
    mem.put("d/step-1.sckpt", data)
    mem.put("d/step-1.sckpt.commit", b"{}")
    with safeckpt.open(mem.url("d")) as f:
        assert f.path.endswith("/d/step-1.sckpt")
        same_tensors(f.load_all(), TENSORS)
    mem.put("d/step-2.sckpt", data)
    with pytest.raises(ValueError, match="several checkpoints .step-1.sckpt, step-2.sckpt"):
        safeckpt.open(mem.url("d"))
    mem.put("e/m-00001-of-00002.sckpt", data)
    with pytest.raises(IsADirectoryError, match="only shards"):
        safeckpt.open(mem.url("e"))
    with pytest.raises(FileNotFoundError):
        safeckpt.open(mem.url("nope.sckpt"))


@pytest.mark.parametrize("name", ["m.sckpt", "model.safetensors"])
def test_remote_sharded_checkpoint(mem, name):
    """open() sends a remote shard index (.sckpt or Hugging Face) to the sharded readers, found by
    its name, by the name its save was given, or as its directory's one checkpoint."""
    tensors = {f"w{i}": np.full(1000, i, np.float32) for i in range(6)}
    safeckpt.save_file(tensors, mem.url(f"d/{name}"), max_shard_size=8000)
    index = name if name.endswith(".sckpt") else name + ".index.json"
    for url in (mem.url(f"d/{name}"), mem.url("d"), mem.url(f"d/{index}")):
        with safeckpt.open(url) as f:
            assert isinstance(f, safeckpt.ShardedReader)
            assert f.shard_of("w5").endswith("-00003-of-00003" + name[name.index("."):])
            same_tensors(f.load_all(), tensors)


def test_fs_and_storage_options(mem):
    need("fsspec")
    data = safeckpt.save_bytes(TENSORS)
    mem.put("m.sckpt", data)
    same_tensors(safeckpt.load_file(f"{mem.root}/m.sckpt", fs=mem.fs), TENSORS)
    same_tensors(safeckpt.load_file(mem.url("m.sckpt"), storage_options={}), TENSORS)
    same_tensors(safeckpt.load_file(remote.resolve(mem.url("m.sckpt"))), TENSORS)


# -- what a remote reader refuses ------------------------------------------------------------------

def test_truncated_object(mem):
    data = safeckpt.save_bytes(TENSORS, align=ALIGN)
    with pytest.raises(TruncatedFileError, match=r"\[T7\]"):
        safeckpt.open(mem.put("t.sckpt", data[:-5]))
    with pytest.raises(TruncatedFileError):
        safeckpt.open(mem.put("t2.sckpt", data[:20]))


def test_object_shrinks_after_open(mem):
    """[RS2]: the object replaced by a shorter one after open: a short response, never used."""
    data = safeckpt.save_bytes(TENSORS, align=ALIGN)
    url = mem.put("t.sckpt", data)
    with safeckpt.open(url) as f:
        mem.put("t.sckpt", data[:len(data) - 1000])
        with pytest.raises(RemoteError, match=r"got \d+ bytes \[RS2\]"):
            f["c"]


def test_header_crc_mismatch(mem):
    data = safeckpt.save_bytes(TENSORS, align=ALIGN)
    with pytest.raises(ChecksumError, match=r"header checksum mismatch.*\[P8\]"):
        safeckpt.open(mem.put("h.sckpt", flipped(data, 40)))


@pytest.mark.parametrize("verify", [None, False, True])
def test_tensor_crc_mismatch(mem, verify):
    """[RS4]: a tensor's CRC32C is checked as it arrives, whatever verify says; the message says
    that the object may have changed."""
    data = safeckpt.save_bytes(TENSORS, align=ALIGN)
    offset = safeckpt.Reader(data).info("c").offset
    with safeckpt.open(mem.put("c.sckpt", flipped(data, offset + 100))) as f:
        assert np.array_equal(f["a"], TENSORS["a"])
        with pytest.raises(ChecksumError, match=r"tensor 'c'.*\[T10\].*may also have changed"):
            f.load_all(verify=verify)
        with pytest.raises(ChecksumError, match="tensor 'c'"):
            f.raw_bytes("c", verify=verify)
        with pytest.raises(ChecksumError, match="tensor 'c'"):
            f.verify(["c"])


def test_padding_before_first_tensor(mem):
    data = safeckpt.save_bytes(TENSORS, align=ALIGN)
    first = safeckpt.Reader(data).info("a").offset
    header_end = first - 1  # the last padding byte before tensor 0
    bad = flipped(data, header_end)
    with pytest.raises(LayoutError, match=r"tensor 'a'.*\[T9\]"):
        safeckpt.Reader(bad)  # the local reader refuses it too
    with pytest.raises(LayoutError, match=r"tensor 'a'.*\[T9\]"):
        safeckpt.open(mem.put("p.sckpt", bad))


@pytest.mark.parametrize("how", ["one", "block", "verify", "rows"])
def test_padding_violation(mem, how):
    """[RS3]: nonzero padding after a fetched tensor (before the next) is a LayoutError naming
    the next tensor, whether the tensor is read alone, in a block of neighbours, by verify or
    by rows; the tensors around it still load alone."""
    data = safeckpt.save_bytes(TENSORS, align=ALIGN)
    start, end = padding_after(data, "a")
    bad = flipped(data, end - 3)
    with pytest.raises(LayoutError):
        safeckpt.Reader(bad)
    with safeckpt.open(mem.put("p.sckpt", bad)) as f:  # opening checks no padding after tensor 0
        assert np.array_equal(f["b"], TENSORS["b"])
        match = rf"tensor 'b'.*\[T9\] \(in bytes {start}-{end - 1}\)"
        with pytest.raises(LayoutError, match=match if how != "block" else r"tensor 'b'.*\[T9\]"):
            if how == "one":
                f["a"]
            elif how == "block":
                f.load_all()
            elif how == "verify":
                f.verify()
            else:
                f.get_slice("a")[8:10]


def test_no_checksum_object_replaced(mem, tmp_path):
    """[RS4]: without checksums the header is read again after each load: an object replaced
    between open and load raises ObjectChangedError and returns nothing."""
    url = mem.put("n.sckpt", safeckpt.save_bytes(TENSORS, checksum=False, align=ALIGN))
    other = dict(TENSORS, a=np.arange(10, dtype=np.int32))  # same layout, another dtype
    with safeckpt.open(url) as f:
        assert not f.has_checksums
        same_tensors(f.load_all(), TENSORS)
        mem.put("n.sckpt", safeckpt.save_bytes(other, checksum=False, align=ALIGN))
        with pytest.raises(ObjectChangedError, match=r"changed since it was opened.*\[RS4\]"):
            f.load_all()
        with pytest.raises(ObjectChangedError):
            f["b"]
        with pytest.raises(ObjectChangedError):
            f.get_slice("c")[3:4]
    path = tmp_path / "m.safetensors"
    safeckpt.save_file(TENSORS, path)
    url = mem.put("m.safetensors", path.read_bytes())
    with safeckpt.open(url) as f:
        safeckpt.save_file({"x": np.zeros(10000)}, path)
        mem.put("m.safetensors", path.read_bytes())
        with pytest.raises(ObjectChangedError):
            f["a"]


def test_checksummed_partial_read_checks_the_header(mem):
    """Rows of a tensor are covered by no CRC32C: the header is read again [RS4]."""
    url = mem.put("c.sckpt", safeckpt.save_bytes(TENSORS, align=ALIGN))
    with safeckpt.open(url) as f:
        f.check_unchanged()
        mem.put("c.sckpt", safeckpt.save_bytes(dict(TENSORS, b=np.zeros((3, 5), np.int8))))
        with pytest.raises(ObjectChangedError):
            f.get_slice("c")[3:4]
        with pytest.raises(ObjectChangedError):
            f.check_unchanged()


# -- over HTTP (tests/servers.py) ------------------------------------------------------------------

def test_http_one_tensor_and_all(http_server, tmp_path):
    """The same reads against a real HTTP server with Range support: the server's own counts."""
    import servers

    tensors = dict(TENSORS, big=np.arange(1 << 18, dtype=np.float32))
    data = safeckpt.save_bytes(tensors, align=ALIGN)
    http_server.objects["m.sckpt"] = data
    options = servers.http_options()
    with safeckpt.open(http_server.url("m.sckpt"), storage_options=options) as f:
        assert http_server.traffic.by_method["GET"] == 1
        assert http_server.traffic.bytes_by_method["GET"] == HEAD
        start, end = padding_after(data, "b")
        assert np.array_equal(f["b"], tensors["b"])
        assert http_server.traffic.by_method["GET"] == 2
        assert http_server.traffic.bytes_by_method["GET"] == HEAD + end - f.info("b").offset
        same_tensors(f.load_all(), tensors)
        assert http_server.traffic.by_method["GET"] == 3
    path = tmp_path / "m.safetensors"
    safeckpt.save_file(tensors, path)
    http_server.objects["m.safetensors"] = path.read_bytes()
    http_server.traffic.reset()
    same_tensors(safeckpt.load_file(http_server.url("m.safetensors"), storage_options=options),
                 tensors)
    assert http_server.traffic.by_method["GET"] == 3  # head, all the tensors, the header again


# -- over S3 (moto's server on 127.0.0.1, reached through s3fs and botocore) ------------------------

def test_s3_reads(s3, tmp_path):
    """Open, one tensor, everything and a directory on a real S3-compatible server: the
    server's own counts of GETs and bytes [RS1], [RS3], [RS6]."""
    tensors = dict(TENSORS, big=np.arange(1 << 18, dtype=np.float32))
    data = safeckpt.save_bytes(tensors, align=ALIGN)
    s3.fs.pipe_file(f"{s3.name}/d/m.sckpt", data)
    s3.traffic.reset()
    with safeckpt.open(s3.url("d/m.sckpt"), storage_options=s3.storage_options) as f:
        assert s3.traffic.by_method["GET"] == 1 and s3.traffic.bytes_by_method["GET"] == HEAD
        start, end = padding_after(data, "b")
        assert np.array_equal(f["b"], tensors["b"])
        assert s3.traffic.by_method["GET"] == 2
        assert s3.traffic.bytes_by_method["GET"] == HEAD + end - f.info("b").offset
        same_tensors(f.load_all(), tensors)
        assert s3.traffic.by_method["GET"] == 3
    with safeckpt.open(s3.url("d"), storage_options=s3.storage_options) as f:  # the directory
        assert f.path == s3.url("d/m.sckpt")
    path = tmp_path / "m.safetensors"
    safeckpt.save_file(tensors, path)
    s3.fs.pipe_file(f"{s3.name}/m.safetensors", path.read_bytes())
    same_tensors(safeckpt.load_file(f"{s3.name}/m.safetensors", fs=s3.fs), tensors)
    with pytest.raises(FileNotFoundError):
        safeckpt.open(s3.url("nope.sckpt"), storage_options=s3.storage_options)


@pytest.mark.parametrize("checksum", [False, True])
def test_replaced_by_another_layout_is_a_change_not_bad_padding(mem, checksum):
    """[RS4]: an object replaced after open by a save whose tensor covers the old padding fails
    the padding check [RS3] first; the error is then ObjectChangedError (the header differs),
    not a LayoutError that blames the file."""
    old = {"a": np.arange(3, dtype=np.uint8), "b": np.arange(5, dtype=np.uint8)}
    new = {"a": np.full(64, 7, np.uint8), "b": np.arange(5, dtype=np.uint8)}
    url = mem.put("m.sckpt", safeckpt.save_bytes(old, checksum=checksum))
    with safeckpt.open(url) as f:
        mem.put("m.sckpt", safeckpt.save_bytes(new, checksum=checksum))
        with pytest.raises(ObjectChangedError, match=r"changed since it was opened"):
            f["a"]
        with pytest.raises(ObjectChangedError):
            f.load_all()


def test_s3_reads_without_s3fs_private_retry_helper(s3, monkeypatch):
    """safeckpt's bounded S3 reads use s3fs's private retry helper when it is there; an s3fs
    release without it still reads (one try per request)."""
    monkeypatch.setattr(remote, "_s3_retries", lambda: None)
    s3.fs.pipe_file(f"{s3.name}/w.sckpt", safeckpt.save_bytes(TENSORS))
    same_tensors(safeckpt.load_file(s3.url("w.sckpt"), storage_options=s3.storage_options),
                 TENSORS)
