"""safeckpt.safe_open (safeckpt/safetensors_compat.py) against the real safetensors.safe_open, on
files the safetensors package wrote; and on .sckpt files and shards; both backends."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import safetensors_compat
from safeckpt.errors import (ChecksumError, InvalidValueError, LimitError, NotSafeckptError,
                             ReaderClosedError)

safetensors = pytest.importorskip("safetensors")

SLICES = [  # indices of a (4, 6) tensor, each taken by torch, as safetensors' "pt" slices are
    slice(1, 3), (slice(None), slice(0, 6, 2)), 1, -1, (1, 2), (slice(None), 1), Ellipsis,
    (Ellipsis, 1), [0, 2], [], (None,), slice(5, 10), slice(-2, None), (slice(1, None, 2), None, 2),
    # and the ones torch refuses: the same exception
    slice(None, None, -1), 10, (slice(0, 2), slice(0, 3), slice(0, 1)),
]
NP_SLICES = [  # what safetensors' numpy path takes (it refuses lists, None, negative starts)
    slice(1, 3), (slice(None), slice(0, 6, 2)), 1, -1, (1, 2), (slice(None), 1), Ellipsis,
    (Ellipsis, 1), (slice(0, 4), slice(2, 6, 3)),
]


def _torch():
    return pytest.importorskip("torch")


def _torch_tensors(torch):
    """A tensor of every dtype safetensors and torch share, in several shapes."""
    g = torch.Generator().manual_seed(0)
    out = {"b": torch.arange(24, dtype=torch.float32).reshape(4, 6),
           "scalar": torch.tensor(3.5, dtype=torch.float64),
           "empty": torch.zeros((0, 3), dtype=torch.float16),
           "cube": torch.randn((3, 4, 5), generator=g).to(torch.bfloat16),
           "flag": torch.rand(7, generator=g) > 0.5,
           "cplx": torch.randn(5, dtype=torch.complex64, generator=g)}
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
                  torch.uint32, torch.uint64):
        out[str(dtype).split(".")[1]] = torch.randint(0, 100, (2, 3), generator=g).to(dtype)
    for dtype in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                  torch.float8_e5m2fnuz):
        out[str(dtype).split(".")[1]] = torch.randn((3, 2), generator=g).to(dtype)
    return out


@pytest.fixture
def st_file(tmp_path):
    """A .safetensors file written by safetensors.torch, with metadata, and its tensors."""
    torch = _torch()
    from safetensors.torch import save_file
    tensors = _torch_tensors(torch)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "hi"})
    return path, tensors


def _bits(tensor):
    """A tensor's bytes, as a flat uint8 tensor (bit-exact comparison of any dtype, -0.0, NaN)."""
    torch = _torch()
    dense = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.cpu())  # strides of its own
    return dense.reshape(-1).view(torch.uint8)


def _same(a, b):
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and _bits(a).equal(_bits(b))


