"""Constants of the .sckpt format, and encoding/decoding of its prefix and header.

docs/FORMAT.md is the specification; rule names such as [P5] refer to it.
"""

import struct

MAGIC = b"\x89SCK\r\n\x1a\n"  # non-ASCII first byte and CR LF / ^Z / LF catch text-mode mangling
MAGIC_TEXT_MANGLED = b"\x89SCK\n\x1a\n"  # what a CR LF -> LF conversion makes of MAGIC
PREFIX_SIZE = 32  # magic 8, major 2, minor 2, flags 4, header_len 8, align 4, header_crc 4
PREFIX_STRUCT = struct.Struct("<8sHHIQII")
VERSION_MAJOR = 1
VERSION_MINOR = 0
FLAG_TENSOR_CRC = 0x1  # the header has a crc32c column
KNOWN_FLAGS = FLAG_TENSOR_CRC
ALIGN_MIN = 8  # natural alignment of every dtype's numpy alignment
ALIGN_MAX = 1 << 20  # 1 MiB: beyond any page, O_DIRECT or GPU-direct need; bounds padding
ALIGN_DEFAULT = 64  # a cache line, and what AVX-512 loads like

# Default reader limits; every one is a keyword argument of open()/load_file().
MAX_HEADER_SIZE = 100 << 20  # 100 MiB: about 2 million tensors with long names
MAX_TENSORS = 10_000_000
MAX_NDIM = 32  # numpy 1.x's limit, so every file loads under any numpy
MAX_DEPTH = 64  # nesting of maps and arrays in the header
