"""Tests of the backends (``_pybackend`` always, ``_native`` when built): same names, same codes.

Every check of docs/FORMAT.md that a backend makes has a hand-made case here, named after its
rule; each case runs on every backend, and the cases that compare backends assert that they
return the same ``(code, index)``.
"""

import errno
import gc
import os
import struct
import timeit
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ml_dtypes
from safeckpt import _pybackend, dtypes
from safeckpt._pycrc32c import _raw_small
from safeckpt.dtypes import ITEMSIZE_BY_CODE, nbytes_of
from safeckpt.errors import ERRORS, Code, LayoutError, SafeckptError, TruncatedFileError
from safeckpt.format import MAGIC, MAGIC_TEXT_MANGLED, PREFIX_STRUCT

try:
    from safeckpt import _native
except ImportError:  # the C core is not built: only the Python backend is tested
    _native = None

BACKENDS = [pytest.param(_pybackend, id="python")]
BACKENDS.append(pytest.param(_native, id="c") if _native is not None else pytest.param(
    None, id="c", marks=pytest.mark.skip(reason="safeckpt._native is not built")))
ALL = [_pybackend] + ([_native] if _native is not None else [])

BIG = 1 << 63  # [T3]/[T4] limit
U64 = (1 << 64) - 1
F32, I8, U8 = 10, 1, 5  # dtype codes used below


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def reference_crc32c(data, value=0):
    """The one-byte-at-a-time table CRC32C: the reference both backends are checked against."""
    return _raw_small(bytes(data), value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# CRC32C


@pytest.mark.parametrize("data, expected", [
    (b"", 0),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),  # RFC 3720 (iSCSI) B.4 vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(backend, data, expected):
    assert backend.crc32c(data) == expected


@pytest.mark.parametrize("size", [0, 1, 7, 63, 1023, 1024, 1025, 4097, 65536 + 5, 300_001,
                                  (1 << 20) + 3])
@pytest.mark.parametrize("start", [0, 1, 6])
def test_crc32c_lengths_and_offsets(backend, size, start):
    raw = np.random.default_rng(size).integers(0, 256, size + start, dtype=np.uint8).tobytes()
    data = raw[start:]
    expected = reference_crc32c(data)
    assert backend.crc32c(data) == expected
    assert backend.crc32c(memoryview(raw)[start:]) == expected
    assert backend.crc32c(np.frombuffer(raw, np.uint8)[start:]) == expected
    assert backend.crc32c(bytearray(data)) == expected


@pytest.mark.parametrize("split", [0, 1, 100, 5000, 70_000, 200_000])
def test_crc32c_continuation(backend, split):
    data = np.random.default_rng(split).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    whole = backend.crc32c(data)
    assert backend.crc32c(data[split:], backend.crc32c(data[:split])) == whole
    assert backend.crc32c(data[split:], reference_crc32c(data[:split])) == whole


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint16", "int32", "float32", "float64",
                                   "complex128", ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (1001,), (257, 129)])
def test_crc32c_numpy_dtypes(backend, dtype, shape):
    values = np.random.default_rng(1).standard_normal(shape) * 10
    array = np.ascontiguousarray(values.astype(dtype))
    assert backend.crc32c(array) == reference_crc32c(array.tobytes())


def test_crc32c_rejects_non_contiguous():
    with pytest.raises((ValueError, BufferError)):
        _pybackend.crc32c(np.zeros((4, 4), np.float32)[:, ::2])


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=3000), value=st.integers(0, 2**32 - 1))
def test_crc32c_property_matches_reference(data, value):
    expected = reference_crc32c(data, value)
    for backend in ALL:
        assert backend.crc32c(data, value) == expected


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1000, 600_000), seed=st.integers(0, 2**32 - 1), cut=st.floats(0, 1))
def test_crc32c_property_large_matches_reference(size, seed, cut):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    split = int(size * cut)
    expected = reference_crc32c(data.tobytes())
    for backend in ALL:
        assert backend.crc32c(data) == expected
        assert backend.crc32c(data[split:], backend.crc32c(data[:split])) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(0, 5000))
def test_crc32c_ranges_property_matches_reference(data, size):
    """[T10] verify's one-call checksum of many ranges, both backends: each range's CRC32C."""
    buffer = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    ranges = data.draw(st.lists(st.integers(0, size).flatmap(
        lambda start: st.tuples(st.just(start), st.integers(0, size - start))), max_size=20))
    offsets = np.array([r[0] for r in ranges], np.uint64)
    lengths = np.array([r[1] for r in ranges], np.uint64)
    expected = [reference_crc32c(buffer[o:o + n].tobytes()) for o, n in ranges]
    for backend in ALL:
        assert backend.crc32c_ranges(buffer, offsets, lengths).tolist() == expected


def test_crc32c_ranges_large_ones_split_across_threads():
    """Ranges past 16 MiB in all are cut into 8 MiB pieces checked by several threads and
    joined; the result is the plain CRC32C of each range."""
    buffer = np.random.default_rng(5).integers(0, 256, 40 << 20, dtype=np.uint8)
    offsets = np.array([0, 3, (8 << 20) + 1, 17 << 20, 40 << 20], np.uint64)
    lengths = np.array([0, 8 << 20, 9 << 20, (23 << 20) - 5, 0], np.uint64)
    expected = [_pybackend.crc32c(buffer[int(o):int(o + n)]) for o, n in zip(offsets, lengths)]
    for backend in ALL:
        assert backend.crc32c_ranges(buffer, offsets, lengths).tolist() == expected


@pytest.mark.parametrize("offset, length", [(101, 0), (100, 1), (0, 101), (2**64 - 1, 2)])
def test_crc32c_ranges_refuse_a_range_outside_the_buffer(backend, offset, length):
    from safeckpt import _backend
    with pytest.raises(ValueError, match="range 1 .*not inside the 100-byte buffer"):
        _backend.backend.crc32c_ranges(bytes(100), np.array([0, offset], np.uint64),
                                       np.array([5, length], np.uint64))


# ---------------------------------------------------------------------------------------------
# bytes_equal: exact comparison for incremental checkpoints [X7]


