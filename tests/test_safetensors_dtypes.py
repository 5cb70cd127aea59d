"""safetensors' F4, F6_E2M3, F6_E3M2 and F8_E8M0 as our codes 26, 24, 25 and 22 (FORMAT.md
section 10, [ST4]/[ST5]): read and written packed (LSB first, as FORMAT.md section 4), checked
against the `safetensors` package where it supports the dtype; the codes safetensors has no name
for are refused when writing, naming the tensor."""

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as hs

import safeckpt
from safeckpt import dtypes, packing, safetensors_compat, safetensors_format

safetensors = pytest.importorskip("safetensors")

ST = {"F4": 26, "F6_E2M3": 24, "F6_E3M2": 25, "F8_E8M0": 22}
NO_NAME = [19, 20, 21, 23, 27, 28, 29, 30, 31, 32, 33, 34]  # codes safetensors cannot hold
# counts whose bits fill whole bytes: 2 per byte for F4, 4 per 3 bytes for F6
WHOLE = {26: 2, 24: 4, 25: 4, 22: 1}


def valid(code, shape, data):
    """An array of code's dtype with random valid bytes (the low ``bits`` bits only)."""
    count = int(np.prod(shape))
    raw = np.frombuffer(data.draw(hs.binary(min_size=count, max_size=count)), np.uint8)
    return (raw & np.uint8((1 << dtypes.BITS_BY_CODE[code]) - 1)).view(
        dtypes.DTYPE_BY_CODE[code]).reshape(shape)


def st_file(entries, data):
    """The bytes of a safetensors file of ``entries`` (name -> header entry) and ``data``."""
    text = json.dumps(entries).encode()
    return len(text).to_bytes(8, "little") + text + data


def their_view(raw):
    """``{name: (dtype, shape, bytes)}`` as the safetensors package parses a file."""
    return {k: (v["dtype"], v["shape"], bytes(v["data"])) for k, v in safetensors.deserialize(raw)}


def header(path):
    raw = path.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])


@pytest.mark.parametrize("name", list(ST))
@given(lead=hs.lists(hs.integers(0, 3), max_size=2).map(tuple), groups=hs.integers(0, 4),
       data=hs.data())
def test_round_trip_bit_exact(tmp_path, backend, name, lead, groups, data):
    """numpy save to .safetensors -> load is bit-exact; the file holds safetensors' dtype
    string, the logical shape and packing.pack's bytes, which safetensors' own parser returns."""
    code = ST[name]
    array = valid(code, (*lead, groups * WHOLE[code]), data)
    path = tmp_path / "x.safetensors"
    safeckpt.save_file({"x": array}, path)
    entry = header(path)["x"]
    assert entry["dtype"] == name and entry["shape"] == list(array.shape)
    packed = packing.pack(array, code).tobytes()
    assert entry["data_offsets"][1] - entry["data_offsets"][0] == len(packed)
    (key, theirs), = safetensors.deserialize(path.read_bytes())
    assert key == "x" and theirs["dtype"] == name and bytes(theirs["data"]) == packed
    back = safeckpt.load_file(path)["x"]
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    with safeckpt.safe_open(path, framework="np") as f:
        assert f.get_slice("x").get_dtype() == name
        assert f.get_tensor("x").tobytes() == array.tobytes()


def test_bit_order_of_each_packed_dtype(tmp_path, backend):
    """LSB first: F4 [0.5, 6.0] is the byte 0x71 (element 0 in the low nibble); F6_E2M3 bit
    patterns [1, 2, 3, 63] are 81 30 FC (FORMAT.md section 4's example, ours for F6)."""
    f4 = np.array([0.5, 6.0], ml_dtypes.float4_e2m1fn)
    f6 = np.array([1, 2, 3, 63], np.uint8).view(ml_dtypes.float6_e2m3fn)
    path = tmp_path / "order.safetensors"
    safeckpt.save_file({"f4": f4, "f6": f6}, path)
    data = {k: bytes(v["data"]) for k, v in safetensors.deserialize(path.read_bytes())}
    assert data == {"f4": b"\x71", "f6": b"\x81\x30\xfc"}


