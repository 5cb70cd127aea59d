"""Mutated valid files (issue 4): bit flips, truncation and spliced headers, under both backends.

Every mutated file either raises a SafeckptError subclass or, only when every flip landed in
tensor data (or in the minor version number, which a reader may meet from a newer writer [H8]),
loads; and with ``verify=True`` a flip in tensor data is always caught by the tensor's CRC32C
[T10]. Nothing else may happen: no other exception, no crash, no load of a damaged layout.
"""

import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt

pytestmark = pytest.mark.usefixtures("backend")

rng = np.random.default_rng(4)
VALID = [
    safeckpt.save_bytes({"w": rng.standard_normal((3, 5)).astype(np.float32),
                         "b": np.arange(7, dtype=np.int16)}, metadata={"step": 3, "lr": [1e-3]}),
    safeckpt.save_bytes({"x": np.array(True), "e": np.zeros((0, 4), np.float64),
                         "c": np.array([1 + 2j, -1j], np.complex128),
                         "h": rng.standard_normal(9).astype(ml_dtypes.bfloat16)}, align=8),
    safeckpt.save_bytes({"u": np.arange(40, dtype=np.uint8).reshape(2, 4, 5),
                         "i": np.array([-1, 2**40], np.int64)}, checksum=False,
                        metadata={"name": "run", "blob": b"\x00\x01"}),
    safeckpt.save_bytes({}, metadata={"empty": True}),
]


def layout(data):
    """``(data ranges, minor field)`` of a valid file: byte ranges holding tensor bytes."""
    header_len = struct.unpack_from("<Q", data, 16)[0]
    with safeckpt.Reader(data) as reader:
        ranges = [(reader.info(k).offset, reader.info(k).offset + reader.info(k).nbytes)
                  for k in reader.keys()]
        has_crc = reader.has_checksums
    assert header_len < len(data)
    return ranges, has_crc


LAYOUTS = [layout(d) for d in VALID]


def outcome(data, **kwargs):
    try:
        return safeckpt.load_bytes(data, **kwargs)
    except safeckpt.SafeckptError as exc:
        return exc


def in_ranges(bit, ranges):
    return any(start <= bit // 8 < stop for start, stop in ranges)


@settings(max_examples=1000)
@given(which=st.integers(0, len(VALID) - 1), data=st.data())
def test_bit_flips(which, data):
    original = VALID[which]
    ranges, has_crc = LAYOUTS[which]
    bits = data.draw(st.lists(st.integers(0, 8 * len(original) - 1), min_size=1, max_size=3,
                              unique=True))
    if data.draw(st.booleans()) and ranges and any(b > a for a, b in ranges):
        # half the examples aim at tensor data, which random bits rarely hit in small files
        start, stop = data.draw(st.sampled_from([r for r in ranges if r[1] > r[0]]))
        bits = sorted({data.draw(st.integers(8 * start, 8 * stop - 1)) for _ in bits})
    mutated = bytearray(original)
    for bit in bits:
        mutated[bit // 8] ^= 1 << (bit % 8)
    mutated = bytes(mutated)

    in_data = all(in_ranges(bit, ranges) for bit in bits)
    in_minor = all(80 <= bit < 96 for bit in bits)  # bytes 10-11
    plain = outcome(mutated, verify=False)  # by default load_bytes checks the CRC32C [T10]
    checked = outcome(mutated, verify=True)
    if in_data:
        assert not isinstance(plain, Exception), plain  # the numbers may be anything
        if has_crc:
            assert isinstance(checked, safeckpt.ChecksumError), checked
    elif not isinstance(plain, Exception):
        # a flip outside tensor data loads only if it changed the minor version [H8], or the
        # alignment to another power of two that this layout also satisfies [P7, T6]
        assert all(in_ranges(bit, ranges) or 80 <= bit < 96 or 192 <= bit < 224
                   for bit in bits), bits
    if not isinstance(checked, Exception):
        assert in_minor or all(80 <= bit < 96 or 192 <= bit < 224 for bit in bits), bits
        expected = safeckpt.load_bytes(original)
        assert list(checked) == list(expected)
        for name, array in expected.items():
            assert checked[name].tobytes() == array.tobytes()
    for result in (plain, checked):
        assert isinstance(result, (dict, safeckpt.SafeckptError)), result


@pytest.mark.parametrize("which", range(len(VALID)))
def test_every_truncation_is_refused(which):
    original = VALID[which]
    for length in range(len(original)):
        result = outcome(original[:length])
        assert isinstance(result, (safeckpt.TruncatedFileError, safeckpt.LayoutError)), (length,
                                                                                          result)


def header_end(data):
    return 32 + struct.unpack_from("<Q", data, 16)[0]


@pytest.mark.parametrize("a", range(len(VALID)))
@pytest.mark.parametrize("b", range(len(VALID)))
def test_spliced_files(a, b):
    """A's prefix and header with B's data section; A's prefix with B's header and data."""
    first, second = VALID[a], VALID[b]
    spliced = first[:header_end(first)] + second[header_end(second):]
    has_crc = LAYOUTS[a][1]
    result = outcome(spliced, verify=has_crc)
    if spliced == first:
        assert isinstance(result, dict), result
    elif has_crc or len(spliced) != len(first):
        # loads only when B's data section is byte for byte what A's header describes
        assert isinstance(result, safeckpt.SafeckptError), result
    else:  # same layout, no checksums: B's bytes are read as A's tensors (numbers may be anything)
        assert isinstance(result, (dict, safeckpt.LayoutError)), result
    mixed = first[:32] + second[32:]
    result = outcome(mixed)
    assert isinstance(result, safeckpt.SafeckptError) or mixed == second, result
