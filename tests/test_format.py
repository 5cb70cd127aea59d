"""One test per MUST of docs/FORMAT.md, on hand-made bytes (tests/forge.py), under both backends.

Each bad file is loaded three ways (bytes, mapped file, pread file); all must raise the same
error type with a message that names the problem.
"""

import shlex
import struct

import msgpack
import numpy as np
import pytest

import safeckpt
from safeckpt import format as fmt
from forge import crc32c, forge, u64s

pytestmark = pytest.mark.usefixtures("backend")

W = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.arange(5, dtype=np.int16)


def load_all_ways(data, tmp_path, **kwargs):
    """Load ``data`` as bytes, as a mapped file and as a pread file; return the three results."""
    path = tmp_path / "f.sckpt"
    path.write_bytes(data)
    return [safeckpt.load_bytes(data, **kwargs),
            safeckpt.load_file(path, **kwargs),
            safeckpt.load_file(path, mmap=False, **kwargs)]


def refuse(data, tmp_path, error, *words, **kwargs):
    """Every way of loading ``data`` raises ``error`` with all of ``words`` in its message."""
    path = tmp_path / "bad.sckpt"
    path.write_bytes(data)
    loaders = [lambda: safeckpt.load_bytes(data, **kwargs),
               lambda: safeckpt.load_file(path, **kwargs),
               lambda: safeckpt.load_file(path, mmap=False, **kwargs)]
    for load in loaders:
        with pytest.raises(error) as info:
            load()
        message = str(info.value)
        for word in words:
            assert word in message, (word, message)
    return message


def test_valid_forged_file_loads(tmp_path):
    for result in load_all_ways(forge({"w": W, "b": B}, metadata={"k": [1, None]}), tmp_path):
        assert list(result) == ["w", "b"]
        np.testing.assert_array_equal(result["w"], W)
        np.testing.assert_array_equal(result["b"], B)


def test_spec_example_bytes():
    """Section 7: the writer's bytes equal the example, and the lengths the spec states."""
    w = np.array([1.0, -0.0], np.float32)
    data = safeckpt.save_bytes({"w": w})
    assert data == forge({"w": w})
    header_len = struct.unpack_from("<Q", data, 16)[0]
    assert (header_len, len(data)) == (93, 136)
    assert data[125:128] == b"\0\0\0" and data[128:] == w.tobytes()
    empty = safeckpt.save_bytes({}, checksum=False)
    assert empty == forge({}, checksum=False)
    assert len(empty) == 32 + struct.unpack_from("<Q", empty, 16)[0]


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_P1_shorter_than_prefix(tmp_path):
    data = forge({"w": W})
    refuse(data[:31], tmp_path, safeckpt.TruncatedFileError, "32-byte")
    refuse(b"", tmp_path, safeckpt.TruncatedFileError)


def test_P1_P2_a_short_file_that_is_not_a_checkpoint(tmp_path):
    """Shorter than the prefix: truncated if its bytes start as the magic does, else not a
    checkpoint at all [P1, P2]; a short text-mode-mangled start is named as such."""
    refuse(b"hello\n", tmp_path, safeckpt.NotSafeckptError, "not a safeckpt file", "b'hello\\n'")
    refuse(b"\x89SCK\r\n", tmp_path, safeckpt.TruncatedFileError, "32-byte prefix")
    refuse(b"\x89SCK\n\x1a\n\x01", tmp_path, safeckpt.NotSafeckptError, "text-mode")


@pytest.mark.parametrize("start, words", [
    (b"PK\x03\x04", ["zip archive", "torch.save"]),
    (b"\x80\x02", ["pickle"]),
    (b"\x80\x05", ["pickle"]),
    (b"\x93NUMPY\x01\x00", ["numpy .npy"]),
])
def test_P2_wrong_magic_says_what_the_file_looks_like(tmp_path, start, words):
    """A torch, numpy or pickle file gets its kind named and the way to convert it [P2]."""
    data = forge({"w": W})
    for length in (len(data), 20):  # whole, or shorter than a prefix
        message = refuse((start + data[len(start):])[:length], tmp_path, safeckpt.NotSafeckptError,
                         "not a safeckpt file", "safeckpt convert", *words)
        assert message.index("not a safeckpt") < message.index("[P2]")
    source, target = (shlex.quote(str(tmp_path / name)) for name in ("bad.sckpt", "bad-converted.sckpt"))
    assert f"convert {source} {target}`" in message
    spaced = tmp_path / "my model.pt"
    spaced.write_bytes(start + data[len(start):])
    with pytest.raises(safeckpt.NotSafeckptError, match=r"convert '\S+/my model.pt' '\S+/my model.sckpt'`"):
        safeckpt.open(spaced)


