"""The writing API: save_file/save_bytes checks, layout, atomicity, memory use."""

import io
import os
import stat
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import safeckpt
from safeckpt import _backend
from safeckpt import format as fmt
from safeckpt import safetensors_format as sft
from safeckpt import safetensors_writer

pytestmark = pytest.mark.usefixtures("backend")


def roundtrip(tensors, tmp_path, **kwargs):
    p = tmp_path / "r.sckpt"
    safeckpt.save_file(tensors, p, **kwargs)
    return safeckpt.load_file(p, verify=kwargs.get("checksum", True))


def test_non_contiguous_arrays_are_written_in_c_order(tmp_path):
    base = np.arange(60, dtype=np.int32).reshape(3, 4, 5)
    tensors = {"t": base.transpose(2, 0, 1), "strided": base[:, ::2, 1::2], "f": np.asfortranarray(base)}
    for name, value in roundtrip(tensors, tmp_path).items():
        np.testing.assert_array_equal(value, tensors[name])
        assert value.flags.c_contiguous


def test_big_endian_arrays_are_written_little_endian(tmp_path):
    big = np.arange(5, dtype=">f8")
    data = safeckpt.save_bytes({"b": big})
    assert np.arange(5, dtype="<f8").tobytes() in data
    loaded = safeckpt.load_bytes(data)["b"]
    assert loaded.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(loaded, big)
    cbig = np.array([1 + 2j], dtype=">c16")
    np.testing.assert_array_equal(roundtrip({"c": cbig}, tmp_path)["c"], cbig)


def test_numpy_scalars_are_0d_tensors(tmp_path):
    loaded = roundtrip({"s": np.float32(1.5), "b": np.bool_(True)}, tmp_path)
    assert loaded["s"].shape == () and loaded["s"].dtype == np.float32 and loaded["s"] == 1.5
    assert loaded["b"].dtype == np.bool_ and loaded["b"]


@pytest.mark.parametrize("value,words", [
    (np.array(["a", "b"]), ["'bad'", "<U1"]),
    (np.array([object()], dtype=object), ["'bad'", "object"]),
    (np.zeros(2, dtype=[("x", "i4")]), ["'bad'", "cannot be stored"]),
    (np.zeros(2, dtype="datetime64[s]"), ["'bad'", "datetime64"]),
    (np.zeros(2, dtype=np.longdouble), ["'bad'"]),
])
def test_unstorable_dtypes_are_refused_by_name(tmp_path, value, words):
    with pytest.raises(safeckpt.UnsupportedDtypeError) as info:
        safeckpt.save_file({"ok": np.zeros(1), "bad": value}, tmp_path / "x.sckpt")
    for word in words:
        assert word in str(info.value)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("tensors,words", [
    ({1: np.zeros(1)}, ["key 1", "str"]),
    ({"": np.zeros(1)}, ["non-empty"]),
    ({"x": [1, 2]}, ["'x'", "list", "not a numpy array"]),
    ({"x": 3.0}, ["'x'", "float"]),
    ([("x", np.zeros(1))], ["dict"]),
])
def test_bad_keys_and_values_are_refused(tmp_path, tensors, words):
    with pytest.raises(safeckpt.InvalidValueError) as info:
        safeckpt.save_file(tensors, tmp_path / "x.sckpt")
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("metadata,words", [
    ({"a": {1, 2}}, ["metadata['a']", "set"]),
    ({"a": [1, np.float32(2)]}, ["metadata['a'][1]", "float32"]),
    ({1: "x"}, ["key 1"]),
    ({"big": 2**64}, ["metadata['big']", "2**64-1"]),
    ("not a dict", ["metadata must be a dict"]),
])
def test_bad_metadata_is_refused_with_its_path(tmp_path, metadata, words):
    with pytest.raises(safeckpt.InvalidValueError) as info:
        safeckpt.save_bytes({"x": np.zeros(1)}, metadata=metadata)
    for word in words:
        assert word in str(info.value)


