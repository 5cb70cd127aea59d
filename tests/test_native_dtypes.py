"""The dtype codes of version 1.5 (19-34) in the table validators of both backends.

FORMAT.md section 4: every code has a number of bits per element; the packed codes (bits < 8)
are a bit stream, so [T5] is ``nbytes == ceil(count * bits / 8)``, and [T4] "too large" holds
both the element count (numpy unpacks one byte per element) and the byte size below 2**63, with
arithmetic that cannot overflow (``count * 6`` needs 66 bits for ``count = 2**63 - 1``). The C
core (csrc/validate.c) and the pure-Python backend must give the same code and tensor index on
every table; each test also checks the answer against the spec's formula in big integers.
Files of the new codes then load through each backend's reads (mmap, pread, bytes): bit-exact,
and refused with the tensor's name for set padding bits [T11] (checked by the shared unpacking,
safeckpt/packing.py, after either backend has read the packed bytes) or an nbytes off by one.
"""

import pathlib
import struct
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("safeckpt._sckpt")

import safeckpt  # noqa: E402
from safeckpt import _native, _pybackend, dtypes, errors  # noqa: E402
from safeckpt.errors import Code  # noqa: E402

BITS = dtypes.BITS_BY_CODE
NEW_CODES = range(19, 35)  # version 1.5
PACKED = sorted(dtypes.PACKED_CODES)
HEADER_END, ALIGN = 87, 64
FIRST_OFFSET = 128  # align_up(HEADER_END)
LIMIT = 2**63
FUZZ = pathlib.Path(__file__).parent / "fuzz"


def u64(*values):
    return struct.pack(f"<{len(values)}Q", *values)