def test_P2_text_mode_mangling_is_named(tmp_path):
    data = forge({"w": W})
    refuse(data.replace(b"\r\n", b"\n", 1), tmp_path, safeckpt.NotSafeckptError, "text-mode")


def test_P3_other_major_version(tmp_path):
    refuse(forge({"w": W}, major=2), tmp_path, safeckpt.UnsupportedVersionError, "major")
    refuse(forge({"w": W}, major=0), tmp_path, safeckpt.UnsupportedVersionError, "major")


def test_P4_unknown_flag_bits(tmp_path):
    refuse(forge({"w": W}, flags=0x9), tmp_path, safeckpt.UnsupportedVersionError, "flag")
    refuse(forge({"w": W}, flags=1 << 31), tmp_path, safeckpt.UnsupportedVersionError, "flag")


def test_P5_header_limit_checked_before_reading(tmp_path):
    data = forge({"w": W})
    message = refuse(data, tmp_path, safeckpt.LimitError, "max_header_size", max_header_size=10)
    assert "trust" in message
    huge = forge({"w": W}, header_len=2**64 - 1)
    refuse(huge, tmp_path, safeckpt.LimitError, "max_header_size")


def test_P6_header_past_end_of_file(tmp_path):
    data = forge({"w": W}, header_len=10**6)
    refuse(data, tmp_path, safeckpt.TruncatedFileError, "header")
    overflow = forge({"w": W}, header_len=2**64 - 1)
    refuse(overflow, tmp_path, safeckpt.TruncatedFileError, max_header_size=2**64 - 1)


@pytest.mark.parametrize("align", [0, 4, 48, 96, 2**21, 2**31])
def test_P7_alignment(tmp_path, align):
    refuse(forge({"w": W}, prefix_align=align), tmp_path, safeckpt.LayoutError, "alignment")


@pytest.mark.parametrize("align", [8, 4096, 2**20])
def test_P7_alignment_range_accepted(tmp_path, align):
    for result in load_all_ways(forge({"w": W, "b": B}, align=align), tmp_path):
        np.testing.assert_array_equal(result["b"], B)


def test_P8_header_crc(tmp_path):
    data = forge({"w": W}, header_crc=0)
    refuse(data, tmp_path, safeckpt.ChecksumError, "header checksum")
    flipped = bytearray(forge({"w": W}))
    flipped[40] ^= 0x01
    refuse(bytes(flipped), tmp_path, safeckpt.ChecksumError, "header checksum")


def raw_header(header, extra=b""):
    return msgpack.packb(header, use_bin_type=True) + extra


def test_H1_trailing_bytes_in_header(tmp_path):
    header = {"names": [], "dtypes": b"", "ndims": b"", "shape": b"", "offsets": b"",
              "nbytes": b""}
    refuse(forge(header_bytes=raw_header(header, b"\xc0"), checksum=False), tmp_path,
           safeckpt.HeaderError, "msgpack", "[H1]")


def test_H1_truncated_msgpack(tmp_path):
    header = raw_header({"names": [], "dtypes": b"", "ndims": b"", "shape": b"",
                         "offsets": b"", "nbytes": b""})
    refuse(forge(header_bytes=header[:-3], checksum=False), tmp_path, safeckpt.HeaderError, "[H1]")


def test_H1_not_a_map(tmp_path):
    refuse(forge(header_bytes=msgpack.packb([1, 2]), checksum=False), tmp_path,
           safeckpt.HeaderError, "map")


def test_H1_non_utf8_string(tmp_path):
    def edit(h):
        h["names"] = ["PLACEHOLDER"]
    data = forge({"w": W}, edit=edit, checksum=False)
    bad = data.replace(b"PLACEHOLDER", b"\xff\xfeLACEHOLDER")
    # fix the header CRC so that the UTF-8 error, not the CRC, is what is found
    header_len = struct.unpack_from("<Q", bad, 16)[0]
    bad = bad[:28] + struct.pack("<I", crc32c(bad[32:32 + header_len])) + bad[32:]
    refuse(bad, tmp_path, safeckpt.HeaderError, "[H1]")