def flip_bit(data, position, bit):
    """A copy of the uint8 array ``data`` with one bit of one byte flipped."""
    other = data.copy()
    other[position] ^= np.uint8(1 << bit)
    return other


@pytest.mark.parametrize("a, b, expected", [
    (b"", b"", True),
    (b"", bytearray(), True),
    (b"a", b"a", True),
    (b"a", b"b", False),
    (b"abc", b"abcd", False),  # different lengths, equal prefix
    (b"abcd", b"abc", False),
    (bytes(16), np.zeros(4, np.float32), True),  # bytes compared, whatever the type
    (np.zeros((3, 5), np.int16), np.zeros(15, np.uint16), True),
    (np.zeros(4, np.float32), np.zeros(4, np.float64), False),  # 16 bytes against 32
    (np.array([0.0], np.float32), np.array([-0.0], np.float32), False),  # == says equal
    (np.array([np.nan], np.float64), np.array([np.nan], np.float64), True),  # == says unequal
    (memoryview(bytes(range(40)))[3:], bytes(range(3, 40)), True),  # unaligned
    (memoryview(bytes(range(40)))[3:], bytes(range(3, 39)) + b"\x00", False),
])
def test_bytes_equal_cases(backend, a, b, expected):
    assert backend.bytes_equal(a, b) is expected
    assert backend.bytes_equal(b, a) is expected


def test_bytes_equal_same_and_overlapping_buffers(backend):
    data = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)
    assert backend.bytes_equal(data, data)
    assert backend.bytes_equal(data[:1000], data[:1000].copy())
    assert not backend.bytes_equal(data[:1000], data[1:1001])


def test_bytes_equal_rejects_non_contiguous(backend):
    with pytest.raises((ValueError, BufferError)):
        backend.bytes_equal(np.zeros((4, 4), np.float32)[:, ::2], bytes(32))
    with pytest.raises((ValueError, BufferError)):
        backend.bytes_equal(bytes(32), np.zeros((4, 4), np.float32)[:, ::2])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.one_of(st.integers(0, 100), st.integers(0, 3 << 20)),
       seed=st.integers(0, 2**32 - 1), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7), start=st.integers(0, 7), extra=st.integers(1, 9))
def test_bytes_equal_property(size, seed, where, bit, start, extra):
    """Equal bytes compare equal; one bit flipped anywhere, or a length changed, do not; the
    start of the buffers (alignment) plays no part. Both backends, past several 1 MiB chunks."""
    raw = np.random.default_rng(seed).integers(0, 256, size + start, dtype=np.uint8)
    data = raw[start:]
    copy = data.copy()
    longer = np.concatenate([data, np.zeros(extra, np.uint8)])
    for backend in ALL:
        assert backend.bytes_equal(data, copy)
        assert not backend.bytes_equal(data, longer)
        assert not backend.bytes_equal(longer[:size - 1] if size else longer, data)
        if size:
            flipped = flip_bit(copy, int(where * size), bit)
            assert not backend.bytes_equal(data, flipped)
            assert not backend.bytes_equal(flipped, data)


def test_bytes_equal_large_split_across_threads():
    """From 16 MiB the C core compares 8 MiB pieces on several threads: a bit flipped in any
    piece, at a piece's edges, or in the last byte is found; equal buffers compare equal."""
    size = (40 << 20) + 5
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    copy = data.copy()
    piece = 8 << 20
    positions = [0, 1, piece - 1, piece, 3 * piece + 17, 5 * piece - 1, 5 * piece, size - 1]
    for backend in ALL:
        assert backend.bytes_equal(data, copy)
        for position in positions:
            copy[position] ^= 0x80
            assert not backend.bytes_equal(data, copy), (backend.NAME, position)
            copy[position] ^= 0x80
        assert not backend.bytes_equal(data, copy[:-1])


def test_bytes_equal_follows_the_backend_in_force():
    from safeckpt import _backend
    previous = _backend.NAME
    try:
        for module in ALL:
            _backend.use(module.NAME)
            assert _backend.backend is module
            assert _backend.bytes_equal(np.zeros(3, np.int32), bytes(12)) is True
            assert _backend.bytes_equal(np.zeros(3, np.int32), bytes(11) + b"\x01") is False
    finally:
        _backend.use(previous)


# ---------------------------------------------------------------------------------------------
# copy_into / copy_many: the snapshot of an async save


@pytest.mark.parametrize("make", [
    lambda: (bytearray(), b""),
    lambda: (bytearray(1), b"\x07"),
    lambda: (np.zeros(4, np.float32), np.arange(4, dtype=np.float32)),
    lambda: (np.zeros(4, np.float32), bytes(range(16))),  # bytes copied, whatever the types
    lambda: (np.zeros((3, 5), np.int16), np.arange(15, dtype=np.uint16)),
    lambda: (np.zeros(2, ml_dtypes.bfloat16), np.array([1.5, -2], ml_dtypes.bfloat16)),
    lambda: (memoryview(bytearray(40))[3:], memoryview(bytes(range(40)))[1:38]),  # unaligned
])
def test_copy_into_cases(backend, make):
    dst, src = make()
    raw = lambda x: x.tobytes() if isinstance(x, np.ndarray) else bytes(x)  # noqa: E731
    backend.copy_into(dst, src)
    assert raw(dst) == raw(src)


def test_copy_into_refuses_and_copies_nothing(backend):
    dst = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="destination 0 has 8 bytes, its source 7"):
        backend.copy_into(dst, bytes(range(1, 8)))
    with pytest.raises((ValueError, BufferError)):
        backend.copy_into(bytearray(32), np.ones((4, 4), np.float32)[:, ::2])  # not contiguous
    with pytest.raises((ValueError, BufferError)):
        backend.copy_into(np.ones((4, 4), np.float32)[:, ::2], bytes(32))
    with pytest.raises((ValueError, BufferError)):
        backend.copy_into(bytes(8), dst)  # read-only destination
    frozen = np.zeros(8, np.uint8)
    frozen.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        backend.copy_into(frozen, np.ones(8, np.uint8))
    assert not dst.any() and not frozen.any()


