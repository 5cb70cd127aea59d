"""Sharded checkpoints: FORMAT.md section 9, rules [S1]-[S9], under both backends."""

import collections
import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import safeckpt
from safeckpt import format as fmt
from safeckpt import shard, writer
from safeckpt.reader import Reader
from safeckpt.tree import same
from forge import forge

pytestmark = pytest.mark.usefixtures("backend")

A = np.arange(200, dtype=np.float32)  # 800 bytes
B = np.ones(75, np.float32)  # 300 bytes
C = np.linspace(0, 1, 625)  # 5000 bytes: over the limit alone
STATE = {"model": collections.OrderedDict(a=A, b=B), "opt": {0: {"c": C, "step": 3}},
         "betas": (0.9, 0.999), "tied": A}


def saved(tmp_path, obj=STATE, limit=1000, **kw):
    path = tmp_path / "m.sckpt"
    safeckpt.save(obj, path, max_shard_size=limit, **kw)
    return path


def index_shards(path):
    """The raw ``shards`` map of an index, to tamper with."""
    with Reader(path, allow_index=True) as reader:
        return reader.shard_index, reader.stored_tree


def write_index(path, shards, tree=fmt.NO_TREE):
    writer.write_plan(writer.Plan({}, None, 64, False, tree=tree, shards=shards), path, atomic=True)


# -- save ------------------------------------------------------------------------------------------

def test_S8_shards_in_order_a_big_tensor_alone(tmp_path):
    path = saved(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "m-00001-of-00003.sckpt", "m-00002-of-00003.sckpt", "m-00003-of-00003.sckpt", "m.sckpt"]
    shards, _ = index_shards(path)
    assert shards["counts"] == [1, 1, 1] and shards["names"] == ["model.a", "model.b", "opt.0.c"]
    for j, name in enumerate(shards["files"]):  # each shard is an ordinary flat file on its own
        with safeckpt.open(tmp_path / name) as f:
            assert f.version == (1, 0) and f.keys() == [shards["names"][j]]
            assert f.metadata == {"safeckpt.shard": {"save_id": shards["save_id"], "index": j + 1,
                                                     "count": 3}}
    with Reader(path, allow_index=True) as index:  # the index: no tensors, its own flag, version 1.2
        assert index.flags == fmt.FLAG_SHARD_INDEX and index.version == (1, 2) and not index.keys()
    assert same(safeckpt.load(path), STATE)


def test_S8_greedy_packing_and_one_file_when_it_fits(tmp_path):
    tensors = {f"t{i}": np.full(75, i, np.float32) for i in range(4)}  # 300 bytes each
    path = tmp_path / "m.sckpt"
    safeckpt.save_file(tensors, path, max_shard_size="1kB", metadata={"k": 1})
    assert index_shards(path)[0]["counts"] == [3, 1]
    safeckpt.save_file(tensors, path, max_shard_size="1MiB")  # fits: one ordinary file...
    assert os.listdir(tmp_path) == ["m.sckpt"]  # ... and the old shards are gone [S9]
    assert safeckpt.open(path).version == (1, 0)
    assert same(safeckpt.load_file(path), tensors)


@pytest.mark.parametrize("value, expected", [
    (1, 1), (4096, 4096), ("2GB", 2 * 10**9), ("2GiB", 2 << 30), ("500MB", 500 * 10**6),
    ("500 mib", 500 << 20), ("1.5GB", 1_500_000_000), ("10", 10), ("7b", 7), ("3KiB", 3072)])
def test_parse_size(value, expected):
    assert shard.parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0MB", "2 GB GB", "2XB", "GB", 1.5, True, b"1GB"])
def test_parse_size_refuses(tmp_path, value):
    with pytest.raises(ValueError, match="max_shard_size"):
        safeckpt.save({"a": A}, tmp_path / "m.sckpt", max_shard_size=value)
    assert not os.listdir(tmp_path)


