"""torch's dtypes for the codes of version 1.5 (FORMAT.md section 4): float8_e8m0fnu (22),
complex32 (33), the shell dtypes int4 .. uint1 (27-32, one element a byte in torch, packed in the
file [T11]) and float4_e2m1fn_x2 (two values a byte, code 26 with the last dimension doubled);
the codes torch has no dtype for are refused by name, never loaded as uint8."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as hs

torch = pytest.importorskip("torch")

import safeckpt  # noqa: E402
import safeckpt.torch as st  # noqa: E402
from safeckpt import dtypes, packing  # noqa: E402

SHELL = {"int4": (27, 4), "uint4": (28, 4), "int2": (29, 2), "uint2": (30, 2), "int1": (31, 1),
         "uint1": (32, 1)}
# torch dtype name -> (code, bits in each torch byte that may be set)
MAPPED = {"float8_e8m0fnu": (22, 8), **SHELL}
NO_TORCH = [19, 20, 21, 23, 24, 25, 34]  # codes torch has no dtype for
shapes = hs.lists(hs.integers(0, 5), min_size=0, max_size=3).map(tuple)


def torch_bytes(tensor):
    """A tensor's bytes, as torch holds them (shell dtypes cannot be copied: view them)."""
    width = {1: torch.uint8, 4: torch.int32}[tensor.element_size()]
    return tensor.view(width).contiguous().numpy().tobytes()


def make(name, shape, data):
    """A torch tensor of dtype ``name`` whose bytes are random and valid (shell: low bits only)."""
    code, bits = MAPPED[name]
    count = int(np.prod(shape))
    raw = np.frombuffer(data.draw(hs.binary(min_size=count, max_size=count)), np.uint8)
    raw = raw & np.uint8((1 << bits) - 1)
    return torch.from_numpy(raw.copy()).reshape(shape).view(getattr(torch, name))


@pytest.mark.parametrize("name", list(MAPPED))
@given(shape=shapes, data=hs.data())
def test_mapped_dtypes_round_trip_bit_exact(tmp_path, backend, name, shape, data):
    """torch save -> torch load gives the same dtype, shape and bytes; -> numpy load gives the
    ml_dtypes array of the same bytes (the file holds them packed, [T11])."""
    tensor = make(name, shape, data)
    path = tmp_path / f"{name}.sckpt"
    st.save({"t": tensor, "odd": tensor.reshape(-1)[::2]}, path)
    back = st.load(path)
    assert back["t"].dtype == tensor.dtype and back["t"].shape == tensor.shape
    assert torch_bytes(back["t"]) == torch_bytes(tensor)
    assert torch_bytes(back["odd"]) == torch_bytes(tensor.reshape(-1)[::2])
    code = MAPPED[name][0]
    want = tensor.view(torch.uint8).numpy().view(dtypes.DTYPE_BY_CODE[code])
    array = safeckpt.load(path, framework="numpy")["t"]
    assert array.dtype == want.dtype and array.shape == want.shape
    assert array.tobytes() == want.tobytes()
    with safeckpt.open(path) as f:
        assert f.info("t").dtype == dtypes.DTYPE_BY_CODE[code]
        assert f.info("t").nbytes == dtypes.nbytes_of(code, tensor.numel())


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@given(shape=shapes, data=hs.data())
def test_complex32_round_trips_as_code_33(tmp_path, backend, shape, data):
    """torch.complex32 (torch.chalf: two float16) is code 33, NaN payloads and -0.0 kept."""
    count = int(np.prod(shape))
    raw = np.frombuffer(data.draw(hs.binary(min_size=4 * count, max_size=4 * count)), np.int32)
    tensor = torch.from_numpy(raw.copy()).reshape(shape).view(torch.complex32)
    path = tmp_path / "c.sckpt"
    st.save({"c": tensor}, path)
    back = st.load(path)["c"]
    assert back.dtype == torch.complex32 and torch_bytes(back) == torch_bytes(tensor)
    array = safeckpt.load(path, framework="numpy")["c"]
    assert array.dtype == ml_dtypes.complex32 and array.tobytes() == raw.tobytes()


@given(lead=hs.lists(hs.integers(0, 3), max_size=2).map(tuple), k=hs.integers(0, 4),
       data=hs.data())