def test_copy_into_overlap_refused_and_self_copy_left_alone(backend):
    """memcpy of overlapping ranges is undefined: refused, naming the pair; ranges that touch
    are copied; a buffer copied onto itself is left as it is."""
    data = np.arange(100, dtype=np.uint8)
    for dst, src in [(data[10:60], data[:50]), (data[:50], data[49:99]), (data[1:], data[:-1])]:
        with pytest.raises(ValueError, match="destination 0 .*overlaps its source"):
            backend.copy_into(dst, src)
    assert np.array_equal(data, np.arange(100, dtype=np.uint8))
    backend.copy_into(data, data)
    backend.copy_into(data[:50], data[:50].view(np.int16))  # the same bytes, another view
    assert np.array_equal(data, np.arange(100, dtype=np.uint8))
    backend.copy_into(data[50:], data[:50])
    assert np.array_equal(data[50:], np.arange(50, dtype=np.uint8))


def test_copy_many_checks_every_pair_before_copying(backend):
    a, b, c = np.zeros(4, np.uint8), np.zeros(4, np.uint8), np.zeros(6, np.uint8)
    with pytest.raises(ValueError, match="2 destinations, 3 sources"):
        backend.copy_many([a, b], [b"1234", b"5678", b"9"])
    with pytest.raises(ValueError, match="destination 2 has 6 bytes, its source 5"):
        backend.copy_many([a, b, c], [b"1234", b"5678", b"12345"])
    with pytest.raises(ValueError, match="destination 1 .*overlaps its source"):
        backend.copy_many([a, c[1:5]], [b"1234", c[:4]])
    assert not a.any() and not b.any() and not c.any()
    backend.copy_many([], [])
    backend.copy_many([a, bytearray(0), c], [b"1234", b"", bytes(range(6))])
    assert a.tobytes() == b"1234" and c.tobytes() == bytes(range(6))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.one_of(st.integers(0, 100), st.integers(0, 3 << 20)), max_size=6),
       seed=st.integers(0, 2**32 - 1), starts=st.lists(st.integers(0, 7), min_size=12,
                                                       max_size=12))
def test_copy_many_property(sizes, seed, starts):
    """Any lengths, at any start (alignment), one pair or many: both backends copy the exact
    bytes and touch nothing around them."""
    rng = np.random.default_rng(seed)
    for backend in ALL:
        srcs, dsts, frames = [], [], []
        for k, size in enumerate(sizes):
            src = rng.integers(0, 256, size + starts[k], dtype=np.uint8)[starts[k]:]
            frame = np.full(size + 16, 0xA5, np.uint8)
            frames.append(frame)
            srcs.append(src)
            dsts.append(frame[starts[k + 6]:starts[k + 6] + size])
        backend.copy_many(dsts, srcs)
        for src, dst, frame, k in zip(srcs, dsts, frames, range(len(sizes))):
            assert np.array_equal(dst, src)
            outside = np.concatenate([frame[:starts[k + 6]], frame[starts[k + 6] + len(src):]])
            assert (outside == 0xA5).all()
        if sizes:
            single = np.zeros(sizes[0], np.uint8)
            backend.copy_into(single, srcs[0])
            assert np.array_equal(single, srcs[0])


def test_copy_many_large_split_across_threads():
    """From 16 MiB in all the C core copies 8 MiB pieces on several threads: every byte of
    ranges across pieces, and of small ranges beside them, lands where it belongs."""
    rng = np.random.default_rng(3)
    sizes = [(40 << 20) + 5, 1, 0, (8 << 20) + 1, 3000, 17 << 20]
    srcs = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    for backend in ALL:
        dsts = [np.zeros(size, np.uint8) for size in sizes]
        backend.copy_many(dsts, srcs)
        assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs)), backend.NAME
        one = np.zeros(sizes[0], np.uint8)
        backend.copy_into(one, srcs[0])
        assert np.array_equal(one, srcs[0]), backend.NAME


def test_copy_follows_the_backend_in_force(monkeypatch):
    from safeckpt import _backend
    previous = _backend.NAME
    try:
        for module in ALL:
            _backend.use(module.NAME)
            calls = []
            monkeypatch.setattr(module, "copy_many", lambda d, s: calls.append((d, s)))
            _backend.copy_many([bytearray(1)], [b"x"])
            assert len(calls) == 1
            monkeypatch.undo()
            dst = np.zeros(3, np.int32)
            _backend.copy_into(dst, np.arange(3, dtype=np.int32))
            _backend.copy_many([dst], [bytes(12)])
            assert dst.tolist() == [0, 0, 0]
    finally:
        _backend.use(previous)


# ---------------------------------------------------------------------------------------------
# parse_prefix [P1]-[P7]


def prefix(magic=MAGIC, major=1, minor=0, flags=0, header_len=10, align=64, header_crc=0):
    return PREFIX_STRUCT.pack(magic, major, minor, flags, header_len, align, header_crc)


def parse(backend, data, file_size=1000, max_header_size=1 << 20):
    code, fields = backend.parse_prefix(data, file_size, max_header_size)
    return int(code), fields


def test_prefix_ok(backend):
    code, fields = parse(backend, prefix(minor=7, flags=1, header_len=55, align=4096,
                                         header_crc=0xDEADBEEF))
    assert code == Code.OK
    assert tuple(fields) == (1, 7, 1, 55, 4096, 0xDEADBEEF)


def test_P1_short_prefix(backend):
    assert parse(backend, prefix()[:31], file_size=31) == (Code.TRUNCATED, None)
    assert parse(backend, prefix(), file_size=31) == (Code.TRUNCATED, None)
    assert parse(backend, b"", file_size=0) == (Code.TRUNCATED, None)


def test_P2_magic(backend):
    assert parse(backend, prefix(magic=b"PK\x03\x04\0\0\0\0")) == (Code.MAGIC, None)
    assert parse(backend, prefix(magic=MAGIC_TEXT_MANGLED + b"\x01")) == (Code.MAGIC_TEXT, None)
    assert parse(backend, prefix(magic=MAGIC[:7] + b"\x0b")) == (Code.MAGIC, None)