def test_H1_ext_type_and_non_str_keys(tmp_path):
    ts = msgpack.Timestamp(1, 0)
    refuse(forge({"w": W}, metadata={"t": ts}), tmp_path, safeckpt.HeaderError, "Timestamp")
    refuse(forge({"w": W}, metadata={"m": {1: 2}}), tmp_path, safeckpt.HeaderError, "not a str")
    ext = msgpack.ExtType(5, b"xyz")
    refuse(forge({"w": W}, metadata={"e": ext}), tmp_path, safeckpt.HeaderError, "ExtType")


def test_H2_duplicate_map_keys(tmp_path):
    packer = msgpack.Packer(use_bin_type=True)
    columns = [("names", []), ("names", []), ("dtypes", b""), ("ndims", b""), ("shape", b""),
               ("offsets", b""), ("nbytes", b"")]
    header = packer.pack_map_header(len(columns)) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in columns)
    refuse(forge(header_bytes=header, checksum=False), tmp_path, safeckpt.HeaderError,
           "duplicate", "'names'")


def test_H3_nesting_limit(tmp_path):
    deep = None
    for _ in range(100):
        deep = [deep]
    refuse(forge({"w": W}, metadata={"deep": deep}), tmp_path, safeckpt.LimitError, "max_depth")
    ok = None
    for _ in range(10):
        ok = {"a": ok}
    assert load_all_ways(forge({"w": W}, metadata={"ok": ok}), tmp_path)


def test_H3_nesting_far_beyond_any_stack(tmp_path):
    header = b"\x91" * 100_000 + b"\xc0"  # an array in an array ... 100,000 deep
    refuse(forge(header_bytes=header, checksum=False), tmp_path, safeckpt.SafeckptError)


@pytest.mark.parametrize("key", ["names", "dtypes", "ndims", "shape", "offsets", "nbytes"])
def test_H4_missing_column(tmp_path, key):
    refuse(forge({"w": W}, edit=lambda h: h.pop(key)), tmp_path, safeckpt.HeaderError, key)


def test_H4_column_of_wrong_type(tmp_path):
    refuse(forge({"w": W}, edit=lambda h: h.update(shape=[2, 3])), tmp_path,
           safeckpt.HeaderError, "'shape'", "bin")
    refuse(forge({"w": W}, edit=lambda h: h.update(names="w")), tmp_path,
           safeckpt.HeaderError, "'names'")


@pytest.mark.parametrize("key", ["dtypes", "ndims", "offsets", "nbytes", "shape"])
def test_H4_column_of_wrong_length(tmp_path, key):
    refuse(forge({"w": W}, edit=lambda h: h.update({key: h[key] + b"\0"})), tmp_path,
           safeckpt.HeaderError, "column")


def test_H4_crc_column_and_flag_must_agree(tmp_path):
    refuse(forge({"w": W}, flags=0), tmp_path, safeckpt.HeaderError, "TENSOR_CRC")
    refuse(forge({"w": W}, checksum=False, flags=1), tmp_path, safeckpt.HeaderError, "crc32c")
    refuse(forge({"w": W}, edit=lambda h: h.update(crc32c=b"\0")), tmp_path,
           safeckpt.HeaderError, "crc32c")


def test_H5_names(tmp_path):
    refuse(forge([("w", W), ("w", W)]), tmp_path, safeckpt.HeaderError, "'w'", "twice")
    refuse(forge([("", W)]), tmp_path, safeckpt.HeaderError, "non-empty")
    refuse(forge({"w": W}, edit=lambda h: h.update(names=[7])), tmp_path,
           safeckpt.HeaderError, "name 7")


def test_H6_tensor_limit(tmp_path):
    refuse(forge({"w": W, "b": B}), tmp_path, safeckpt.LimitError, "max_tensors=1", max_tensors=1)


def test_H7_metadata_must_be_a_map(tmp_path):
    refuse(forge({"w": W}, metadata=[1, 2]), tmp_path, safeckpt.HeaderError, "metadata")


def test_H7_metadata_values_round_trip(tmp_path):
    metadata = {"s": "é", "i": -2**63, "u": 2**64 - 1, "f": -0.0, "n": None, "b": True,
                "y": b"\0\xff", "l": [1, [2.5, {"x": "y"}]], "m": {}}
    data = forge({"w": W}, metadata=metadata)
    for path in [None, tmp_path / "m.sckpt"]:
        if path is None:
            reader = safeckpt.Reader(data)
        else:
            path.write_bytes(data)
            reader = safeckpt.open(path)
        with reader:
            assert reader.metadata == metadata
            assert str(reader.metadata["f"]) == "-0.0"


def test_H8_unknown_key(tmp_path):
    data = forge({"w": W}, extra={"future": 1})
    refuse(data, tmp_path, safeckpt.HeaderError, "'future'", "[H8]")


