"""The reading API: open/Reader, load_file, load_bytes, zero-copy mapping, slices, verify."""

import gc
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import safeckpt
from safeckpt.tree import same

pytestmark = pytest.mark.usefixtures("backend")

TENSORS = {
    "emb": np.arange(40, dtype=np.float32).reshape(10, 4),
    "bias": np.array([1, -2, 3], dtype=np.int64),
    "scalar": np.array(2.5, dtype=np.float64),
    "empty": np.zeros((0, 3), dtype=np.float16),
}


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "t.sckpt"
    safeckpt.save_file(TENSORS, p, metadata={"step": 3})
    return p


@pytest.mark.parametrize("mmap", [True, False])
def test_open_mapping_interface(path, mmap):
    with safeckpt.open(path, mmap=mmap) as f:
        assert f.keys() == list(TENSORS) == list(f)
        assert len(f) == 4 and "emb" in f and "nope" not in f
        assert f.metadata == {"step": 3}
        assert f.has_checksums and f.version == (1, 0) and f.align == 64
        for name, value in TENSORS.items():
            got = f[name]
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
        with pytest.raises(KeyError, match="nope"):
            f["nope"]


def test_repr_counts_tensors(path, tmp_path):
    one = tmp_path / "one.sckpt"
    safeckpt.save_file({"w": np.zeros(2)}, one)
    assert repr(safeckpt.open(one)).endswith("(1 tensor)>")
    assert repr(safeckpt.open(path)).endswith("(4 tensors)>")
    sharded = tmp_path / "m.sckpt"
    safeckpt.save({"a": np.zeros(200), "b": np.zeros(200)}, sharded, max_shard_size=1000)
    assert "(2 shards, 2 tensors)" in repr(safeckpt.open(sharded))


def test_info_does_not_read_data(path):
    with safeckpt.open(path) as f:
        info = f.info("emb")
        assert info.name == "emb" and info.shape == (10, 4) and info.dtype == np.float32
        assert info.nbytes == 160 and info.offset % 64 == 0 and info.crc32c is not None


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("key", [
    0, -1, 9, slice(None), slice(2, 5), slice(1, 9, 3), slice(None, None, -1), slice(8, 1, -2),
    slice(5, 2), slice(-3, None), (slice(1, 3), 2), (4, slice(None, None, 2)), (Ellipsis, 1),
    [1, 3],
])
def test_get_slice_matches_numpy(path, mmap, key):
    with safeckpt.open(path, mmap=mmap) as f:
        s = f.get_slice("emb")
        assert s.shape == (10, 4) and s.dtype == np.float32
        np.testing.assert_array_equal(s[key], TENSORS["emb"][key])


@pytest.mark.parametrize("mmap", [True, False])
def test_get_slice_out_of_range(path, mmap):
    with safeckpt.open(path, mmap=mmap) as f:
        with pytest.raises(IndexError):
            f.get_slice("emb")[10]
        with pytest.raises(IndexError):
            f.get_slice("emb")[-11]
        assert f.get_slice("emb")[20:30].shape == (0, 4)
        assert f.get_slice("scalar")[()] == 2.5


def test_pread_slice_reads_only_needed_rows(tmp_path, monkeypatch):
    big = np.arange(1000 * 64, dtype=np.float64).reshape(1000, 64)
    p = tmp_path / "big.sckpt"
    safeckpt.save_file({"big": big}, p)
    from safeckpt import _backend
    asked = []
    real = _backend.backend.read_into

    def spy(fd, offsets, lengths, dests, checksum=False):
        asked.extend(lengths)
        return real(fd, offsets, lengths, dests, checksum)

    monkeypatch.setattr(_backend.backend, "read_into", spy)
    with safeckpt.open(p, mmap=False) as f:
        np.testing.assert_array_equal(f.get_slice("big")[10:12], big[10:12])
    assert asked == [2 * 64 * 8]


def test_zero_copy_arrays_view_the_mapping(path):
    with safeckpt.open(path) as f:
        start, size = f._mapping.address, f.size
        for name in ("emb", "bias", "scalar"):
            address = f[name].__array_interface__["data"][0]
            assert start <= address < start + size
            assert address % 64 == 0


def test_arrays_are_writable_copy_on_write(path):
    before = path.read_bytes()
    loaded = safeckpt.load_file(path)
    loaded["emb"][:] = -1
    assert loaded["emb"].flags.writeable
    assert path.read_bytes() == before
    np.testing.assert_array_equal(safeckpt.load_file(path)["emb"], TENSORS["emb"])


