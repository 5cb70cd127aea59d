"""Tests of the C core (csrc/) through its cffi binding and safeckpt._native.

Rule names ([P3], [T6], ...) refer to docs/FORMAT.md; every error code of the validators is
reached with hand-made bytes.
"""

import gc
import os
import random
import struct
import timeit

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("safeckpt._sckpt")

from safeckpt import _native, dtypes, errors, format  # noqa: E402
from safeckpt._sckpt import ffi, lib  # noqa: E402
from safeckpt.errors import Code  # noqa: E402

ITEMSIZE = dtypes.ITEMSIZE_BY_CODE
BITS = dtypes.BITS_BY_CODE  # bits per element in a file (FORMAT.md section 4)
CODES = len(BITS)
U64_MAX = (1 << 64) - 1
F32, U8, F64 = 10, 5, 11


def u64(*values):
    return struct.pack(f"<{len(values)}Q", *values)


def crc32c_bitwise(data, crc=0):
    """Reference CRC32C, one bit at a time."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---- constants ---------------------------------------------------------------------------------


def test_constants_match_format_py():
    assert bytes(ffi.buffer(lib.sck_magic)) == format.MAGIC
    assert lib.SCK_MAGIC_SIZE == len(format.MAGIC)
    assert lib.SCK_MAGIC_TEXT_MANGLED_SIZE == len(format.MAGIC_TEXT_MANGLED)
    assert lib.SCK_PREFIX_SIZE == format.PREFIX_SIZE == format.PREFIX_STRUCT.size
    assert lib.SCK_VERSION_MAJOR == format.VERSION_MAJOR
    assert lib.SCK_VERSION_MINOR == format.VERSION_MINOR
    assert lib.SCK_FLAG_TENSOR_CRC == format.FLAG_TENSOR_CRC
    assert lib.SCK_FLAG_SHARD_INDEX == format.FLAG_SHARD_INDEX
    assert lib.SCK_FLAG_REFS == format.FLAG_REFS
    assert lib.SCK_KNOWN_FLAGS == format.KNOWN_FLAGS
    assert lib.SCK_ALIGN_MIN == format.ALIGN_MIN
    assert lib.SCK_ALIGN_MAX == format.ALIGN_MAX
    assert lib.SCK_ALIGN_DEFAULT == format.ALIGN_DEFAULT
    assert lib.SCK_MAX_HEADER_SIZE == format.MAX_HEADER_SIZE
    assert lib.SCK_MAX_TENSORS == format.MAX_TENSORS
    assert lib.SCK_MAX_NDIM == format.MAX_NDIM
    assert lib.SCK_MAX_DEPTH == format.MAX_DEPTH


def test_error_codes_match_errors_py():
    for code in Code:
        name = "SCK_OK" if code is Code.OK else f"SCK_E_{code.name}"
        assert getattr(lib, name) == code.value, name
    c_names = {name for name in dir(lib) if name.startswith("SCK_E_")}
    assert c_names == {f"SCK_E_{c.name}" for c in Code if c is not Code.OK}


def test_messages_live_only_in_errors_py():
    # one table of messages: errors.ERRORS covers every error code, and the C core has none
    assert set(errors.ERRORS) == {code for code in Code if code is not Code.OK}
    assert all(message for _, message in errors.ERRORS.values())
    assert not [name for name in dir(lib) if "strerror" in name or "message" in name]


def test_dtype_table_matches_dtypes_py():
    # the one dtype table, twice: codes, bits per element in a file, numpy item sizes
    assert lib.SCK_DTYPE_COUNT == len(dtypes.DTYPES) == len(BITS) == len(ITEMSIZE)
    for code, _, dt in dtypes.DTYPES:
        assert lib.sck_dtype_itemsize(code) == dt.itemsize == ITEMSIZE[code]
        assert lib.sck_dtype_bits(code) == BITS[code]
        assert (BITS[code] < 8) == (code in dtypes.PACKED_CODES)
    for bad in (-1, lib.SCK_DTYPE_COUNT, 255, 1 << 20):
        assert lib.sck_dtype_itemsize(bad) == 0
        assert lib.sck_dtype_bits(bad) == 0


def test_native_name():
    assert _native.NAME == "c"


# ---- CRC32C ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data, expected):
    assert _native.crc32c(data) == expected
    assert lib.sck_crc32c(0, data, len(data)) == expected
    assert lib.sck_crc32c_sw(0, data, len(data)) == expected


def test_crc32c_sw_matches_bitwise_reference():
    rng = random.Random(1)
    for length in list(range(0, 70)) + [255, 256, 1000]:
        data = rng.randbytes(length)
        assert lib.sck_crc32c_sw(0, data, length) == crc32c_bitwise(data)


def test_crc32c_hw_and_sw_agree_on_lengths_and_alignments():
    rng = np.random.default_rng(2)
    buf = rng.integers(0, 256, 3 * 8192 * 2 + 4096, dtype=np.uint8)
    cbuf = ffi.from_buffer(buf)
    lengths = set(range(0, 64)) | {
        255, 256, 767, 768, 769, 3 * 256 * 2 + 5, 24575, 24576, 24577, 3 * 8192 * 2, 3 * 8192 * 2 + 77,
    }
    lengths |= {int(x) for x in rng.integers(0, 3 * 8192 * 2, 40)}
    for length in sorted(lengths):
        for start in range(8):
            if start + length > len(buf):
                continue
            piece = cbuf + start
            init = int(rng.integers(0, 1 << 32))
            assert lib.sck_crc32c(init, piece, length) == lib.sck_crc32c_sw(init, piece, length), (
                length, start)


def test_crc32c_hw_reported():
    # x86-64 CPUs of the last 15 years and ARMv8.1+ have CRC32C instructions.
    if os.uname().machine in ("x86_64", "aarch64"):
        assert lib.sck_crc32c_hw_available() in (0, 1)


def test_crc32c_continuation():
    data = np.random.default_rng(3).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    whole = _native.crc32c(data)
    for cut in (0, 1, 7, 8, 769, 24577, 50_000, len(data)):
        assert _native.crc32c(data[cut:], _native.crc32c(data[:cut])) == whole
        a = lib.sck_crc32c_sw(0, data[:cut], cut)
        assert lib.sck_crc32c_sw(a, data[cut:], len(data) - cut) == whole


def test_crc32c_combine():
    """crc(a + b) from crc(a), crc(b) and len(b): what joins the pieces of sck_crc32c_ranges."""
    data = np.random.default_rng(4).integers(0, 256, 70_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 8, 4095, 24577, len(data)):
        a, b = data[:cut], data[cut:]
        assert lib.sck_crc32c_combine(_native.crc32c(a), _native.crc32c(b), len(b)) == \
            _native.crc32c(data)


def test_crc32c_accepts_bytes_like():
    data = b"123456789"
    for obj in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert _native.crc32c(obj) == 0xE3069283
    arr = np.arange(10, dtype=np.float32)
    assert _native.crc32c(arr) == _native.crc32c(arr.tobytes())
    assert _native.crc32c(memoryview(b"")) == 0
    assert _native.crc32c(b"", 1234) == 1234
    with pytest.raises((ValueError, BufferError, TypeError)):
        _native.crc32c(np.zeros((4, 4), np.float32).T)  # not C-contiguous


# ---- prefix [P1]-[P7] --------------------------------------------------------------------------


def prefix(magic=format.MAGIC, major=1, minor=0, flags=0, header_len=10, align=64, crc=0):
    return format.PREFIX_STRUCT.pack(magic, major, minor, flags, header_len, align, crc)


def parse(buf, file_size=None, max_header_size=format.MAX_HEADER_SIZE):
    return _native.parse_prefix(buf, len(buf) + 1000 if file_size is None else file_size,
                                max_header_size)


def test_prefix_valid_fields():
    buf = prefix(minor=3, flags=1, header_len=55, align=4096, crc=0xDEADBEEF)
    assert parse(buf, 87) == (0, (1, 3, 1, 55, 4096, 0xDEADBEEF))


def test_P1_short_file_refused():
    assert parse(prefix()[:31], 31) == (Code.TRUNCATED, None)
    assert parse(b"", 0) == (Code.TRUNCATED, None)
    assert parse(prefix(), 31) == (Code.TRUNCATED, None)


def test_P2_magic_refused():
    assert parse(prefix(magic=b"PK\x03\x04\0\0\0\0")) == (Code.MAGIC, None)
    assert parse(prefix(magic=b"\x89SCK\r\n\x1a\x00")) == (Code.MAGIC, None)


def test_P2_line_endings_converted_detected():
    mangled = format.MAGIC_TEXT_MANGLED + prefix()[8:] + b"\0"  # CR LF -> LF shifts by one
    assert parse(mangled[:32]) == (Code.MAGIC_TEXT, None)


@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_P3_major_version_refused(major):
    assert parse(prefix(major=major)) == (Code.VERSION, None)
    assert parse(prefix(major=major, flags=2)) == (Code.VERSION, None)  # [P3] before [P4]


def test_P3_minor_version_accepted():
    assert parse(prefix(minor=0xFFFF))[0] == Code.OK


@pytest.mark.parametrize("flags", [8, 0x80000000, 0xFFFFFFFF])
def test_P4_unknown_flags_refused(flags):
    assert parse(prefix(flags=flags)) == (Code.FLAGS, None)


def test_P5_header_limit():
    assert parse(prefix(header_len=101), max_header_size=100) == (Code.HEADER_LIMIT, None)
    assert parse(prefix(header_len=100), max_header_size=100)[0] == Code.OK
    # [P5] before [P6]: a huge header_len is a limit error even in a small file
    assert parse(prefix(header_len=U64_MAX), 40) == (Code.HEADER_LIMIT, None)


def test_P6_header_past_end_of_file():
    assert parse(prefix(header_len=10), 41) == (Code.TRUNCATED, None)
    assert parse(prefix(header_len=10), 42)[0] == Code.OK
    # 32 + header_len overflows u64
    assert parse(prefix(header_len=U64_MAX), U64_MAX, U64_MAX) == (Code.TRUNCATED, None)
    assert parse(prefix(header_len=U64_MAX - 32), U64_MAX, U64_MAX)[0] == Code.OK


@pytest.mark.parametrize("align", [0, 1, 4, 48, 100, 1 << 21, 0xFFFFFFFF, 1 << 31])
def test_P7_bad_alignment_refused(align):
    assert parse(prefix(align=align)) == (Code.ALIGN, None)


@pytest.mark.parametrize("align", [8, 16, 64, 4096, 1 << 20])
def test_P7_good_alignment(align):
    assert parse(prefix(align=align))[0] == Code.OK


def test_prefix_accepts_longer_buffer():
    assert parse(prefix() + b"x" * 100)[0] == Code.OK


# ---- tensor table [H4], [T1]-[T8] --------------------------------------------------------------


def build_table(tensors, header_end=87, align=64):
    """Columns of a valid table for [(dtype_code, shape)]; returns (columns, file_size)."""
    dt, nd, shape, offsets, nbytes = bytearray(), bytearray(), b"", [], []
    end = header_end
    for code, dims in tensors:
        size = dtypes.nbytes_of(code, int(np.prod(dims, dtype=object)))
        offset = -(-end // align) * align
        dt.append(code)
        nd.append(len(dims))
        shape += u64(*dims)
        offsets.append(offset)
        nbytes.append(size)
        end = offset + size
    return [bytes(dt), bytes(nd), shape, u64(*offsets), u64(*nbytes)], end


def validate(columns, file_size, header_end=87, align=64, max_ndim=32, n=None):
    n = len(columns[0]) if n is None else n
    return _native.validate_table(n, *columns, header_end, align, file_size, max_ndim)


SAMPLE = [(F32, [2]), (U8, [3, 5]), (F64, []), (F32, [4, 0, 7]), (16, [1, 1, 1])]


def test_table_valid():
    columns, size = build_table(SAMPLE)
    assert validate(columns, size) == (Code.OK, 0)


def test_table_spec_example():
    # FORMAT.md section 7: one float32 (2,) tensor, header 55 bytes, align 64 -> file of 136
    columns, size = build_table([(F32, [2])], header_end=87)
    assert size == 136 and columns[3] == u64(128)
    assert validate(columns, 136) == (Code.OK, 0)


def test_table_empty_n0():
    empty = [b""] * 5
    assert validate(empty, 87) == (Code.OK, 0)
    assert validate(empty, 88) == (Code.TRAILING, 0)  # [T8] no tensors: the file ends at header_end
    assert validate([memoryview(b"")] * 5, 87) == (Code.OK, 0)


def test_table_zero_size_and_0d():
    columns, size = build_table([(F32, [0]), (F64, []), (F32, [3, 0]), (U8, [0])])
    assert validate(columns, size) == (Code.OK, 0)
    assert struct.unpack("<4Q", columns[4]) == (0, 8, 0, 0)


def test_table_accepts_any_bytes_like():
    columns, size = build_table(SAMPLE)
    as_np = [np.frombuffer(c, np.uint8) for c in columns]
    assert validate(as_np, size) == (Code.OK, 0)
    as_ba = [bytearray(c) for c in columns]
    assert validate(as_ba, size) == (Code.OK, 0)


@pytest.mark.parametrize("col, delta", [(0, 1), (0, -1), (1, 1), (3, 8), (3, -1), (4, 1), (4, -8)])
def test_H4_column_lengths(col, delta):
    columns, size = build_table(SAMPLE)
    columns[col] = columns[col] + b"\0" * delta if delta > 0 else columns[col][:delta]
    assert validate(columns, size, n=len(SAMPLE)) == (Code.COLUMN, len(SAMPLE))


def test_H4_column_length_overflow():
    # 8 * n overflows u64: must not wrap to a small length
    assert validate([b""] * 5, 87, n=1 << 61) == (Code.COLUMN, 1 << 61)


def test_H4_shape_column_short_for_tensor():
    columns, size = build_table(SAMPLE)
    columns[2] = columns[2][: 8 * 2]  # tensor 0 has its dim, tensor 1 lacks its second
    assert validate(columns, size) == (Code.COLUMN, 1)


def test_H4_shape_column_left_over():
    columns, size = build_table(SAMPLE)
    columns[2] += u64(7)
    assert validate(columns, size) == (Code.COLUMN, len(SAMPLE))
    columns[2] = columns[2][:-1]  # not a multiple of 8 either
    assert validate(columns, size) == (Code.COLUMN, len(SAMPLE))


def test_table_align_and_header_end_checked():
    columns, size = build_table(SAMPLE)
    assert validate(columns, size, align=48) == (Code.ALIGN, len(SAMPLE))
    assert validate(columns, size, align=4) == (Code.ALIGN, len(SAMPLE))
    # [P7] comes before the column lengths [H4], as in the spec's order
    assert validate(columns, size, align=4, n=1) == (Code.ALIGN, 1)
    assert validate([b""] * 5, 87, header_end=88) == (Code.TRUNCATED, 0)


def test_T1_unknown_dtype():
    columns, size = build_table(SAMPLE)
    columns[0] = columns[0][:2] + bytes([CODES]) + columns[0][3:]  # the first unknown code
    assert validate(columns, size) == (Code.DTYPE, 2)
    columns[0] = bytes([255]) + columns[0][1:]
    assert validate(columns, size) == (Code.DTYPE, 0)


def test_T2_too_many_dims():
    columns, size = build_table([(U8, [1] * 33)])
    assert validate(columns, size) == (Code.NDIM, 0)
    assert validate(columns, size, max_ndim=33) == (Code.OK, 0)
    columns, size = build_table([(U8, [1] * 255)])
    assert validate(columns, size, max_ndim=1 << 40) == (Code.OK, 0)
    assert validate(columns, size, max_ndim=0) == (Code.NDIM, 0)


def test_T3_dim_not_below_2_63():
    columns, _ = build_table([(F32, [2, 1])])
    columns[2] = u64(2, 2**63)
    assert validate(columns, 1 << 40) == (Code.DIM, 0)
    columns[2] = u64(U64_MAX, 0)
    assert validate(columns, 1 << 40) == (Code.DIM, 0)
    # [T3] is checked on every dim before [T4]
    columns, _ = build_table([(F32, [1, 1, 1])])
    columns[2] = u64(2**62, 4, 2**63)
    assert validate(columns, 1 << 40) == (Code.DIM, 0)


def test_T4_too_large():
    columns, _ = build_table([(F32, [1, 1])])
    columns[2] = u64(2**62, 4)  # [2**62, 4] float32 = 2**66 bytes
    assert validate(columns, 1 << 40) == (Code.TOO_LARGE, 0)
    columns[2] = u64(2**31, 2**31)  # 2**62 elements * 4 = 2**64: wraps to 0 if unchecked
    assert validate(columns, 1 << 40) == (Code.TOO_LARGE, 0)
    columns[2] = u64(2**62, 2)  # 2**63 bytes exactly
    assert validate(columns, 1 << 40) == (Code.TOO_LARGE, 0)
    # a zero dim does not excuse the others: product of the non-zero dims counts
    columns, _ = build_table([(F32, [1, 1, 1])])
    columns[2] = u64(2**62, 0, 4)
    assert validate(columns, 1 << 40) == (Code.TOO_LARGE, 0)
    columns, size = build_table([(F32, [1, 0, 1])])
    columns[2] = u64(2**59 - 1, 0, 4)  # (2**59 - 1) * 4 * 4 < 2**63: fine, and 0 bytes
    assert validate(columns, size) == (Code.OK, 0)


def test_T4_largest_tensor_accepted():
    columns, size = build_table([(U8, [2**63 - 1])])
    assert size == 128 + 2**63 - 1
    assert validate(columns, size) == (Code.OK, 0)


def test_T5_nbytes_mismatch():
    columns, size = build_table(SAMPLE)
    nb = list(struct.unpack("<5Q", columns[4]))
    nb[1] -= 1  # one too small
    columns[4] = u64(*nb)
    assert validate(columns, size) == (Code.NBYTES, 1)
    nb[1] += 1
    nb[3] = 4  # zero-size tensor claiming bytes
    columns[4] = u64(*nb)
    assert validate(columns, size) == (Code.NBYTES, 3)


def test_T6_misaligned():
    columns, size = build_table(SAMPLE)
    offs = list(struct.unpack("<5Q", columns[3]))
    offs[2] += 8
    columns[3] = u64(*offs)
    assert validate(columns, size) == (Code.MISALIGNED, 2)


def test_T6_overlap():
    columns, size = build_table(SAMPLE)
    offs = list(struct.unpack("<5Q", columns[3]))
    offs[1] -= 64  # tensor 1 starting 64 bytes early
    columns[3] = u64(*offs)
    assert validate(columns, size) == (Code.OVERLAP, 1)
    columns, size = build_table([(U8, [1])])
    columns[3] = u64(64)  # inside the header (header_end = 87)
    assert validate(columns, size) == (Code.OVERLAP, 0)


def test_T6_overlap_when_align_up_overflows():
    columns, _ = build_table([(U8, [1])], header_end=0)
    columns[3] = u64(0)
    assert validate(columns, U64_MAX, header_end=U64_MAX - 10) == (Code.OVERLAP, 0)


def test_T6_gap():
    columns, size = build_table(SAMPLE)
    offs = list(struct.unpack("<5Q", columns[3]))
    offs[4] += 64
    columns[3] = u64(*offs)
    assert validate(columns, size + 64) == (Code.GAP, 4)


def test_T7_tensor_truncated():
    columns, size = build_table(SAMPLE)
    assert validate(columns, size - 1) == (Code.TENSOR_TRUNCATED, 4)
    assert validate(columns, 200) == (Code.TENSOR_TRUNCATED, 1)


def test_T7_offset_plus_nbytes_overflow():
    header_end = U64_MAX - 99  # align_up(header_end) = 2**64 - 64 does not overflow
    columns, _ = build_table([(U8, [1])], header_end=0)
    columns[2], columns[3], columns[4] = u64(128), u64(2**64 - 64), u64(128)
    assert validate(columns, U64_MAX, header_end=header_end) == (Code.TENSOR_TRUNCATED, 0)


def test_T8_trailing_bytes():
    columns, size = build_table(SAMPLE)
    assert validate(columns, size + 1) == (Code.TRAILING, len(SAMPLE))
    # a trailing empty tensor still sits at align_up(previous end)
    columns, size = build_table([(U8, [3]), (U8, [0])])
    assert size == 192 and validate(columns, 192) == (Code.OK, 0)
    assert validate(columns, 193) == (Code.TRAILING, 2)
    assert validate(columns, 131) == (Code.TENSOR_TRUNCATED, 1)


def test_table_first_failing_tensor_wins():
    columns, size = build_table(SAMPLE)
    dt = bytearray(columns[0])
    dt[1], dt[3] = 99, 99
    columns[0] = bytes(dt)
    assert validate(columns, size) == (Code.DTYPE, 1)


def test_table_20000_tensors_fast():
    columns, size = build_table([(F32, [i % 7 + 1, 3]) for i in range(20_000)])
    assert validate(columns, size) == (Code.OK, 0)
    # the best of several runs, so that a busy machine does not fail the test
    best = min(timeit.repeat(lambda: validate(columns, size), number=1, repeat=20))
    assert best < 1e-3


@settings(max_examples=60, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(st.integers(0, CODES - 1), st.lists(st.integers(0, 5), max_size=4)), max_size=12),
    align=st.sampled_from([8, 64, 4096]),
    header_end=st.integers(32, 300),
)
def test_table_random_valid_layouts(tensors, align, header_end):
    columns, size = build_table(tensors, header_end=header_end, align=align)
    assert validate(columns, size, header_end=header_end, align=align) == (Code.OK, 0)
    data = bytearray(size)
    assert _native.check_padding(bytes(data), len(tensors), columns[3], columns[4],
                                 header_end) == (Code.OK, 0)


def ref_validate(n, dt, nd, sh, of, nb, header_end, align, file_size, max_ndim):
    """Reference of validate_table in plain Python (big integers: no overflow to think of)."""
    if align & (align - 1) or not 8 <= align <= 1 << 20:
        return Code.ALIGN, n
    if len(dt) != n or len(nd) != n or len(of) != 8 * n or len(nb) != 8 * n:
        return Code.COLUMN, n
    if header_end > file_size:
        return Code.TRUNCATED, n
    of = struct.unpack(f"<{n}Q", of)
    nb = struct.unpack(f"<{n}Q", nb)
    pos, prev = 0, header_end
    for i in range(n):
        if dt[i] >= CODES:
            return Code.DTYPE, i
        if nd[i] > max_ndim:
            return Code.NDIM, i
        if len(sh) - pos < 8 * nd[i]:
            return Code.COLUMN, i
        dims = struct.unpack_from(f"<{nd[i]}Q", sh, pos)
        pos += 8 * nd[i]
        if any(d >= 2**63 for d in dims):
            return Code.DIM, i
        count = 1
        for d in dims:
            count *= d or 1
        size = -(-count * BITS[dt[i]] // 8)  # ceil(count * bits / 8) [T5]
        if count >= 2**63 or size >= 2**63:
            return Code.TOO_LARGE, i
        if nb[i] != (0 if 0 in dims else size):
            return Code.NBYTES, i
        if of[i] % align:
            return Code.MISALIGNED, i
        expected = -(-prev // align) * align
        if of[i] < expected:
            return Code.OVERLAP, i
        if of[i] > expected:
            return Code.GAP, i
        if of[i] + nb[i] > file_size:
            return Code.TENSOR_TRUNCATED, i
        prev = of[i] + nb[i]
    if pos != len(sh):
        return Code.COLUMN, n
    if prev != file_size:
        return Code.TRAILING, n
    return Code.OK, 0


@settings(max_examples=300, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(st.integers(0, CODES - 1), st.lists(st.integers(0, 4), max_size=3)), min_size=1,
        max_size=6),
    mutations=st.lists(
        st.tuples(st.integers(0, 8), st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
)
def test_table_mutations_match_reference(tensors, mutations):
    columns, size = build_table(tensors)
    columns = [bytearray(c) for c in columns]
    n, header_end, align, max_ndim = len(tensors), 87, 64, 3
    for which, where, value in mutations:
        if which < 5:  # set one byte of a column, or cut the column there
            col = columns[which]
            if col and value < 200:
                col[where % len(col)] = value
            else:
                del col[where % (len(col) + 1):]
        elif which == 5:
            size = max(0, size + value - 128)
        elif which == 6:
            header_end = where % 300
        elif which == 7:
            align = (4, 8, 48, 64, 128, 1 << 21)[value % 6]
        else:
            n = max(0, n + value % 3 - 1)
    got = _native.validate_table(n, *map(bytes, columns), header_end, align, size, max_ndim)
    assert got == ref_validate(n, *map(bytes, columns), header_end, align, size, max_ndim)


# ---- padding [T9] ------------------------------------------------------------------------------


def sample_file(tmp_path, tensors=SAMPLE, header_end=87, align=64):
    columns, size = build_table(tensors, header_end, align)
    data = bytearray(size)
    for i, (off, nb) in enumerate(zip(struct.unpack(f"<{len(tensors)}Q", columns[3]),
                                      struct.unpack(f"<{len(tensors)}Q", columns[4]))):
        data[off:off + nb] = bytes([i % 200 + 1]) * nb
    path = tmp_path / "f.sckpt"
    path.write_bytes(bytes(data))
    return columns, data, path


def check_all_sources(columns, data, path, n=len(SAMPLE), header_end=87):
    results = [_native.check_padding(bytes(data), n, columns[3], columns[4], header_end)]
    fd = os.open(path, os.O_RDONLY)
    try:
        results.append(_native.check_padding(fd, n, columns[3], columns[4], header_end))
        mapping = _native.map_file(fd, len(data))
        results.append(_native.check_padding(mapping, n, columns[3], columns[4], header_end))
    finally:
        os.close(fd)
    return results


def test_T9_zero_padding_accepted(tmp_path):
    columns, data, path = sample_file(tmp_path)
    assert check_all_sources(columns, data, path) == [(Code.OK, 0)] * 3


@pytest.mark.parametrize("where, index", [(87, 0), (127, 0), (136, 1), (207, 2), (300, 3), (319, 3)])
def test_T9_padding_byte_set(tmp_path, where, index):
    columns, data, path = sample_file(tmp_path)
    data[where] = 1
    path.write_bytes(bytes(data))
    assert check_all_sources(columns, data, path) == [(Code.PADDING, index)] * 3


def test_T9_many_tensors_fd(tmp_path):
    tensors = [(U8, [i % 100 + 1]) for i in range(3000)]
    columns, data, path = sample_file(tmp_path, tensors)
    offs = struct.unpack("<3000Q", columns[3])
    assert check_all_sources(columns, data, path, n=3000) == [(Code.OK, 0)] * 3
    data[offs[2500] - 1] = 7
    path.write_bytes(bytes(data))
    assert check_all_sources(columns, data, path, n=3000) == [(Code.PADDING, 2500)] * 3


def test_T9_bounds_checked_on_bad_table():
    data = bytes(100)
    assert _native.check_padding(data, 1, u64(128), u64(8), 32) == (Code.TRUNCATED, 0)
    assert _native.check_padding(data, 1, u64(64), u64(U64_MAX), 32) == (Code.OK, 0)
    assert _native.check_padding(data, 1, u64(16), u64(8), 32) == (Code.OK, 0)  # no gap
    # an end that overflows u64 is beyond any later offset: no gap after it
    assert _native.check_padding(data, 2, u64(64, 96), u64(U64_MAX, 0), 32) == (Code.OK, 0)
    assert _native.check_padding(data, 1, u64(64), b"", 32) == (Code.COLUMN, 1)
    assert _native.check_padding(data, 0, b"", b"", 101) == (Code.OK, 0)
    assert _native.check_padding(b"\1" * 100, 1, u64(101), u64(0), 100) == (Code.TRUNCATED, 0)


def test_T9_fd_short_read_and_io_error(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes(50))
    offsets, nbytes = ffi.from_buffer(u64(128)), ffi.from_buffer(u64(8))  # kept alive here
    table = ffi.new("sck_table *", {"n": 1, "offsets": offsets, "offsets_len": 8,
                                    "nbytes": nbytes, "nbytes_len": 8})
    index, err = ffi.new("uint64_t *"), ffi.new("int *")
    fd = os.open(path, os.O_RDONLY)
    try:  # the caller claims 136 bytes, the file has 50
        assert lib.sck_check_padding_fd(fd, 136, table, 32, index, err) == Code.TRUNCATED
        assert index[0] == 0
    finally:
        os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)  # pread on a directory fails with EISDIR
    try:
        assert lib.sck_check_padding_fd(fd, 136, table, 32, index, err) == Code.IO
        assert err[0] == 21
    finally:
        os.close(fd)


# ---- write_tensors and read_into ---------------------------------------------------------------


def raw(obj):
    """The bytes of a buffer (memoryview cannot export ml_dtypes arrays)."""
    return ffi.buffer(ffi.from_buffer(obj))[:]


def expected_file(prefix_bytes, buffers, align):
    out = bytearray(prefix_bytes)
    for b in buffers:
        out += bytes(-len(out) % align)
        out += raw(b)
    return bytes(out)


def test_write_and_read_round_trip(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(5)
    big = rng.standard_normal((20 << 20) // 4).astype(np.float32)  # 20 MiB: several chunks
    buffers = [
        b"abc",
        b"",
        big,
        bytearray(b"\x01" * 100),
        memoryview(b"xyz" * 1000),
        np.arange(7, dtype=ml_dtypes.bfloat16),
        np.zeros((0, 3), np.float64),
        rng.integers(0, 256, 5 << 20, dtype=np.uint8),  # just over one chunk
        b"z",
    ]
    head = b"H" * 87
    path = tmp_path / "w.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, head)
        crcs, end = _native.write_tensors(fd, 87, buffers, 64, True)
        want = expected_file(head, buffers, 64)
        assert end == len(want)
        assert os.fstat(fd).st_size == end
        with open(path, "rb") as f:
            assert f.read() == want
        assert crcs == [lib.sck_crc32c_sw(0, ffi.from_buffer(b), len(ffi.from_buffer(b)))
                        for b in buffers]
        assert crcs[1] == 0 and crcs[6] == 0

        # read everything back in parallel
        offsets, lengths, dests, pos = [], [], [], 87
        for b in buffers:
            n = len(ffi.from_buffer(b))
            pos += -pos % 64
            offsets.append(pos)
            lengths.append(n)
            dests.append(np.empty(n, np.uint8))
            pos += n
        _native.read_into(fd, offsets, lengths, dests)
        for b, d in zip(buffers, dests):
            assert d.tobytes() == raw(b)
        big_back = np.empty_like(big)
        _native.read_into(fd, [offsets[2]], [lengths[2]], [big_back])
        assert np.array_equal(big_back, big)
    finally:
        os.close(fd)


def test_write_without_checksum_and_no_buffers(tmp_path):
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    try:
        assert _native.write_tensors(fd, 40, [], 64, True) == ([], 40)
        assert _native.write_tensors(fd, 40, [b"a"], 8, False) == (None, 41)
        assert os.pread(fd, 100, 0) == bytes(40) + b"a"
    finally:
        os.close(fd)


def test_write_many_small_tensors_batches(tmp_path):
    buffers = [bytes([i % 251]) * (i % 13) for i in range(3000)]  # more than IOV_MAX entries
    fd = os.open(tmp_path / "many", os.O_RDWR | os.O_CREAT)
    try:
        crcs, end = _native.write_tensors(fd, 32, buffers, 8, True)
        want = expected_file(bytes(32), buffers, 8)
        assert end == len(want)
        assert os.pread(fd, end + 10, 0)[32:] == want[32:]
        assert crcs == [crc32c_bitwise(b) for b in buffers]
    finally:
        os.close(fd)


def test_write_to_read_only_fd_raises(tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            _native.write_tensors(fd, 0, [b"abc"], 64, True)
        assert info.value.errno == 9  # EBADF
        with pytest.raises(OSError):
            _native.write_tensors(fd, 0, [bytes(30 << 20)], 64, False)  # big-tensor path
    finally:
        os.close(fd)


def test_write_bad_align_raises(tmp_path):
    fd = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(errors.LayoutError):
            _native.write_tensors(fd, 0, [b"abc"], 48, True)
        with pytest.raises(ValueError):
            _native.write_tensors(fd, 2**63 - 2, [b"abc"], 8, True)
    finally:
        os.close(fd)


def test_read_into_truncated_and_errors(tmp_path):
    path = tmp_path / "r"
    path.write_bytes(bytes(range(100)))
    fd = os.open(path, os.O_RDONLY)
    try:
        dest = bytearray(20)
        _native.read_into(fd, [10], [20], [dest])
        assert dest == bytes(range(10, 30))
        with pytest.raises(errors.TruncatedFileError):
            _native.read_into(fd, [0, 90], [10, 20], [bytearray(10), bytearray(20)])
        with pytest.raises(ValueError):
            _native.read_into(fd, [0], [10], [bytearray(5)])  # destination too small
        with pytest.raises((TypeError, BufferError, ValueError)):
            _native.read_into(fd, [0], [3], [b"abc"])  # read-only destination
        with pytest.raises(ValueError):
            _native.read_into(fd, [0, 1], [3], [bytearray(3)])
        _native.read_into(fd, [], [], [])
        _native.read_into(fd, [5], [0], [bytearray()])
    finally:
        os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            _native.read_into(fd, [0], [10], [bytearray(10)])
        assert info.value.errno == 21  # EISDIR
    finally:
        os.close(fd)


def test_pread_many_threads_and_pieces(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, 40 << 20, dtype=np.uint8)
    path = tmp_path / "p"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = [0, 17, 30 << 20, (40 << 20) - 5]
        lengths = [20 << 20, 1000, 10 << 20, 5]
        expected = [_native.crc32c(data[o:o + n]) for o, n in zip(offsets, lengths)]
        for nthreads in (1, 2, 0, 100):
            dests = [np.empty(n, np.uint8) for n in lengths]
            ptrs = ffi.new("void *[]", [ffi.from_buffer(d) for d in dests])
            index, err = ffi.new("uint64_t *"), ffi.new("int *")
            crcs = ffi.new("uint32_t[]", [7] * 4)
            rc = lib.sck_pread_many(fd, 4, offsets, lengths, ptrs, ffi.NULL, crcs, nthreads,
                                    index, err)
            assert rc == Code.OK
            for o, n, d in zip(offsets, lengths, dests):
                assert np.array_equal(d, data[o:o + n])
            assert list(crcs) == expected  # the 20 MiB range is joined from 3 pieces
            rc = lib.sck_pread_many(fd, 4, offsets, lengths, ptrs, [0, 1, 1, 0], crcs, nthreads,
                                    index, err)
            assert (rc, list(crcs)) == (Code.OK, [0, expected[1], expected[2], 0])
        # the lowest failing tensor is reported; no checksum of a failed read is given
        dests = [np.empty(8 << 20, np.uint8) for _ in range(3)]
        ptrs = ffi.new("void *[]", [ffi.from_buffer(d) for d in dests])
        crcs = ffi.new("uint32_t[]", [7] * 3)
        rc = lib.sck_pread_many(fd, 3, [0, 40 << 20, 41 << 20], [8 << 20] * 3, ptrs, ffi.NULL,
                                crcs, 3, index, err)
        assert (rc, index[0], list(crcs)) == (Code.TRUNCATED, 1, [0, 0, 0])
        rc = lib.sck_pread_many(fd, 3, [0, 40 << 20, 41 << 20], [8 << 20] * 3, ptrs, ffi.NULL,
                                ffi.NULL, 3, index, err)
        assert (rc, index[0]) == (Code.TRUNCATED, 1)
    finally:
        os.close(fd)


# ---- mapping -----------------------------------------------------------------------------------


def count_maps(path):
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(str(path)))


def test_map_lifetime_follows_arrays(tmp_path):
    path = tmp_path / "m.bin"
    data = np.arange(5000, dtype=np.float64)
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    mapping = _native.map_file(fd, data.nbytes)
    os.close(fd)  # the mapping outlives the descriptor
    assert mapping.size == data.nbytes
    assert mapping.address == int(ffi.cast("uintptr_t", ffi.from_buffer(mapping.buffer)))
    arr = np.frombuffer(mapping.buffer, dtype=np.float64)[1000:]
    assert count_maps(path) == 1
    del mapping
    gc.collect()
    assert count_maps(path) == 1
    assert np.array_equal(arr, data[1000:])
    arr[0] = -1.0  # copy-on-write: writable, the file is untouched
    assert path.read_bytes() == data.tobytes()
    del arr
    gc.collect()
    assert count_maps(path) == 0


def test_map_advise_and_errors(tmp_path):
    path = tmp_path / "adv"
    path.write_bytes(b"x" * 100_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = _native.map_file(fd, 100_000)
        for advice in ("sequential", "willneed", "random", "normal"):
            _native.advise(mapping, 5000, 20000, advice)
        _native.advise(mapping, 0, 2**70, "willneed")  # clamped
        _native.advise(mapping, 10**9, 10, "willneed")  # outside: nothing to do
        with pytest.raises(ValueError):
            _native.advise(mapping, 0, 10, "soon")
        with pytest.raises(ValueError):
            _native.map_file(fd, 0)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        _native.map_file(fd, 100)  # closed descriptor: EBADF


def test_write_checksums_on_a_second_thread(tmp_path):
    """Writes of at least SCK_CRC_THREAD_MIN bytes checksum on a helper thread: same CRCs, and a
    failing write still joins it and reports the error."""
    rng = np.random.default_rng(7)
    big = [rng.integers(0, 256, n, dtype=np.uint8) for n in (lib.SCK_CRC_THREAD_MIN, 3, 0, 999_999)]
    path = tmp_path / "w"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        crcs, end = _native.write_tensors(fd, 0, big, 64, True)
    finally:
        os.close(fd)
    assert crcs == [_native.crc32c(b) for b in big]
    assert crcs == [int(lib.sck_crc32c_sw(0, ffi.from_buffer(b), len(b))) for b in big]
    assert os.path.getsize(path) == end
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            _native.write_tensors(fd, 0, big, 64, True)
    finally:
        os.close(fd)


def test_mapping_outlives_module_teardown(tmp_path):
    """A mapped array alive at interpreter exit is unmapped without an error: the unmap function
    is bound when the mapping is made, not looked up in the module's globals (gone by then)."""
    import subprocess
    import sys
    path = tmp_path / "f.sckpt"
    pytest.importorskip("jax")  # with jax imported and a reader left in a global, lib goes first
    script = ("import builtins, sys, numpy as np, safeckpt, safeckpt.jax_convert\n"
              "safeckpt.save({'w': np.arange(10.0, dtype=np.float32)}, sys.argv[1])\n"
              "with safeckpt.open(sys.argv[1]) as reader:\n"
              "    pass\n"
              "import jax\n"
              "KEEP = builtins._kept = safeckpt.load(sys.argv[1], mmap=True)\n")
    (tmp_path / "keep.py").write_text(script)  # run as a file: its module globals go at exit
    done = subprocess.run([sys.executable, str(tmp_path / "keep.py"), str(path)],
                          capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SAFECKPT_BACKEND": "c"})
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