def test_H8_newer_minor_version_is_read(tmp_path):
    newer = fmt.VERSION_MINOR + 1
    data = forge({"w": W}, extra={"future": {"x": 1}}, minor=newer)
    for result in load_all_ways(data, tmp_path):
        np.testing.assert_array_equal(result["w"], W)
    with safeckpt.Reader(data) as reader:
        assert reader.version == (1, newer)


def test_T1_unknown_dtype_code(tmp_path):
    unknown = len(safeckpt.dtypes.NAME_BY_CODE)  # the first code this reader does not know
    data = forge({"w": W}, edit=lambda h: h.update(dtypes=bytes([unknown])))
    refuse(data, tmp_path, safeckpt.UnsupportedDtypeError, "'w'", f"code {unknown}")
    data = forge({"w": W}, edit=lambda h: h.update(dtypes=b"\xff"))
    refuse(data, tmp_path, safeckpt.UnsupportedDtypeError, "code 255")


def test_T2_ndim_limit(tmp_path):
    a = np.zeros((1,) * 33, np.uint8)
    refuse(forge({"a": a}), tmp_path, safeckpt.LimitError, "'a'", "max_ndim")
    b = np.zeros((1,) * 5, np.uint8)
    refuse(forge({"b": b}), tmp_path, safeckpt.LimitError, "max_ndim", max_ndim=4)