def test_float4_x2_round_trips_as_code_26(tmp_path, backend, lead, k, data):
    """float4_e2m1fn_x2 of shape (..., k) is float4_e2m1fn of shape (..., 2k); its bytes are the
    file's packed bytes (element 0 in the low nibble, FORMAT.md section 4)."""
    count = int(np.prod(lead)) * k
    raw = np.frombuffer(data.draw(hs.binary(min_size=count, max_size=count)), np.uint8)
    tensor = torch.from_numpy(raw.copy()).reshape(*lead, k).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "f4.sckpt"
    st.save({"f4": tensor}, path)
    with safeckpt.open(path) as f:
        info = f.info("f4")
        assert info.dtype == ml_dtypes.float4_e2m1fn and info.shape == (*lead, 2 * k)
        assert path.read_bytes()[info.offset:info.offset + info.nbytes] == raw.tobytes()
    back = st.load(path)["f4"]
    assert back.dtype == torch.float4_e2m1fn_x2 and back.shape == tensor.shape
    assert torch_bytes(back) == raw.tobytes()
    array = safeckpt.load(path, framework="numpy")["f4"]
    nibbles = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(*lead, 2 * k)
    assert array.view(np.uint8).tolist() == nibbles.tolist()


def test_float4_nibble_order_is_torchs(tmp_path, backend):
    """torch packs val0 in bits 3..0 and val1 in 7..4 (c10 Float4_e2m1fn_x2.h); the values
    (0.5, 6.0) are the byte 0x71, and numpy's float4_e2m1fn [0.5, 6.0] loads as that byte."""
    pair = np.array([[0.5, 6.0]], ml_dtypes.float4_e2m1fn)
    path = tmp_path / "pair.sckpt"
    safeckpt.save_file({"p": pair}, path)
    back = st.load(path)["p"]
    assert back.shape == (1, 1) and back.view(torch.uint8).item() == 0x71
    assert back.view(torch.uint8).item() == (0x7 << 4) | 0x1  # 6.0 = 0b0111, 0.5 = 0b0001


@pytest.mark.parametrize("shape", [(3,), (2, 5), ()])
def test_float4_odd_last_dimension_is_refused_for_torch(tmp_path, backend, shape):
    """A float4_e2m1fn tensor whose last dimension is odd (or missing) has no torch dtype: the
    load names the tensor and framework='numpy', which still reads it."""
    array = np.zeros(shape, ml_dtypes.float4_e2m1fn)
    path = tmp_path / "odd.sckpt"
    safeckpt.save_file({"w": array}, path)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"'w'.*float4_e2m1fn.*numpy"):
        st.load(path)
    with safeckpt.open(path) as f, pytest.raises(safeckpt.UnsupportedDtypeError, match="'w'"):
        st.device_tensors(f, [0], torch.device("cpu"))
    assert safeckpt.load(path, framework="numpy")["w"].shape == shape


@pytest.mark.parametrize("code", NO_TORCH)
def test_codes_without_a_torch_dtype_are_refused_by_name(tmp_path, backend, code):
    """Loading with torch refuses the tensor, naming it, its dtype and framework='numpy' (never
    a silent uint8); numpy loads it."""
    dtype = dtypes.DTYPE_BY_CODE[code]
    array = np.zeros((2, 4), dtype)
    path = tmp_path / "x.sckpt"
    safeckpt.save_file({"x": array}, path)
    pattern = rf"tensor 'x'.*{dtype.name}.*framework='numpy'"
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=pattern):
        st.load(path)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=pattern):
        safeckpt.load(path, framework="torch")
    with safeckpt.open(path) as f, pytest.raises(safeckpt.UnsupportedDtypeError, match=pattern):
        st.device_tensors(f, [0], torch.device("cpu"))
    assert safeckpt.load(path, framework="numpy")["x"].dtype == dtype


@pytest.mark.parametrize("name", ["uint3", "uint5", "uint6", "uint7", "int3", "int5", "int6",
                                  "int7"])
def test_torch_dtypes_without_a_code_are_refused(tmp_path, name):
    """torch's 3, 5, 6 and 7-bit shell dtypes have no code: a save names the tensor and writes
    nothing."""
    tensor = torch.zeros(4, dtype=torch.uint8).view(getattr(torch, name))
    path = tmp_path / "no.sckpt"
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=rf"obj\['w'\].*{name}"):
        st.save({"w": tensor}, path)
    assert not path.exists()


@pytest.mark.parametrize("name", list(SHELL))
def test_shell_bytes_above_the_width_are_refused(tmp_path, name):
    """torch gives a shell dtype no values: a byte with bits above the width (an int8 -1 viewed
    as int4 is 0xff) would lose them when packed, so the save refuses it, naming the tensor and
    the element, and writes nothing."""
    bits = SHELL[name][1]
    raw = torch.zeros(2, 3, dtype=torch.uint8)
    raw[1, 2] = 1 << bits
    path = tmp_path / "bad.sckpt"
    with pytest.raises(safeckpt.InvalidValueError, match=rf"obj\['w'\].*\(1, 2\).*{1 << bits:#04x}"):
        st.save({"w": raw.view(getattr(torch, name))}, path)
    assert not path.exists()
    raw[1, 2] = (1 << bits) - 1  # the largest valid byte is saved
    st.save({"w": raw.view(getattr(torch, name))}, path)


