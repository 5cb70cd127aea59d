"""Saving through fsspec (issue 14, FORMAT.md section 12): save/save_file/save_plan/save_sharded to
URLs, streamed [RS7], and sharded, Hugging Face and linked checkpoints read back remotely.

Every round trip runs on fsspec's memory filesystem and on moto's S3 server (the ``s3`` fixture of
tests/conftest.py), under both backends.
"""

import io
import tracemalloc
import uuid

import numpy as np
import pytest

import safeckpt
from safeckpt import api
from safeckpt import format as fmt
from safeckpt import writer
from safeckpt.errors import (ChecksumError, InvalidValueError, LimitError, RefError, RemoteError,
                             ShardError)
from safeckpt.refs import LinkedReader
from safeckpt.safetensors_shards import SafetensorsShards
from safeckpt.shard import ShardedReader

from conftest import need

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("backend")]


class Store:
    """A directory of the test's own in a remote filesystem: its ``url(name)``, the
    ``storage_options`` that reach it, and the objects in it (``names()``, ``cat(name)``)."""

    def __init__(self, kind, fs, root, url_root, options, bucket=None):
        self.kind, self.fs, self.root, self.options = kind, fs, root, options
        self.url_root, self.bucket = url_root, bucket

    def url(self, name=""):
        return f"{self.url_root}/{name}"

    def names(self):
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def cat(self, name):
        self.fs.invalidate_cache()
        return self.fs.cat_file(f"{self.root}/{name}")

    def put(self, name, data):
        self.fs.pipe_file(f"{self.root}/{name}", bytes(data))
        self.fs.invalidate_cache()

    def uploads(self):
        """Multipart uploads begun and neither completed nor aborted (S3 only)."""
        return self.fs.call_s3("list_multipart_uploads", Bucket=self.bucket).get("Uploads", [])


@pytest.fixture(params=["memory", "s3"])
def store(request):
    if request.param == "memory":
        need("fsspec")
        import fsspec

        fs = fsspec.filesystem("memory")
        root = f"/h3-{uuid.uuid4().hex}"
        yield Store("memory", fs, root, f"memory://{root}", None)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        bucket = request.getfixturevalue("s3")
        yield Store("s3", bucket.fs, f"{bucket.name}/d", bucket.url("d"), bucket.storage_options,
                    bucket.name)


STATE = {
    "model": {"w": np.arange(1000, dtype=np.float32).reshape(10, 100),
              "b": np.arange(7, dtype=">i4"),  # big-endian: written little-endian [T1]
              "t": np.arange(24, dtype=np.int16).reshape(4, 6).T},  # not C-contiguous
    "opt": ({"step": 3, "lr": np.float32(0.5)}, [None, "adam", b"\x00"]),
    7: np.zeros((0, 3), np.float64),
}


