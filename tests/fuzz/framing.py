"""The input framing of tests/fuzz/fuzz_table.c in Python, and the seed corpora of both fuzzers.

``unframe(data)`` reads an input of the C harness as the harness does: the input is the whole
file, and its first bytes frame a tensor table (see the comment at the top of fuzz_table.c).
``frame(...)`` builds such an input from a table, laid out so that the table is valid.

    python tests/fuzz/framing.py     # rewrites corpus_c/ and corpus_py/ seeds (deterministic)

The fuzzers add what they find to the corpora; tests/test_fuzz_corpus.py replays every file.
"""

import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for forge
from forge import forge  # noqa: E402

# bits per element by dtype code (FORMAT.md section 4); codes 24-32 are packed (bits < 8)
BITS = [8, 8, 16, 32, 64, 8, 16, 32, 64, 16, 32, 64, 16, 8, 8, 64, 128, 8, 8,  # 0-18
        8, 8, 8, 8, 8, 6, 6, 4, 4, 4, 2, 2, 1, 1, 32, 32]  # 19-34 (version 1.5)


def nbytes_of(code, dims):
    """[T5]: ceil(prod(dims) * bits / 8)."""
    count = 1
    for d in dims:
        count *= d
    return -(-count * BITS[code] // 8)


def pack_bits(values, bits):
    """FORMAT.md section 4: element k in stream bits [k*bits, (k+1)*bits), LSB first."""
    stream = 0
    for k, v in enumerate(values):
        stream |= (v & ((1 << bits) - 1)) << (k * bits)
    return stream.to_bytes(-(-len(values) * bits // 8), "little")


def unframe(data):
    """``(n, dtypes, ndims, offsets, nbytes, shape, header_end, align, max_ndim)`` of an input,
    or None when it is shorter than the 5-byte framing header."""
    if len(data) < 5:
        return None
    n, align, max_ndim = data[0] % 48, 1 << (data[1] % 22), data[2] % 40
    header_end = data[3] | data[4] << 8
    pos = 5
    columns = []
    for width in (n, n, 8 * n, 8 * n):
        columns.append(data[pos:pos + width])
        pos += width
    dtypes, ndims, offsets, nbytes = columns
    shape = data[pos:pos + 8 * sum(ndims)]
    return n, dtypes, ndims, offsets, nbytes, shape, header_end, align, max_ndim


def frame(tensors, align_log2=6, max_ndim=32, nbytes_delta=None):
    """A harness input holding a valid table of ``tensors``: ``[(dtype code, shape)]``.

    ``nbytes_delta={i: d}`` states tensor i's nbytes d bytes off (and lays the data out by it),
    so that [T5] is the only rule the table breaks.
    """
    n = len(tensors)
    dtypes = bytes(code for code, _ in tensors)
    ndims = bytes(len(shape) for _, shape in tensors)
    shape = b"".join(struct.pack("<Q", d) for _, s in tensors for d in s)
    header_end = 5 + 2 * n + 16 * n + len(shape)
    align = 1 << align_log2
    offsets, sizes, end = [], [], header_end
    for code, dims in tensors:
        end = -(-end // align) * align
        size = nbytes_of(code, dims) + (nbytes_delta or {}).get(len(offsets), 0)
        offsets.append(end)
        sizes.append(size)
        end += size
    head = bytes([n, align_log2, max_ndim]) + struct.pack("<H", header_end) + dtypes + ndims
    head += b"".join(struct.pack("<Q", v) for v in offsets + sizes) + shape
    assert len(head) == header_end
    body = bytearray(head + bytes(end - header_end))
    for offset, size in zip(offsets, sizes):
        body[offset:offset + size] = bytes((offset + k) % 251 + 1 for k in range(size))
    return bytes(body)


C_SEEDS = {
    "empty_table": frame([]),
    "one_float32": frame([(10, (2, 3))]),
    "three_mixed": frame([(10, (4,)), (2, ()), (16, (1, 2))], align_log2=3),
    "zero_size": frame([(4, (0, 5)), (0, (3,))], align_log2=4),
    "many_small": frame([(1, (3,))] * 20, align_log2=3),
    # version 1.5: every new code, packed ones at counts that leave the last byte part used
    "new_codes": frame([(code, (3,)) for code in range(19, 35)], align_log2=3),
    "packed_shapes": frame([(24, (5,)), (26, (3, 3)), (29, (7,)), (32, (9,)), (31, (2, 0)),
                            (27, ())], align_log2=3),
    "packed_nbytes_plus_one": frame([(10, (2,)), (27, (3,))], nbytes_delta={1: 1}),
    "packed_nbytes_minus_one": frame([(25, (5,)), (10, (2,))], nbytes_delta={0: -1}),
    "packed_unpacked_size": frame([(32, (16,))], nbytes_delta={0: 14}),  # one byte per element
}


def _packed_file(code, shape, values, minor=5, last_byte_or=0, nbytes_delta=0, checksum=True):
    """A file (forge) holding one tensor of a packed ``code``: ``values`` packed by the spec."""
    data = bytearray(pack_bits(values, BITS[code]))
    data[-1] |= last_byte_or
    data += bytes(max(0, nbytes_delta))
    if nbytes_delta < 0:
        del data[nbytes_delta:]
    raw = np.frombuffer(bytes(data), np.uint8).reshape((1,) * (len(shape) - 1) + (-1,))

    def edit(header):
        header["dtypes"] = bytes([code])
        header["shape"] = b"".join(struct.pack("<Q", d) for d in shape)
    return forge({"q": raw}, minor=minor, checksum=checksum, edit=edit)


def py_seeds():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {
        "empty": forge({}, checksum=False),
        "one_tensor": forge({"w": w}),
        "mixed": forge({"a": np.int8(3), "b": np.zeros((0, 2), np.float16),
                        "c": np.array([1 + 2j], np.complex64)}, align=8, metadata={"k": [1, "x"]}),
        "no_checksums": forge({"w": w, "v": np.arange(3, dtype=np.int64)}, checksum=False),
        "tree": forge({"w": w, "b": np.arange(2, dtype=np.int16)}, minor=1, extra={
            "tree": ["dict", "w", ["tensor", 0], "b", ["tensor", 1], "t", ["ref", 0],
                     "s", ["scalar", 10, b"\0\0\xc0\x3f"], "l", ["tuple", 1, None]]}),
        # version 1.5: packed tensors (FORMAT.md section 4), valid and broken
        "packed_int4": _packed_file(27, (3,), [1, -2, 7]),
        "packed_float6_2d": _packed_file(24, (2, 3), [1, 2, 3, 60, 61, 62], checksum=False),
        "packed_uint1": _packed_file(32, (9,), [1, 0, 1, 1, 0, 0, 0, 1, 1]),
        "packed_padding_bits": _packed_file(27, (3,), [1, -2, 7], last_byte_or=0x10),  # [T11]
        "packed_nbytes_plus_one": _packed_file(29, (5,), [1, 2, 3, 0, 1], nbytes_delta=1),
        "packed_nbytes_minus_one": _packed_file(25, (5,), [1, 2, 3, 4, 5], nbytes_delta=-1),
    }


def main():
    for folder, seeds in (("corpus_c", C_SEEDS), ("corpus_py", py_seeds())):
        os.makedirs(os.path.join(HERE, folder), exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(HERE, folder, "seed_" + name), "wb") as out:
                out.write(data)
    print(f"wrote {len(C_SEEDS)} C seeds and {len(py_seeds())} Python seeds under {HERE}")


if __name__ == "__main__":
    main()
