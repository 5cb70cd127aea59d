"""Conversions (safeckpt/interop.py): safetensors, sharded safetensors, npz/npy, torch; both backends."""

import argparse
import collections
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import safeckpt
from safeckpt import _fs, interop
from safeckpt import safetensors_writer

pytestmark = pytest.mark.usefixtures("backend")


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_a_real_safetensors_model_converts_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 50))
    model[2].weight = model[0].weight  # tied, as in language models: safetensors drops the copy
    model = model.to(torch.bfloat16)
    src, dst, back = tmp_path / "model.safetensors", tmp_path / "model.sckpt", tmp_path / "b.safetensors"
    st_torch.save_model(model, str(src), metadata={"format": "pt"})
    expected = st_torch.load_file(str(src))
    assert safeckpt.convert(src, dst).tensors == len(expected)
    loaded = safeckpt.load_file(dst, verify=True)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        got = safeckpt.torch.from_numpy(loaded[name])
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(torch.int16), tensor.view(torch.int16)), name
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()  # save_model records the dropped tied name: {'2.weight': '0.weight'}
    with safeckpt.open(dst) as f:
        assert f.metadata == metadata and metadata["format"] == "pt" and f.has_checksums
    safeckpt.convert(dst, back)  # and back: the safetensors package reads it, same bits
    again = st_torch.load_file(str(back))
    assert all(torch.equal(again[k].view(torch.int16), v.view(torch.int16)) for k, v in expected.items())


def write_sharded(tmp_path, tensors, per_shard=2, metadata=None):
    names = list(tensors)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for j, group in enumerate(groups, 1):
        file = f"model-{j:05d}-of-{len(groups):05d}.safetensors"
        safetensors_writer.save_file({n: tensors[n] for n in group}, tmp_path / file, metadata={"format": "np"})
        weight_map.update({n: file for n in group})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": metadata or {"total_size": 1}, "weight_map":
                                 dict(sorted(weight_map.items()))}))
    return index


TENSORS = {f"layers.{i}.weight": np.full((3, i + 1), i, np.float32) for i in range(5)}


def test_a_sharded_safetensors_model_converts_as_a_whole(tmp_path):
    index = write_sharded(tmp_path, TENSORS)
    safeckpt.convert(index, tmp_path / "all.sckpt")
    with safeckpt.open(tmp_path / "all.sckpt") as f:
        assert f.keys() == list(TENSORS)  # shard order, not the index's sorted order
        assert all(same_bits(f[k], v) for k, v in TENSORS.items())
        assert f.metadata == {"total_size": 1, "format": "np"}


def test_a_sharded_index_is_checked(tmp_path):
    index = write_sharded(tmp_path, TENSORS)
    data = json.loads(index.read_text())
    data["weight_map"]["layers.0.weight"] = "../model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(safeckpt.HeaderError, match="plain file name"):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    data["weight_map"]["layers.0.weight"] = "model-00002-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(safeckpt.LayoutError, match="layers.0.weight"):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    index.write_text('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    with pytest.raises(safeckpt.HeaderError, match="duplicate"):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    index.write_text('{"weight_map": {"a": "missing.safetensors"}}')
    with pytest.raises(FileNotFoundError):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    assert not (tmp_path / "x.sckpt").exists()


def test_sources_and_indexes_open_only_regular_files(tmp_path, monkeypatch):
    """An .npy/.npz/torch source and a Hugging Face index open through one helper,
    ``_fs.open_regular``: a FIFO is refused at once (never waited on), a directory is
    IsADirectoryError, and the file's size comes with it."""
    fifo = tmp_path / "a.npy"
    os.mkfifo(fifo)
    with pytest.raises(safeckpt.HeaderError, match=r"a\.npy'.*not a regular file.*convert reads"):
        safeckpt.convert(fifo, tmp_path / "out.sckpt")
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(IsADirectoryError):
        safeckpt.convert(tmp_path / "d.pt", tmp_path / "out.sckpt")
    with pytest.raises(safeckpt.HeaderError, match=r"a\.npy'.*not a regular file.* \[Q\]"):
        _fs.open_regular(str(fifo), repr(str(fifo)), " [Q]")
    np.save(tmp_path / "b.npy", np.arange(3))
    file, size = _fs.open_regular(str(tmp_path / "b.npy"), "b", "")
    with file:
        assert size == os.path.getsize(tmp_path / "b.npy") and file.read(6) == b"\x93NUMPY"
    opened = []

    def spy(path, *args):
        opened.append(os.path.basename(path))
        return real(path, *args)

    real = _fs.open_regular
    monkeypatch.setattr(_fs, "open_regular", spy)
    safeckpt.convert(tmp_path / "b.npy", tmp_path / "b.sckpt")
    safeckpt.convert(write_sharded(tmp_path, TENSORS), tmp_path / "c.sckpt")
    assert opened == ["b.npy", "model.safetensors.index.json"]


def test_npz_and_npy_convert_without_pickle(tmp_path):
    arrays = {"a": np.arange(6, dtype=">i4").reshape(2, 3), "b": np.asfortranarray(np.eye(3)),
              "c": np.array(True)}
    np.savez(tmp_path / "x.npz", **arrays)
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    for src in ("x.npz", "z.npz"):
        safeckpt.convert(tmp_path / src, tmp_path / "x.sckpt")
        loaded = safeckpt.load_file(tmp_path / "x.sckpt")
        assert loaded.keys() == arrays.keys()
        assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype.newbyteorder("<")
                   for k, v in arrays.items())
    np.save(tmp_path / "one.npy", arrays["a"])
    safeckpt.convert(tmp_path / "one.npy", tmp_path / "one.safetensors")
    assert np.array_equal(safeckpt.load(tmp_path / "one.safetensors"), arrays["a"])
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", ok=np.zeros(2), bad=np.array([None, 1], dtype=object))
    for src in ("obj.npy", "obj.npz"):
        with pytest.raises(safeckpt.PickleRequiredError, match="allow_pickle=False"):
            safeckpt.convert(tmp_path / src, tmp_path / "o.sckpt")
    assert not (tmp_path / "o.sckpt").exists()