def test_too_deep_metadata_is_refused():
    deep = "leaf"
    for _ in range(80):
        deep = [deep]
    with pytest.raises(safeckpt.LimitError, match="max_depth"):
        safeckpt.save_bytes({}, metadata={"d": deep})


@pytest.mark.parametrize("align", [0, 4, 12, 2**21, 64.0])
def test_bad_alignment_is_refused(align):
    with pytest.raises(ValueError, match="align"):
        safeckpt.save_bytes({"x": np.zeros(1)}, align=align)


@pytest.mark.parametrize("align", [8, 64, 4096, 2**20])
def test_every_offset_is_aligned(tmp_path, align):
    tensors = {f"t{i}": np.ones(i, np.uint8) for i in range(7)}
    p = tmp_path / "a.sckpt"
    safeckpt.save_file(tensors, p, align=align)
    with safeckpt.open(p) as f:
        assert f.align == align
        assert all(f.info(name).offset % align == 0 for name in f)


def test_save_file_equals_save_bytes(tmp_path):
    tensors = {"a": np.arange(100, dtype=np.float32), "b": np.zeros((3, 0)), "c": np.int8(-1),
               "bf": np.ones(3, ml_dtypes.bfloat16)}
    p = tmp_path / "same.sckpt"
    for checksum in (True, False):
        safeckpt.save_file(tensors, p, metadata={"m": 1}, checksum=checksum)
        assert p.read_bytes() == safeckpt.save_bytes(tensors, metadata={"m": 1}, checksum=checksum)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "keep.sckpt"
    safeckpt.save_file({"old": np.zeros(3)}, p)
    before = p.read_bytes()

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_backend.backend, "write_tensors", broken)
    with pytest.raises(OSError, match="No space"):
        safeckpt.save_file({"new": np.ones(3)}, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.sckpt"]  # the temporary file is gone


def test_atomic_save_replaces_and_uses_umask_permissions(tmp_path):
    p = tmp_path / "perm.sckpt"
    old = os.umask(0o022)
    try:
        safeckpt.save_file({"x": np.zeros(1)}, p)
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    safeckpt.save_file({"y": np.ones(2)}, p)
    assert list(safeckpt.load_file(p)) == ["y"]
    assert os.listdir(tmp_path) == ["perm.sckpt"]


def test_non_atomic_save_truncates_existing_file(tmp_path):
    p = tmp_path / "plain.sckpt"
    p.write_bytes(b"x" * 100_000)
    safeckpt.save_file({"x": np.zeros(1)}, p, atomic=False)
    assert list(safeckpt.load_file(p)) == ["x"]




def test_many_tensors_and_copies_are_batched(tmp_path, monkeypatch):
    from safeckpt import writer
    monkeypatch.setattr(writer, "_MAX_BATCH", 7)
    monkeypatch.setattr(writer, "_MAX_HELD_COPIES", 100)
    tensors = {f"t{i}": np.arange(i * 10, dtype=np.float32)[::2] for i in range(50)}
    loaded = roundtrip(tensors, tmp_path)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)


# -- where a save writes: a new file, named as asked (issue 10, items 2, 5, 12) --------------------

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path)}
WRITERS = {"sckpt": (safeckpt.save_file, "m.sckpt"), "safetensors": (safetensors_writer.save_file, "m.safetensors")}


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_saving_over_a_loaded_file_leaves_its_arrays_alone(tmp_path, kind, atomic):
    """[W3]: a save writes a new file; arrays mapped from the old one (and hard links) keep it."""
    save, name = WRITERS[kind]
    p = tmp_path / name
    a, b = np.arange(1000, dtype=np.float32), np.arange(1000, dtype=np.float32) + 5000
    save({"a": a, "b": b}, p)
    os.link(p, tmp_path / "link")
    old = p.read_bytes()
    d = safeckpt.load_file(p)
    save({"b": d["b"] * 2, "a": d["a"]}, p, atomic=atomic)
    np.testing.assert_array_equal(d["a"], a)
    np.testing.assert_array_equal(d["b"], b)
    assert (tmp_path / "link").read_bytes() == old
    again = safeckpt.load_file(p, verify=kind == "sckpt")
    assert list(again) == ["b", "a"]
    np.testing.assert_array_equal(again["b"], b * 2)
    np.testing.assert_array_equal(again["a"], a)


