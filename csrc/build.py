"""cffi builder of ``safeckpt._sckpt``: compiles csrc/*.c into the extension (API mode).

Used by setup.py through ``cffi_modules=["csrc/build.py:ffibuilder"]``; paths are relative to
the repository root, where setup.py runs. ``python csrc/build.py`` builds it by hand. cffi
builds it with the limited API (``Py_LIMITED_API``), hence ``_sckpt.abi3.so`` and setup.py's
``cp39-abi3`` wheel tag.
The ``cdef`` below is written by hand from csrc/sck.h; constants are declared with ``...`` so
that their values come from the C header, and tests/test_native.py compares them with the
Python modules. The core is ISO C11 on POSIX (csrc/compat.h); .ci/cross builds the same sources
with -std=c11 -pedantic for three CPUs.
"""

import glob
import os
import sys

from cffi import FFI

CDEF = """
#define SCK_MAGIC_SIZE ...
#define SCK_MAGIC_TEXT_MANGLED_SIZE ...
#define SCK_PREFIX_SIZE ...
#define SCK_VERSION_MAJOR ...
#define SCK_VERSION_MINOR ...
#define SCK_FLAG_TENSOR_CRC ...
#define SCK_FLAG_SHARD_INDEX ...
#define SCK_FLAG_REFS ...
#define SCK_KNOWN_FLAGS ...
#define SCK_ALIGN_MIN ...
#define SCK_ALIGN_MAX ...
#define SCK_ALIGN_DEFAULT ...
#define SCK_MAX_HEADER_SIZE ...
#define SCK_MAX_TENSORS ...
#define SCK_MAX_NDIM ...
#define SCK_MAX_DEPTH ...
#define SCK_DTYPE_COUNT ...
#define SCK_ADVICE_NORMAL ...
#define SCK_ADVICE_SEQUENTIAL ...
#define SCK_ADVICE_WILLNEED ...
#define SCK_ADVICE_RANDOM ...
#define SCK_READ_PIECE ...
#define SCK_MAX_THREADS ...
#define SCK_WRITE_CHUNK ...
#define SCK_CRC_THREAD_MIN ...
#define SCK_COMPARE_THREAD_MIN ...
#define SCK_COPY_THREAD_MIN ...

extern const unsigned char sck_magic[8];

typedef enum sck_code {
    SCK_OK, SCK_E_TRUNCATED, SCK_E_MAGIC, SCK_E_MAGIC_TEXT, SCK_E_VERSION, SCK_E_FLAGS,
    SCK_E_HEADER_LIMIT, SCK_E_ALIGN, SCK_E_HEADER_CRC, SCK_E_COLUMN, SCK_E_DTYPE, SCK_E_NDIM,
    SCK_E_DIM, SCK_E_TOO_LARGE, SCK_E_NBYTES, SCK_E_MISALIGNED, SCK_E_OVERLAP, SCK_E_GAP,
    SCK_E_TENSOR_TRUNCATED, SCK_E_TRAILING, SCK_E_PADDING, SCK_E_CRC, SCK_E_IO, SCK_E_NOMEM,
    SCK_E_ARG, ...
} sck_code;

int sck_dtype_bits(int code);
int sck_dtype_itemsize(int code);

uint32_t sck_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t sck_crc32c_sw(uint32_t crc, const void *buf, size_t len);
int sck_crc32c_hw_available(void);
uint32_t sck_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
int sck_crc32c_ranges(const void *base, uint64_t size, uint64_t n, const uint64_t *offsets,
                      const uint64_t *lengths, uint32_t *crcs, int nthreads, uint64_t *bad_index);

typedef struct sck_prefix {
    uint32_t major;
    uint32_t minor;
    uint32_t flags;
    uint32_t align;
    uint64_t header_len;
    uint32_t header_crc;
} sck_prefix;

int sck_parse_prefix(const uint8_t *buf, uint64_t buf_len, uint64_t file_size,
                     uint64_t max_header_size, sck_prefix *out);

typedef struct sck_table {
    uint64_t n;
    const uint8_t *dtypes;
    uint64_t dtypes_len;
    const uint8_t *ndims;
    uint64_t ndims_len;
    const uint8_t *shape;
    uint64_t shape_len;
    const uint8_t *offsets;
    uint64_t offsets_len;
    const uint8_t *nbytes;
    uint64_t nbytes_len;
} sck_table;

int sck_validate_table(const sck_table *t, uint64_t header_end, uint64_t align,
                       uint64_t file_size, uint32_t max_ndim, uint64_t *bad_index);
int sck_check_padding_mem(const uint8_t *base, uint64_t size, const sck_table *t,
                          uint64_t header_end, uint64_t *bad_index);
int sck_check_padding_fd(int fd, uint64_t size, const sck_table *t, uint64_t header_end,
                         uint64_t *bad_index, int *err);

int sck_map(int fd, uint64_t size, void **out, int *err);
void sck_unmap(void *base, uint64_t size);
int sck_advise(void *base, uint64_t size, uint64_t offset, uint64_t length, int advice);

int sck_pread_many(int fd, uint64_t n, const uint64_t *offsets, const uint64_t *lengths,
                   void *const *dests, const uint8_t *want_crc, uint32_t *crcs, int nthreads,
                   uint64_t *bad_index, int *err);
int sck_write_tensors(int fd, uint64_t pos, uint64_t n, const void *const *srcs,
                      const uint64_t *lens, uint64_t align, int want_crc, uint32_t *crcs,
                      uint64_t *end, uint64_t *bad_index, int *err);
int sck_bytes_equal(const void *a, const void *b, uint64_t len, int nthreads, int *equal);
int sck_copy_many(uint64_t n, void *const *dsts, const void *const *srcs, const uint64_t *lens,
                  int nthreads, uint64_t *bad_index);
"""

SOURCES = sorted(glob.glob("csrc/*.c"))
HEADERS = sorted(glob.glob("csrc/*.h"))
if not SOURCES or not HEADERS:
    # without its sources the extension still links (a shared object may leave symbols undefined)
    # and fails only at import: a source tree or sdist missing csrc/ must fail the build instead
    raise FileNotFoundError(f"csrc/*.c and csrc/*.h not found under {os.getcwd()!r}: run the "
                            "build from the root of safeckpt's source tree (sdists carry csrc/, "
                            "see MANIFEST.in)")

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "safeckpt._sckpt",
    '#include "sck.h"',
    sources=SOURCES,
    include_dirs=["csrc"],
    depends=HEADERS,
    # _FILE_OFFSET_BITS: a 64-bit off_t on 32-bit hosts (compat.h sets it too, for other builds)
    define_macros=[("_FILE_OFFSET_BITS", "64")],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose="-v" in sys.argv)