def test_arrays_outlive_close_and_reader(path):
    f = safeckpt.open(path)
    emb = f["emb"]
    f.close()
    del f
    gc.collect()
    np.testing.assert_array_equal(emb, TENSORS["emb"])
    emb[0, 0] = 7  # still a live, writable mapping
    assert emb[0, 0] == 7


def mapped(path):
    with open("/proc/self/maps") as maps:
        return sum(str(path) in line for line in maps)


def test_mapping_released_with_last_array(path):
    f = safeckpt.open(path)
    emb = f["emb"]
    f.close()
    gc.collect()
    assert mapped(path) == 1
    del emb
    gc.collect()
    assert mapped(path) == 0


def test_use_after_close_is_a_clear_error(path):
    f = safeckpt.open(path)
    f.close()
    assert f.closed
    for use in (lambda: f["emb"], f.keys, lambda: f.info("emb"), f.verify,
                lambda: f.get_slice("emb"), lambda: len(f)):
        with pytest.raises(safeckpt.ReaderClosedError, match="closed"):
            use()
    f.close()  # twice is fine


def test_no_file_descriptor_leak(path):
    before = len(os.listdir("/proc/self/fd"))
    for mmap in (True, False) * 50:
        with safeckpt.open(path, mmap=mmap) as f:
            f["bias"]
    bad = path.with_name("bad.sckpt")
    bad.write_bytes(path.read_bytes()[:-1])
    for _ in range(50):
        with pytest.raises(safeckpt.TruncatedFileError):
            safeckpt.open(bad)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    assert mapped(path) == 0 and mapped(bad) == 0


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_opening_a_large_file_does_not_read_it(tmp_path):
    p = tmp_path / "large.sckpt"
    size = 256 << 20
    safeckpt.save_file({"a": np.ones(size // 2, np.uint8), "b": np.ones(size // 2, np.uint8)},
                       p, checksum=False)
    gc.collect()
    before = rss_bytes()
    with safeckpt.open(p) as f:
        arrays = [f["a"], f["b"]]
        grown = rss_bytes() - before
        assert grown < 16 << 20, grown
        assert arrays[1][-1] == 1  # touching one page maps one page
        assert rss_bytes() - before < 32 << 20


def test_verify_reads_every_tensor(path):
    with safeckpt.open(path) as f:
        f.verify()
    assert safeckpt.load_file(path, verify=True)["bias"][1] == -2
    assert safeckpt.load_file(path, mmap=False, verify=True)["bias"][1] == -2


@pytest.mark.parametrize("batch", [64 << 20, 100, 1000])
def test_verify_without_a_mapping_reads_in_bounded_batches(tmp_path, backend, monkeypatch, batch):
    """[T10] with mmap=False: neighbours share a read, a tensor larger than a batch is read in
    pieces, and the first bad tensor in the order asked for is named."""
    from safeckpt import reader as reader_module
    monkeypatch.setattr(reader_module, "_VERIFY_BATCH", batch)
    rng = np.random.default_rng(7)
    tensors = {f"t{i}": rng.random(n, dtype=np.float32) for i, n in enumerate([3, 500, 0, 40, 7])}
    path = tmp_path / "v.sckpt"
    safeckpt.save_file(tensors, path)
    with safeckpt.open(path, mmap=False) as f:
        f.verify()
        f.verify(["t4", "t1", "t2"])
        where = {name: f.info(name).offset for name in tensors}
    data = bytearray(path.read_bytes())
    data[where["t1"] + 1500] ^= 1
    data[where["t4"]] ^= 1
    path.write_bytes(data)
    for mmap in (False, True):
        with safeckpt.open(path, mmap=mmap) as f:
            f.verify(["t0", "t2", "t3"])
            with pytest.raises(safeckpt.ChecksumError, match="'t1'"):
                f.verify()
            with pytest.raises(safeckpt.ChecksumError, match="'t4'"):
                f.verify(["t3", "t4", "t1"])


def test_unmapped_load_checks_tensors_in_the_read(tmp_path, backend, monkeypatch):
    """mmap=False checks every tensor's CRC32C [T10]: a tensor read alone (here one spanning
    three 8 MiB read pieces, and a small one with no neighbour in reach) by the read itself, so
    the only second pass is over the block of small neighbours; a flipped byte anywhere is
    caught and named."""
    tensors = {"a": np.arange(5, dtype=np.int32), "b": np.arange(7, dtype=np.int16),
               "big": np.arange(4_500_000, dtype=np.float32), "empty": np.zeros(0, np.int8),
               "lone": np.arange(9, dtype=np.int64)}
    path = tmp_path / "c.sckpt"
    safeckpt.save_file(tensors, path)
    be = safeckpt._backend.backend
    second_pass, crc32c_ranges = [], be.crc32c_ranges
    monkeypatch.setattr(be, "crc32c_ranges", lambda *a: second_pass.append(list(a[2])) or
                        crc32c_ranges(*a))
    loaded = safeckpt.load_file(path, mmap=False)
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    assert second_pass == [[20, 14]]  # "a" and "b", sharing one block
    with safeckpt.open(path) as f:
        at = {name: f.info(name).offset for name in ("a", "b", "big", "lone")}
    for name, offset in [("a", at["a"]), ("b", at["b"] + 13), ("big", at["big"]),
                         ("big", at["big"] + (17 << 20) + 3), ("lone", at["lone"] + 71)]:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x40
        bad = tmp_path / "bad.sckpt"
        bad.write_bytes(bytes(data))
        with pytest.raises(safeckpt.ChecksumError, match=f"'{name}'"):
            safeckpt.load_file(bad, mmap=False)
        assert safeckpt.load_file(bad, mmap=False, verify=False).keys() == tensors.keys()


def test_sharded_loads_verify_by_default(tmp_path):
    """verify=None (auto) [T10] on a sharded checkpoint: each shard read into fresh memory checks
    its tensors; mapped shards stay lazy."""
    path = tmp_path / "m.sckpt"
    safeckpt.save({"a": np.zeros(200, np.float32), "b": np.ones(200, np.float32)}, path,
                  max_shard_size=1000)
    with safeckpt.open(path) as f:
        shard, offset = f.shard_of("b"), f.info("b").offset
    data = bytearray(open(shard, "rb").read())
    data[offset] ^= 1
    open(shard, "wb").write(bytes(data))
    for load in (lambda: safeckpt.load_file(path, mmap=False), lambda: safeckpt.load(path, mmap=False),
                 lambda: safeckpt.open(path, mmap=False)["b"], lambda: safeckpt.load_file(path, verify=True)):
        with pytest.raises(safeckpt.ChecksumError, match="'b'"):
            load()
    assert safeckpt.load_file(path)["b"][0] != 1
    assert safeckpt.load_file(path, mmap=False, verify=False)["b"][0] != 1


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        safeckpt.load_file(tmp_path / "absent.sckpt")
    with pytest.raises(IsADirectoryError):
        safeckpt.load_file(tmp_path)


def test_load_bytes_views_its_input():
    data = safeckpt.save_bytes(TENSORS)
    loaded = safeckpt.load_bytes(data, verify=True)
    np.testing.assert_array_equal(loaded["emb"], TENSORS["emb"])
    assert not loaded["emb"].flags.writeable  # bytes are immutable
    writable = safeckpt.load_bytes(bytearray(data))
    assert writable["emb"].flags.writeable


def test_many_threads_read_one_reader(path):
    errors = []
    with safeckpt.open(path, mmap=False) as slow, safeckpt.open(path) as fast:
        def work():
            try:
                for _ in range(50):
                    for f in (slow, fast):
                        np.testing.assert_array_equal(f["emb"], TENSORS["emb"])
                        np.testing.assert_array_equal(f.get_slice("emb")[3], TENSORS["emb"][3])
            except Exception as exc:  # collected and re-raised in the main thread
                errors.append(exc)
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_backend_names():
    assert safeckpt.backend in ("c", "python")
    code = "import safeckpt; print(safeckpt.backend)"
    env = dict(os.environ, SAFECKPT_BACKEND="python")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "python", out.stderr
    env["SAFECKPT_BACKEND"] = "fortran"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SAFECKPT_BACKEND" in out.stderr


# -- concurrency and resources (issue 4); test_many_threads_read_one_reader above covers reads ---


@pytest.mark.parametrize("mmap", [True, False])
def test_reader_closed_while_other_threads_read(path, mmap):
    """Each read returns the right data or raises ReaderClosedError: never another error, never
    bytes of some other file (a closed descriptor's number is soon reused by the next open)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that close() lands inside reads
    try:
        race_close(path, mmap)
    finally:
        sys.setswitchinterval(switch)
    gc.collect()
    assert mapped(path) == 0


def race_close(path, mmap):
    for attempt in range(50):
        f = safeckpt.open(path, mmap=mmap)
        outcomes, started = [], threading.Barrier(5)

        def work():
            started.wait()
            try:
                for _ in range(200):
                    np.testing.assert_array_equal(f["emb"], TENSORS["emb"])
                    np.testing.assert_array_equal(f.get_slice("emb")[2:4], TENSORS["emb"][2:4])
                    np.testing.assert_array_equal(f.load_all()["bias"], TENSORS["bias"])
                outcomes.append("done")
            except safeckpt.ReaderClosedError:
                outcomes.append("closed")
            except BaseException as exc:  # collected and re-raised in the main thread
                outcomes.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(attempt * 0.0002)  # close at a different point of the reads each time
        f.close()
        decoys = [os.open(path, os.O_RDONLY) for _ in range(4)]  # take the freed descriptor numbers
        for t in threads:
            t.join()
        for fd in decoys:
            os.close(fd)
        assert all(o in ("done", "closed") for o in outcomes), outcomes


def count_fds():
    return len(os.listdir("/proc/self/fd"))


def map_count():
    with open("/proc/self/maps") as maps:
        return len(maps.read().splitlines())


def test_thousands_of_open_close_cycles_leak_nothing(path, tmp_path):
    """6000 opens, failed opens and loads leave no descriptor and no mapping of either file, and
    the process's mapping count does not grow with the number of cycles. The allocator adds
    mappings of its own at moments a loaded machine shifts (glibc's per-thread arenas and cached
    stacks for the parallel-read threads; under .ci/sanitize, ASan's allocator mapping its regions
    as it grows: CI once saw 9 more than a fixed slack of 8), so the count is taken after a
    warm-up, and the bound, 60, is what a leak of one mapping per 100 operations would reach (a
    leak of one a cycle breaks it by thousands; under ASan after the tests before it the growth
    was -7 and 4)."""
    bad = tmp_path / "bad.sckpt"
    bad.write_bytes(path.read_bytes()[:-1])

    def cycles(n):
        for i in range(n):
            mmap = i % 2 == 0
            with safeckpt.open(path, mmap=mmap) as f:
                f["emb"], f.get_slice("emb")[1]
            with pytest.raises(safeckpt.TruncatedFileError):
                safeckpt.open(bad, mmap=mmap)
            safeckpt.load_file(path, mmap=mmap)
        gc.collect()

    cycles(100)
    fds, maps = count_fds(), map_count()
    cycles(2000)
    assert count_fds() == fds
    assert mapped(path) == 0 and mapped(bad) == 0
    assert map_count() - maps < 60


def test_shard_of_a_single_file_is_that_file(tmp_path, backend):
    """README's sharded example calls shard_of, which works when the state fits in one file."""
    path = str(tmp_path / "one.sckpt")
    safeckpt.save({"w": np.zeros(2)}, path, max_shard_size="1GB")
    with safeckpt.open(path) as f:
        assert f.shard_of("w") == path
        with pytest.raises(KeyError, match="nope"):
            f.shard_of("nope")


# -- byte order: a big-endian host (FORMAT.md section 4: tensor bytes are little-endian) ----------

@pytest.mark.parametrize("mmap", [True, False])
def test_a_big_endian_host_reads_back_what_it_saved(tmp_path, monkeypatch, mmap):
    """dtypes.BIG_ENDIAN_HOST takes a big-endian host's path on this machine: native ('=') arrays
    are big-endian there, the file's bytes little-endian (FORMAT.md section 4). The reader returns
    '<' views for numpy's dtypes (right on any host) and swaps ml_dtypes' into host order (numpy
    has them in native order only), and reads the table's u64 columns through numpy rather than a
    native memoryview. So what that host saves loads back with the values it had there (for a
    uint16 array, the big-endian reading of its bytes), and a little-endian host's file reads
    right too."""
    from safeckpt import dtypes
    import ml_dtypes
    u16, bf16 = np.arange(6, dtype=np.uint16).reshape(2, 3), np.array([1.5, -2.0], ml_dtypes.bfloat16)
    tensors = {"u16": u16, "bf16": bf16, "u8": np.array([7], np.uint8)}
    safeckpt.save_file(tensors, tmp_path / "little.sckpt")
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", True)
    safeckpt.save_file(tensors, tmp_path / "big.sckpt")
    as_big_host = u16.view(">u2")  # the values of u16's bytes on a big-endian host
    loaded = safeckpt.load_file(tmp_path / "big.sckpt", mmap=mmap, verify=True)
    assert loaded["u16"].dtype.str == "<u2" and np.array_equal(loaded["u16"], as_big_host)
    assert loaded["bf16"].tobytes() == bf16.tobytes() and loaded["u8"].tolist() == [7]
    with safeckpt.open(tmp_path / "big.sckpt", mmap=mmap) as f:
        assert np.array_equal(f.get_slice("u16")[1:], as_big_host[1:])
        f.verify(arrays=loaded)
    little = safeckpt.load_file(tmp_path / "little.sckpt", mmap=mmap, verify=True)
    assert np.array_equal(little["u16"], u16)
    assert little["bf16"].tobytes() == bf16.byteswap().tobytes()  # host order of bytes it holds
