"""Property: what is saved is what comes back, bit for bit (NaN payloads and -0.0 included)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt.dtypes import BITS_BY_CODE, CODE_BY_DTYPE, DTYPE_BY_CODE, PACKED_CODES

pytestmark = pytest.mark.usefixtures("backend")

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=8).map(tuple).filter(
    lambda s: int(np.prod(s)) <= 2000)


@st.composite
def arrays(draw):
    """Any storable dtype and shape, filled with random bytes (so every bit pattern occurs)."""
    dtype = draw(st.sampled_from(DTYPE_BY_CODE))
    shape = draw(shapes)
    count = int(np.prod(shape)) * dtype.itemsize
    raw = draw(st.binary(min_size=count, max_size=count))
    code = CODE_BY_DTYPE[dtype]
    if code in PACKED_CODES:  # canonical bytes only: packing keeps the value (test_dtypes_packed)
        raw = bytes(np.frombuffer(raw, np.uint8) & ((1 << BITS_BY_CODE[code]) - 1))
    array = np.frombuffer(raw, np.uint8).view(dtype).reshape(shape).copy()
    layout = draw(st.sampled_from(["c", "fortran", "big-endian"]))
    if layout == "fortran" and array.ndim > 1:
        array = np.asfortranarray(array)
    elif layout == "big-endian" and dtype.itemsize > 1 and dtype.kind in "iufc":
        array = array.astype(dtype.newbyteorder(">"))
    return array


names = st.text(min_size=1, max_size=20)
primitives = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
              | st.floats(allow_nan=True, width=64) | st.text(max_size=10) | st.binary(max_size=10))
metadata_values = st.recursive(
    primitives,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def same_bits(a, b):
    """Equal dtype (up to byte order), shape and little-endian bytes."""
    a_le = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a)
    assert b.dtype == a_le.dtype and b.shape == a.shape
    assert a_le.tobytes() == np.ascontiguousarray(b).tobytes()


def same_metadata(a, b):
    """Equal msgpack values, comparing floats by their bits (NaN, -0.0)."""
    if isinstance(a, float):
        assert isinstance(b, float) and np.float64(a).tobytes() == np.float64(b).tobytes()
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            same_metadata(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            same_metadata(a[key], b[key])
    else:
        assert type(a) is type(b) and a == b


@settings(max_examples=60)
@given(tensors=st.dictionaries(names, arrays(), max_size=6),
       metadata=st.dictionaries(st.text(max_size=8), metadata_values, max_size=4),
       align=st.sampled_from([8, 64, 4096]), checksum=st.booleans())
def test_save_bytes_load_bytes(tensors, metadata, align, checksum):
    data = safeckpt.save_bytes(tensors, metadata=metadata, align=align, checksum=checksum)
    loaded = safeckpt.load_bytes(data, verify=checksum)
    assert list(loaded) == list(tensors)
    for name, value in tensors.items():
        same_bits(value, loaded[name])
    with safeckpt.Reader(data) as reader:
        same_metadata(metadata, reader.metadata)


@settings(max_examples=25)
@given(tensors=st.dictionaries(names, arrays(), min_size=1, max_size=5), mmap=st.booleans())
def test_save_file_load_file(tmp_path_factory, tensors, mmap):
    path = tmp_path_factory.mktemp("rt") / "x.sckpt"
    safeckpt.save_file(tensors, path)
    loaded = safeckpt.load_file(path, mmap=mmap, verify=True)
    for name, value in tensors.items():
        same_bits(value, loaded[name])


def test_nan_payloads_and_negative_zero():
    payloads = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000], np.uint32).view(np.float32)
    halves = np.array([0x7E01, 0xFC01, 0x8000], np.uint16).view(np.float16)
    data = safeckpt.save_bytes({"f": payloads, "h": halves}, metadata={"z": -0.0, "n": float("nan")})
    loaded = safeckpt.load_bytes(data, verify=True)
    assert loaded["f"].view(np.uint32).tolist() == payloads.view(np.uint32).tolist()
    assert loaded["h"].view(np.uint16).tolist() == halves.view(np.uint16).tolist()
