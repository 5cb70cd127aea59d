"""Hand-made .sckpt files for tests, built from docs/FORMAT.md alone (not from safeckpt's writer).

``forge()`` lays out a file the way the spec says, lets a test edit the header or prefix, and
returns the bytes, so each test can break exactly one rule.
"""

import struct

import msgpack
import numpy as np

MAGIC = b"\x89SCK\r\n\x1a\n"
CODES = {"bool": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "uint8": 5, "uint16": 6,
         "uint32": 7, "uint64": 8, "float16": 9, "float32": 10, "float64": 11, "bfloat16": 12,
         "float8_e4m3fn": 13, "float8_e5m2": 14, "complex64": 15, "complex128": 16}


def _crc_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data):
    """Reference CRC32C, one byte at a time (small inputs only)."""
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def u64s(values):
    return b"".join(struct.pack("<Q", v) for v in values)


def forge(tensors=(), *, align=64, metadata=None, checksum=True, major=1, minor=0, flags=None,
          magic=MAGIC, extra=None, edit=None, header_bytes=None, header_crc=None, header_len=None,
          prefix_align=None, tail=b""):
    """Return the bytes of a file holding ``tensors`` (a dict or pairs of name -> array).

    ``extra`` adds header keys before the layout is computed; ``edit(header)`` may change the
    header dict after it (the data stays where the layout put it); the other keywords override
    single prefix fields.
    """
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    arrays = [np.array(a, order="C") for _, a in items]
    header = {
        "names": [name for name, _ in items],
        "dtypes": bytes(CODES[a.dtype.name] for a in arrays),
        "ndims": bytes(a.ndim for a in arrays),
        "shape": u64s(d for a in arrays for d in a.shape),
        "offsets": u64s(0 for _ in arrays),
        "nbytes": u64s(a.nbytes for a in arrays),
    }
    if checksum:
        header["crc32c"] = b"".join(struct.pack("<I", crc32c(a.tobytes())) for a in arrays)
    if metadata is not None:
        header["metadata"] = metadata
    header.update(extra or {})
    length = len(msgpack.packb(header, use_bin_type=True))
    offsets, pos = [], 32 + length
    for a in arrays:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += a.nbytes
    header["offsets"] = u64s(offsets)
    if edit is not None:
        edit(header)
    if header_bytes is None:
        header_bytes = msgpack.packb(header, use_bin_type=True)
    if flags is None:
        flags = 1 if checksum else 0
    prefix = magic + struct.pack(
        "<HHIQII", major, minor, flags,
        len(header_bytes) if header_len is None else header_len,
        align if prefix_align is None else prefix_align,
        crc32c(header_bytes) if header_crc is None else header_crc,
    )
    body = bytearray(prefix + header_bytes)
    for a, offset in zip(arrays, offsets):
        body.extend(bytes(max(0, offset - len(body))))
        body[offset:offset + a.nbytes] = a.tobytes()
    if len(body) < pos:
        body.extend(bytes(pos - len(body)))
    return bytes(body) + tail


def u32s(values):
    return b"".join(struct.pack("<I", v) for v in values)


def table_of(data):
    """``{name: (offset, nbytes, crc32c, dtype code, shape)}`` of a forged file's own tensors,
    read from its header as FORMAT.md section 3 lays it out."""
    header_len = struct.unpack_from("<Q", data, 16)[0]
    header = msgpack.unpackb(data[32:32 + header_len], raw=False)
    n = len(header["names"])
    offsets = struct.unpack(f"<{n}Q", header["offsets"])
    nbytes = struct.unpack(f"<{n}Q", header["nbytes"])
    crcs = struct.unpack(f"<{n}I", header["crc32c"]) if "crc32c" in header else (None,) * n
    dims = iter(struct.unpack(f"<{len(header['shape']) // 8}Q", header["shape"]))
    shapes = [tuple(next(dims) for _ in range(k)) for k in header["ndims"]]
    return {name: (offsets[i], nbytes[i], crcs[i], header["dtypes"][i], shapes[i])
            for i, name in enumerate(header["names"])}


def refs_map(files, refs):
    """The ``refs`` header map (FORMAT.md section 11) of references ``refs``: ``(name, file,
    (offset, nbytes, crc32c, dtype code, shape))`` with ``file`` an index into ``files``, a list
    of ``(file name, save_id, file bytes)`` (the file's header_crc and size read from its bytes)."""
    return {
        "files": [name for name, _, _ in files],
        "save_ids": [save_id for _, save_id, _ in files],
        "header_crcs": [struct.unpack_from("<I", data, 28)[0] for _, _, data in files],
        "sizes": [len(data) for _, _, data in files],
        "names": [name for name, _, _ in refs],
        "file": u32s(j for _, j, _ in refs),
        "dtypes": bytes(entry[3] for _, _, entry in refs),
        "ndims": bytes(len(entry[4]) for _, _, entry in refs),
        "shape": u64s(d for _, _, entry in refs for d in entry[4]),
        "offsets": u64s(entry[0] for _, _, entry in refs),
        "nbytes": u64s(entry[1] for _, _, entry in refs),
        "crc32c": u32s(entry[2] for _, _, entry in refs),
    }