def test_T3_dimension_not_below_2_63(tmp_path):
    data = forge({"w": W}, edit=lambda h: h.update(shape=u64s([2, 2**63])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'w'", "2**63")


def test_T4_too_large(tmp_path):
    data = forge({"w": W}, edit=lambda h: h.update(shape=u64s([2**62, 4])))
    refuse(data, tmp_path, safeckpt.LayoutError, "too large")
    data = forge({"w": W}, edit=lambda h: h.update(ndims=b"\x03", shape=u64s([0, 2**62, 2**62])))
    refuse(data, tmp_path, safeckpt.LayoutError, "too large")


def test_T5_nbytes_must_match_shape(tmp_path):
    data = forge({"w": W}, edit=lambda h: h.update(nbytes=u64s([23])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'w'", "prod(shape)")


def offsets_of(data):
    header_len = struct.unpack_from("<Q", data, 16)[0]
    header = msgpack.unpackb(data[32:32 + header_len])
    return list(struct.unpack(f"<{len(header['names'])}Q", header["offsets"]))


def test_T6_misaligned(tmp_path):
    good = forge({"w": W, "b": B})
    first, second = offsets_of(good)
    data = forge({"w": W, "b": B}, edit=lambda h: h.update(offsets=u64s([first, second + 8])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'b'", "multiple of the alignment")


def test_T6_overlap_and_gap(tmp_path):
    first, second = offsets_of(forge({"w": W, "b": B}))
    data = forge({"w": W, "b": B}, edit=lambda h: h.update(offsets=u64s([first, second - 64])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'b'", "overlaps")
    data = forge({"w": W, "b": B}, edit=lambda h: h.update(offsets=u64s([first + 64, second])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'w'", "gap")
    data = forge({"w": W}, edit=lambda h: h.update(offsets=u64s([0])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'w'", "overlaps")


def test_T6_offset_plus_length_overflow(tmp_path):
    data = forge({"w": W}, edit=lambda h: h.update(offsets=u64s([2**64 - 64])))
    refuse(data, tmp_path, safeckpt.LayoutError, "'w'")


def test_T7_truncated_data(tmp_path):
    data = forge({"w": W, "b": B})
    refuse(data[:-1], tmp_path, safeckpt.TruncatedFileError, "'b'", "past the end")
    first, _ = offsets_of(data)
    refuse(data[:first + 4], tmp_path, safeckpt.TruncatedFileError, "'w'")


def test_T8_trailing_bytes_and_polyglot(tmp_path):
    refuse(forge({"w": W}, tail=b"\0"), tmp_path, safeckpt.LayoutError, "trailing")
    zip_tail = b"PK\x05\x06" + bytes(18)
    refuse(forge({"w": W}, tail=zip_tail), tmp_path, safeckpt.LayoutError, "trailing")
    refuse(forge({}, tail=b"x"), tmp_path, safeckpt.LayoutError, "trailing")


def test_T9_non_zero_padding(tmp_path):
    data = bytearray(forge({"w": W, "b": B}))
    first, second = offsets_of(bytes(data))
    data[second - 1] = 1  # the last padding byte before b
    refuse(bytes(data), tmp_path, safeckpt.LayoutError, "'b'", "padding")
    data = bytearray(forge({"w": W}))
    data[first - 1] = 0x80  # padding between header and the first tensor
    refuse(bytes(data), tmp_path, safeckpt.LayoutError, "'w'", "padding")


def corrupt_b():
    """A file whose tensor 'b' has one flipped bit."""
    data = bytearray(forge({"w": W, "b": B}))
    _, second = offsets_of(bytes(data))
    data[second] ^= 0x04
    return bytes(data)


def test_T10_loads_that_copy_the_bytes_verify_by_default(tmp_path):
    """verify=None (auto): every load that copies a tensor's bytes (mmap=False, bytes) checks its
    CRC32C; a mapped load stays lazy; verify=True checks everywhere, verify=False nowhere."""
    data = corrupt_b()
    path = tmp_path / "f.sckpt"
    path.write_bytes(data)
    copying = [lambda **kw: safeckpt.load_bytes(data, **kw),
               lambda **kw: safeckpt.load_file(path, mmap=False, **kw)]
    for load in copying:
        with pytest.raises(safeckpt.ChecksumError, match="tensor 'b': tensor checksum mismatch"):
            load()
        assert load(verify=False)["b"][0] != B[0]
    assert safeckpt.load_file(path)["b"][0] != B[0]  # mapped: nothing read, nothing checked
    refuse(data, tmp_path, safeckpt.ChecksumError, "'b'", "checksum", verify=True)
    for reader in (safeckpt.Reader(data), safeckpt.open(path, mmap=False)):
        with reader:
            np.testing.assert_array_equal(reader["w"], W)  # each tensor checked as it is read
            with pytest.raises(safeckpt.ChecksumError, match="'b'"):
                reader["b"]
            reader.verify(["w"])
            with pytest.raises(safeckpt.ChecksumError, match="'b'"):
                reader.verify()
    with safeckpt.open(path, mmap=False) as reader:  # a part of a tensor has no CRC of its own
        assert reader.get_slice("b")[1:].tolist() == B[1:].tolist()
    with safeckpt.open(path) as reader:
        assert reader["b"][0] != B[0]
        with pytest.raises(safeckpt.ChecksumError, match="'b'"):
            reader.load_all(verify=True)


def test_T10_checksums_come_from_the_bytes_read(tmp_path, monkeypatch):
    """mmap=False with verify: one parallel read, and the CRC32C of the very buffers it filled
    (a tensor read alone is checksummed by the read itself, a shared block by one C call after
    it), never a second read; small and large tensors, shared blocks."""
    tensors = {f"s{i}": np.full(100, i, np.int32) for i in range(20)}
    tensors["big"] = np.arange(600_000, dtype=np.float32)  # above the shared-block size
    tensors["empty"] = np.zeros((0, 2), np.int8)
    path = tmp_path / "f.sckpt"
    safeckpt.save_file(tensors, path)
    with safeckpt.open(path, mmap=False) as reader:
        reads, ranges = [], []
        read_into, crc32c_ranges = reader.pread_into, reader._be.crc32c_ranges
        monkeypatch.setattr(reader, "pread_into", lambda *a: reads.append(a) or read_into(*a))
        monkeypatch.setattr(reader._be, "crc32c_ranges",
                            lambda *a: ranges.append(a) or crc32c_ranges(*a))
        loaded = reader.load_all(verify=True)
        assert len(reads) == 1 and len(ranges) == 1  # the block of 20 small ones
        assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
        data = bytearray(path.read_bytes())
        data[reader.info("big").offset + 12345] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(safeckpt.ChecksumError, match="'big'"):
        safeckpt.load_file(path, mmap=False)


def test_T10_verify_without_checksums_is_refused(tmp_path):
    """Auto verification loads a file without checksums; only verify=True refuses it."""
    data = forge({"w": W}, checksum=False)
    assert load_all_ways(data, tmp_path)
    refuse(data, tmp_path, safeckpt.ChecksumError, "checksum=False", verify=True)


def test_zero_size_and_0d_tensors(tmp_path):
    tensors = {"scalar": np.array(3.5), "empty": np.zeros((0, 4), np.int8),
               "last_empty": np.zeros((3, 0), np.float32)}
    data = forge(tensors)
    assert data == safeckpt.save_bytes(tensors)
    for result in load_all_ways(data, tmp_path, verify=True):
        for name, value in tensors.items():
            assert result[name].shape == value.shape and result[name].dtype == value.dtype
        assert result["scalar"] == 3.5