def test_P2_before_P3(backend):
    assert parse(backend, prefix(magic=b"\0" * 8, major=2, flags=8)) == (Code.MAGIC, None)


@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_P3_major(backend, major):
    assert parse(backend, prefix(major=major, flags=2)) == (Code.VERSION, None)


@pytest.mark.parametrize("flags", [8, 0x80000000, 0xFFFFFFFF])
def test_P4_flags(backend, flags):
    assert parse(backend, prefix(flags=flags, header_len=U64)) == (Code.FLAGS, None)


def test_P5_header_limit(backend):
    assert parse(backend, prefix(header_len=101), max_header_size=100) == (Code.HEADER_LIMIT, None)
    assert parse(backend, prefix(header_len=U64, align=3)) == (Code.HEADER_LIMIT, None)
    assert parse(backend, prefix(header_len=100), file_size=132, max_header_size=100)[0] == Code.OK


def test_P6_header_past_end(backend):
    assert parse(backend, prefix(header_len=969, align=3)) == (Code.TRUNCATED, None)
    assert parse(backend, prefix(header_len=U64), max_header_size=U64) == (Code.TRUNCATED, None)
    assert parse(backend, prefix(header_len=968))[0] == Code.OK


@pytest.mark.parametrize("align", [0, 1, 4, 48, 96, 1 << 21, 0xFFFFFFFF])
def test_P7_align(backend, align):
    assert parse(backend, prefix(align=align)) == (Code.ALIGN, None)


@pytest.mark.parametrize("align", [8, 64, 4096, 1 << 20])
def test_P7_align_ok(backend, align):
    assert parse(backend, prefix(align=align))[0] == Code.OK


# ---------------------------------------------------------------------------------------------
# validate_table [H4], [T1]-[T8]


