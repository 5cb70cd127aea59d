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

ITEMSIZE = [1, 1, 2, 4, 8, 1, 2, 4, 8, 2, 4, 8, 2, 1, 1, 8, 16]  # by dtype code (FORMAT.md section 4)


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


def frame(tensors, align_log2=6, max_ndim=32):
    """A harness input holding a valid table of ``tensors``: ``[(dtype code, shape)]``."""
    n = len(tensors)
    dtypes = bytes(code for code, _ in tensors)
    ndims = bytes(len(shape) for _, shape in tensors)
    shape = b"".join(struct.pack("<Q", d) for _, s in tensors for d in s)
    header_end = 5 + 2 * n + 16 * n + len(shape)
    align = 1 << align_log2
    offsets, sizes, end = [], [], header_end
    for code, dims in tensors:
        end = -(-end // align) * align
        size = ITEMSIZE[code] * int(np.prod(dims, dtype=np.uint64))
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
}


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