def test_a_bad_value_refused_before_any_shard_is_written(tmp_path):
    with pytest.raises(safeckpt.InvalidValueError, match="obj\\['x'\\]"):
        safeckpt.save({"a": A, "x": object()}, tmp_path / "m.sckpt", max_shard_size=10)
    with pytest.raises(safeckpt.InvalidValueError, match="non-empty str"):
        safeckpt.save_file({"a": A, 3: B}, tmp_path / "m.sckpt", max_shard_size=10)
    assert not os.listdir(tmp_path)


# -- open ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mmap", [True, False])
def test_one_lazy_reader_over_all_shards(tmp_path, mmap):
    path = saved(tmp_path, metadata={"epoch": 2})
    for target in (path, tmp_path):  # the index, or the directory that holds it
        with safeckpt.open(target, mmap=mmap) as f:
            assert isinstance(f, safeckpt.ShardedReader) and len(f.shards) == 3
            assert f.keys() == ["model.a", "model.b", "opt.0.c"] and len(f) == 3
            assert "model.b" in f and "nope" not in f and f.metadata == {"epoch": 2}
            np.testing.assert_array_equal(f["opt.0.c"], C)
            assert f.info("model.b").shape == (75,) and f.shard_of("model.b").endswith("00002-of-00003.sckpt")
            np.testing.assert_array_equal(f.get_slice("model.a")[10:13], A[10:13])
            assert f.tree["opt"][0]["step"] == 3
            np.testing.assert_array_equal(f.tree["model"]["b"], B)
            assert same(f.load("opt"), STATE["opt"])
            back = f.load(verify=True)
            assert same(back, STATE) and back["tied"] is back["model"]["a"]
            f.verify()
            assert same(f.load_all(), {"model.a": A, "model.b": B, "opt.0.c": C})
            with pytest.raises(KeyError, match="nope"):
                f["nope"]
        with pytest.raises(safeckpt.ReaderClosedError):
            f.keys()
    torch_state = safeckpt.load(path, prefix="model", framework=None, mmap=mmap, verify=True)
    assert same(torch_state, STATE["model"])


def test_load_reads_shards_in_parallel(tmp_path, monkeypatch):
    path = saved(tmp_path, obj={f"t{i}": np.full(300, i, np.float32) for i in range(6)}, limit=1200)
    threads = set()
    original = Reader.load_indices

    def spy(self, *args):
        threads.add(threading.get_ident())
        return original(self, *args)

    monkeypatch.setattr(Reader, "load_indices", spy)
    with safeckpt.open(path, mmap=False) as f:
        assert len(f.shards) == 6 and len(f.load_all()) == 6
    assert threading.get_ident() not in threads and threads  # worker threads did the reads


def test_directory_errors(tmp_path):
    with pytest.raises(IsADirectoryError):
        safeckpt.open(tmp_path)
    saved(tmp_path)
    os.unlink(tmp_path / "m.sckpt")  # a save that never wrote its index
    with pytest.raises(IsADirectoryError, match="no index"):
        safeckpt.open(tmp_path)
    safeckpt.save_file({"a": A}, tmp_path / "x.sckpt")
    safeckpt.save_file({"a": A}, tmp_path / "y.sckpt")
    with pytest.raises(ValueError, match="several checkpoints"):
        safeckpt.open(tmp_path)