def spec_nbytes(code, dims):
    """nbytes of a tensor by FORMAT.md [T5], in big integers: ceil(prod(dims) * bits / 8)."""
    count = 1
    for d in dims:
        count *= d
    return -(-count * BITS[code] // 8)


def validate_both(code, dims, nbytes, file_size=None):
    """``(code, index)`` of a one-tensor table from both backends, which must agree."""
    if file_size is None:
        file_size = FIRST_OFFSET + nbytes
    args = (1, bytes([code]), bytes([len(dims)]), u64(*dims), u64(FIRST_OFFSET), u64(nbytes),
            HEADER_END, ALIGN, file_size, 32)
    got_c = tuple(map(int, _native.validate_table(*args)))
    got_py = tuple(map(int, _pybackend.validate_table(*args)))
    assert got_c == got_py, (code, dims, nbytes)
    return got_c


def test_packed_codes_are_24_to_32():
    # the plan's table (FORMAT.md section 4): 6-bit 24-25, 4-bit 26-28, 2-bit 29-30, 1-bit 31-32
    assert PACKED == list(range(24, 33))
    assert [BITS[c] for c in PACKED] == [6, 6, 4, 4, 4, 2, 2, 1, 1]
    assert [BITS[c] for c in NEW_CODES if c not in PACKED] == [8] * 5 + [32, 32]


def test_fuzz_framing_bits_match_dtypes_py():
    # the fuzz harnesses' own copy of the table (tests/fuzz/framing.py, written from the spec)
    sys.path.insert(0, str(FUZZ))
    try:
        import framing
    finally:
        sys.path.remove(str(FUZZ))
    assert framing.BITS == list(BITS)
    assert framing.pack_bits([1, -2, 7], 4) == bytes([0xE1, 0x07])  # element 0: the low nibble


@pytest.mark.parametrize("code", NEW_CODES, ids=lambda c: dtypes.NAME_BY_CODE[c])
@pytest.mark.parametrize("dims", [(), (0,), (1,), (3,), (7,), (8,), (9,), (2, 5), (3, 0, 2), (4, 4, 3)])
def test_T5_new_code_nbytes_exact(code, dims):
    nbytes = spec_nbytes(code, dims)
    assert nbytes == dtypes.nbytes_of(code, int(np.prod(dims, dtype=np.int64)))
    assert validate_both(code, dims, nbytes) == (Code.OK, 0)
    # one byte more or less (in a file of the right size for it) is [T5]
    assert validate_both(code, dims, nbytes + 1) == (Code.NBYTES, 0)
    if nbytes:
        assert validate_both(code, dims, nbytes - 1) == (Code.NBYTES, 0)


@pytest.mark.parametrize("code, count, nbytes", [
    (27, 3, 2),    # int4: 12 bits, the last byte half used
    (28, 2, 1),    # uint4: one byte, two nibbles
    (26, 5, 3),    # float4_e2m1fn: 20 bits
    (24, 4, 3),    # float6_e2m3fn: 24 bits exactly
    (25, 5, 4),    # float6_e3m2fn: 30 bits
    (29, 5, 2),    # int2: 10 bits
    (30, 4, 1),    # uint2: 8 bits
    (31, 9, 2),    # int1: 9 bits
    (32, 8, 1),    # uint1: 8 bits
    (32, 1, 1),    # one bit still takes a byte
    (33, 3, 12),   # complex32: 2 x float16
    (34, 1, 4),    # bcomplex32: 2 x bfloat16
    (19, 5, 5),    # a float8: one byte each
])
def test_T5_spec_examples(code, count, nbytes):
    assert validate_both(code, (count,), nbytes) == (Code.OK, 0)


@pytest.mark.parametrize("code", PACKED, ids=lambda c: dtypes.NAME_BY_CODE[c])
def test_T5_packed_not_one_byte_per_element(code):
    # the unpacked size (numpy's: one byte per element) is refused for a packed code
    count = 16
    assert spec_nbytes(code, (count,)) < count
    assert validate_both(code, (count,), count) == (Code.NBYTES, 0)


@pytest.mark.parametrize("code, dims", [
    (32, (2**62, 2)),          # uint1: 2**63 elements, only 2**60 bytes, but numpy needs 2**63
    (31, (2**63 - 1, 2)),      # int1: the count overflows past 2**63
    (24, (2**62, 2)),          # float6: 2**63 elements
    (25, (2**32, 2**32)),      # float6: the product wraps u64 to 0 if unchecked
    (32, (2**32, 2**31, 0)),   # a zero dim does not excuse the others: 2**63 non-zero product
    (27, (2**40, 0, 2**23)),   # int4, the same
    (33, (2**61,)),            # complex32: 2**63 bytes
    (16, (2**59,)),            # complex128: 2**63 bytes
    (34, (2**31, 2**30)),      # bcomplex32: 2**61 elements, 2**63 bytes
])
def test_T4_too_large_with_bits(code, dims):
    assert validate_both(code, dims, 0, file_size=2**64 - 1) == (Code.TOO_LARGE, 0)


@pytest.mark.parametrize("code, dims", [
    (32, (2**63 - 1,)),         # uint1: the largest count, 2**60 bytes
    (24, (2**63 - 1,)),         # float6: count * 6 needs 66 bits; the byte size fits
    (25, (2**62,)),             # float6: count * 6 wraps u64 to 2**63 if computed naively
    (24, (3, 2**61 - 1)),
    (28, (2**62 - 1, 2)),       # uint4: odd count of nibbles, about 2**62 bytes
    (29, (5, 3, 2**58)),
    (33, (2**61 - 1,)),         # complex32: the largest
    (16, (2**59 - 1,)),         # complex128: the largest
    (27, (2**61, 0, 3)),        # zero elements, the non-zero product below 2**63
])
def test_T4_largest_accepted_with_exact_nbytes(code, dims):
    nbytes = 0 if 0 in dims else spec_nbytes(code, dims)
    assert nbytes < LIMIT
    assert validate_both(code, dims, nbytes) == (Code.OK, 0)
    # a u64-wrapped count * bits, or the count itself, is [T5] (not accepted)
    count = 1
    for d in dims:
        count *= d
    for wrong in {(count * BITS[code] % 2**64 + 7) // 8, count % 2**64, nbytes + 1}:
        if wrong != nbytes:
            assert validate_both(code, dims, wrong, FIRST_OFFSET + wrong) == (Code.NBYTES, 0)


def test_T1_first_code_past_the_table():
    assert len(BITS) == 35
    assert validate_both(35, (1,), 1) == (Code.DTYPE, 0)
    assert validate_both(255, (1,), 1) == (Code.DTYPE, 0)


DIM = st.one_of(st.integers(0, 9), st.integers(2**29, 2**34),
                st.sampled_from([2**61 - 1, 2**61, 2**62 - 1, 2**62, 2**63 - 1]))


@settings(max_examples=400, deadline=None)
@given(code=st.integers(0, len(BITS) - 1), dims=st.lists(DIM, max_size=4),
       delta=st.sampled_from([0, 0, 0, 1, -1, 7, 2**64 - 1]))
def test_one_tensor_tables_match_spec(code, dims, delta):
    """Both backends, every code, shapes near the limits: the spec's formula in big integers."""
    nonzero = 1
    for d in dims:
        nonzero *= d or 1
    size = 0 if 0 in dims else spec_nbytes(code, dims)
    nbytes = (size + delta) % 2**64
    if nonzero >= LIMIT or -(-nonzero * BITS[code] // 8) >= LIMIT:
        want = (Code.TOO_LARGE, 0)
    elif nbytes != size:
        want = (Code.NBYTES, 0)
    else:
        want = (Code.OK, 0)
    assert validate_both(code, dims, nbytes, min(FIRST_OFFSET + nbytes, 2**64 - 1)) == want


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(NEW_CODES)),
                          st.lists(st.integers(0, 11), max_size=3)), min_size=1, max_size=8),
       st.integers(0, 7), st.sampled_from([-1, 1]))
