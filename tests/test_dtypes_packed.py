"""Every ml_dtypes dtype in a .sckpt file (codes 19-34, version 1.5) and sub-byte packing
(FORMAT.md section 4: bits per code, LSB-first bit stream, [T4]/[T5] with bits, [T11])."""

import math

import ml_dtypes
import numpy as np
import pytest
from forge import forge, table_of, u64s
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import _backend, dtypes, packing
from safeckpt.dtypes import BITS_BY_CODE, DTYPE_BY_CODE, NAME_BY_CODE, PACKED_CODES
from safeckpt.errors import Code

NEW_CODES = range(19, 35)
ALL_CODES = range(len(NAME_BY_CODE))
PACKED = sorted(PACKED_CODES)


def spec_pack(values, bits):
    """The packed bytes of ``values`` (ints below 2**bits), bit by bit as FORMAT.md section 4
    says: element k at stream bits [k*bits, (k+1)*bits), stream bit j = bit j%8 of byte j//8."""
    out = bytearray(-(-len(values) * bits // 8))
    for k, value in enumerate(values):
        for b in range(bits):
            if value >> b & 1:
                j = k * bits + b
                out[j // 8] |= 1 << (j % 8)
    return bytes(out)


def same_bytes(a, b):
    """Equal dtype, shape and bytes (NaN payloads and -0.0 included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).view(np.uint8).tobytes() == \
        np.ascontiguousarray(b).view(np.uint8).tobytes()


def packed_file(code, shape, data, *, minor=5, checksum=True):
    """A hand-made file holding one tensor 'w' of ``code`` and ``shape`` whose bytes are ``data``
    (FORMAT.md alone: forge lays out uint8 bytes, the header then says what they are)."""
    def edit(header):
        header.update(dtypes=bytes([code]), shape=u64s(shape))
    # uint8 bytes of the tensor's rank, so that the header keeps its length when edited
    raw = np.frombuffer(data, np.uint8).reshape((1,) * (len(shape) - 1) + (-1,) if shape else ())
    return forge({"w": raw}, minor=minor, checksum=checksum, edit=edit)


# -- the table ------------------------------------------------------------------------------------

def test_bits_and_packed_codes_follow_format_md():
    """Section 4: 8 x item size bits for the byte types, 6/4/2/1 for codes 24-32 (packed)."""
    assert len(BITS_BY_CODE) == len(NAME_BY_CODE) == len(dtypes.ITEMSIZE_BY_CODE) == 35
    assert PACKED_CODES == frozenset(range(24, 33))
    assert [BITS_BY_CODE[c] for c in PACKED] == [6, 6, 4, 4, 4, 2, 2, 1, 1]
    for code in ALL_CODES:
        dt = DTYPE_BY_CODE[code]
        assert dt == np.dtype(getattr(ml_dtypes, NAME_BY_CODE[code], NAME_BY_CODE[code]))
        assert dt.itemsize == dtypes.ITEMSIZE_BY_CODE[code]
        if code not in PACKED_CODES:
            assert BITS_BY_CODE[code] == 8 * dt.itemsize
        assert dtypes.MINOR_BY_CODE[code] == (5 if code >= 19 else 3 if code >= 17 else 0)


@pytest.mark.parametrize("code, count, expected", [(10, 3, 12), (27, 3, 2), (27, 4, 2), (24, 5, 4),
                                                   (24, 4, 3), (31, 9, 2), (29, 0, 0), (32, 1, 1)])
def test_nbytes_of_is_ceil_count_bits_over_8(code, count, expected):
    assert dtypes.nbytes_of(code, count) == expected


# -- packing against the spec ---------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(code=st.sampled_from(PACKED), data=st.data())
def test_pack_matches_the_spec_bit_by_bit(code, data):
    bits = BITS_BY_CODE[code]
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=40))
    array = np.array(values, np.uint8).view(DTYPE_BY_CODE[code])
    packed = packing.pack(array, code)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.tobytes() == spec_pack(values, bits)
    same_bytes(packing.unpack(packed.tobytes(), code, (len(values),), "w"), array)


def test_format_md_examples():
    """The worked examples of section 4."""
    assert packing.pack(np.array([1, -2, 7], ml_dtypes.int4), 27).tobytes() == b"\xe1\x07"
    assert packing.pack(np.array([1, 0, 1], ml_dtypes.uint1), 32).tobytes() == b"\x05"
    f6 = np.array([1, 2, 3, 63, 5], np.uint8).view(ml_dtypes.float6_e2m3fn)
    assert packing.pack(f6, 24).tobytes() == bytes([0x81, 0x30, 0xFC, 0x05])


@pytest.mark.parametrize("code", PACKED, ids=lambda c: NAME_BY_CODE[c])
def test_non_canonical_bytes_keep_their_value(code):
    """numpy may hold bytes with bits above ``bits`` set (ml_dtypes' int4 negation sign-extends;
    float6 0x40 reads as -0.0): packing keeps the value ml_dtypes gives each of the 256 bytes."""
    every = np.arange(256, dtype=np.uint8).view(DTYPE_BY_CODE[code])
    back = packing.unpack(packing.pack(every, code), code, every.shape, "w")
    assert not (back.view(np.uint8) >> BITS_BY_CODE[code]).any()  # canonical bytes
    assert every.astype(np.float32).view(np.uint32).tolist() == \
        back.astype(np.float32).view(np.uint32).tolist()


def test_negated_int4_round_trips(backend):
    x = -np.array([7, 1, -8, 0, 3], ml_dtypes.int4)
    assert x.view(np.uint8)[0] == 0xF9  # what ml_dtypes holds: not the canonical 0x09
    back = safeckpt.load_bytes(safeckpt.save_bytes({"x": x}))["x"]
    assert back.tolist() == x.tolist() and back.dtype == x.dtype


# -- round trips of every code, both backends -----------------------------------------------------

SHAPES = st.sampled_from([(), (0,), (1,), (3,), (5,), (7,), (9,), (2, 3), (3, 0, 2), (4, 5),
                          (1, 1, 11)])


@st.composite
def arrays(draw, codes=ALL_CODES):
    """An array of any code and shape, with random bytes (canonical ones for packed codes)."""
    code = draw(st.sampled_from(codes))
    shape = draw(SHAPES)
    dt = DTYPE_BY_CODE[code]
    count = math.prod(shape) * dt.itemsize
    raw = np.frombuffer(draw(st.binary(min_size=count, max_size=count)), np.uint8)
    if code in PACKED_CODES:
        raw = raw & ((1 << BITS_BY_CODE[code]) - 1)
    elif code == 0:
        raw = raw & 1
    return raw.view(dt).reshape(shape).copy()


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # backend: set once, unchanged
@given(tensors=st.lists(arrays(), min_size=1, max_size=4), checksum=st.booleans())
def test_every_code_round_trips_bit_exact_in_bytes(backend, tensors, checksum):
    named = {f"t{i}": a for i, a in enumerate(tensors)}
    data = safeckpt.save_bytes(named, checksum=checksum)
    back = safeckpt.load_bytes(data)
    for name, array in named.items():
        same_bytes(back[name], array)
    with safeckpt.Reader(data) as f:
        for name, array in named.items():
            code = dtypes.code_of(array.dtype)
            info = f.info(name)
            assert info.dtype == array.dtype and info.shape == array.shape
            assert info.nbytes == dtypes.nbytes_of(code, array.size)
            assert bytes(f.raw_bytes(name)) == packing.pack(array, code).tobytes()
        if checksum:
            f.verify()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(arrays(), min_size=1, max_size=5))
def test_every_code_round_trips_in_files_mapped_or_read(backend, tmp_path, tensors):
    named = {f"t{i}": a for i, a in enumerate(tensors)}
    path = tmp_path / "m.sckpt"
    safeckpt.save_file(named, path)
    for mmap in (True, False):
        with safeckpt.open(path, mmap=mmap) as f:
            loaded = f.load_all()
            for name, array in named.items():
                same_bytes(loaded[name], array)
                if array.ndim:
                    same_bytes(f.get_slice(name)[1:], array[1:])
            f.verify()
            f.verify(arrays=loaded)


@pytest.mark.parametrize("code", NEW_CODES, ids=lambda c: NAME_BY_CODE[c])
def test_each_new_code_round_trips_with_version_1_5(backend, code):
    """The writer says 1.5 only when a code of 1.5 is present (section 5)."""
    dt = DTYPE_BY_CODE[code]
    if dt.itemsize == 1:  # every canonical byte, or 7 of them
        x = (np.arange(max(7, 1 << min(BITS_BY_CODE[code], 7))) % (1 << BITS_BY_CODE[code])
             ).astype(np.uint8).view(dt)
    else:  # complex32, bcomplex32: two halves
        x = np.frombuffer(bytes(range(28)), dt)
    data = safeckpt.save_bytes({"x": x, "y": np.ones(2, np.float32)})
    assert int.from_bytes(data[10:12], "little") == 5
    with safeckpt.Reader(data) as f:
        assert f.version == (1, 5)
        same_bytes(f["x"], x)
    assert int.from_bytes(safeckpt.save_bytes({"y": np.ones(2, np.float32)})[10:12], "little") == 0
    fnuz = np.zeros(2, ml_dtypes.float8_e5m2fnuz)
    assert int.from_bytes(safeckpt.save_bytes({"y": fnuz})[10:12], "little") == 3


@pytest.mark.parametrize("code", PACKED, ids=lambda c: NAME_BY_CODE[c])
def test_a_packed_scalar_node_round_trips(backend, tmp_path, code):
    """[R5]: a scalar of a packed code is one byte in the tree, and makes the file 1.5."""
    value = np.array([1], np.uint8).view(DTYPE_BY_CODE[code])[0]
    path = tmp_path / "s.sckpt"
    safeckpt.save({"w": np.ones(2, np.float32), "s": value, "step": 3}, path)
    assert int.from_bytes(path.read_bytes()[10:12], "little") == 5
    back = safeckpt.load(path)["s"]
    assert back.dtype == value.dtype and back.tobytes() == value.tobytes()


# -- hand-made files: the rules --------------------------------------------------------------------

def test_a_hand_made_int4_file_loads(backend):
    """Section 4's example: [1, -2, 7] is E1 07."""
    data = packed_file(27, (3,), b"\xe1\x07")
    out = safeckpt.load_bytes(data)["w"]
    assert out.dtype == np.dtype(ml_dtypes.int4) and out.tolist() == [1, -2, 7]


@pytest.mark.parametrize("code, shape, size", [(27, (3,), 2), (24, (5,), 4), (31, (9,), 2),
                                               (25, (2, 2), 3), (29, (1, 1, 1), 1)])
@pytest.mark.parametrize("delta", [-1, 1])
def test_T5_packed_nbytes_off_by_one(backend, code, shape, size, delta):
    data = packed_file(code, shape, bytes(size + delta))
    with pytest.raises(safeckpt.LayoutError, match=r"'w'.*\[T5\]"):
        safeckpt.load_bytes(data)


@pytest.mark.parametrize("code, shape, data", [
    (27, (3,), b"\xe1\x17"),  # int4: the high nibble of the last byte
    (31, (9,), b"\xff\x03"),  # int1: bit 1 of byte 1
    (24, (5,), b"\x81\x30\xfc\x45"),  # float6: bit 6 of byte 3
    (29, (), b"\x80"),  # int2 0-d: bit 7
])
@pytest.mark.parametrize("how", ["bytes", "mmap", "pread", "unverified", "slice"])
def test_T11_a_set_padding_bit_is_refused_naming_the_tensor(backend, tmp_path, code, shape, data,
                                                            how):
    raw = packed_file(code, shape, data)
    path = tmp_path / "p.sckpt"
    path.write_bytes(raw)
    with pytest.raises(safeckpt.LayoutError, match=r"'w'.*high bits.*\[T11\]"):
        if how == "bytes":
            safeckpt.load_bytes(raw)
        elif how == "unverified":
            safeckpt.load_file(path, verify=False)
        elif how == "slice":
            with safeckpt.open(path, mmap=False) as f:
                f.get_slice("w")[...]
        else:
            with safeckpt.open(path, mmap=how == "mmap") as f:
                f["w"]


@pytest.mark.parametrize("mmap", [True, False])
def test_T10_a_packed_tensor_is_checked_when_copied(backend, tmp_path, mmap):
    """A packed tensor is always copied (unpacked): by default its CRC32C is checked, mapped too."""
    raw = bytearray(packed_file(27, (3,), b"\xe1\x07"))
    offset = table_of(bytes(raw))["w"][0]
    raw[offset] ^= 0x01
    path = tmp_path / "c.sckpt"
    path.write_bytes(raw)
    with safeckpt.open(path, mmap=mmap) as f:
        with pytest.raises(safeckpt.ChecksumError, match="'w'"):
            f["w"]
        assert f.load_indices([0], verify=False)[0].tolist() == [0, -2, 7]


def test_T1_a_file_stating_minor_4_holding_code_19_is_read(backend):
    """[T1]: a reader reads every code it knows, whatever minor version the file states."""
    x = np.array([0, 1, 0x7F, 0x80], np.uint8)
    data = packed_file(19, (4,), x.tobytes(), minor=4)
    with safeckpt.Reader(data) as f:
        assert f.version == (1, 4)
        same_bytes(f["w"], x.view(ml_dtypes.float8_e4m3b11fnuz))


def test_T1_code_35_is_refused_naming_the_tensor(backend):
    data = packed_file(35, (1,), b"\x00")
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"'w'.*code 35"):
        safeckpt.load_bytes(data)


def _columns(tensors, file_size=None, header_end=100, align=64):
    """validate_table's arguments for ``tensors`` = [(code, shape, nbytes)]: offsets laid out,
    the file as long as they say unless ``file_size``."""
    offsets, end = [], header_end
    for _, _, size in tensors:
        offsets.append(-(-end // align) * align)
        end = offsets[-1] + size
    return (len(tensors), bytes(c for c, _, _ in tensors), bytes(len(s) for _, s, _ in tensors),
            u64s(d for _, s, _ in tensors for d in s), u64s(offsets),
            u64s(size for _, _, size in tensors), header_end, align, file_size or end, 32)


def test_T4_T5_with_bits_in_both_backends(backend):
    """[T4]: the element count (one byte each once unpacked) is below 2**63 even where the packed
    length would be; [T5]: nbytes is ceil(count * bits / 8), exact far beyond 2**53."""
    validate = _backend.backend.validate_table
    assert validate(*_columns([(32, (2**62, 3), 3 * 2**59)], 4096))[0] == Code.TOO_LARGE
    # the largest count: 2**63 - 1 bits are 2**60 bytes, which pass [T4] and [T5]
    assert validate(*_columns([(32, (2**63 - 1,), 2**60)], 4096))[0] == Code.TENSOR_TRUNCATED
    assert validate(*_columns([(32, (2**63 - 1,), 2**60 - 1)], 4096))[0] == Code.NBYTES
    count = 2**62 + 1  # uint1: 2**59 + 1 bytes; the file is not that long
    assert validate(*_columns([(32, (count,), 2**59 + 1)], 4096))[0] == Code.TENSOR_TRUNCATED
    assert validate(*_columns([(32, (count,), 2**59)], 4096))[0] == Code.NBYTES
    assert validate(*_columns([(24, (2**60 + 3,), 3 * 2**58 + 3)], 4096))[0] == \
        Code.TENSOR_TRUNCATED
    assert validate(*_columns([(24, (2**60 + 3,), 3 * 2**58 + 2)], 4096))[0] == Code.NBYTES
    # a table of many tensors goes through the numpy screen of the pure-Python backend
    many = [(27, (5,), 3)] * 20 + [(24, (7,), 6), (26, (2, 3), 3)]
    assert validate(*_columns(many)) == (Code.OK, 0)
    bad = many[:21] + [(24, (7,), 5)] + many[22:]
    assert tuple(map(int, validate(*_columns(bad)))) == (Code.NBYTES, 21)


# -- an ml_dtypes without a type --------------------------------------------------------------------

@pytest.fixture
def ml_dtypes_without_int2(monkeypatch):
    """As with an ml_dtypes older than 0.7, which lacks int2."""
    monkeypatch.delattr(ml_dtypes, "int2")
    dtypes._resolve()
    yield
    monkeypatch.undo()
    dtypes._resolve()


def test_a_code_the_installed_ml_dtypes_lacks_is_refused_naming_the_tensor(
        backend, ml_dtypes_without_int2):
    # made by hand: with int2 gone no array of it can be saved (the bytes: 1, -1 = 3 as int2)
    data = packed_file(29, (2,), b"\x0d")
    with safeckpt.Reader(data) as f:
        for get in (lambda: f["w"], lambda: f.info("w"), lambda: f.get_slice("w")):
            with pytest.raises(safeckpt.UnsupportedDtypeError,
                               match=r"'w'.*code 29 \(int2\).*ml_dtypes>=0\.7"):
                get()
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"'w'.*ml_dtypes>=0\.7"):
        safeckpt.load_bytes(data)
    assert safeckpt.load_bytes(safeckpt.save_bytes({"f": np.ones(2, ml_dtypes.int4)}))["f"].tolist() \
        == [1, 1]  # the other codes still work


# -- remote objects, shards ---------------------------------------------------------------------------

def test_packed_tensors_read_from_a_remote_object(backend):
    """Ranged reads (FORMAT.md section 12) of packed tensors: unpacked after their CRC32C [RS4],
    [T11] checked; a slice reads the whole packed tensor."""
    fsspec = pytest.importorskip("fsspec")
    import uuid
    fs, root = fsspec.filesystem("memory"), f"/packed-{uuid.uuid4().hex}"
    x = {"a": np.array([1, -2, 7, 0, 3], ml_dtypes.int4), "f": np.arange(5, dtype=np.float32),
         "b": np.array([1, 0, 1, 1, 0, 0, 1, 1, 1], ml_dtypes.uint1),
         "c": np.array([3, 63, 1], np.uint8).view(ml_dtypes.float6_e3m2fn)}
    try:
        fs.pipe_file(f"{root}/m.sckpt", safeckpt.save_bytes(x))
        with safeckpt.open(f"memory://{root}/m.sckpt") as f:
            for name, array in x.items():
                same_bytes(f[name], array)
            same_bytes(f.get_slice("a")[1:4], x["a"][1:4])
            same_bytes(f.load_all()["c"], x["c"])
        fs.pipe_file(f"{root}/p.sckpt", packed_file(27, (3,), b"\xe1\x17"))
        with pytest.raises(safeckpt.LayoutError, match=r"'w'.*\[T11\]"):
            safeckpt.load_file(f"memory://{root}/p.sckpt")
    finally:
        fs.rm(root, recursive=True)


def test_shards_are_sized_by_packed_bytes(backend, tmp_path):
    """A shard limit counts what the file holds: 8000 uint1 elements are 1000 bytes, not 8000."""
    x = {f"t{i}": np.ones(8000, ml_dtypes.uint1) for i in range(4)}
    safeckpt.save_file(x, tmp_path / "m.sckpt", max_shard_size=2500)
    assert len(list(tmp_path.glob("m-*-of-00002.sckpt"))) == 2
    with safeckpt.open(tmp_path / "m.sckpt") as f:
        for name, array in x.items():
            same_bytes(f[name], array)
        f.verify()