def _outcome(fn):
    """What ``fn()`` gives: its value, or the type of the exception it raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return type(exc)


# -- parity with safetensors.safe_open ---------------------------------------------------------

@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_pt_matches_safetensors_bit_for_bit(backend, st_file, io):
    torch = _torch()
    path, tensors = st_file
    ref = safetensors.safe_open(path, framework="pt")
    with safeckpt.safe_open(path, framework="pt", backend=io) as f:
        assert f.keys() == ref.keys() == sorted(tensors)
        assert f.offset_keys() == ref.offset_keys()
        assert f.metadata() == ref.metadata() == {"format": "pt", "note": "hi"}
        for name in ref.keys():
            ours, theirs = f.get_tensor(name), ref.get_tensor(name)
            assert isinstance(ours, torch.Tensor) and _same(ours, theirs), name
            assert _same(ours, tensors[name])
            assert f.get_slice(name).get_shape() == ref.get_slice(name).get_shape()
            assert f.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype()
        got = f.get_tensors()
        assert list(got) == list(ref.get_tensors()) == ref.offset_keys()
        assert all(_same(got[name], tensors[name]) for name in got)


@pytest.mark.parametrize("io", ["mmap", "pread"])
@pytest.mark.parametrize("key", SLICES, ids=repr)
def test_pt_slices_match_safetensors(backend, st_file, io, key):
    torch = _torch()
    path, _ = st_file
    ref = safetensors.safe_open(path, framework="pt").get_slice("b")
    with safeckpt.safe_open(path, "pt", backend=io) as f:
        ours, theirs = _outcome(lambda: f.get_slice("b")[key]), _outcome(lambda: ref[key])
    if isinstance(theirs, type):
        assert ours is theirs  # the same exception: torch raised both
    else:
        assert isinstance(ours, torch.Tensor) and _same(ours, theirs)


_index = st.one_of(st.integers(-6, 6), st.none(), st.just(Ellipsis),
                   st.builds(slice, st.none() | st.integers(-7, 7), st.none() | st.integers(-7, 7),
                             st.none() | st.integers(-1, 3)))


@settings(max_examples=150)
@given(key=st.one_of(_index, st.lists(_index, max_size=4).map(tuple)))
def test_pt_slices_match_safetensors_for_any_basic_index(backend, tmp_path_factory, key):
    """Any mix of ints, slices, None and Ellipsis on a (5, 4, 3) tensor: the same tensor or the
    same exception, with the file mapped and read by pread (rows read first, then the rest)."""
    torch = _torch()
    from safetensors.torch import save_file
    path = tmp_path_factory.getbasetemp() / "slices.safetensors"
    if not path.exists():
        save_file({"t": torch.arange(60, dtype=torch.int32).reshape(5, 4, 3)}, path)
    theirs = _outcome(lambda: safetensors.safe_open(path, "pt").get_slice("t")[key])
    for io in ("mmap", "pread"):
        with safeckpt.safe_open(path, "pt", backend=io) as f:
            ours = _outcome(lambda: f.get_slice("t")[key])
        if isinstance(theirs, type):
            assert ours is theirs, io
        else:
            assert isinstance(ours, torch.Tensor) and _same(ours, theirs), io


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_np_matches_safetensors(backend, tmp_path, io):
    from safetensors.numpy import save_file
    arrays = {"b": np.arange(24, dtype=np.float32).reshape(4, 6), "i": np.arange(5, dtype=np.int64),
              "e": np.zeros((0, 3), np.float16), "s": np.array(2.5), "u": np.ones((2, 2), np.uint8)}
    path = tmp_path / "n.safetensors"
    save_file(arrays, path)
    ref = safetensors.safe_open(path, framework="np")
    with safeckpt.safe_open(path, framework="numpy", backend=io) as f:
        assert f.keys() == ref.keys() and f.offset_keys() == ref.offset_keys()
        assert f.metadata() is ref.metadata() is None
        for name in ref.keys():
            ours = f.get_tensor(name)
            assert type(ours) is np.ndarray and ours.dtype == ref.get_tensor(name).dtype
            assert ours.tobytes() == ref.get_tensor(name).tobytes() and ours.shape == arrays[name].shape
        for key in NP_SLICES:
            ours, theirs = f.get_slice("b")[key], ref.get_slice("b")[key]
            assert type(ours) is type(theirs) is np.ndarray, key  # 0-d arrays, not scalars
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), key


def test_np_reads_bfloat16_and_float8_bit_for_bit(backend, st_file):
    """safetensors' numpy path cannot (numpy has no such dtypes); ml_dtypes' arrays here."""
    path, tensors = st_file
    with safeckpt.safe_open(path, framework="np") as f:
        for name in ("cube", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz"):
            array = f.get_tensor(name)
            assert array.dtype.name == name if name != "cube" else array.dtype.name == "bfloat16"
            assert array.tobytes() == _bits(tensors[name]).numpy().tobytes()
            assert f.get_slice(name)[1:].tobytes() == _bits(tensors[name][1:]).numpy().tobytes()


def test_jax_gives_jax_arrays_and_refuses_a_silent_64_bit_cut(backend, tmp_path):
    jax = pytest.importorskip("jax")
    path = tmp_path / "j.safetensors"
    safeckpt.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "i": np.arange(3, dtype=np.int64)}, path)
    for name in ("jax", "flax"):
        with safeckpt.safe_open(path, framework=name) as f:
            w = f.get_tensor("w")
            assert isinstance(w, jax.Array) and np.array_equal(np.asarray(w), np.arange(6).reshape(2, 3))
            part = f.get_slice("w")[:, 1]
            assert isinstance(part, jax.Array) and np.asarray(part).tolist() == [1.0, 4.0]
            if not jax.config.jax_enable_x64:  # safetensors would hand out int32 silently
                with pytest.raises(safeckpt.UnsupportedDtypeError, match="'i'.*jax_enable_x64"):
                    f.get_tensor("i")


def test_missing_files_and_tensors(backend, st_file, tmp_path):
    path, _ = st_file
    with pytest.raises(FileNotFoundError):
        safetensors.safe_open(tmp_path / "nope.safetensors", "pt")
    with pytest.raises(FileNotFoundError):
        safeckpt.safe_open(tmp_path / "nope.safetensors", "pt")
    with safeckpt.safe_open(path, "np") as f:
        for get in (f.get_tensor, f.get_slice):
            with pytest.raises(KeyError, match=r"has no tensor 'nope'"):
                get("nope")
        with pytest.raises(KeyError):
            f.get_tensor(1)


def test_closed_reader_refuses_but_a_mapped_slice_stays_valid(backend, st_file):
    """As safetensors: after the `with`, the reader is closed; a slice taken inside still reads
    (it views the file's mapping). A pread slice reads the file, so it is closed too."""
    torch = _torch()
    path, tensors = st_file
    with safeckpt.safe_open(path, "pt") as f:
        mapped = f.get_slice("b")
    with safeckpt.safe_open(path, "pt", backend="pread") as g:
        by_pread = g.get_slice("b")
    for call in (f.keys, f.offset_keys, f.metadata, f.get_tensors, lambda: f.get_tensor("b"),
                 lambda: f.get_slice("b")):
        with pytest.raises(ReaderClosedError):
            call()
    assert torch.equal(mapped[1:3], tensors["b"][1:3])
    with pytest.raises(ReaderClosedError):
        by_pread[1:3]
    assert "closed" in repr(f)


def test_usable_without_with(backend, st_file):
    path, tensors = st_file
    f = safeckpt.safe_open(path, "pt")
    assert _same(f.get_tensor("b"), tensors["b"])
    f.close()
    with pytest.raises(ReaderClosedError):
        f.keys()


# -- frameworks, devices and options -----------------------------------------------------------

def test_framework_names(st_file):
    path, _ = st_file
    for name in ("pt", "torch", "pytorch", "np", "numpy", "jax", "flax"):
        safeckpt.safe_open(path, name).close()
    for name, adapter in (("tf", "TensorFlow"), ("tensorflow", "TensorFlow"), ("mlx", "MLX"),
                          ("paddle", "Paddle")):
        with pytest.raises(InvalidValueError, match=f"no {adapter} adapter.*framework='np'"):
            safeckpt.safe_open(path, name)
    for bad in ("PT", "bogus", None, 1):
        with pytest.raises(InvalidValueError, match="is not a framework; use one of 'pt'"):
            safeckpt.safe_open(path, bad)
    with pytest.raises(TypeError):
        safeckpt.safe_open(path)  # framework is required, as in safetensors


def test_devices_are_checked_when_opened(st_file):
    torch = _torch()
    path, tensors = st_file
    for device in ("cpu", None, torch.device("cpu")):
        with safeckpt.safe_open(path, "pt", device=device) as f:
            assert f.get_tensor("b").device.type == "cpu"
            assert f.get_slice("b")[1:].device.type == "cpu"
    for device, message in (("meta", "meta device holds no data"), ("bogus", "not a device name"),
                            (-1, "not a device"), ({"cuda:0": "cpu"}, "not a dict")):
        with pytest.raises(InvalidValueError, match=message):
            safeckpt.safe_open(path, "pt", device=device)
    for framework in ("np", "jax"):
        with pytest.raises(InvalidValueError, match="loads to the CPU only"):
            safeckpt.safe_open(path, framework, device="cuda")
        safeckpt.safe_open(path, framework, device=None).close()
    with pytest.raises(InvalidValueError, match="backend='bogus'"):
        safeckpt.safe_open(path, "pt", backend="bogus")


def test_an_accelerator_device_without_an_accelerator_is_refused_at_open(st_file):
    torch = _torch()
    if torch.cuda.is_available():
        pytest.skip("an accelerator is here: test_accelerator_devices covers it")
    path, _ = st_file
    for device in (0, "cuda", "cuda:0"):  # safetensors opens, then fails at the first tensor
        with pytest.raises(InvalidValueError, match="device="):
            safeckpt.safe_open(path, "pt", device=device)


def test_accelerator_devices(backend, st_file, tmp_path):
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    path, tensors = st_file
    for device in (0, "cuda", "cuda:0", torch.device("cuda", 0)):
        for io in ("mmap", "pread"):
            ref = safetensors.safe_open(path, "pt", device=device)
            with safeckpt.safe_open(path, "pt", device=device, backend=io) as f:
                for name in ("b", "cube", "float8_e4m3fn", "scalar", "empty"):
                    ours = f.get_tensor(name)
                    assert ours.device.type == "cuda" and _same(ours.cpu(), tensors[name])
                    assert _same(ours.cpu(), ref.get_tensor(name).cpu())
                for key in (slice(1, 3), (slice(None), 2), [0, 3]):
                    part = f.get_slice("b")[key]
                    assert part.device.type == "cuda" and _same(part.cpu(), ref.get_slice("b")[key].cpu())
                assert all(t.device.type == "cuda" for t in f.get_tensors().values())
    # a copy to the GPU checks the CRC32C of a .sckpt file on the way
    sckpt = tmp_path / "c.sckpt"
    safeckpt.save_file({"w": np.arange(1000, dtype=np.float32)}, sckpt)
    _flip_a_byte(sckpt, "w")
    with safeckpt.safe_open(sckpt, "pt", device="cuda:0") as f:
        with pytest.raises(ChecksumError, match="'w'"):
            f.get_tensor("w")


# -- other files: .sckpt, shards, what safeckpt.open reads -------------------------------------

def _flip_a_byte(path, name):
    with safeckpt.open(path) as f:
        offset = f.info(name).offset
    with open(path, "r+b") as out:
        out.seek(offset + 3)
        byte = out.read(1)
        out.seek(offset + 3)
        out.write(bytes([byte[0] ^ 0xFF]))


def test_sckpt_files(backend, tmp_path):
    path = tmp_path / "m.sckpt"
    arrays = {"z": np.arange(6, dtype=np.int16).reshape(2, 3), "a": np.ones(4, np.complex128),
              "m": np.zeros((2, 2), np.float32)}
    safeckpt.save_file(arrays, path, metadata={"step": 7, "format": "pt"})
    with safeckpt.safe_open(path, "np") as f:
        assert f.keys() == ["a", "m", "z"] and f.offset_keys() == ["z", "a", "m"]
        assert f.metadata() == {"step": 7, "format": "pt"}  # our metadata keeps its types
        assert f.get_slice("a").get_dtype() == "C128" and f.get_slice("z").get_dtype() == "I16"
        assert all(np.array_equal(f.get_tensor(name), arrays[name]) for name in arrays)
        assert f.get_slice("z")[1, 1:].tolist() == [4, 5]
    # a nested save: the tensors by their flat names, as safetensors tools see a converted file
    safeckpt.save({"model": {"w": np.ones(2)}, "step": 3}, tmp_path / "n.sckpt")
    with safeckpt.safe_open(tmp_path / "n.sckpt", "np") as f:
        assert f.keys() == ["model.w"] and f.metadata() is None


def test_pread_checks_checksums_and_reads_only_the_rows_asked_for(backend, tmp_path, monkeypatch):
    torch = _torch()
    path = tmp_path / "big.sckpt"
    rows = np.arange(1000 * 16, dtype=np.float32).reshape(1000, 16)
    safeckpt.save_file({"w": rows, "v": np.ones(3, np.float32)}, path)
    reads = []
    real = safeckpt.Reader.pread_into

    def counted(self, offsets, lengths, dests, checksum=False):
        reads.extend(lengths)
        return real(self, offsets, lengths, dests, checksum)

    monkeypatch.setattr(safeckpt.Reader, "pread_into", counted)
    with safeckpt.safe_open(path, "pt", backend="pread") as f:
        assert f.get_slice("w")[10:12, 3:5].tolist() == rows[10:12, 3:5].tolist()
        assert sum(reads) == 2 * 16 * 4  # two rows, not 64 KB
        reads.clear()
        assert f.get_slice("w")[-1, ::4].tolist() == rows[-1, ::4].tolist()
        assert sum(reads) == 16 * 4
    with safeckpt.safe_open(path, "np", backend="pread") as f:
        reads.clear()
        assert np.array_equal(f.get_slice("w")[500:503], rows[500:503]) and sum(reads) == 3 * 64
    _flip_a_byte(path, "w")
    for framework in ("pt", "np"):
        with safeckpt.safe_open(path, framework, backend="pread") as f:
            with pytest.raises(ChecksumError, match="'w'"):
                f.get_tensor("w")
            assert f.get_tensor("v").tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(safeckpt.safe_open(path, "pt").get_tensor("v"), torch.ones(3))


def test_sharded_checkpoint(backend, tmp_path):
    arrays = {f"layer{i}": np.full((10,), i, np.float32) for i in range(5)}
    index = tmp_path / "m.sckpt"
    safeckpt.save_file(arrays, index, max_shard_size=100, metadata={"format": "pt"})
    for source in (index, tmp_path):  # the index, or its directory
        with safeckpt.safe_open(source, "np") as f:
            assert f.keys() == sorted(arrays) and f.offset_keys() == list(arrays)
            assert f.metadata() == {"format": "pt"}
            assert all(np.array_equal(f.get_tensor(name), arrays[name]) for name in arrays)
            assert f.get_slice("layer4")[2:4].tolist() == [4.0, 4.0]
            assert list(f.get_tensors()) == list(arrays)


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_hugging_face_sharded_safetensors(backend, tmp_path, io):
    """A model.safetensors.index.json (or its directory) and shards written by safetensors.torch:
    each tensor bit for bit as the real safe_open reads it from its shard."""
    torch = _torch()
    from safetensors.torch import save_file
    tensors = _torch_tensors(torch)
    names = sorted(tensors)
    weight_map = {}
    for j, part in enumerate((names[0::2], names[1::2])):  # interleaved, as by name
        file = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = tmp_path / "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for source in (index, tmp_path):
        with safeckpt.safe_open(source, "pt", backend=io) as f:
            assert f.keys() == names
            shard_order = []
            for file in sorted(set(weight_map.values())):
                ref = safetensors.safe_open(tmp_path / file, "pt")
                shard_order += ref.offset_keys()
                for name in ref.keys():
                    assert _same(f.get_tensor(name), ref.get_tensor(name)), name
                    assert f.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype()
                    assert f.get_slice(name).get_shape() == ref.get_slice(name).get_shape()
            assert f.offset_keys() == shard_order
            assert _same(f.get_slice("b")[1:, ::2], tensors["b"][1:, ::2])
            assert list(f.get_tensors()) == shard_order
            with safeckpt.open(source) as reader:
                assert f.metadata() == (dict(reader.metadata) or None)


def test_files_safeckpt_refuses_are_refused(backend, st_file, tmp_path):
    path, _ = st_file
    with pytest.raises(LimitError, match="max_tensors"):
        safeckpt.safe_open(path, "np", max_tensors=2)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1])
    with pytest.raises(safeckpt.TruncatedFileError):
        safeckpt.safe_open(tmp_path / "cut.safetensors", "np")
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(NotSafeckptError, match="safeckpt convert"):
        safeckpt.safe_open(tmp_path / "x.pt", "pt")


def test_an_empty_metadata_header_reads_as_none(backend, tmp_path):
    """The one metadata difference (documented): safetensors returns {} for `"__metadata__": {}`."""
    header = json.dumps({"__metadata__": {}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    header += " " * (-len(header) % 8)
    path = tmp_path / "e.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(4))
    assert safetensors.safe_open(path, "np").metadata() == {}
    with safeckpt.safe_open(path, "np") as f:
        assert f.metadata() is None and f.get_tensor("x").tolist() == [0.0]


def test_public_names():
    assert safeckpt.safe_open is safetensors_compat.safe_open
    assert "safe_open" in safeckpt.__all__
    assert set(safetensors_compat.DTYPE_NAMES) == set(range(len(safeckpt.dtypes.NAME_BY_CODE)))