def test_zero_dim_float4_x2_is_refused(tmp_path):
    """A 0-d float4_e2m1fn_x2 tensor holds two values and no dimension to double: refused."""
    tensor = torch.tensor(0x21, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"obj\['w'\].*reshape"):
        st.save({"w": tensor}, tmp_path / "z.sckpt")


def packed_case(tmp_path):
    obj = {"i4": torch.tensor([1, 14, 7, 8, 0], dtype=torch.uint8).view(torch.int4),
           "u1": torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.uint8).view(torch.uint1),
           "f4": torch.tensor([[0x21, 0xF3]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
           "e8": torch.tensor([0, 127, 255], dtype=torch.uint8).view(torch.float8_e8m0fnu),
           "f": torch.arange(3, dtype=torch.float32)}
    path = tmp_path / "packed.sckpt"
    st.save(obj, path)
    return obj, path


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("staging_bytes", [1, 3, 1 << 20])
def test_device_tensors_with_packed_codes(tmp_path, backend, mmap, staging_bytes):
    """The staged load to a device (run on the CPU): float4 pairs are staged as they are, the
    packed shell codes are unpacked on the host and moved; each tensor's CRC is checked."""
    obj, path = packed_case(tmp_path)
    with safeckpt.open(path, mmap=mmap) as f:
        names = f.keys()
        back = st.device_tensors(f, list(range(len(f))), torch.device("cpu"), verify=True,
                                 staging_bytes=staging_bytes)
    for i, name in enumerate(names):
        assert back[i].dtype == obj[name].dtype and back[i].shape == obj[name].shape, name
        assert torch_bytes(back[i]) == torch_bytes(obj[name]), name


def test_device_tensors_check_the_crc_of_packed_codes(tmp_path, backend):
    """[T10] on a packed tensor loaded for a device: a flipped bit is caught, naming it."""
    obj, path = packed_case(tmp_path)
    with safeckpt.open(path) as f:
        info = f.info("i4")
    data = bytearray(path.read_bytes())
    data[info.offset] ^= 0x01
    path.write_bytes(data)
    with safeckpt.open(path, mmap=False) as f, pytest.raises(safeckpt.ChecksumError,
                                                              match="'i4'"):
        st.device_tensors(f, [f.keys().index("i4")], torch.device("cpu"), verify=True)


@pytest.mark.parametrize("map_location", [None, "cpu", {"cpu": "cpu"},
                                          lambda storage, location: storage,
                                          lambda storage, location: None])
def test_packed_codes_with_map_location(tmp_path, backend, map_location):
    """Every form of map_location gives the packed codes back as fresh tensors of their dtype."""
    obj, path = packed_case(tmp_path)
    back = st.load(path, map_location=map_location, mmap=False)
    for name, tensor in obj.items():
        assert back[name].dtype == tensor.dtype and torch_bytes(back[name]) == torch_bytes(tensor)
    moved = st.to_torch(safeckpt.load(path, framework="numpy"), map_location=map_location)
    assert all(torch_bytes(moved[name]) == torch_bytes(t) for name, t in obj.items())


def test_file_bytes_of_a_torch_int4_tensor(tmp_path, backend):
    """FORMAT.md section 4's example from torch: int4 [1, -2, 7] (bytes 1, 0xE, 7) is E1 07."""
    tensor = torch.tensor([1, 0xE, 7], dtype=torch.uint8).view(torch.int4)
    path = tmp_path / "i4.sckpt"
    st.save({"x": tensor}, path)
    with safeckpt.open(path) as f:
        info = f.info("x")
    assert path.read_bytes()[info.offset:info.offset + info.nbytes] == bytes([0xE1, 0x07])
    assert safeckpt.load(path, framework="numpy")["x"].tolist() == [1, -2, 7]
    assert packing.pack(np.array([1, -2, 7], ml_dtypes.int4), 27).tobytes() == b"\xe1\x07"


def test_safe_open_pt_gives_torch_dtypes(tmp_path, backend):
    """safe_open(framework="pt") of a .sckpt file: the same torch dtypes; a code torch lacks
    is refused by name."""
    obj, path = packed_case(tmp_path)
    with safeckpt.safe_open(path, framework="pt") as f:
        for name, tensor in obj.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and torch_bytes(got) == torch_bytes(tensor), name
        assert torch_bytes(f.get_slice("f4")[...]) == torch_bytes(obj["f4"])
    other = tmp_path / "e3m4.sckpt"
    safeckpt.save_file({"y": np.zeros(2, ml_dtypes.float8_e3m4)}, other)
    with safeckpt.safe_open(other, framework="pt") as f:
        with pytest.raises(safeckpt.UnsupportedDtypeError, match="'y'.*numpy"):
            f.get_tensor("y")


class _Shells(torch.nn.Module):
    """A module holding a buffer of each shell dtype, float4_e2m1fn_x2, float8_e8m0fnu and
    complex32 (zeros until filled)."""

    def __init__(self):
        super().__init__()
        for name in (*SHELL, "float8_e8m0fnu", "float4_e2m1fn_x2"):
            self.register_buffer(name, torch.zeros(2, 3, dtype=torch.uint8).view(
                getattr(torch, name)))
        self.register_buffer("complex32", torch.zeros(2, 3, dtype=torch.int32).view(
            torch.complex32))


def _filled(seed):
    """A :class:`_Shells` whose buffers hold random valid bytes (shell: low bits only)."""
    model = _Shells()
    gen = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        width = {1: torch.uint8, 4: torch.int32}[buffer.element_size()]
        bits = SHELL.get(name, (0, 8))[1]
        raw = torch.randint(0, 1 << bits, buffer.shape, generator=gen, dtype=torch.uint8)
        buffer.view(width).copy_(raw if width is torch.uint8 else raw.to(torch.int32) * 0x10001)
    return model


@pytest.mark.parametrize("assign", [False, True])
def test_load_model_into_shell_dtype_buffers(tmp_path, backend, assign):
    """A model's int4 .. uint1 buffers (codes 27-32, FORMAT.md section 4) load back into the
    same model with the default assign=False too (torch has no copy kernel for them: their bytes
    are copied), bit-exact; assign=True keeps working."""
    model, path = _filled(1), tmp_path / "m.sckpt"
    st.save_model(model, path)
    other = _filled(2)
    kept = {name: buffer for name, buffer in other.named_buffers()}
    st.load_model(other, path, assign=assign)
    for name, buffer in model.named_buffers():
        got = getattr(other, name)
        assert got.dtype == buffer.dtype and torch_bytes(got) == torch_bytes(buffer), name
        assert (got is kept[name]) != assign, name  # copied into, or put in its place


def test_load_state_shell_dtypes_into_a_dict_and_assigned_twice(tmp_path, backend):
    """A dict target's shell tensors are copied into by bytes; with assign=True, one state
    tensor bound for two untied buffers is copied for the second (never aliased)."""
    model = _filled(3)
    target = dict(_Shells().named_buffers())  # zeros
    st.load_state(target, dict(model.named_buffers()))
    for name, buffer in model.named_buffers():
        assert torch_bytes(target[name]) == torch_bytes(buffer), name

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.zeros(3, dtype=torch.uint8).view(torch.int4))
            self.register_buffer("b", torch.zeros(3, dtype=torch.uint8).view(torch.int4))
    two, value = Two(), torch.tensor([1, 0xE, 7], dtype=torch.uint8).view(torch.int4)
    st.load_state(two, {"a": value, "b": value}, assign=True)
    assert torch_bytes(two.a) == torch_bytes(two.b) == torch_bytes(value)
    assert two.a.data_ptr() != two.b.data_ptr()