SHRINK = """
import sys, numpy as np, safeckpt
from safeckpt import safetensors_format as sft
from safeckpt import safetensors_writer
save = {"sckpt": safeckpt.save_file, "safetensors": safetensors_writer.save_file}[sys.argv[1]]
path, atomic = sys.argv[2], sys.argv[3] == "1"
save({"a": np.arange(10, dtype=np.float32), "b": np.ones(1 << 20, np.float32)}, path)
d = safeckpt.load_file(path)
save({"a": d["a"]}, path, atomic=atomic)
print(float(d["b"].sum()), list(safeckpt.load_file(path)))
"""


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_saving_a_smaller_file_over_a_loaded_one_does_not_kill_the_process(tmp_path, backend, kind,
                                                                            atomic):
    """[W3]: an in-place save would cut the mapped file, and reading it then raises SIGBUS."""
    p = tmp_path / WRITERS[kind][1]
    out = subprocess.run([sys.executable, "-c", SHRINK, kind, str(p), "01"[atomic]],
                         capture_output=True, text=True, env={**ENV, "SAFECKPT_BACKEND": backend})
    assert out.returncode == 0, f"exit status {out.returncode} (-7: SIGBUS): {out.stderr[-3000:]}"
    assert out.stdout.split() == ["1048576.0", "['a']"]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_failed_non_atomic_save_leaves_no_partial_file(tmp_path, kind):
    save, name = WRITERS[kind]

    def fail():
        raise OSError(28, "No space left on device")

    lazy = safeckpt.writer.LazyArray(np.float32, (4,), fail)
    with pytest.raises(OSError, match="No space"):
        save({"a": np.ones(1000, np.float32), "lazy": lazy}, tmp_path / name, atomic=False)
    assert not os.listdir(tmp_path)


def test_a_safetensors_name_gets_a_safetensors_file(tmp_path):
    """As convert does, the name chooses the format, for every save entry point."""
    from safetensors.numpy import load_file as load_safetensors
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    safeckpt.save_file({"w": w, "s": np.int64(3)}, tmp_path / "flat.safetensors",
                       metadata={"epoch": 3})
    back = load_safetensors(tmp_path / "flat.safetensors")
    np.testing.assert_array_equal(back["w"], w)
    with safeckpt.open(tmp_path / "flat.safetensors") as f:
        assert f.format == "safetensors" and f.metadata == {"epoch": 3}
    safeckpt.save({"model": {"w": w}, "step": 7}, tmp_path / "nested.SafeTensors")
    assert list(load_safetensors(tmp_path / "nested.SafeTensors")) == ["model.w"]
    loaded = safeckpt.load(tmp_path / "nested.SafeTensors")
    assert loaded["step"] == 7
    np.testing.assert_array_equal(loaded["model"]["w"], w)


SAVES = {
    "save_file": safeckpt.save_file,
    "save": safeckpt.save,
    "sharded": lambda tensors, path: safeckpt.save(tensors, path, max_shard_size=8),
    "save_checkpoint": lambda tensors, path: safeckpt.save_checkpoint(path, extra=tensors, rng=False),
    "safetensors": safetensors_writer.save_file,
}


@pytest.mark.parametrize("name", ["m.pt", "m.PTH", "pytorch_model.bin", "m.ckpt", "m.npz", "m.npy",
                                  "model.safetensors.index.json"])
@pytest.mark.parametrize("save", sorted(SAVES))
def test_names_of_formats_safeckpt_does_not_write_are_refused(tmp_path, save, name):
    with pytest.raises(safeckpt.InvalidValueError, match="name it") as info:
        SAVES[save]({"a": np.zeros(2), "b": np.ones(2)}, tmp_path / name)
    assert repr(str(tmp_path / name)) in str(info.value)
    assert not os.listdir(tmp_path)


