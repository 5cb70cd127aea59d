"""Writes the .sckpt fixtures of the C tests (tests/c/fixtures/) with safeckpt's Python writer.

The fixtures are checked in: they were written on x86-64, and tests/c/test_core.c reads them on
every CPU that .ci/cross runs it on (x86-64, aarch64, big-endian s390x) and checks them bit by bit.
Element k (C order) of a tensor with seed s has a value given by a formula of (dtype, s, k) that
tests/c/test_core.c computes too (``expected`` below and ``expect_element`` there):

- integers, float16 and float8 (raw bits): the top 8·itemsize bits of
  k·0x9E3779B97F4A7C15 + s·0x0123456789ABCDEF (mod 2**64); bool: the top bit;
- float32: (k − 3s)·0.375; float64: (k − s)·0.1; bfloat16: the top 16 bits of float32 (k − s)·0.5;
- complex64: (k + s)·0.5 + i·k·(−0.25) in float32; complex128: (k + s)·0.1 + i·k·(−0.001);
- complex32, bcomplex32 (version 1.5): raw bits, as the integers;
- the packed codes (bits < 8, version 1.5): the top ``bits`` bits, which the file holds packed
  (FORMAT.md section 4: element k at stream bits [k·bits, (k+1)·bits), LSB first).

Each fixture NAME.sckpt comes with NAME.txt, the facts the C test checks the file against: file
size, prefix fields, where each column of the header lies in the file, and per tensor its name,
dtype code, seed, shape, offset, byte length and CRC32C (0 without checksums). Run from the
repository root, with safeckpt importable:  python tests/c/make_fixtures.py
"""

import os
import struct
import sys

import ml_dtypes
import numpy as np

import safeckpt
from safeckpt import dtypes, format

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
M1, M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0x0123456789ABCDEF)
COLUMNS = ("dtypes", "ndims", "shape", "offsets", "nbytes", "crc32c")

# name, dtype name, seed, shape: every dtype of FORMAT.md section 4, odd sizes (so that padding
# follows most tensors), an empty tensor and a scalar
MIXED = [
    ("f64", "float64", 1, (3, 4)),
    ("i16", "int16", 2, (7,)),
    ("bf16", "bfloat16", 3, (2, 5)),
    ("u8", "uint8", 4, (5,)),
    ("flag", "bool", 5, (4,)),
    ("i64", "int64", 6, (2, 2)),
    ("f32", "float32", 7, (3,)),
    ("nothing", "float32", 8, (0, 3)),
    ("c64", "complex64", 9, (2,)),
    ("scalar", "int32", 10, ()),
    ("u64", "uint64", 11, (3,)),
    ("f16", "float16", 12, (4,)),
    ("i8", "int8", 13, (9,)),
    ("u16", "uint16", 14, (3,)),
    ("u32", "uint32", 15, (2,)),
    ("c128", "complex128", 16, (1, 2)),
    ("e4m3", "float8_e4m3fn", 17, (6,)),
    ("e5m2", "float8_e5m2", 18, (5,)),
    ("e4m3fnuz", "float8_e4m3fnuz", 19, (3,)),
    ("e5m2fnuz", "float8_e5m2fnuz", 20, (4,)),
    ("last", "float64", 21, (3,)),
]


# name, dtype name, seed, shape: every code of version 1.5 (19-34), counts that leave the last
# byte of a packed tensor part used, an empty one and a 0-d one
PACKED = [
    ("e4m3b11", "float8_e4m3b11fnuz", 1, (3,)),
    ("e3m4", "float8_e3m4", 2, (2, 2)),
    ("e4m3", "float8_e4m3", 3, (5,)),
    ("e8m0", "float8_e8m0fnu", 4, (3,)),
    ("e5m3", "float8_e5m3fnu", 5, (7,)),
    ("f6a", "float6_e2m3fn", 6, (5,)),
    ("f6b", "float6_e3m2fn", 7, (2, 3)),
    ("f4", "float4_e2m1fn", 8, (7,)),
    ("i4", "int4", 9, (3, 3)),
    ("u4", "uint4", 10, (4,)),
    ("i2", "int2", 11, (7,)),
    ("u2", "uint2", 12, ()),
    ("i1", "int1", 13, (13,)),
    ("u1", "uint1", 14, (2, 0)),
    ("c32", "complex32", 15, (3,)),
    ("bc32", "bcomplex32", 16, (2,)),
    ("last", "uint1", 17, (9,)),
]


def dtype_of(name):
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, the float8, float6, float4, sub-byte integers, complex32
        return np.dtype(getattr(ml_dtypes, name))


def bits_of(name):
    """Bits per element in a file (FORMAT.md section 4)."""
    return dtypes.BITS_BY_CODE[dtypes.NAME_BY_CODE.index(name)]