def test_S1_an_index_is_not_a_file_of_tensors(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(safeckpt.ShardError, match="shard index"):
        Reader(path)
    for data, words in [
        (forge({}, flags=fmt.FLAG_SHARD_INDEX, minor=2, checksum=False), "'shards' map"),  # no key
        (forge({}, minor=2, checksum=False, extra={"shards": {}}), "not the SHARD_INDEX flag"),
        (forge({}, flags=fmt.FLAG_SHARD_INDEX, minor=1, checksum=False, extra={"shards": {}}),
         "unknown header key"),
        (forge({}, flags=fmt.FLAG_SHARD_INDEX | fmt.FLAG_TENSOR_CRC, minor=2, extra={"shards": {}}),
         "no other flag"),
        (forge({"w": A}, flags=fmt.FLAG_SHARD_INDEX, minor=2, checksum=False,
               extra={"shards": {}}), "no tensors"),
    ]:
        (tmp_path / "bad.sckpt").write_bytes(data)
        with pytest.raises(safeckpt.HeaderError, match=words):
            safeckpt.open(tmp_path / "bad.sckpt")


def tampered(tmp_path, **changes):
    """An index whose shards map has ``changes``; returns the error of opening it."""
    path = saved(tmp_path)
    shards, tree = index_shards(path)
    shards = dict(shards)
    for key, value in changes.items():
        if value is KeyError:
            del shards[key]
        else:
            shards[key] = value
    write_index(path, shards, tree)
    return path


OK_FILES = ["m-00001-of-00003.sckpt", "m-00002-of-00003.sckpt", "m-00003-of-00003.sckpt"]


@pytest.mark.parametrize("changes, error, words", [
    ({"files": KeyError}, safeckpt.HeaderError, ["missing ['files']", "[S2]"]),
    ({"extra": 1}, safeckpt.HeaderError, ["unknown ['extra']", "[S2]"]),
    ({"counts": {"a": 1}}, safeckpt.HeaderError, ["shards['counts']", "an array", "[S2]"]),
    ({"save_id": "x" * 16}, safeckpt.HeaderError, ["'save_id'", "bin", "[S2]"]),
    ({"save_id": b"short"}, safeckpt.HeaderError, ["16 bytes", "[S2]"]),
    ({"sizes": [40, 40]}, safeckpt.HeaderError, ["one length", "[S2]"]),
    ({"files": [], "counts": [], "sizes": [], "header_crcs": []}, safeckpt.HeaderError, ["[S2]"]),
    ({"files": ["../m-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["'../", "[S3]"]),
    ({"files": ["/etc/m-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["[S3]"]),
    ({"files": ["a\\m-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["[S3]"]),
    ({"files": [".m-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["[S3]"]),
    ({"files": ["m\0-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["[S3]"]),
    ({"files": ["x" * 250 + "-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["[S3]"]),
    ({"files": ["-00001-of-00003.sckpt"] + OK_FILES[1:]}, safeckpt.HeaderError, ["[S3]"]),
    ({"files": [OK_FILES[1], OK_FILES[0], OK_FILES[2]]}, safeckpt.HeaderError, ["ending in", "[S3]"]),
    ({"files": [OK_FILES[0]] * 3}, safeckpt.HeaderError, ["[S3]"]),  # a name twice: misnumbered
    ({"files": OK_FILES[:2] + [7]}, safeckpt.HeaderError, ["7", "[S3]"]),
    ({"counts": [1, 1, 2]}, safeckpt.HeaderError, ["4 tensors", "[S4]"]),
    ({"counts": [2, 0, 1]}, safeckpt.HeaderError, ["at least 1", "[S4]"]),
    ({"counts": [1, True, 1]}, safeckpt.HeaderError, ["[S4]"]),
    ({"names": ["model.a", "model.a", "opt.0.c"]}, safeckpt.HeaderError, ["named twice", "[S4]"]),
    ({"names": ["model.a", "", "opt.0.c"]}, safeckpt.HeaderError, ["non-empty", "[S4]"]),
    ({"names": ["model.a", 5, "opt.0.c"]}, safeckpt.HeaderError, ["[S4]"]),
    ({"sizes": [31, 40, 40]}, safeckpt.HeaderError, ["size 31", "[S5]"]),
    ({"sizes": [2**63, 40, 40]}, safeckpt.HeaderError, ["[S5]"]),
    ({"header_crcs": [-1, 0, 0]}, safeckpt.HeaderError, ["header_crc -1", "[S5]"]),
    ({"header_crcs": [2**32, 0, 0]}, safeckpt.HeaderError, ["[S5]"]),
])
def test_S2_S5_hostile_index(tmp_path, changes, error, words):
    path = tampered(tmp_path, **changes)
    with pytest.raises(error) as info:
        safeckpt.open(path)
    for word in words:
        assert word in str(info.value)


def test_S4_names_over_max_tensors(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(safeckpt.LimitError, match="max_tensors=2"):
        safeckpt.open(path, max_tensors=2)


def test_S6_tree_checked_against_the_index_names(tmp_path):
    path = saved(tmp_path)
    shards, _ = index_shards(path)
    write_index(path, shards, ["list", ["tensor", 0], ["tensor", 3]])
    with pytest.raises(safeckpt.HeaderError, match=r"tensor index 3 is not in 0..2 \[R3\]"):
        safeckpt.open(path)
    write_index(path, shards, ["list", ["tensor", 0], ["tensor", 1]])
    with pytest.raises(safeckpt.HeaderError, match=r"'opt.0.c' is not in the tree \[R3\]"):
        safeckpt.open(path)
    write_index(path, shards)  # no tree: a dict of the tensors by name
    assert same(safeckpt.load(path), {"model.a": A, "model.b": B, "opt.0.c": C})


# -- shards that do not match their index [S7] ----------------------------------------------------

@pytest.mark.parametrize("mmap", [True, False])
def test_S7_missing_shard_is_an_os_error(tmp_path, mmap):
    """[S7]: a missing shard, or a directory in its place, is the OS's error (type, errno and the
    shard as its file name kept) whose message names the index too."""
    path = saved(tmp_path)
    os.unlink(tmp_path / OK_FILES[1])
    words = rf"index {re.escape(repr(str(path)))} names \[S7\]\): '.*{OK_FILES[1]}'"
    with pytest.raises(FileNotFoundError, match=words) as info:
        safeckpt.open(path, mmap=mmap)
    assert info.value.filename == str(tmp_path / OK_FILES[1])
    (tmp_path / OK_FILES[1]).mkdir()
    with pytest.raises(IsADirectoryError, match=words) as info:
        safeckpt.open(tmp_path, mmap=mmap)
    assert info.value.filename == str(tmp_path / OK_FILES[1])


@pytest.mark.parametrize("name, plain", [
    ("m-00001-of-00002.sckpt", True), ("model.safetensors", True), ("é" * 127, True),
    ("", False), (".hidden", False), ("../x", False), ("a/b", False), ("C:\\x", False),
    ("a\0b", False), ("é" * 128, False), ("x" * 256, False), (3, False), (None, False),
])
def test_S3_plain_file_name(name, plain):
    """[S3] (and [HF2], which uses it): a plain file name in the index's own directory."""
    assert shard.plain_file_name(name) is plain


def test_S7_shard_of_another_save(tmp_path):
    path = saved(tmp_path)
    keep = (tmp_path / OK_FILES[0]).read_bytes()
    saved(tmp_path)  # the same tensors again: only the save_id differs
    (tmp_path / OK_FILES[0]).write_bytes(keep)
    with pytest.raises(safeckpt.ShardError, match=r"header_crc .* \[S7\]"):
        safeckpt.open(path)


def test_S7_shard_checks(tmp_path):
    path = saved(tmp_path)
    shards, tree = index_shards(path)
    shard1 = tmp_path / OK_FILES[0]
    write_index(path, dict(shards, sizes=[shards["sizes"][0] + 4] + shards["sizes"][1:]), tree)
    with pytest.raises(safeckpt.ShardError, match="bytes, the index says"):
        safeckpt.open(path)
    write_index(path, dict(shards, names=["model.b", "model.a", "opt.0.c"]))
    with pytest.raises(safeckpt.ShardError, match="other tensors"):
        safeckpt.open(path)
    with open(shard1, "r+b") as f:  # a damaged shard: its own rules first
        f.seek(40)
        f.write(b"\xff")
    with pytest.raises(safeckpt.ChecksumError, match="m-00001-of-00003"):
        safeckpt.open(path)
    write_index(shard1, shards, tree)  # an index where a shard should be
    with pytest.raises(safeckpt.ShardError, match="shard index"):
        safeckpt.open(path)
    path = saved(tmp_path)
    shards, tree = index_shards(path)
    safeckpt.save({"model.a": A, "x": [A]}, shard1)  # a file with a tree
    write_index(path, dict(shards, sizes=[os.path.getsize(shard1)] + shards["sizes"][1:]), tree)
    with pytest.raises(safeckpt.ShardError, match="has a tree"):
        safeckpt.open(path)


def test_S9_crash_before_the_index(tmp_path, monkeypatch):
    """Shards first, index last: an interrupted save never yields a silently mixed checkpoint."""
    path = saved(tmp_path)
    first = safeckpt.load(path)
    real = writer.write_plan
    calls = []

    def crash_on_second(plan, target, *, atomic):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        return real(plan, target, atomic=atomic)

    monkeypatch.setattr(writer, "write_plan", crash_on_second)
    changed = dict(STATE, opt={0: {"c": C + 1, "step": 4}})
    with pytest.raises(KeyboardInterrupt):
        safeckpt.save(changed, path, max_shard_size=1000)  # same shard count: shard 1 replaced?
    with pytest.raises(safeckpt.ShardError, match="S7"):
        safeckpt.open(path)  # the old index with a new shard: refused, not mixed
    monkeypatch.setattr(writer, "write_plan", real)
    safeckpt.save(STATE, path, max_shard_size=1000)
    calls.clear()
    monkeypatch.setattr(writer, "write_plan", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        safeckpt.save(changed, path, max_shard_size=1200)  # 2 shards: other names...
    assert same(safeckpt.load(path), first)  # ... so the previous checkpoint still loads
    monkeypatch.setattr(writer, "write_plan", real)
    safeckpt.save(changed, path, max_shard_size=1000)
    assert same(safeckpt.load(path, verify=True), changed)
    assert not [e for e in os.listdir(tmp_path) if e.endswith(".tmp")]


# -- file descriptors (issue 10, R8) ---------------------------------------------------------------

_FDS = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    import safeckpt
    path, mmap, limit = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    peak = 0

    def count():
        global peak
        peak = max(peak, len(os.listdir("/proc/self/fd")))

    with safeckpt.open(path, mmap=mmap) as f:
        count()
        arrays = f.load_all()  # in parallel threads
        count()
        f.verify()
        names = f.keys()
        each = [float(f[name][0]) for name in reversed(names)]  # every shard again, one by one
        sliced = [float(f.get_slice(name)[1]) for name in names]
        count()
    whole = safeckpt.load(path, mmap=mmap, verify=True)
    count()
    ok = (all(float(arrays[n][0]) == i for i, n in enumerate(names)) and sliced == [i + 1.0 for i in range(len(names))]
          and each == sorted(each, reverse=True) and same(whole, arrays))
    print(json.dumps({"shards": len(names), "peak": peak, "held": len(os.listdir("/proc/self/fd")), "ok": ok}))
""").replace("same(whole, arrays)", "__import__('safeckpt.tree').tree.same(whole, arrays)")


@pytest.mark.parametrize("mmap", [True, False])
def test_R8_descriptors_bounded_with_more_shards_than_the_limit(tmp_path, backend, mmap):
    """A checkpoint of 150 shards opens, loads, verifies and reads tensor by tensor under a limit
    of 64 open files, with the arrays alive: a reader holds a bounded number of descriptors
    (mmap=False: an LRU of open shards; a mapping keeps no descriptor) [S1]."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts descriptors in /proc/self/fd")
    tensors = {f"t{i:03d}": np.full(4, i, np.float32) + np.arange(4) for i in range(150)}
    path = tmp_path / "m.sckpt"
    safeckpt.save_file(tensors, path, max_shard_size=16, atomic=False)
    env = dict(os.environ, SAFECKPT_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", _FDS, str(path), "1" if mmap else "0", "64"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["ok"] and result["shards"] == 150 and result["peak"] < 64, result


def test_R8_two_open_descriptors_and_eight_threads(tmp_path, backend, monkeypatch):
    """Shards closed for room while other threads read them: every read still succeeds."""
    monkeypatch.setattr(shard, "MAX_OPEN_SHARDS", 2)
    reopened, reopen = [], shard._ShardFile._reopen
    monkeypatch.setattr(shard._ShardFile, "_reopen", lambda self: reopened.append(1) or reopen(self))
    tensors = {f"t{i:02d}": np.full(1000, i, np.float32) for i in range(40)}
    path = tmp_path / "m.sckpt"
    safeckpt.save_file(tensors, path, max_shard_size=4000, atomic=False)
    with safeckpt.open(path, mmap=False) as f:
        assert len(f.shards) == 40
        for _ in range(5):
            assert same(f.load_all(), tensors)
            f.verify()
        assert same(safeckpt.load(path, mmap=False, verify=True), tensors)
    assert len(reopened) >= 40 * 10


def test_R8_a_shard_replaced_while_closed_is_refused(tmp_path, monkeypatch):
    """mmap=False with more shards than are kept open: a shard reopened later must be the file
    that was checked when the reader was made [S7]."""
    monkeypatch.setattr(shard, "MAX_OPEN_SHARDS", 2)
    path = saved(tmp_path)
    with safeckpt.open(path, mmap=False) as f:
        np.testing.assert_array_equal(f["opt.0.c"], C)  # shard 3 open, shard 1 closed
        (tmp_path / "other").mkdir()
        os.replace(saved(tmp_path / "other").parent / OK_FILES[0], tmp_path / OK_FILES[0])
        with pytest.raises(safeckpt.ShardError, match=r"m-00001-of-00003.*replaced.*\[S7\]"):
            f["model.a"]
        np.testing.assert_array_equal(f["model.b"], B)


# -- bytes paths (issue 10, item 12) ---------------------------------------------------------------

def test_bytes_path_is_a_path_not_contents(tmp_path, backend):
    """``load_file(b"m.sckpt")`` and ``open(b"...")`` read the file named by the bytes, as os.fspath
    takes them; load_bytes is the way to load contents. A bytearray or memoryview is refused."""
    single = tmp_path / "one.sckpt"
    safeckpt.save_file({"a": A}, single)
    (tmp_path / "sharded").mkdir()
    sharded = saved(tmp_path / "sharded")
    for target in (single, sharded, sharded.parent):
        raw = os.fsencode(target)
        with safeckpt.open(raw) as f:
            assert "model.a" in f or "a" in f
        assert same(safeckpt.load(raw), safeckpt.load(target))
        assert same(safeckpt.load_file(raw, mmap=False), safeckpt.load_file(target))
    safeckpt.save(STATE, os.fsencode(sharded), max_shard_size=1000)  # writing shards too
    assert same(safeckpt.load(sharded), STATE) and len(os.listdir(sharded.parent)) == 4
    assert same(safeckpt.load_bytes(single.read_bytes()), {"a": A})
    for contents in (bytearray(single.read_bytes()), memoryview(single.read_bytes())):
        with pytest.raises(TypeError, match="load_bytes"):
            safeckpt.load_file(contents)


def test_R8_a_later_save_on_a_reused_inode_is_refused(tmp_path, monkeypatch, backend):
    """A shard closed for room and re-saved since (atomic=False: unlink, then create, and the file
    system hands the freed inode to the new file at once) has the old device, inode and size;
    its header (another save id) tells it apart, so no read returns the later save's values [S7]."""
    monkeypatch.setattr(shard, "MAX_OPEN_SHARDS", 2)

    def tensors(base):
        return {f"t{i}": np.full(16, base + i, np.float32) for i in range(6)}

    path = tmp_path / "ck.sckpt"
    safeckpt.save_file(tensors(0.0), path, max_shard_size=64)
    with safeckpt.open(path, mmap=False) as f:
        for i in range(6):
            f[f"t{i}"]  # the first shards are closed for room
        safeckpt.save_file(tensors(1000.0), path, max_shard_size=64, atomic=False)
        for read in (lambda: f.get_slice("t0")[:2], lambda: f["t0"],
                     lambda: f.load_all(verify=False)):
            with pytest.raises(safeckpt.ShardError, match=r"replaced or changed.*\[S7\]"):
                read()