def test_a_format_a_save_cannot_write_under_that_name_is_refused(tmp_path):
    # .sckpt shards never go under a .safetensors name (save_file writes Hugging Face shards there:
    # tests/test_safetensors_shards.py)
    with pytest.raises(safeckpt.InvalidValueError, match="shard"):
        safeckpt.shard.save_sharded(fmt.NO_TREE, ["a", "b"], [np.zeros(2), np.ones(2)],
                                    tmp_path / "m.safetensors", metadata=None, align=64,
                                    checksum=True, atomic=True, max_shard_size=8)
    with pytest.raises(safeckpt.InvalidValueError, match="name it"):
        safetensors_writer.save_file({"a": np.zeros(2)}, tmp_path / "m.sckpt")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("atomic", [True, False])
@pytest.mark.parametrize("save", sorted(SAVES))
def test_saving_into_a_missing_directory_names_the_directory(tmp_path, save, atomic):
    path = tmp_path / "nodir" / ("m.safetensors" if save == "safetensors" else "m.sckpt")
    function = SAVES[save]
    if save in ("save_file", "save", "safetensors"):
        function = lambda tensors, path: SAVES[save](tensors, path, atomic=atomic)  # noqa: E731
    with pytest.raises(FileNotFoundError) as info:
        function({"a": np.zeros(2), "b": np.ones(2)}, path)
    message = str(info.value)
    assert "does not exist" in message and repr(str(tmp_path / "nodir")) in message, message
    assert ".tmp" not in message
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("atomic", [True, False])
def test_a_bytes_path_is_a_path(tmp_path, monkeypatch, atomic):
    monkeypatch.chdir(tmp_path)
    tensors = {"a": np.zeros(2), "b": np.ones(2)}
    safeckpt.save_file(tensors, b"m.sckpt", atomic=atomic)
    safeckpt.save_file(tensors, os.fsencode(tmp_path / "m.safetensors"), atomic=atomic)
    safeckpt.save(tensors, b"s.sckpt", max_shard_size=16, atomic=atomic)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "m.sckpt", "s-00001-of-00002.sckpt",
                                            "s-00002-of-00002.sckpt", "s.sckpt"]
    for name in ("m.sckpt", "m.safetensors", "s.sckpt"):
        assert safeckpt.load(name)["b"].tolist() == [1, 1]


def test_a_path_that_is_no_path_is_refused(tmp_path):
    with pytest.raises(TypeError, match="save_bytes"):
        safeckpt.save_file({"a": np.zeros(2)}, io.BytesIO())


@pytest.mark.parametrize("atomic", [True, False])
def test_a_directory_or_a_fifo_is_never_replaced(tmp_path, atomic):
    (tmp_path / "d.sckpt").mkdir()
    os.mkfifo(tmp_path / "f.sckpt")
    for path, error in ((tmp_path / "d.sckpt", IsADirectoryError), (f"{tmp_path}/new/", IsADirectoryError),
                        (tmp_path / "f.sckpt", FileExistsError)):
        with pytest.raises(error) as info:
            safeckpt.save_file({"a": np.zeros(2)}, path, atomic=atomic)
        assert ".tmp" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["d.sckpt", "f.sckpt"]
    assert stat.S_ISFIFO(os.lstat(tmp_path / "f.sckpt").st_mode)


# -- a file the default reader refuses is not written in silence (issue 10, item 13) ---------------

