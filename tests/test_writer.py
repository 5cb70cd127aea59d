"""The writing API: save_file/save_bytes checks, layout, atomicity, memory use."""

import os
import stat

import ml_dtypes
import numpy as np
import pytest

import safeckpt
from safeckpt import _backend

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


def test_save_to_missing_directory_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        safeckpt.save_file({"x": np.zeros(1)}, tmp_path / "no" / "such.sckpt")


def test_many_tensors_and_copies_are_batched(tmp_path, monkeypatch):
    from safeckpt import writer
    monkeypatch.setattr(writer, "_MAX_BATCH", 7)
    monkeypatch.setattr(writer, "_MAX_HELD_COPIES", 100)
    tensors = {f"t{i}": np.arange(i * 10, dtype=np.float32)[::2] for i in range(50)}
    loaded = roundtrip(tensors, tmp_path)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