def test_tables_of_new_codes_valid_and_off_by_one(tensors, which, delta):
    """Several tensors of the new codes laid out by the spec; one nbytes moved by one byte."""
    dt, nd, shape, offsets, sizes, end = bytearray(), bytearray(), b"", [], [], HEADER_END
    for code, dims in tensors:
        end = -(-end // ALIGN) * ALIGN
        dt.append(code)
        nd.append(len(dims))
        shape += u64(*dims)
        offsets.append(end)
        sizes.append(spec_nbytes(code, dims))
        end += sizes[-1]
    columns = (bytes(dt), bytes(nd), shape, u64(*offsets))
    n = len(tensors)
    for backend in (_native, _pybackend):
        assert backend.validate_table(n, *columns, u64(*sizes), HEADER_END, ALIGN, end, 32) == \
            (Code.OK, 0)
    i = which % n
    if sizes[i] + delta < 0:
        return
    sizes[i] += delta
    got = [tuple(map(int, backend.validate_table(n, *columns, u64(*sizes), HEADER_END, ALIGN,
                                                 end + delta, 32)))
           for backend in (_native, _pybackend)]
    assert got[0] == got[1] == (Code.NBYTES, i)


# ---- files of the new codes, loaded through each backend's reads (mmap, pread, bytes) ----------

C_FIXTURES = pathlib.Path(__file__).parent / "c" / "fixtures"


def _packed_fixture():
    """``{name: expected array}`` of tests/c/fixtures/packed.sckpt (make_fixtures' formula)."""
    # loaded from its path under its own name: tests/fixtures/make_fixtures.py (test_hostile's)
    # is imported as "make_fixtures" too, and whichever came first would answer both
    import importlib.util
    spec = importlib.util.spec_from_file_location("c_make_fixtures",
                                                  C_FIXTURES.parent / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    return {name: make_fixtures.expected(d, seed, shape)
            for name, d, seed, shape in make_fixtures.PACKED}


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("how", ["mmap", "pread", "bytes", "verify"])
def test_packed_fixture_loads_bit_exact(how):
    """Every code 19-34 (tests/c/fixtures/packed.sckpt, which tests/c checks on three CPUs)."""
    path = C_FIXTURES / "packed.sckpt"
    if how == "bytes":
        got = safeckpt.load_bytes(path.read_bytes())
    else:
        got = safeckpt.load_file(path, mmap=how == "mmap", verify=how == "verify")
    want = _packed_fixture()
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name  # bits, NaN payloads included
        if dtypes.code_of(array.dtype) in dtypes.PACKED_CODES:  # a fresh unpacked array
            assert got[name].flags.owndata or got[name].base.flags.owndata, name


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("mmap", [True, False])
def test_packed_padding_bits_refused(tmp_path, mmap):
    """[T11]: a high bit set past the last element (the fuzz seed) is a LayoutError naming it."""
    data = (FUZZ / "corpus_py" / "seed_packed_padding_bits").read_bytes()
    path = tmp_path / "bad.sckpt"
    path.write_bytes(data)
    for load in (lambda: safeckpt.load_file(path, mmap=mmap), lambda: safeckpt.load_bytes(data)):
        with pytest.raises(errors.LayoutError, match=r"'q'.*\[T11\]|\[T11\].*'q'"):
            load()


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("seed", ["seed_packed_nbytes_plus_one", "seed_packed_nbytes_minus_one"])
def test_packed_nbytes_off_by_one_refused(seed):
    with pytest.raises(errors.LayoutError, match=r"'q'.*\[T5\]"):
        safeckpt.load_bytes((FUZZ / "corpus_py" / seed).read_bytes())