def packed_bytes(raw, bits):
    """The bit stream of FORMAT.md section 4 of unsigned ``raw`` values, in plain integers."""
    stream = 0
    for k, value in enumerate(int(v) for v in raw):
        stream |= value << (k * bits)
    return stream.to_bytes(-(-len(raw) * bits // 8), "little")


def hashed_bits(seed, count, bits):
    """The top ``bits`` bits of k*M1 + seed*M2 (mod 2**64), k = 0..count-1, as uint64."""
    k = np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = k * M1 + np.uint64(seed) * M2
    return h >> np.uint64(64 - bits)


def expected(dtype_name, seed, shape):
    """The array of the formula above, in C order (native byte order: run this on x86-64)."""
    count = int(np.prod(shape, dtype=np.int64))
    dt = dtype_of(dtype_name)
    k = np.arange(count, dtype=np.int64)
    if dtype_name == "bool":
        flat = hashed_bits(seed, count, 1).astype(np.bool_)
    elif dtype_name == "float32":
        flat = (k - 3 * seed).astype(np.float32) * np.float32(0.375)
    elif dtype_name == "float64":
        flat = (k - seed).astype(np.float64) * 0.1
    elif dtype_name == "bfloat16":
        f = (k - seed).astype(np.float32) * np.float32(0.5)
        flat = (f.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(dt)
    elif dtype_name == "complex64":
        real = (k + seed).astype(np.float32) * np.float32(0.5)
        imag = k.astype(np.float32) * np.float32(-0.25)
        flat = np.stack([real, imag], axis=-1).reshape(-1).view(np.complex64)
    elif dtype_name == "complex128":
        real = (k + seed).astype(np.float64) * 0.1
        imag = k.astype(np.float64) * -0.001
        flat = np.stack([real, imag], axis=-1).reshape(-1).view(np.complex128)
    elif bits_of(dtype_name) < 8:  # packed: the top bits, in the low bits of each byte
        raw = hashed_bits(seed, count, bits_of(dtype_name)).astype(np.uint8)
        if dtype_name.startswith("int"):  # a value of the signed type with those low bits
            raw = raw.astype(np.int8) - ((raw >> (bits_of(dtype_name) - 1)) << bits_of(dtype_name))
            flat = raw.astype(np.int8).astype(dt)
        elif dtype_name.startswith("uint"):
            flat = raw.astype(dt)
        else:
            flat = raw.view(dt)
    else:  # integers, float16, float8, complex32: raw bits
        bits = hashed_bits(seed, count, 8 * dt.itemsize)
        flat = bits.astype(f"u{dt.itemsize}").view(dt)
    return flat.reshape(shape)


def column_places(data, header_len):
    """{column: (file offset, length)} of the header's bin columns, found by their msgpack keys."""
    header = data[format.PREFIX_SIZE:format.PREFIX_SIZE + header_len]
    places = {}
    for key in COLUMNS:
        tag = bytes([0xA0 | len(key)]) + key.encode()
        if header.count(tag) == 0:
            continue
        assert header.count(tag) == 1, key
        at = header.index(tag) + len(tag)
        kind = header[at]
        size, width = {0xC4: ("B", 1), 0xC5: (">H", 2), 0xC6: (">I", 4)}[kind]
        (length,) = struct.unpack_from(size, header, at + 1)
        places[key] = (format.PREFIX_SIZE + at + 1 + width, length)
    return places


def write(name, specs, **options):
    """Save the tensors of ``specs`` to NAME.sckpt and describe the file in NAME.txt."""
    path = os.path.join(HERE, name + ".sckpt")
    tensors = {t: expected(d, s, shape) for t, d, s, shape in specs}
    safeckpt.save_file(tensors, path, **options)
    with open(path, "rb") as f:
        data = f.read()
    magic, major, minor, flags, header_len, align, header_crc = struct.unpack_from(
        "<8sHHIQII", data)
    places = column_places(data, header_len)
    lines = [f"# {name}.sckpt, written by tests/c/make_fixtures.py (safeckpt {safeckpt.__version__})",
             f"size {len(data)}",
             f"prefix {major} {minor} {flags} {align} {header_len} {header_crc}"]
    lines += [f"column {key} {at} {length}" for key, (at, length) in places.items()]
    lines.append(f"tensors {len(specs)}")
    offsets = np.frombuffer(data, "<u8", len(specs), places["offsets"][0]) if specs else []
    crcs = (np.frombuffer(data, "<u4", len(specs), places["crc32c"][0])
            if "crc32c" in places and specs else [0] * len(specs))
    for i, (t, d, s, shape) in enumerate(specs):
        code = dtypes.code_of(tensors[t].dtype)
        bits = dtypes.BITS_BY_CODE[code]
        want = tensors[t].tobytes()
        if bits < 8:  # the file holds the formula's top bits, packed
            want = packed_bytes(hashed_bits(s, tensors[t].size, bits), bits)
        nbytes = len(want)
        got = data[int(offsets[i]):int(offsets[i]) + nbytes]
        assert got == want, t  # the file holds the formula's bytes
        dims = " ".join(str(x) for x in shape)
        lines.append(f"tensor {t} {code} {s} {len(shape)} {dims} {int(offsets[i])} {nbytes} "
                     f"{int(crcs[i])}".replace("  ", " "))
    with open(os.path.join(HERE, name + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{name}.sckpt: {len(data)} bytes, {len(specs)} tensors")


def main():
    os.makedirs(HERE, exist_ok=True)
    write("mixed", MIXED, align=64, checksum=True)
    write("align256_nocrc", [("w", "float32", 31, (5, 3)), ("b", "int16", 32, (3,)),
                             ("x", "float64", 33, (2,))], align=256, checksum=False)
    write("empty", [], checksum=True)
    write("packed", PACKED, align=8, checksum=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