def same(got, want):
    """Nested equality with types, arrays compared exactly."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            same(a, b)
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype.newbyteorder("=") == want.dtype.newbyteorder("=")
        assert got.shape == want.shape and np.array_equal(got, want)
    else:
        assert got == want


class Failing(writer.LazyArray):
    """A lazy array whose loading raises after ``ok`` loads: a save that fails partway (a GPU
    copy that fails)."""

    def __init__(self, shape=(4,), ok=0):
        loads = []

        def load():
            loads.append(1)
            if len(loads) > ok:
                raise RuntimeError("the device copy failed")
            return np.zeros(shape, np.float32)
        super().__init__(np.float32, shape, load)


def failing_in_the_write(name):
    """A Failing array that fails when the tensor bytes are being written: a .sckpt save loads
    it twice (the CRC pass, then the write), a .safetensors save once."""
    return Failing(ok=1 if name.endswith(".sckpt") else 0)


def parts_sent(request):
    """The PUT requests (S3's upload_part) moto has answered so far."""
    return request.getfixturevalue("moto_server").traffic.by_method["PUT"]


class Changing(writer.LazyArray):
    """A lazy array that loads other bytes each time: an array written to during the save."""

    def __init__(self, n=1000):
        self.loads = 0

        def load():
            self.loads += 1
            return np.full(n, self.loads, np.float32)
        super().__init__(np.float32, (n,), load)


# -- round trips -------------------------------------------------------------------------------

def test_save_and_load_nested(store):
    """[RS7]: the streamed object is byte for byte the file a local save writes."""
    url = store.url("ckpt.sckpt")
    safeckpt.save(STATE, url, storage_options=store.options)
    assert store.names() == ["ckpt.sckpt"]
    assert store.cat("ckpt.sckpt") == api.save_tree_bytes(STATE)
    same(safeckpt.load(url, storage_options=store.options), STATE)
    same(safeckpt.load(url, prefix="opt", storage_options=store.options), STATE["opt"])


@pytest.mark.parametrize("checksum", [True, False])
def test_save_file_and_load_file(store, checksum):
    tensors = {"a": np.arange(300, dtype=np.float64), "b": np.ones((3, 5), ">f2"),
               "c": np.arange(40, dtype=np.uint8)[::2], "empty": np.zeros(0, np.int8)}
    url = store.url("flat.sckpt")
    safeckpt.save_file(tensors, url, metadata={"epoch": 2}, align=128, checksum=checksum,
                       storage_options=store.options)
    assert store.cat("flat.sckpt") == safeckpt.save_bytes(tensors, metadata={"epoch": 2},
                                                          align=128, checksum=checksum)
    got = safeckpt.load_file(url, storage_options=store.options)
    assert list(got) == list(tensors)
    for name in tensors:
        assert np.array_equal(got[name], tensors[name]) and got[name].shape == tensors[name].shape
    with safeckpt.open(url, storage_options=store.options) as f:
        assert f.metadata == {"epoch": 2} and f.has_checksums is checksum


def test_fs_object(store):
    """fs= with a path inside it, and a RemotePath as the path, save as a URL does."""
    path = f"{store.root}/by-fs.sckpt"
    fs = store.fs
    safeckpt.save_file({"w": np.arange(5)}, path, fs=fs)
    assert safeckpt.load_file(path, fs=fs)["w"].tolist() == [0, 1, 2, 3, 4]
    target = safeckpt.remote.resolve(store.url("by-rp.sckpt"), storage_options=store.options)
    safeckpt.save({"x": (1, 2)}, target)
    assert safeckpt.load(target) == {"x": (1, 2)}


def test_safetensors_single_file(store, tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(5, dtype=">i8")}
    url = store.url("model.safetensors")
    safeckpt.save_file(tensors, url, metadata={"format": "pt"}, storage_options=store.options)
    safeckpt.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert store.cat("model.safetensors") == (tmp_path / "model.safetensors").read_bytes()
    got = safeckpt.load_file(url, storage_options=store.options)
    assert got["w"].tolist() == tensors["w"].tolist() and got["i"].tolist() == [0, 1, 2, 3, 4]
    safeckpt.save(STATE["model"], store.url("tree.safetensors"), storage_options=store.options)
    same(safeckpt.load(store.url("tree.safetensors"), storage_options=store.options),
         STATE["model"])


def test_sharded_sckpt(store):
    """[S8], [S9]: shards then the index; a later save with fewer shards removes the stale ones."""
    state = {"a": np.zeros(200, np.float32), "b": np.ones(200, np.float32),
             "c": np.full(200, 2, np.float32), "step": 3}
    url = store.url("m.sckpt")
    safeckpt.save(state, url, max_shard_size=1000, storage_options=store.options)
    assert store.names() == ["m-00001-of-00003.sckpt", "m-00002-of-00003.sckpt",
                             "m-00003-of-00003.sckpt", "m.sckpt"]
    with safeckpt.open(url, storage_options=store.options) as f:
        assert isinstance(f, ShardedReader)
        assert f.shard_of("b") == store.url("m-00002-of-00003.sckpt")
        assert f.header_crc == int.from_bytes(store.cat("m.sckpt")[28:32], "little")
        f.verify()
    same(safeckpt.load(url, storage_options=store.options), state)
    same(safeckpt.load(store.url(), storage_options=store.options), state)  # the directory
    safeckpt.save(state, url, max_shard_size=2000, storage_options=store.options)
    assert store.names() == ["m-00001-of-00002.sckpt", "m-00002-of-00002.sckpt", "m.sckpt"]
    same(safeckpt.load(url, storage_options=store.options), state)
    safeckpt.save(state, url, max_shard_size="1GB",  # one shard's worth: one file, no shards
                  storage_options=store.options)
    assert store.names() == ["m.sckpt"]


def test_sharded_failure_keeps_the_previous_index(store):
    """[S9]: a shard that fails leaves no index of the new save; the previous checkpoint loads."""
    state = {"a": np.zeros(200, np.float32), "b": np.ones(200, np.float32)}
    url = store.url("m.sckpt")
    safeckpt.save(state, url, max_shard_size=1000, storage_options=store.options)
    before = {name: store.cat(name) for name in store.names()}
    with pytest.raises(RuntimeError, match="device copy failed"):
        safeckpt.save_file({"a": np.ones(200, np.float32), "x": Failing((200,)),
                            "y": np.ones(300, np.float32)}, url, max_shard_size=1000,
                           storage_options=store.options)
    assert store.cat("m.sckpt") == before["m.sckpt"]
    same(safeckpt.load(url, storage_options=store.options), state)


def test_remote_shard_missing_or_replaced(store):
    state = {"a": np.zeros(200, np.float32), "b": np.ones(200, np.float32)}
    url = store.url("m.sckpt")
    safeckpt.save(state, url, max_shard_size=1000, storage_options=store.options)
    shard = store.cat("m-00002-of-00002.sckpt")
    store.put("m-00002-of-00002.sckpt", safeckpt.save_bytes({"b": np.ones(200, np.float32)}))
    with pytest.raises(ShardError, match=r"m-00002-of-00002\.sckpt.*\[S7\]"):
        safeckpt.open(url, storage_options=store.options)
    store.put("m-00002-of-00002.sckpt", shard)
    store.fs.rm(f"{store.root}/m-00002-of-00002.sckpt")
    with pytest.raises(FileNotFoundError, match=r"shard that the index .*m\.sckpt.*\[S7\]"):
        safeckpt.open(url, storage_options=store.options)


def test_hugging_face_shards(store):
    """[HF6], [HF7] remotely: shards then the index, opened by the directory, the index or the
    name saved to; a later single-file save removes the index and the shards."""
    tensors = {"a": np.zeros(300, np.float32), "b": np.ones(300, np.float32)}
    url = store.url("model.safetensors")
    safeckpt.save_file(tensors, url, max_shard_size="1KB", storage_options=store.options)
    assert store.names() == ["model-00001-of-00002.safetensors",
                             "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for where in (store.url(), store.url("model.safetensors.index.json"), url):
        with safeckpt.open(where, storage_options=store.options) as f:
            assert isinstance(f, SafetensorsShards) and f.keys() == ["a", "b"]
            assert f.shard_of("b") == store.url("model-00002-of-00002.safetensors")
            assert f.metadata["total_size"] == 2400 and f["b"].tolist() == [1.0] * 300
    safeckpt.save_file(tensors, url, storage_options=store.options)
    assert store.names() == ["model.safetensors"]
    assert safeckpt.load_file(url, storage_options=store.options)["b"].tolist() == [1.0] * 300


def test_hugging_face_index_size_checked_before_it_is_read(store, monkeypatch):
    """[HF1]: an index over max_header_size is refused from its size, never fetched."""
    tensors = {"a": np.zeros(300, np.float32), "b": np.ones(300, np.float32)}
    safeckpt.save_file(tensors, store.url("model.safetensors"), max_shard_size="1KB",
                       storage_options=store.options)
    index = store.url("model.safetensors.index.json")
    fetched = []
    methods = ("cat_file", "cat_ranges", "cat", "open") + (
        ("_call_s3",) if hasattr(store.fs, "_call_s3") else ())  # s3fs: safeckpt's own GETs
    for method in methods:
        def record(*args, _original=getattr(store.fs, method), _method=method, **kwargs):
            if _method != "_call_s3" or args[0] == "get_object":  # a HEAD is the size check
                fetched.append((_method, args[0]))
            return _original(*args, **kwargs)
        monkeypatch.setattr(store.fs, method, record)
    with pytest.raises(LimitError, match=r"index\.json.*max_header_size=100.*\[HF1\]"):
        safeckpt.open(index, max_header_size=100, storage_options=store.options)
    assert fetched == []
    with safeckpt.open(index, max_header_size=1000, storage_options=store.options) as f:
        assert f.keys() == ["a", "b"]
    assert fetched  # the same filesystem object: the calls above would have been seen


def test_linked_files_read_remotely(store, tmp_path):
    """Section 11 remotely: a file with references opens with the file it refers to beside it,
    each checked [X5]; a referenced file saved again since is refused; consolidate copies."""
    base = {"base": np.arange(1000, dtype=np.float32), "lora": np.zeros(8, np.float32)}
    first, second = store.url("step-1.sckpt"), store.url("step-2.sckpt")
    api.save_plan(writer.Plan(base, None, 64, True, save_id=fmt.new_save_id()), first,
                  storage_options=store.options)
    with safeckpt.open(first, storage_options=store.options) as prev:
        where = {"base": prev.location("base")}
    new = {"base": base["base"], "lora": np.ones(8, np.float32)}
    api.save_plan(writer.Plan(new, None, 64, True, refs=where), second,
                  storage_options=store.options)
    with safeckpt.open(second, storage_options=store.options) as f:
        assert isinstance(f, LinkedReader)
        assert f.shard_of("base") == first and f.shards == [first, second]
        assert f.references() == [("step-1.sckpt", 1, 4000)]
        assert f["base"].tolist() == base["base"].tolist() and f["lora"].tolist() == [1.0] * 8
        f.verify()
    with pytest.raises(RefError, match=r"step-2\.sckpt.*\[X8\]"):  # step 2 refers to step 1
        safeckpt.consolidate(second, first, storage_options=store.options)
    safeckpt.consolidate(second, store.url("full.sckpt"), storage_options=store.options)
    with safeckpt.open(store.url("full.sckpt"), storage_options=store.options) as f:
        assert f.refs is None and f.load_all()["base"].tolist() == base["base"].tolist()
    # the options go to the URL only: a local copy of a remote checkpoint
    safeckpt.consolidate(second, tmp_path / "local.sckpt", storage_options=store.options)
    assert safeckpt.load_file(tmp_path / "local.sckpt")["lora"].tolist() == [1.0] * 8
    api.save_plan(writer.Plan(base, None, 64, True, save_id=fmt.new_save_id()), first,
                  storage_options=store.options)  # saved again: another save_id
    with pytest.raises(RefError, match=r"step-1\.sckpt.*header_crc.*saved again since.*\[X5\]"):
        safeckpt.open(second, storage_options=store.options)
    store.fs.rm(f"{store.root}/step-1.sckpt")
    with pytest.raises(FileNotFoundError, match=r"refers to.*\[X5\]"):
        safeckpt.open(second, storage_options=store.options)


# -- failures leave nothing half-written [RS7] -------------------------------------------------

def s3_small_parts(store):
    """Storage options whose uploads send a part every 5 MiB (S3's smallest), so that a save of
    a few MiB is a multipart upload well under way when it fails."""
    if store.kind != "s3":
        return store.options
    return {**store.options, "default_block_size": 5 << 20}


@pytest.mark.parametrize("atomic", [True, False])
@pytest.mark.parametrize("name", ["f.sckpt", "f.safetensors"])
def test_failed_save_leaves_no_object(store, request, atomic, name):
    """An array that fails while the upload is under way: no object, and no multipart upload
    left behind on S3."""
    big = np.ones(3 << 20, np.float32)  # 12 MiB: a part sent before the failure
    with pytest.raises(RuntimeError, match="device copy failed"):
        safeckpt.save_file({"big": big, "bad": failing_in_the_write(name)}, store.url(name),
                           atomic=atomic, storage_options=s3_small_parts(store))
    assert name not in store.names()
    if store.kind == "s3":
        assert parts_sent(request) >= 1 and store.uploads() == []


@pytest.mark.parametrize("name", ["f.sckpt", "f.safetensors"])
def test_failed_save_keeps_the_previous_object(store, request, name):
    safeckpt.save_file({"w": np.arange(10)}, store.url(name), storage_options=store.options)
    before = store.cat(name)
    sent = parts_sent(request) if store.kind == "s3" else 0
    with pytest.raises(RuntimeError, match="device copy failed"):
        safeckpt.save_file({"big": np.ones(3 << 20, np.float32),
                            "bad": failing_in_the_write(name)},
                           store.url(name), storage_options=s3_small_parts(store))
    assert store.cat(name) == before
    assert safeckpt.load_file(store.url(name), storage_options=store.options)["w"].tolist() == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    if store.kind == "s3":
        assert parts_sent(request) > sent and store.uploads() == []


def refuse_parts(store, request):
    """moto answers every upload of a part (a PUT) with 403 (no retry) until the test ends."""
    if store.kind != "s3":
        pytest.skip("fault injection is moto's (tests/servers.py)")
    moto = request.getfixturevalue("moto_server")
    moto.misbehave("status", status=403, method="PUT")
    request.addfinalizer(moto.behave)
    return moto


def test_storage_failure_mid_upload(store, request):
    """The storage refuses a part: an OSError, the upload aborted, the previous object kept."""
    url = store.url("f.sckpt")
    safeckpt.save_file({"w": np.arange(10)}, url, storage_options=store.options)
    before = store.cat("f.sckpt")
    moto = refuse_parts(store, request)
    with pytest.raises(OSError):
        safeckpt.save_file({"big": np.ones(3 << 20, np.float32)}, url,
                           storage_options=s3_small_parts(store))
    assert moto.faults.applied
    moto.behave()
    assert store.cat("f.sckpt") == before and store.uploads() == []


def test_storage_failure_mid_upload_is_a_remote_error(store, request):
    """s3fs uploads a part inside write(): its failure is a RemoteError naming the object, and
    the upload is aborted (no object, no multipart upload left)."""
    moto = refuse_parts(store, request)
    with pytest.raises(RemoteError, match=r"f\.sckpt: upload \(after \d+ bytes\) failed"):
        safeckpt.save_file({"big": np.ones(3 << 20, np.float32)}, store.url("f.sckpt"),
                           storage_options=s3_small_parts(store))
    moto.behave()
    assert "f.sckpt" not in store.names() and store.uploads() == []


def test_array_changed_between_the_passes(store):
    """[RS7]: bytes that differ from the CRC in the header abort the save, naming the tensor."""
    url = store.url("c.sckpt")
    safeckpt.save_file({"w": np.arange(10)}, url, storage_options=store.options)
    before = store.cat("c.sckpt")
    changing = Changing(3 << 20)
    with pytest.raises(ChecksumError, match=r"tensor 'moving'.*changed.*\[RS7\]"):
        safeckpt.save_file({"still": np.zeros(10), "moving": changing}, url,
                           storage_options=s3_small_parts(store))
    assert changing.loads == 2  # the CRC pass, then the write pass
    assert store.cat("c.sckpt") == before
    if store.kind == "s3":
        assert store.uploads() == []


def test_known_crc_loads_once(store):
    """A LazyArray whose CRC32C is known is loaded once; one that does not match it aborts."""
    data = np.arange(1000, dtype=np.float32)
    crc = safeckpt.Reader(safeckpt.save_bytes({"x": data})).info("x").crc32c
    loads = []

    def load():
        loads.append(1)
        return data.copy()
    url = store.url("k.sckpt")
    safeckpt.save_file({"x": writer.LazyArray(np.float32, (1000,), load, crc32c=crc)}, url,
                       storage_options=store.options)
    assert len(loads) == 1
    assert safeckpt.load_file(url, storage_options=store.options)["x"].tolist() == data.tolist()
    wrong = writer.LazyArray(np.float32, (1000,), load, crc32c=crc ^ 1)
    with pytest.raises(ChecksumError, match=r"tensor 'x'.*its source gave"):
        safeckpt.save_file({"x": wrong}, store.url("k2.sckpt"), storage_options=store.options)
    assert "k2.sckpt" not in store.names()


# -- refusals -----------------------------------------------------------------------------------

def test_http_save_refused(http_server):
    for save in (lambda url: safeckpt.save_file({"w": np.zeros(2)}, url),
                 lambda url: safeckpt.save({"w": np.zeros(2)}, url, max_shard_size=8)):
        with pytest.raises(InvalidValueError, match=r"http://127\.0\.0\.1.*nothing over HTTP"):
            save(http_server.url("x.sckpt"))
    assert http_server.traffic.requests == 0 and not http_server.objects


def test_http_write_refused_below_the_api(http_server):
    """Every write path refuses http, not only the api's: convert's .safetensors output goes
    straight to the writer, and RemotePath's own writes check too."""
    from safeckpt import remote

    rp = remote.resolve(http_server.url("y.safetensors"))
    with pytest.raises(InvalidValueError, match="nothing over HTTP"):
        with rp.open_write():
            pass
    with pytest.raises(InvalidValueError, match="nothing over HTTP"):
        rp.write_small(b"x")
    src = http_server.url("src.sckpt")
    http_server.objects["src.sckpt"] = safeckpt.save_bytes({"w": np.zeros(2)})
    with pytest.raises(InvalidValueError, match="nothing over HTTP"):
        safeckpt.convert(src, http_server.url("out.safetensors"), storage_options={})
    assert set(http_server.objects) == {"src.sckpt"}


def test_storage_options_with_a_local_path_refused(tmp_path):
    path = tmp_path / "w.sckpt"
    for save in (safeckpt.save_file, safeckpt.save):
        with pytest.raises(InvalidValueError, match=r"local path: storage_options="):
            save({"w": np.zeros(2)}, path, storage_options={"anon": True})
    assert not path.exists()


def test_names_checked_before_anything_is_written(store):
    with pytest.raises(InvalidValueError, match=r"does not write \.pt"):
        safeckpt.save_file({"w": np.zeros(2)}, store.url("w.pt"), storage_options=store.options)
    assert store.names() == []


# -- bounded memory [RS7] -----------------------------------------------------------------------

class Discarding(io.RawIOBase):
    """A stream that keeps nothing: counts the bytes and the largest single write."""

    def __init__(self):
        self.total, self.largest = 0, 0

    def writable(self):
        return True

    def write(self, data):
        n = memoryview(data).nbytes
        self.total, self.largest = self.total + n, max(self.largest, n)
        return n


def discarding_fs():
    """An fsspec filesystem whose buffered files (5 MiB blocks, as s3fs with its smallest parts)
    send each block nowhere: a save through it holds only what safeckpt and fsspec buffer."""
    need("fsspec")
    from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

    class Sink(AbstractBufferedFile):
        def _initiate_upload(self):
            pass

        def _upload_chunk(self, final=False):
            self.fs.received += self.buffer.getbuffer().nbytes
            return True

    class DiscardingFS(AbstractFileSystem):
        protocol = "h3discard"
        cachable = False

        def __init__(self):
            super().__init__()
            self.received = 0

        def _open(self, path, mode="rb", block_size=None, autocommit=True, **kwargs):
            return Sink(self, path, mode, block_size=5 << 20, autocommit=autocommit)

        def ls(self, path, detail=True, **kwargs):  # it keeps nothing
            return []

        def _rm(self, path):
            raise FileNotFoundError(path)

    return DiscardingFS()


@pytest.mark.parametrize("name", ["big.sckpt", "big.safetensors"])
def test_streamed_save_memory_is_bounded(name):
    """A 128 MiB array streams with a few pieces held at once (a piece of it copied to be
    checksummed, fsspec's buffer), whatever its size."""
    fs = discarding_fs()
    big = np.ones(32 << 20, np.float32)
    tracemalloc.start()
    try:
        safeckpt.save_file({"big": big, "small": np.arange(10)}, f"d/{name}", fs=fs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fs.received > big.nbytes
    assert peak < 4 * writer.PIECE == big.nbytes // 4, peak


def test_stream_plan_writes_bounded_pieces():
    out = Discarding()
    plan = writer.Plan({"a": np.ones(5 << 20, np.float32), "b": np.arange(3, dtype=">u2")},
                       None, 64, True)
    writer.stream_plan(plan, out)
    assert out.total == plan.file_size and out.largest <= writer.PIECE


@pytest.mark.parametrize("source", ["src.sckpt", "src.safetensors"])
def test_convert_to_a_url_counts_progress_once(tmp_path, source):
    """A streamed save may load a tensor twice (no known CRC: the CRC pass, then the write
    [RS7]); convert's progress counts each tensor's bytes once, and a checksummed source's
    tensors are read once (their CRC is known)."""
    need("fsspec")
    src = str(tmp_path / source)
    state = {"a": np.arange(1000, dtype=np.float32), "b": np.ones((3, 7))}
    safeckpt.save_file(state, src)
    seen = []
    dst = f"memory://convert-{uuid.uuid4().hex}/out.sckpt"
    safeckpt.convert(src, dst, progress=lambda done, total: seen.append((done, total)))
    total = sum(a.nbytes for a in state.values())
    assert seen[-1] == (total, total) and all(done <= total for done, _ in seen)
    loaded = safeckpt.load_file(dst)
    assert all(loaded[k].tobytes() == v.tobytes() for k, v in state.items())