def align_up(x, align):
    return -(-x // align) * align


def make_table(tensors, header_end=100, align=64):
    """Valid columns for ``tensors`` = [(dtype code, shape), ...]; returns a dict of arguments."""
    dtypes, ndims, dims, offsets, sizes = [], [], [], [], []
    end = header_end
    for code, shape in tensors:
        size = nbytes_of(code, int(np.prod(shape, dtype=object)))  # [T5] with bits
        offset = align_up(end, align)
        dtypes.append(code)
        ndims.append(len(shape))
        dims.extend(shape)
        offsets.append(offset)
        sizes.append(size)
        end = offset + size
    return dict(n=len(tensors), dtypes=dtypes, ndims=ndims, shape=dims, offsets=offsets,
                nbytes=sizes, header_end=header_end, align=align, file_size=end, max_ndim=32)


def encode(table):
    """The call arguments of ``validate_table``: the columns as raw little-endian bins."""
    t = dict(table)
    t["dtypes"] = bytes(t["dtypes"])
    t["ndims"] = bytes(t["ndims"])
    for key in ("shape", "offsets", "nbytes"):
        if not isinstance(t[key], bytes):
            t[key] = struct.pack(f"<{len(t[key])}Q", *t[key])
    return t


def validate(backend, table):
    t = encode(table)
    code, index = backend.validate_table(t["n"], t["dtypes"], t["ndims"], t["shape"],
                                         t["offsets"], t["nbytes"], t["header_end"], t["align"],
                                         t["file_size"], t["max_ndim"])
    return int(code), int(index)


def validate_all(table):
    """(code, index) from every backend and from the plain reference loop; all must agree."""
    t = encode(table)
    args = (t["n"], t["dtypes"], t["ndims"], t["shape"], t["offsets"], t["nbytes"],
            t["header_end"], t["align"], t["file_size"], t["max_ndim"])
    results = {(int(c), int(i)) for c, i in [b.validate_table(*args) for b in ALL]}
    results.add(tuple(int(x) for x in _pybackend._validate_table_scalar(*args)))
    assert len(results) == 1, results
    return results.pop()


TWO = [(F32, (2, 3)), (I8, (5,)), (F32, (4,))]


def test_table_ok(backend):
    assert validate(backend, make_table(TWO)) == (Code.OK, 0)


def test_T8_empty_table(backend):
    table = make_table([])
    assert table["file_size"] == 100
    assert validate(backend, table) == (Code.OK, 0)
    table["file_size"] = 101
    assert validate(backend, table) == (Code.TRAILING, 0)


def test_zero_size_and_0d_tensors(backend):
    table = make_table([(F32, ()), (F32, (0, 5)), (I8, (0,)), (U8, ()), (16, (2, 0, 2**57))])
    assert table["nbytes"] == [4, 0, 0, 1, 0]
    assert validate(backend, table) == (Code.OK, 0)
    assert validate_all(table) == (Code.OK, 0)


def test_P7_table_align(backend):
    for align in (0, 4, 48, 1 << 21):
        table = make_table(TWO)
        table["align"] = align
        assert validate(backend, table) == (Code.ALIGN, 3)


@pytest.mark.parametrize("column, delta", [("dtypes", 1), ("dtypes", -1), ("ndims", 1),
                                           ("offsets", 1), ("nbytes", -1)])
def test_H4_column_lengths(backend, column, delta):
    table = encode(make_table(TWO))
    table[column] = table[column] + b"\0" if delta > 0 else table[column][:-1]
    table["align"] = 64
    assert validate(backend, table) == (Code.COLUMN, 3)


def test_H4_column_before_truncated_header(backend):
    table = encode(make_table(TWO))
    table["ndims"] = table["ndims"][:-1]
    table["header_end"] = table["file_size"] + 1
    assert validate(backend, table) == (Code.COLUMN, 3)


def test_header_end_past_file(backend):
    table = make_table(TWO)
    table["header_end"] = table["file_size"] + 1
    assert validate(backend, table) == (Code.TRUNCATED, 3)


@pytest.mark.parametrize("code", [len(ITEMSIZE_BY_CODE), 200, 255])
def test_T1_dtype(backend, code):
    table = make_table(TWO)
    table["dtypes"][1] = code
    table["ndims"][1] = 200  # [T1] comes before [T2]
    assert validate(backend, table) == (Code.DTYPE, 1)


def test_T2_ndim(backend):
    table = make_table([(I8, (1,) * 33)])
    assert validate(backend, table) == (Code.NDIM, 0)
    table["max_ndim"] = 33
    assert validate(backend, table) == (Code.OK, 0)
    table["max_ndim"] = 0
    assert validate(backend, make_table([(I8, ())]) | {"max_ndim": 0}) == (Code.OK, 0)


def test_H4_shape_too_short(backend):
    table = make_table(TWO)
    table["shape"] = table["shape"][:-1]
    assert validate(backend, table) == (Code.COLUMN, 2)
    table = encode(make_table(TWO))
    table["shape"] = table["shape"][:-1]  # seven bytes of the last dimension
    assert validate(backend, table) == (Code.COLUMN, 2)


def test_H4_shape_too_long(backend):
    table = make_table(TWO)
    table["shape"] = table["shape"] + [7]
    table["file_size"] += 1  # [H4] is checked before [T8]
    assert validate(backend, table) == (Code.COLUMN, 3)
    table = encode(make_table(TWO))
    table["shape"] += b"\0"
    assert validate(backend, table) == (Code.COLUMN, 3)


def test_T3_dim(backend):
    table = make_table([(F32, (3,)), (I8, (2, 1))])
    table["shape"][2] = BIG
    table["nbytes"][1] = 0  # [T3] before [T5]
    assert validate(backend, table) == (Code.DIM, 1)
    table["shape"][2] = U64
    assert validate(backend, table) == (Code.DIM, 1)
    table = make_table([(I8, (0, 2))])
    table["shape"][1] = BIG  # also with a zero dimension
    assert validate(backend, table) == (Code.DIM, 0)


def test_T4_too_large(backend):
    table = make_table([(F32, (1,))])
    table["ndims"] = [2]
    table["shape"] = [2**62, 4]
    assert validate(backend, table) == (Code.TOO_LARGE, 0)
    table["shape"] = [2**61, 1]  # 2**61 * 4 bytes == 2**63
    assert validate(backend, table) == (Code.TOO_LARGE, 0)
    table["dtypes"] = [I8]
    table["ndims"] = [3]
    table["shape"] = [0, 2**62, 2**62]  # non-zero product 2**124, whole product 0
    table["nbytes"] = [0]
    assert validate(backend, table) == (Code.TOO_LARGE, 0)
    table["shape"] = [2**62 - 1, 0, 2]  # just below: accepted
    table["file_size"] = table["offsets"][0]
    assert validate(backend, table) == (Code.OK, 0)


def test_T4_many_dims_overflow(backend):
    table = make_table([(I8, (1,))])
    table["ndims"] = [32]
    table["shape"] = [2**40] * 32
    assert validate(backend, table) == (Code.TOO_LARGE, 0)


@pytest.mark.parametrize("delta", [-1, 1, U64])
def test_T5_nbytes(backend, delta):
    table = make_table(TWO)
    table["nbytes"][0] = (table["nbytes"][0] + delta) & U64
    table["offsets"][1] = 3  # [T5] before [T6]
    assert validate(backend, table) == (Code.NBYTES, 0)


def test_T5_zero_dim(backend):
    table = make_table([(F32, (0, 3))])
    table["nbytes"] = [12]
    assert validate(backend, table) == (Code.NBYTES, 0)


def test_T6_misaligned(backend):
    table = make_table(TWO)
    table["offsets"][1] += 8
    table["file_size"] = 10**9  # [T6] before [T7] and [T8]
    assert validate(backend, table) == (Code.MISALIGNED, 1)


def test_T6_overlap(backend):
    table = make_table([(F32, (32,)), (F32, (4,))])
    table["offsets"][1] -= 64  # tensor 1 starting 64 bytes early
    assert validate(backend, table) == (Code.OVERLAP, 1)
    table = make_table(TWO)
    table["offsets"][0] = 64  # overlaps the header (header_end 100)
    assert validate(backend, table) == (Code.OVERLAP, 0)


def test_T6_gap(backend):
    table = make_table(TWO)
    table["offsets"][2] += 64
    table["file_size"] += 64
    assert validate(backend, table) == (Code.GAP, 2)
    table = make_table(TWO)
    table["offsets"][0] = 2**64 - 64  # an offset near 2**64
    assert validate(backend, table) == (Code.GAP, 0)


def test_T7_truncated(backend):
    table = make_table(TWO)
    table["file_size"] -= 1  # a file cut in the middle of the data
    assert validate(backend, table) == (Code.TENSOR_TRUNCATED, 2)
    table = make_table([(I8, (2**63 - 1,))])  # offset + nbytes just above 2**63
    table["file_size"] = 200
    assert validate(backend, table) == (Code.TENSOR_TRUNCATED, 0)
    table = make_table([(16, (2**59 - 1,))])  # 2**63 - 16 bytes at offset 128
    table["file_size"] = 2**63 - 1
    assert validate(backend, table) == (Code.TENSOR_TRUNCATED, 0)


def test_T8_trailing(backend):
    table = make_table(TWO)
    table["file_size"] += 1  # e.g. a zip archive appended
    assert validate(backend, table) == (Code.TRAILING, 3)


def test_first_failure_wins(backend):
    table = make_table(TWO * 3)
    table["nbytes"][4] += 1
    table["dtypes"][5] = 99
    assert validate(backend, table) == (Code.NBYTES, 4)


@pytest.mark.parametrize("where", [0, 1, 9_999, 19_999])
def test_large_table_first_failure(where):
    rng = np.random.default_rng(where)
    tensors = [(int(c), tuple(int(d) for d in rng.integers(0, 5, int(k))))
               for c, k in zip(rng.integers(0, 17, 20_000), rng.integers(0, 4, 20_000))]
    table = make_table(tensors)
    assert validate_all(table) == (Code.OK, 0)
    table["offsets"][where] += 64
    assert validate_all(table) == (Code.GAP, where)
    table["offsets"][where] -= 128
    assert validate_all(table) == (Code.OVERLAP, where)


def test_large_table_is_fast():
    table = encode(make_table([(F32, (64, 64, 3))] * 20_000))
    args = [table[k] for k in ("n", "dtypes", "ndims", "shape", "offsets", "nbytes",
                               "header_end", "align", "file_size", "max_ndim")]
    assert _pybackend.validate_table(*args) == (Code.OK, 0)
    # the best of several runs, so that a busy machine does not fail the test
    best = min(timeit.repeat(lambda: _pybackend.validate_table(*args), number=1, repeat=5))
    assert best < 0.05


SHAPE = st.lists(st.integers(0, 6), max_size=4).map(tuple)
TENSORS = st.lists(st.tuples(st.integers(0, len(ITEMSIZE_BY_CODE) - 1), SHAPE), max_size=24)
FIELDS = st.sampled_from(["dtypes", "ndims", "shape", "offsets", "nbytes", "file_size",
                          "header_end", "shape_len", "max_ndim", "align"])
VALUES = st.one_of(st.integers(0, 300), st.integers(0, U64),
                   st.sampled_from([BIG - 1, BIG, U64, 2**62, 2**32]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=TENSORS, header_end=st.integers(32, 300), align=st.sampled_from([8, 64, 4096]),
       field=FIELDS, pick=st.integers(0, 1000), value=VALUES, pad=st.integers(0, 40))
def test_property_mutated_table_backends_agree(tensors, header_end, align, field, pick, value,
                                               pad):
    # Pad to more than 16 tensors sometimes, so the numpy screen of _pybackend runs too.
    tensors = tensors + [(U8, (1,))] * pad
    table = make_table(tensors, header_end=header_end, align=align)
    assert validate_all(table) == (Code.OK, 0)
    n = table["n"]
    if field in ("dtypes", "ndims", "offsets", "nbytes"):
        assume(n > 0)
        column = table[field]
        column[pick % n] = value & (0xFF if field in ("dtypes", "ndims") else U64)
    elif field == "shape":
        assume(table["shape"])
        table["shape"][pick % len(table["shape"])] = value & U64
    elif field == "shape_len":
        raw = encode(table)["shape"]
        table["shape"] = raw[:pick % (len(raw) + 9)]
    elif field == "max_ndim":
        table["max_ndim"] = pick % 5
    elif field == "align":
        table["align"] = value if value < 2**32 else 1 << (pick % 22)
    else:
        table[field] = value if field == "file_size" else value % 2**63
    validate_all(table)


# ---------------------------------------------------------------------------------------------
# check_padding [T9]


def build_file(tensors, header_end=100, align=64, seed=0):
    """A file image: `header_end` bytes of junk header, then valid zero-padded tensor data."""
    table = encode(make_table(tensors, header_end, align))
    rng = np.random.default_rng(seed)
    image = bytearray(table["file_size"])
    image[:header_end] = rng.integers(1, 256, header_end, dtype=np.uint8).tobytes()
    for offset, size in zip(struct.unpack(f"<{table['n']}Q", table["offsets"]),
                            struct.unpack(f"<{table['n']}Q", table["nbytes"])):
        image[offset:offset + size] = rng.integers(1, 256, size, dtype=np.uint8).tobytes()
    return table, image


def padding_results(backend, table, image, tmp_path):
    """check_padding on the three kinds of source: bytes, an fd and a Mapping."""
    args = (table["n"], table["offsets"], table["nbytes"], table["header_end"])
    path = tmp_path / "f.sckpt"
    path.write_bytes(image)
    fd = os.open(path, os.O_RDONLY)
    try:
        results = [backend.check_padding(bytes(image), *args),
                   backend.check_padding(fd, *args),
                   backend.check_padding(backend.map_file(fd, len(image)), *args)]
    finally:
        os.close(fd)
    return {(int(c), int(i)) for c, i in results}


def test_T9_padding_ok(backend, tmp_path):
    table, image = build_file([(F32, (3,)), (I8, (5,)), (F32, ()), (I8, (0,)), (F32, (2,))])
    assert validate(backend, table) == (Code.OK, 0)
    assert padding_results(backend, table, image, tmp_path) == {(Code.OK, 0)}


def test_T9_padding_empty_table(backend, tmp_path):
    table, image = build_file([])
    assert padding_results(backend, table, image, tmp_path) == {(Code.OK, 0)}


@pytest.mark.parametrize("where, index", [(100, 0), (127, 0), (140, 1), (191, 1), (200, 2)])
def test_T9_padding_byte_set(backend, tmp_path, where, index):
    table, image = build_file([(F32, (3,)), (I8, (5,)), (F32, (2,))])  # gaps 100-127, 140-191...
    assert image[where] == 0
    image[where] = 1
    assert padding_results(backend, table, image, tmp_path) == {(Code.PADDING, index)}


def test_T9_padding_first_gap_wins(backend, tmp_path):
    table, image = build_file([(I8, (3,))] * 5, align=4096)
    image[3 * 4096 + 5] = 7
    image[4 * 4096 - 1] = 7
    assert padding_results(backend, table, image, tmp_path) == {(Code.PADDING, 3)}
    image[2 * 4096 - 1] = 7  # last byte of the gap before tensor 1
    assert padding_results(backend, table, image, tmp_path) == {(Code.PADDING, 1)}


def test_T9_source_too_short_is_not_read_past(backend):
    table, image = build_file([(I8, (3,)), (I8, (3,))])
    args = (table["n"], table["offsets"], table["nbytes"], table["header_end"])
    assert int(backend.check_padding(bytes(image[:120]), *args)[0]) != Code.OK


def test_T9_backends_agree_on_random_padding(tmp_path):
    rng = np.random.default_rng(5)
    for trial in range(20):
        tensors = [(int(c), (int(d),)) for c, d in zip(rng.integers(0, 17, 30),
                                                         rng.integers(0, 9, 30))]
        table, image = build_file(tensors, header_end=int(rng.integers(32, 200)), seed=trial)
        zeros = [i for i, b in enumerate(image) if b == 0 and i >= table["header_end"]]
        image[zeros[int(rng.integers(len(zeros)))]] = 1
        found = set()
        for backend in ALL:
            found |= padding_results(backend, table, image, tmp_path)
        assert len(found) == 1 and found.pop()[0] == Code.PADDING


# ---------------------------------------------------------------------------------------------
# map_file, advise, read_into, write_tensors


@pytest.fixture
def file_fd(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, 3 * 4096 + 17, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data, path
    os.close(fd)


def test_map_file_lifetime_and_copy_on_write(backend, file_fd):
    fd, data, path = file_fd
    mapping = backend.map_file(fd, len(data))
    assert mapping.size == len(data) and mapping.address != 0
    array = np.frombuffer(mapping.buffer, dtype=np.uint8)
    assert array.ctypes.data == mapping.address
    del mapping
    gc.collect()
    assert array.tobytes() == data  # still mapped
    assert array.flags.writeable
    array[:4] = [1, 2, 3, 4]
    array[-1] ^= 0xFF
    assert array[:4].tolist() == [1, 2, 3, 4]
    assert path.read_bytes() == data  # private: the file never changes
    floats = np.frombuffer(backend.map_file(fd, len(data)).buffer, np.float32, count=4)
    gc.collect()
    assert floats.tobytes() == data[:16]


def test_python_mapping_is_released(file_fd):
    fd, data, _ = file_fd
    mapping = _pybackend.map_file(fd, len(data))
    ref = weakref.ref(mapping.buffer.obj.base)  # what owns the mapping (and unmaps it)
    array = np.frombuffer(mapping.buffer, dtype=np.uint8)
    del mapping
    gc.collect()
    assert ref() is not None
    del array
    gc.collect()
    assert ref() is None  # unmapped once nothing views it


@pytest.mark.parametrize("advice", ["sequential", "willneed", "random"])
def test_advise_best_effort(backend, file_fd, advice):
    fd, data, _ = file_fd
    mapping = backend.map_file(fd, len(data))
    for offset, length in [(0, len(data)), (5, 100), (4097, 10**12), (len(data) + 10, 5)]:
        backend.advise(mapping, offset, length, advice)
    assert bytes(mapping.buffer[:10]) == data[:10]
    with pytest.raises(ValueError):
        backend.advise(mapping, 0, 10, "bogus")


def test_read_into(backend, file_fd):
    fd, data, _ = file_fd
    dests = [np.empty(3, np.float32), np.empty(0, np.uint8), np.empty((2, 5), np.int16),
             bytearray(7), np.empty((), np.float64), np.empty(8192 + 17, np.uint8)]
    offsets = [1, 50, 4095, 30, 0, 4096]
    lengths = [12, 0, 20, 7, 8, 8192 + 17]
    backend.read_into(fd, offsets, lengths, dests)
    for dest, offset, length in zip(dests, offsets, lengths):
        assert bytes(memoryview(dest).cast("B")) == data[offset:offset + length]


def test_read_into_truncated(backend, file_fd):
    fd, data, _ = file_fd
    with pytest.raises(TruncatedFileError):
        backend.read_into(fd, [len(data) - 4], [8], [np.empty(8, np.uint8)])
    with pytest.raises(ValueError):
        backend.read_into(fd, [0], [8], [np.empty(4, np.uint8)])  # destination too small
    with pytest.raises(ValueError):
        backend.read_into(fd, [0, 1], [8], [np.empty(8, np.uint8)])


def test_read_into_checksums(backend, tmp_path):
    """checksum=True: the CRC32C of every range, as read; C checksums each piece of at most
    SCK_READ_PIECE (8 MiB) as it reads it and joins the pieces, so ranges spanning several
    pieces, empty ranges and many small ranges must all give the CRC of the whole range."""
    data = np.random.default_rng(5).integers(0, 256, (20 << 20) + 333, dtype=np.uint8)
    path = tmp_path / "big.bin"
    path.write_bytes(data.tobytes())
    small = [(7 + 97 * k, k % 50) for k in range(1000)]  # 1000 ranges, 0 to 49 bytes
    ranges = [(3, (17 << 20) + 5), (0, 0), ((17 << 20) + 11, (3 << 20) + 300)] + small
    dests = [np.empty(length, np.uint8) for _, length in ranges]
    fd = os.open(path, os.O_RDONLY)
    try:
        crcs = backend.read_into(fd, [o for o, _ in ranges], [n for _, n in ranges], dests,
                                 checksum=True)
        assert backend.read_into(fd, [0], [4], [np.empty(4, np.uint8)]) is None
        flags = [k % 3 == 0 for k in range(len(ranges))]
        some = backend.read_into(fd, [o for o, _ in ranges], [n for _, n in ranges], dests,
                                 checksum=flags)
    finally:
        os.close(fd)
    expected = [_pybackend.crc32c(data[o:o + n]) for o, n in ranges]
    assert crcs.dtype == np.uint32 and list(crcs) == expected
    assert expected[1] == 0 and len(set(expected[:3])) == 3
    assert list(some) == [crc if flag else 0 for crc, flag in zip(expected, flags)]
    assert all(np.array_equal(dest, data[o:o + n]) for dest, (o, n) in zip(dests, ranges))


def test_read_into_checksums_truncated(backend, file_fd):
    """A short read raises TruncatedFileError with checksum=True as without; a wrong number of
    flags is a ValueError before anything is read."""
    fd, data, _ = file_fd
    with pytest.raises(TruncatedFileError):
        backend.read_into(fd, [0, len(data) - 4], [5, 8], [np.empty(5, np.uint8),
                                                          np.empty(8, np.uint8)], checksum=True)
    with pytest.raises(ValueError, match="flags"):
        backend.read_into(fd, [0, 1], [1, 1], [bytearray(1), bytearray(1)], checksum=[True])


@pytest.mark.parametrize("align", [8, 4096])
@pytest.mark.parametrize("checksum", [True, False])
def test_write_tensors_round_trip(backend, tmp_path, align, checksum):
    rng = np.random.default_rng(align)
    buffers = [rng.standard_normal(5).astype(np.float32), np.empty(0, np.uint8),
               np.arange(3, dtype=np.int8), b"xyz", np.float64(2.5).reshape(()),
               rng.integers(0, 256, 9 << 20, dtype=np.uint8),  # more than one 8 MiB chunk
               bytearray(b"\x01" * 9)]
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"H" * 37)
        crcs, end = backend.write_tensors(fd, 37, buffers, align, checksum)
        assert end == os.fstat(fd).st_size
        image = path.read_bytes()
        pos = 37
        dests = []
        for buf in buffers:
            raw = bytes(memoryview(buf).cast("B")) if not isinstance(buf, np.ndarray) \
                else buf.tobytes()
            start = align_up(pos, align)
            assert image[pos:start] == bytes(start - pos)  # padding zeros
            assert image[start:start + len(raw)] == raw
            dests.append((start, len(raw), raw))
            pos = start + len(raw)
        assert pos == end
        if checksum:
            assert crcs == [reference_crc32c(raw) if len(raw) < 4096 else
                            _pybackend.crc32c(raw) for _, _, raw in dests]
            assert crcs[1] == 0
        else:
            assert crcs is None
        out = [np.empty(length, np.uint8) for _, length, _ in dests]
        backend.read_into(fd, [s for s, _, _ in dests], [n for _, n, _ in dests], out)
        assert [o.tobytes() for o in out] == [raw for _, _, raw in dests]
    finally:
        os.close(fd)


def test_write_tensors_empty_list(backend, tmp_path):
    fd = os.open(tmp_path / "e.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        crcs, end = backend.write_tensors(fd, 123, [], 64, True)
        assert (list(crcs), end) == ([], 123)
    finally:
        os.close(fd)


def test_write_tensors_bad_align(tmp_path):
    fd = os.open(tmp_path / "e.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(LayoutError):
            _pybackend.write_tensors(fd, 0, [b"x"], 48, False)
    finally:
        os.close(fd)


def test_backends_same_interface():
    names = ["NAME", "crc32c", "parse_prefix", "validate_table", "check_padding", "map_file",
             "advise", "read_into", "write_tensors", "bytes_equal", "copy_into", "copy_many"]
    for backend in ALL:
        assert all(hasattr(backend, name) for name in names)
    assert _pybackend.NAME == "python"


def test_T9_padding_check_is_bounded_on_any_table(backend, tmp_path):
    """Gaps that no accepted table has (2**40, 2**62 bytes) cost neither memory nor time."""
    data = bytes(4096)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in (2**40, 2**62):
            for source in (data, fd):
                assert backend.check_padding(source, 1, struct.pack("<Q", offset),
                                             struct.pack("<Q", 8), 32) == (Code.TRUNCATED, 0)
        big = 4 << 20  # a real 4 MiB gap, all zero, then one bad byte
        image = bytearray(big + 64)
        assert backend.check_padding(bytes(image), 1, struct.pack("<Q", big), struct.pack("<Q", 64),
                                     32) == (Code.OK, 0)
        image[big - 1] = 1
        assert backend.check_padding(bytes(image), 1, struct.pack("<Q", big), struct.pack("<Q", 64),
                                     32) == (Code.PADDING, 0)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Errors: every code becomes an exception through errors.error_for, with the same message on
# both backends


def test_a_short_read_says_the_table_message_on_every_backend(backend, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDONLY)
    try:
        for checksum in (False, True):
            with pytest.raises(TruncatedFileError) as info:
                backend.read_into(fd, [0, 96], [4, 8], [bytearray(4), bytearray(8)], checksum)
            assert str(info.value) == f"reading bytes [96, 104): {ERRORS[Code.TENSOR_TRUNCATED][1]}"
    finally:
        os.close(fd)


def test_a_bad_align_on_write_says_the_same_on_every_backend(backend, tmp_path):
    fd = os.open(tmp_path / "e.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(LayoutError) as info:
            backend.write_tensors(fd, 0, [b"x"], 48, True)
    finally:
        os.close(fd)
    assert str(info.value) == f"write_tensors: {ERRORS[Code.ALIGN][1]} (align=48)"


def test_map_file_errors_are_the_same_on_every_backend(backend, tmp_path):
    path = tmp_path / "m"
    path.write_bytes(bytes(10))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SafeckptError, match=r"^mmap of 0 bytes: .*the size must be > 0"):
            backend.map_file(fd, 0)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        backend.map_file(fd, 10)  # closed descriptor
    assert info.value.errno == errno.EBADF
    assert str(info.value) == f"[Errno {errno.EBADF}] mmap of 10 bytes: {os.strerror(errno.EBADF)}"


def test_a_range_outside_the_buffer_is_an_internal_error_on_every_backend(backend):
    with pytest.raises(SafeckptError, match=r"^crc32c_ranges: internal error: .* range 0 "):
        backend.crc32c_ranges(bytes(10), np.array([8], np.uint64), np.array([4], np.uint64))


# ---------------------------------------------------------------------------------------------
# Byte order: the backends checksum and write bytes, never values, so no host order creeps in


@pytest.mark.parametrize("order", ["<", ">", "="])
def test_crcs_and_writes_use_the_raw_bytes_of_any_byte_order(backend, tmp_path, order):
    array = np.arange(1000, dtype=f"{order}u8")  # 8000 bytes: the numpy lanes of _pycrc32c
    raw = array.tobytes()
    assert backend.crc32c(array) == backend.crc32c(raw) == reference_crc32c(raw)
    assert backend.crc32c_ranges(array, [8], [16]).tolist() == [reference_crc32c(raw[8:24])]
    fd = os.open(tmp_path / "w.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        crcs, end = backend.write_tensors(fd, 0, [array], 64, True)
        assert os.pread(fd, end, 0) == raw and list(crcs) == [reference_crc32c(raw)]
    finally:
        os.close(fd)


def test_a_native_array_is_saved_byteswapped_on_a_big_endian_host(backend, tmp_path,
                                                                   monkeypatch):
    """What the writer hands a backend on a big-endian host: to_little_endian(array)."""
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", True)
    array = np.array([1, 2, 0x0102], dtype="=u2")  # native order: big-endian on this "host"
    fd = os.open(tmp_path / "w.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        backend.write_tensors(fd, 0, [dtypes.to_little_endian(array)], 64, False)
        assert os.pread(fd, 6, 0) == array.byteswap().tobytes()
    finally:
        os.close(fd)