def test_manager_restore_into_shell_dtype_tensors(tmp_path, backend):
    """CheckpointManager.restore of a state dict holding shell-dtype tensors writes their bytes
    in place (restore_into's Tensor.copy_ has no kernel for them)."""
    model = _filled(4)
    manager = safeckpt.CheckpointManager(tmp_path, rng=False)
    manager.save(1, {"model": model.state_dict()})
    other = _filled(5)
    target = {"model": other.state_dict()}
    manager.restore(target)
    for name, buffer in model.named_buffers():
        assert torch_bytes(getattr(other, name)) == torch_bytes(buffer), name


@pytest.mark.parametrize("source", ["uint8", "uint4"])
def test_cast_to_a_shell_dtype_is_refused_by_name(backend, source):
    """cast=True cannot cast to or from a shell dtype (torch has no casts for them): a
    StateMismatchError naming the key, the dtype and what to do; nothing is loaded."""
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.zeros(3, dtype=torch.uint8).view(torch.int4))
    model = One()
    state = {"a": torch.tensor([1, 2, 3], dtype=torch.uint8).view(getattr(torch, source))}
    for assign in (False, True):
        with pytest.raises(safeckpt.StateMismatchError, match=r"(?s)a.*no casts for .*numpy"):
            st.load_state(model, state, cast=True, assign=assign)
    assert torch_bytes(model.a) == bytes(3)