def test_torch_files_load_with_weights_only_and_never_fall_back(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"model": collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3),
                                              h=torch.ones(2, dtype=torch.bfloat16)),
             "epoch": 4, "betas": (0.9, 0.999)}
    torch.save(state, tmp_path / "ckpt.pt")
    torch.save(state["model"], tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    safeckpt.convert(tmp_path / "ckpt.pt", tmp_path / "ckpt.sckpt")
    back = safeckpt.torch.load(tmp_path / "ckpt.sckpt")
    assert safeckpt.tree.same(back, state)
    safeckpt.convert(tmp_path / "legacy.bin", tmp_path / "legacy.sckpt")
    assert safeckpt.tree.same(safeckpt.torch.load(tmp_path / "legacy.sckpt"), state["model"])

    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pt")
    with pytest.raises(safeckpt.PickleRequiredError, match="argparse.Namespace.*never falls back"):
        safeckpt.convert(tmp_path / "evil.pt", tmp_path / "evil.sckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(safeckpt.HeaderError, match="not a torch file"):
        safeckpt.convert(tmp_path / "junk.pt", tmp_path / "junk.sckpt")
    assert not (tmp_path / "evil.sckpt").exists() and not (tmp_path / "junk.sckpt").exists()


def test_convert_reports_progress_and_refuses_unknown_outputs(tmp_path):
    safeckpt.save_file({"a": np.zeros(100), "b": np.ones(50, np.float32)}, tmp_path / "s.sckpt")
    seen = []
    safeckpt.convert(tmp_path / "s.sckpt", tmp_path / "t.safetensors",
                     progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 1000) and seen[-1] == (1000, 1000)
    with pytest.raises(ValueError, match=r"\*\.sckpt or \*\.safetensors"):
        safeckpt.convert(tmp_path / "s.sckpt", tmp_path / "t.txt")
    safeckpt.save_file({"z": np.zeros(2, np.complex128)}, tmp_path / "c.sckpt")
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'z'"):
        safeckpt.convert(tmp_path / "c.sckpt", tmp_path / "c.safetensors")


# -- hostile sources: every failure a SafeckptError, every cost bounded by the file's size ----------

def npy_bytes(array):
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, allow_pickle=False)
    return stream.getvalue()


def npy_made(header, data=b""):
    """An .npy file (version 1.0) with this header text, padded as numpy pads it."""
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def write_zip(path, members, method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def patch_directory(path, **fields):
    """Change fields of every central directory entry: ``compress_size``, ``file_size``, ``flags``."""
    data = bytearray(path.read_bytes())
    offsets = {"flags": (8, "<H"), "compress_size": (20, "<I"), "file_size": (24, "<I")}
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        for field, value in fields.items():
            offset, code = offsets[field]
            struct.pack_into(code, data, at + offset, value)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    return path


def test_npz_decompression_is_bounded_by_the_real_output(tmp_path):
    """The red team's .npz bombs [R4]: nothing is allocated by a claim of the zip directory or of a
    .npy header beyond max_expansion x the file's size, no compression numpy does not write is
    inflated, and each failure is a SafeckptError naming the member and what to pass."""
    zeros = npy_bytes(np.zeros(1 << 20, np.float32))  # 4 MiB of zeros: deflate makes it ~4 KiB
    bomb = write_zip(tmp_path / "bomb.npz", {"z.npy": zeros}, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size * 16 < len(zeros)
    with pytest.raises(safeckpt.LimitError, match=r"max_expansion=16\b.*pass max_expansion="):
        safeckpt.convert(bomb, tmp_path / "x.sckpt")
    safeckpt.convert(bomb, tmp_path / "x.sckpt", max_expansion=2000)  # when the user trusts it
    assert np.array_equal(safeckpt.load(tmp_path / "x.sckpt")["z"], np.zeros(1 << 20, np.float32))

    bz = write_zip(tmp_path / "bz.npz", {"z.npy": zeros}, zipfile.ZIP_BZIP2)
    with pytest.raises(safeckpt.HeaderError, match=r"'z.npy'.*bzip2"):
        safeckpt.convert(bz, tmp_path / "x.sckpt", max_expansion=10**9)

    small = npy_bytes(np.arange(10, dtype=np.int32))
    claims = patch_directory(write_zip(tmp_path / "claims.npz", {"a.npy": small}),
                             compress_size=3_500_000_000, file_size=3_500_000_000)
    with pytest.raises(safeckpt.LayoutError, match=r"'a.npy'.*3500000000"):
        safeckpt.convert(claims, tmp_path / "x.sckpt")
    huge = npy_made("{'descr': '<i4', 'fortran_order': False, 'shape': (875000000,), }", bytes(40))
    both = patch_directory(write_zip(tmp_path / "both.npz", {"a.npy": huge}),
                           compress_size=len(huge) - 40 + 3_500_000_000,
                           file_size=len(huge) - 40 + 3_500_000_000)
    with pytest.raises(safeckpt.LimitError, match=r"'a.npy'.*max_expansion=1000\b"):
        safeckpt.convert(both, tmp_path / "x.sckpt", max_expansion=1000)


def corrupt_npz_cases(tmp_path):
    """name -> (.npz bytes, the error it must raise, words of the message)."""
    good = npy_bytes(np.arange(1000, dtype=np.int32))
    path = write_zip(tmp_path / "good.npz", {"a.npy": good}, zipfile.ZIP_DEFLATED)
    data = path.read_bytes()
    cases = {}
    member = data.find(b"PK\x01\x02")
    cases["truncated data"] = (data[:60] + data[member - 200:], safeckpt.SafeckptError, "zip")
    flipped = bytearray(data)
    flipped[60] ^= 0x55  # inside the deflate stream
    cases["flipped compressed byte"] = (bytes(flipped), safeckpt.SafeckptError, "'a.npy'")
    stored = write_zip(tmp_path / "s.npz", {"a.npy": good}).read_bytes()
    crc = bytearray(stored)
    crc[200] ^= 1  # array data: only the zip's CRC-32 can tell
    cases["bad CRC"] = (bytes(crc), safeckpt.HeaderError, "CRC")
    (tmp_path / "e.npz").write_bytes(stored)
    cases["encrypted"] = (patch_directory(tmp_path / "e.npz", flags=1).read_bytes(),
                          safeckpt.HeaderError, "encrypted")
    cases["lzma"] = (write_zip(tmp_path / "l.npz", {"a.npy": good}, zipfile.ZIP_LZMA).read_bytes(),
                     safeckpt.HeaderError, "lzma")
    cases["short member"] = (write_zip(tmp_path / "t.npz", {"a.npy": good[:-4]}).read_bytes(),
                             safeckpt.LayoutError, "'a.npy'")
    cases["trailing bytes"] = (write_zip(tmp_path / "t.npz", {"a.npy": good + b"xx"}).read_bytes(),
                               safeckpt.LayoutError, "'a.npy'")
    cases["not an npy"] = (write_zip(tmp_path / "n.npz", {"a.txt": b"hello"}).read_bytes(),
                           safeckpt.HeaderError, "'a.txt'")
    cases["bad npy magic"] = (write_zip(tmp_path / "m.npz", {"a.npy": b"x" + good[1:]}).read_bytes(),
                              safeckpt.HeaderError, "'a.npy'")
    long_header = good[:8] + b"\xff\xff" + good[10:]
    cases["npy header past the member"] = (write_zip(tmp_path / "h.npz", {"a.npy": long_header})
                                           .read_bytes(), safeckpt.SafeckptError, "'a.npy'")
    v2 = b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 31) + b"{" * 100
    cases["npy 2.0 header of 2 GiB"] = (write_zip(tmp_path / "v.npz", {"a.npy": v2}).read_bytes(),
                                        safeckpt.LimitError, "'a.npy'")
    nested = npy_made("{'descr': " + "[" * 60 + "]" * 60 + ", 'fortran_order': False, 'shape': (), }")
    cases["npy header nonsense"] = (write_zip(tmp_path / "p.npz", {"a.npy": nested}).read_bytes(),
                                    safeckpt.HeaderError, "'a.npy'")
    zero_dim = npy_made("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4611686018427387904), }")
    cases["zero dimension beside a huge one"] = (
        write_zip(tmp_path / "z.npz", {"a.npy": zero_dim}).read_bytes(), safeckpt.LayoutError, "[T4]")
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as archive:
        archive.writestr("a.npy", good)
        with pytest.warns(UserWarning, match="Duplicate"):
            archive.writestr("a.npy", good)
    cases["duplicate member"] = ((tmp_path / "d.npz").read_bytes(), safeckpt.HeaderError, "twice")
    cases["not a zip"] = (b"PK\x03\x04" + b"\0" * 100, safeckpt.HeaderError, "corrupt zip")
    cases["empty file"] = (b"", safeckpt.HeaderError, "not an .npz")
    return cases


def test_every_corrupt_npz_is_a_safeckpt_error(tmp_path):
    """Each way an .npz can be broken [R4, 6]: a SafeckptError naming the member, never zipfile's,
    zlib's or numpy's own exceptions (BadZipFile, EOFError, NotImplementedError, RuntimeError...)."""
    for name, (data, error, words) in corrupt_npz_cases(tmp_path).items():
        src = tmp_path / "case.npz"
        src.write_bytes(data)
        with pytest.raises(error, match=re.escape(words)) as caught:
            safeckpt.convert(src, tmp_path / "x.sckpt")
        assert "case.npz" in str(caught.value), name
    assert not (tmp_path / "x.sckpt").exists()


def test_npy_sources_are_checked_like_npz_members(tmp_path):
    array = np.arange(12, dtype=">f8").reshape(3, 4, order="F")
    src = tmp_path / "a.npy"
    src.write_bytes(npy_bytes(np.asfortranarray(array)))
    safeckpt.convert(src, tmp_path / "a.sckpt")
    assert np.array_equal(safeckpt.load(tmp_path / "a.sckpt"), array)
    good = src.read_bytes()
    for data, error in ((good[:-1], safeckpt.TruncatedFileError), (good + b"\0", safeckpt.LayoutError),
                        (good[:20], safeckpt.TruncatedFileError), (b"", safeckpt.TruncatedFileError),
                        (npy_made("{'descr': '<f8', 'fortran_order': False, 'shape': (-3, 4), }"),
                         safeckpt.LayoutError)):
        src.write_bytes(data)
        with pytest.raises(error, match="a.npy"):
            safeckpt.convert(src, tmp_path / "b.sckpt")


class Payload:
    """What a pickle payload does: call a function of the OS when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo PWNED",))


def test_a_pickle_payload_in_a_torch_file_is_named_as_such(tmp_path):
    """[R9] torch's weights-only loader refuses the payload; safeckpt says so (PickleRequiredError)
    with torch's reason whole, and that nothing ran."""
    torch = pytest.importorskip("torch")
    for protocol in (2, 4):  # 4: STACK_GLOBAL, an instruction torch's loader does not run
        torch.save({"w": torch.ones(2), "p": Payload()}, tmp_path / "evil.pt",
                   pickle_protocol=protocol)
        with pytest.raises(safeckpt.PickleRequiredError) as caught:
            safeckpt.convert(tmp_path / "evil.pt", tmp_path / "evil.sckpt")
        message = str(caught.value)
        assert "nothing from the file ran" in message and "never" in message, message
        if protocol == 2:
            assert ("Trying to load unsupported GLOBAL posix.system whose module posix is "
                    "blocked." in message), message
        else:
            assert "Unsupported operand" in message, message
        assert "Please file an issue" not in message and "\x1b" not in message, message
    assert not (tmp_path / "evil.sckpt").exists()


def test_torch_failures_are_classified(tmp_path):
    """[R9] a file torch cannot read says which: not a torch file, a corrupt zip, a compressed member
    (torch would map the compressed bytes as tensor data), a truncated pickle."""
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "good.pt") as plain, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for info in plain.infolist():
            out.writestr(info.filename, plain.read(info))
    torch.save({"w": torch.arange(4.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    cases = [("junk.pt", b"not a torch file at all", safeckpt.HeaderError, "not a torch file"),
             ("empty.pt", b"", safeckpt.HeaderError, "not a torch file"),
             ("cut.pt", good[:len(good) // 2], safeckpt.HeaderError, "zip"),
             ("deflated.pt", None, safeckpt.HeaderError, "compressed"),
             ("legacy-cut.pt", legacy[:len(legacy) // 3], safeckpt.SafeckptError, "legacy-cut.pt"),
             ("legacy-magic.pt", legacy[:5] + bytes([legacy[5] ^ 1]) + legacy[6:],
              safeckpt.HeaderError, "torch cannot read")]
    for name, data, error, words in cases:
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(error, match=re.escape(words)) as caught:
            safeckpt.convert(tmp_path / name, tmp_path / "x.sckpt")
        assert name in str(caught.value)
    assert not (tmp_path / "x.sckpt").exists()


def test_shared_objects_in_a_torch_file_are_bounded(tmp_path):
    """[R3] pickle stores a repeated object once; a tree stores every appearance. A DAG of 60 levels
    (2**60 paths in a 2 KB file), a list that holds itself, a long string repeated, a tensor that
    repeats one element: refused at once. Sharing as torch's own optimizers make it (every param
    group holds the same ``betas`` tuple) converts."""
    torch = pytest.importorskip("torch")
    dag = {"x": torch.ones(1)}
    for _ in range(60):
        dag = {"a": dag, "b": dag}
    cycle = []
    cycle.append(cycle)
    text = "x" * 10_000
    for name, obj, words in (("dag.pt", dag, "shared"), ("cycle.pt", cycle, "holds itself"),
                             ("strings.pt", [text] * 10_000, "shared")):
        torch.save(obj, tmp_path / name)
        with pytest.raises(safeckpt.LimitError, match=words):
            safeckpt.convert(tmp_path / name, tmp_path / "x.sckpt")
    torch.save({"w": torch.ones(1).as_strided((1 << 36,), (0,))}, tmp_path / "stride0.pt")
    with pytest.raises(safeckpt.LimitError, match=r"max_expansion=16\b"):
        safeckpt.convert(tmp_path / "stride0.pt", tmp_path / "x.sckpt")
    torch.save({"w": torch.ones(1).as_strided((100_000,), (0,))}, tmp_path / "rep.pt")
    safeckpt.convert(tmp_path / "rep.pt", tmp_path / "x.sckpt", max_expansion=1000)
    assert (safeckpt.load(tmp_path / "x.sckpt")["w"] == 1).all()

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}])
    model(torch.ones(3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, tmp_path / "ckpt.pt")
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["betas"] is groups[1]["betas"]  # shared, as pickle keeps it
    safeckpt.convert(tmp_path / "ckpt.pt", tmp_path / "ckpt.sckpt")
    assert safeckpt.tree.same(safeckpt.torch.load(tmp_path / "ckpt.sckpt"), state)


def _sources(directory):
    """One small valid file of each source format: name -> (path given to convert, file to damage)."""
    torch = pytest.importorskip("torch")
    arrays = {"a": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.array([1, -2], np.int64)}
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(2, dtype=torch.bfloat16)},
             "step": 3, "betas": (0.9, 0.999), "name": "run"}
    sources = {}
    for name, save in (
            ("sckpt", lambda p: safeckpt.save({"x": arrays, "n": [1, "two"]}, p)),
            ("sharded.sckpt", lambda p: safeckpt.save({"x": arrays, "n": 1}, p, max_shard_size=100)),
            ("safetensors", lambda p: safetensors_writer.save_file(arrays, p, metadata={"format": "np"})),
            ("npy", lambda p: np.save(p, arrays["a"])),
            ("npz", lambda p: np.savez(p, **arrays)),
            ("deflated.npz", lambda p: np.savez_compressed(p, **arrays)),
            ("pt", lambda p: torch.save(state, p)),
            ("legacy.pt", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))):
        folder = directory / name.replace(".", "-")
        folder.mkdir(parents=True)
        path = folder / f"src.{name}"
        save(path)
        sources[name] = (path, path)
        if name == "sharded.sckpt":
            sources["sharded.sckpt shard"] = (path, folder / "src.sharded-00001-of-00002.sckpt")
    index = write_sharded(directory, TENSORS)
    sources["index.json"] = (index, index)
    sources["index.json shard"] = (index, directory / "model-00002-of-00003.safetensors")
    return sources


def test_no_damaged_source_escapes_as_another_error(tmp_path):
    """[6] Every source format, truncated at many points and with bytes flipped at many places,
    converted to both destinations: the conversion succeeds (damage in tensor data) or raises a
    SafeckptError; never zipfile's, numpy's, torch's own exceptions, a hang or an OSError (but
    FileNotFoundError for a shard that a damaged index names, as for .sckpt shards [S7])."""
    rng = random.Random(10)
    escaped = []
    for name, (src, victim) in _sources(tmp_path / "src").items():
        good = victim.read_bytes()
        cuts = sorted({0, 1, len(good) - 1} | {len(good) * i // 40 for i in range(40)})
        places = sorted(rng.sample(range(len(good)), min(len(good), 120)))
        damaged = [good[:cut] for cut in cuts] + [
            good[:at] + bytes([good[at] ^ mask]) + good[at + 1:]
            for at in places for mask in (0x01, 0x80, 0xFF)[at % 3:at % 3 + 1]]
        for i, data in enumerate(damaged):
            victim.write_bytes(data)
            dst = tmp_path / ("out.sckpt" if i % 2 else "out.safetensors")
            try:
                safeckpt.convert(src, dst)
            except safeckpt.SafeckptError:
                pass
            except FileNotFoundError:  # a damaged index names a shard that is not there [S7]
                assert name == "index.json", name
            except Exception as exc:  # what this test looks for
                escaped.append(f"{name} #{i}: {type(exc).__name__}: {exc}"[:300])
        victim.write_bytes(good)
    assert escaped == []


# -- the cost of convert per input byte, from every source format (SECURITY.md, "Bounds") ----------

def _files_size(src):
    """The bytes convert reads from: the source and, for a sharded one, its shards beside it."""
    return sum(p.stat().st_size for p in src.parent.iterdir() if p.is_file())


def _npz_members(folder, n):
    """Many tiny members: the zip directory and the .npy headers at their densest."""
    np.savez(folder / "src.npz", **{f"a{i}": np.zeros(1, np.uint8) for i in range(n)})
    return folder / "src.npz"


def _npz_inflating(folder, n):
    """One deflated member that inflates to just under max_expansion x the file: 1/15 random
    bytes (which deflate cannot shrink), the rest zeros."""
    data = np.zeros(n * 15, np.uint8)
    data[:n] = np.random.default_rng(0).integers(0, 256, n, np.uint8)
    np.savez_compressed(folder / "src.npz", a=data)
    return folder / "src.npz"


def _npz_bomb(folder, n):
    """One deflated member of zeros, ~1000x its size: refused before anything inflates [R4]."""
    np.savez_compressed(folder / "src.npz", a=np.zeros(n * 1000, np.uint8))
    return folder / "src.npz"


def _dag(torch, n):
    """The red team's DAG [R3], 60 levels each holding the one below ~n/120 times: (n/120)**60
    paths, refused at once."""
    dag = torch.ones(1)
    for _ in range(60):
        dag = [dag] * max(2, n // 120)
    return dag


def _npy(folder, n):
    np.save(folder / "src.npy", np.ones(n // 4, np.float32))
    return folder / "src.npy"


def _torch(make, **options):
    def build(folder, n):
        torch = pytest.importorskip("torch")
        torch.save(make(torch, n), folder / "src.pt", **options)
        return folder / "src.pt"
    return build


def _index(folder, n):
    tensors = {f"t{i}": np.zeros(0, np.float32) for i in range(n // 80)}
    return write_sharded(folder, tensors, per_shard=max(1, n // 800))


def _sharded(folder, n):
    arrays = {f"t{i}": np.zeros(1, np.float32) for i in range(n // 100)}
    safeckpt.save(arrays, folder / "src.sckpt", max_shard_size=max(64, n // 8))
    return folder / "src.sckpt"


# name -> (builder of the source in a folder from a size in bytes, size of the large source,
#          bound on the bytes of memory per source byte: SECURITY.md, "Bounds")
CONVERT_SHAPES = {
    "npz-members": (lambda folder, n: _npz_members(folder, n // 260), 1 << 20, 16),
    "npz-inflating": (_npz_inflating, 1 << 19, 2 * interop.MAX_EXPANSION),
    "npz-bomb": (_npz_bomb, 1 << 16, 16),
    "npy": (_npy, 1 << 23, 2),
    "torch-none": (_torch(lambda torch, n: [None] * n), 1 << 18, 400),
    "torch-lists": (_torch(lambda torch, n: [[] for _ in range(n // 6)]), 1 << 19, 400),
    "torch-shared": (_torch(lambda torch, n: [[None] * n] * 2), 1 << 18, 400),
    "torch-dag": (_torch(_dag), 1 << 18, 400),
    "torch-tensors": (_torch(lambda torch, n: {f"t{i}": torch.zeros(1) for i in range(n // 400)}),
                      1 << 21, 400),
    "torch-legacy": (_torch(lambda torch, n: [[] for _ in range(n // 6)],
                            _use_new_zipfile_serialization=False), 1 << 19, 400),
    "index.json": (_index, 1 << 20, 64),
    "sharded.sckpt": (_sharded, 1 << 20, 64),
}
SLACK = 4 << 20  # allocator arenas and first-use caches that do not grow with the file
TIME_RATIO = 24  # 8x the source: linear ~8x the CPU time, quadratic ~64x

_COST = textwrap.dedent("""
    import gc, json, sys, time, warnings
    warnings.simplefilter("ignore")
    import safeckpt
    if sys.argv[1] == "torch":
        import torch  # before the baseline, as a user's process has it
    tiny, small, large, dst = sys.argv[2:]

    def convert(src):  # a shape may be refused: what matters is what it cost
        try:
            safeckpt.convert(src, dst)
        except safeckpt.SafeckptError:
            pass

    def kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    def cpu(src):  # least CPU time of 3 (process time: other processes do not count)
        best = float("inf")
        for _ in range(3):
            gc.collect()  # each run starts from the same heap, not with a collection half due
            start = time.process_time()
            convert(src)
            best = min(best, time.process_time() - start)
        return best

    convert(tiny)  # lazy imports and first-use caches
    gc.freeze()  # the collector's full passes then walk what convert made, not torch's own objects
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM, the peak that getrusage's ru_maxrss reports, restarts at VmRSS
    before = kib("VmRSS")
    convert(large)
    print(json.dumps({"memory": (kib("VmHWM") - before) * 1024, "small": cpu(small),
                      "large": cpu(large)}))
""")


@pytest.mark.cost
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc")
@pytest.mark.parametrize("shape", CONVERT_SHAPES)
def test_convert_cost_per_source_byte(tmp_path, backend, shape):
    """convert from each source format, on sources that pack the most objects into each byte: peak
    memory (VmHWM - VmRSS in a fresh process) per source byte below the shape's bound, and 8x the
    source costs less than TIME_RATIO x the CPU time (SECURITY.md, "Bounds")."""
    build, n, per_byte = CONVERT_SHAPES[shape]
    sources = []
    for name, size in (("tiny", 4096), ("small", n // 8), ("large", n)):
        (tmp_path / name).mkdir()
        sources.append(build(tmp_path / name, size))
    env = dict(os.environ, SAFECKPT_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", _COST, shape.split("-")[0]]
                         + [str(p) for p in sources] + [str(tmp_path / "out.sckpt")],
                         capture_output=True, text=True, env=env, check=True,
                         timeout=600)  # a hang guard only: the bound is the CPU time ratio
    cost = json.loads(out.stdout)
    size = _files_size(sources[-1])
    print(f"{shape}: {cost['memory'] / size:.1f} bytes of memory per source byte ({size} bytes), "
          f"8x the source: {cost['large'] / cost['small']:.1f}x the CPU time")
    assert cost["memory"] <= per_byte * size + SLACK, (shape, cost["memory"] / size)
    assert cost["large"] <= TIME_RATIO * max(cost["small"], 1e-3), cost