def test_safetensors_package_reads_ours_with_torch(tmp_path, backend):
    """safetensors (torch) reads our F4 as float4_e2m1fn_x2 (the last dimension halved, the same
    bytes) and our F8_E8M0 as float8_e8m0fnu."""
    torch = pytest.importorskip("torch")
    import safetensors.torch
    f4 = np.arange(16, dtype=np.uint8).reshape(2, 8).view(ml_dtypes.float4_e2m1fn)
    e8 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    path = tmp_path / "ours.safetensors"
    safeckpt.save_file({"f4": f4, "e8": e8}, path)
    theirs = safetensors.torch.load_file(str(path))
    assert theirs["f4"].dtype == torch.float4_e2m1fn_x2 and theirs["f4"].shape == (2, 4)
    assert theirs["f4"].view(torch.uint8).numpy().tobytes() == packing.pack(f4, 26).tobytes()
    assert theirs["e8"].dtype == torch.float8_e8m0fnu
    assert theirs["e8"].view(torch.uint8).numpy().tobytes() == e8.tobytes()


def test_ours_reads_what_safetensors_writes(tmp_path, backend):
    """A file safetensors writes from torch's float4_e2m1fn_x2 and float8_e8m0fnu loads as
    ml_dtypes arrays: element 2i from the low nibble of byte i; and with torch as the same
    tensors (safeckpt.safe_open "pt" as safetensors.safe_open gives them)."""
    torch = pytest.importorskip("torch")
    import safetensors.torch
    raw = torch.tensor([[0x71, 0x0A], [0xFF, 0x00]], dtype=torch.uint8)
    tensors = {"f4": raw.view(torch.float4_e2m1fn_x2),
               "e8": torch.tensor([1.0, 4.0, 0.5]).to(torch.float8_e8m0fnu)}
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    back = safeckpt.load_file(path)
    assert back["f4"].dtype == ml_dtypes.float4_e2m1fn and back["f4"].shape == (2, 4)
    assert back["f4"][0].tolist() == [0.5, 6.0, -1.0, 0.0]
    assert back["e8"].astype(np.float32).tolist() == [1.0, 4.0, 0.5]
    with safeckpt.safe_open(path, framework="pt") as ours, \
            safetensors.safe_open(str(path), framework="pt") as theirs:
        for name in tensors:
            a, b = ours.get_tensor(name), theirs.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.view(torch.uint8).tolist() == b.view(torch.uint8).tolist()
        assert ours.get_slice("f4").get_shape() == theirs.get_slice("f4").get_shape() == [2, 4]
        assert ours.get_slice("f4").get_dtype() == theirs.get_slice("f4").get_dtype() == "F4"
        assert ours.get_slice("f4")[:, 2:].view(torch.uint8).tolist() == [[0x0A], [0x00]]


def test_torch_save_to_a_safetensors_name(tmp_path, backend):
    """safeckpt.torch.save of float4_e2m1fn_x2 to a .safetensors name writes F4 that safetensors
    loads as the same tensor; int4 (no safetensors name) is refused, naming it."""
    torch = pytest.importorskip("torch")
    import safetensors.torch
    import safeckpt.torch as st
    x2 = torch.tensor([[0x21, 0xF3]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "t.safetensors"
    st.save({"w": x2}, path)
    got = safetensors.torch.load_file(str(path))["w"]
    assert got.dtype == x2.dtype and got.view(torch.uint8).tolist() == [[0x21, 0xF3]]
    assert st.load(path)["w"].view(torch.uint8).tolist() == [[0x21, 0xF3]]
    int4 = torch.zeros(2, dtype=torch.uint8).view(torch.int4)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="int4.*save as .sckpt"):
        st.save({"q": int4}, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("code", NO_NAME)
def test_codes_without_a_safetensors_name_are_refused(tmp_path, code):
    """Writing .safetensors refuses int4 .. complex32, naming the tensor and .sckpt; convert of
    a .sckpt holding one too; nothing is written."""
    array = np.zeros(4, dtypes.DTYPE_BY_CODE[code])
    path = tmp_path / "x.safetensors"
    pattern = rf"tensor 'q'.*{dtypes.NAME_BY_CODE[code]}.*\.sckpt"
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=pattern):
        safeckpt.save_file({"q": array}, path)
    safeckpt.save_file({"q": array}, tmp_path / "x.sckpt")
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=pattern):
        safeckpt.convert(tmp_path / "x.sckpt", path)
    assert not path.exists()


@pytest.mark.parametrize("name,count", [("F4", 3), ("F4", 1), ("F6_E2M3", 5), ("F6_E3M2", 2),
                                        ("F6_E2M3", 1)])