@pytest.mark.parametrize("name", ["big.sckpt", "big.safetensors"])
def test_a_header_over_the_default_limit_warns_how_to_load_it(tmp_path, name):
    p = tmp_path / name
    with pytest.warns(UserWarning, match=r"max_header_size=\d+") as warned:
        safeckpt.save_file({"w": np.zeros(1)}, p, metadata={"blob": "x" * fmt.MAX_HEADER_SIZE})
    assert warned[0].filename == __file__  # points at the caller's line
    message = str(warned[0].message)
    needed = int(message.split("max_header_size=")[-1].split()[0])
    assert str(fmt.MAX_HEADER_SIZE) in message and needed > fmt.MAX_HEADER_SIZE
    with pytest.raises(safeckpt.LimitError):
        safeckpt.open(p)
    with safeckpt.open(p, max_header_size=needed) as f:
        assert len(f.metadata["blob"]) == fmt.MAX_HEADER_SIZE


@pytest.mark.parametrize("name", ["n.sckpt", "n.safetensors"])
def test_more_tensors_than_the_default_limit_warns_how_to_load_them(tmp_path, monkeypatch, name):
    # 10 million tensors would make a slow test: the writer and a reader given the same limit agree
    monkeypatch.setattr(fmt, "MAX_TENSORS", 3)
    p = tmp_path / name
    safeckpt.save_file({f"t{i}": np.zeros(1) for i in range(3)}, p)
    safeckpt.open(p, max_tensors=3).close()
    with pytest.warns(UserWarning, match="max_tensors=4"):
        safeckpt.save_file({f"t{i}": np.zeros(1) for i in range(4)}, p)
    with pytest.raises(safeckpt.LimitError):
        safeckpt.open(p, max_tensors=3)


def test_dimensions_the_default_reader_refuses_are_refused(tmp_path):
    for save, name in WRITERS.values():
        with pytest.raises(safeckpt.LimitError, match=r"'deep'.*33"):
            save({"deep": np.zeros((1,) * 33)}, tmp_path / name)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["u.sckpt", "u.safetensors"])
@pytest.mark.parametrize("tensors,metadata,words", [
    ({"bad\ud800": np.zeros(1)}, None, ["tensor name", "bad"]),
    ({"a": np.zeros(1)}, {"k": "v\udc80"}, ["'v\\udc80'"]),
    ({"a": np.zeros(1)}, {"k": [1, "v\udc80"]}, ["'v\\udc80'"]),
    ({"a": np.zeros(1)}, {"\udc80key": 1}, ["key"]),
])
def test_strings_that_are_not_unicode_are_refused_by_name(tmp_path, name, tensors, metadata, words):
    with pytest.raises(safeckpt.InvalidValueError, match="not valid Unicode") as info:
        safeckpt.save_file(tensors, tmp_path / name, metadata=metadata)
    for word in words:
        assert word in str(info.value)
    assert not os.listdir(tmp_path)



# -- byte order: a big-endian host (FORMAT.md section 4: tensor bytes are little-endian) ----------

@pytest.mark.parametrize("save", ["file", "bytes", "safetensors"])
def test_native_arrays_on_a_big_endian_host_are_stored_little_endian(tmp_path, monkeypatch, save):
    """dtypes.BIG_ENDIAN_HOST takes the path a big-endian host takes: a native ('=') array is
    big-endian there, so every writer swaps its bytes ('>' arrays too; one-byte ones never). On
    this little-endian machine the native array's bytes are really little-endian, so the file
    holds them byte-reversed: that the swap happened is what is checked."""
    from safeckpt import dtypes
    tensors = {"native": np.array([1, 2], np.uint16), "big": np.array([5, 6], ">u2"),
               "bytes": np.array([7, 8], np.uint8)}
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", True)
    if save == "bytes":
        data = safeckpt.save_bytes(tensors)
    else:
        path = tmp_path / ("m.safetensors" if save == "safetensors" else "m.sckpt")
        safeckpt.save_file(tensors, path)
        data = path.read_bytes()
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", False)
    with safeckpt.Reader(data) as f:
        raw = {name: f[name].view(np.uint8).tobytes() for name in f.keys()}
    assert raw == {"native": bytes([0, 1, 0, 2]), "big": bytes([5, 0, 6, 0]), "bytes": bytes([7, 8])}