def test_partial_bytes_are_refused_when_writing(tmp_path, name, count):
    """safetensors refuses a tensor that ends inside a byte (MisalignedSlice): so do we, naming
    the tensor, its bits and the way out, before anything is written [ST5]."""
    array = np.zeros(count, dtypes.DTYPE_BY_CODE[ST[name]])
    path = tmp_path / "x.safetensors"
    with pytest.raises(safeckpt.InvalidValueError, match=r"tensor 'p'.*bits.*\[ST5\].*\.sckpt"):
        safeckpt.save_file({"p": array, "ok": np.zeros(2, np.float32)}, path)
    assert not path.exists()
    safeckpt.save_file({"p": array}, tmp_path / "x.sckpt")  # .sckpt holds it [T11]
    with pytest.raises(safeckpt.InvalidValueError, match="'p'"):
        safeckpt.convert(tmp_path / "x.sckpt", path)


@pytest.mark.parametrize("name,shape,nbytes,match", [
    ("F4", (3,), 2, "12 bits"), ("F4", (4,), 4, "needs 2"), ("F6_E3M2", (2,), 2, "12 bits"),
    ("F6_E2M3", (4,), 4, "needs 3"), ("F8_E8M0", (3,), 2, "needs 3")])
def test_hostile_packed_entries_are_refused(tmp_path, backend, name, shape, nbytes, match):
    """[ST5] with bits: a byte count that is not prod(shape) x bits / 8, or a shape that ends
    inside a byte, is a LayoutError naming the tensor (safetensors refuses both too)."""
    raw = st_file({"w": {"dtype": name, "shape": list(shape), "data_offsets": [0, nbytes]}},
                  bytes(nbytes))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(safeckpt.LayoutError, match=rf"'w'.*{match}.*\[ST5\]"):
        safeckpt.open(path)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(raw)


def test_safe_open_dtype_names_cover_every_code(tmp_path, backend):
    """get_dtype() gives safetensors' name where it has one and FORMAT.md's name otherwise."""
    assert {safetensors_compat.DTYPE_NAMES[c] for c in ST.values()} == set(ST)
    arrays = {f"c{code}": np.zeros(4, dtypes.DTYPE_BY_CODE[code]) for code in NO_NAME}
    path = tmp_path / "all.sckpt"
    safeckpt.save_file(arrays, path)
    with safeckpt.safe_open(path, framework="np") as f:
        for code in NO_NAME:
            s = f.get_slice(f"c{code}")
            assert s.get_dtype() == dtypes.NAME_BY_CODE[code] and s.get_shape() == [4]
            assert f.get_tensor(f"c{code}").dtype == dtypes.DTYPE_BY_CODE[code]
    assert not set(safetensors_format.DTYPE_NAMES) & set(NO_NAME)


def test_safe_open_pt_refuses_f6_by_name(tmp_path, backend):
    """torch has no float6: framework "pt" names the tensor and framework='numpy'."""
    pytest.importorskip("torch")
    path = tmp_path / "f6.safetensors"
    safeckpt.save_file({"s": np.zeros(4, ml_dtypes.float6_e3m2fn)}, path)
    with safeckpt.safe_open(path, framework="pt") as f:
        with pytest.raises(safeckpt.UnsupportedDtypeError, match="'s'.*float6_e3m2fn.*numpy"):
            f.get_tensor("s")
        assert f.get_slice("s").get_dtype() == "F6_E3M2"


def test_convert_keeps_packed_bytes(tmp_path, backend):
    """.safetensors -> .sckpt -> .safetensors keeps F4/F6/F8_E8M0 bit for bit."""
    arrays = {"f4": np.arange(8, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn),
              "f6": np.arange(8, dtype=np.uint8).view(ml_dtypes.float6_e2m3fn),
              "f63": (np.arange(4, dtype=np.uint8) + 60).view(ml_dtypes.float6_e3m2fn),
              "e8": np.arange(5, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)}
    first = tmp_path / "a.safetensors"
    safeckpt.save_file(arrays, first)
    safeckpt.convert(first, tmp_path / "b.sckpt")
    safeckpt.convert(tmp_path / "b.sckpt", tmp_path / "c.safetensors")
    assert their_view(first.read_bytes()) == their_view((tmp_path / "c.safetensors").read_bytes())
    back = safeckpt.load_file(tmp_path / "b.sckpt")
    assert all(back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes()
               for k, v in arrays.items())
