/*
 * sck.h - the C core of safeckpt: CRC32C, prefix and table validation, padding check, mmap,
 * parallel pread and streaming write of .sckpt files.
 *
 * docs/FORMAT.md is the specification; rule names such as [P5] or [T6] refer to it.
 * Every constant here mirrors safeckpt/format.py, safeckpt/dtypes.py or safeckpt/errors.py, and
 * tests/test_native.py checks that they agree. compat.h says what the core needs of the platform;
 * the sources: validate.c (pure validation), crc32c.c (pure CRC32C), parallel.c (work in pieces
 * on threads, parallel CRC32C), io.c (mmap, pread, pwrite), compare.c (exact byte comparison).
 *
 * Conventions: every public name starts with sck_ / SCK_. Functions return an int: SCK_OK (0) or a
 * negative enum sck_code; results go through out-pointers, which are zeroed before being filled.
 * Every length, offset and count read from a file is untrusted and checked without overflow.
 * Functions doing I/O report the errno of a failure through an `int *err` out-parameter (errno is
 * per thread, and the parallel reader fails in a worker thread).
 */
#ifndef SCK_H
#define SCK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Format constants (safeckpt/format.py) ---------------------------------------------- */

#define SCK_MAGIC "\x89SCK\r\n\x1a\n" /* 8 bytes, no terminating NUL counted */
#define SCK_MAGIC_SIZE 8
#define SCK_MAGIC_TEXT_MANGLED "\x89SCK\n\x1a\n" /* SCK_MAGIC after CR LF -> LF: 7 bytes */
#define SCK_MAGIC_TEXT_MANGLED_SIZE 7
#define SCK_PREFIX_SIZE 32 /* magic 8, major 2, minor 2, flags 4, header_len 8, align 4, crc 4 */
#define SCK_VERSION_MAJOR 1
#define SCK_VERSION_MINOR 5 /* 1.1 "tree" (FORMAT.md 8), 1.2 shard indexes (9), 1.3 dtypes 17, 18,
                             1.4 save_id and references (11), 1.5 dtypes 19-34 (sub-byte
                             packing, 4) and the "weak" and "key" tree nodes (8) */
#define SCK_FLAG_TENSOR_CRC 0x1u
#define SCK_FLAG_SHARD_INDEX 0x2u /* the file is a shard index [S1] */
#define SCK_FLAG_REFS 0x4u        /* some tensors are in other files [X2] */
#define SCK_KNOWN_FLAGS (SCK_FLAG_TENSOR_CRC | SCK_FLAG_SHARD_INDEX | SCK_FLAG_REFS)
#define SCK_ALIGN_MIN 8
#define SCK_ALIGN_MAX (1u << 20) /* 1 MiB: bounds any padding run */
#define SCK_ALIGN_DEFAULT 64

/* Default reader limits (format.py); the reader passes the ones in force to each call. */
#define SCK_MAX_HEADER_SIZE (100ull << 20)
#define SCK_MAX_TENSORS 10000000ull
#define SCK_MAX_NDIM 32
#define SCK_MAX_DEPTH 64

/* The magic as an array, for bindings that cannot see a string macro. */
extern const unsigned char sck_magic[SCK_MAGIC_SIZE];

/* ---- Error codes (safeckpt/errors.py, class Code): same names, same values ----------------
 * The messages live in one place, safeckpt/errors.py (ERRORS); the C core has no table of them. */

typedef enum sck_code {
    SCK_OK = 0,
    SCK_E_TRUNCATED = -1,
    SCK_E_MAGIC = -2,
    SCK_E_MAGIC_TEXT = -3,
    SCK_E_VERSION = -4,
    SCK_E_FLAGS = -5,
    SCK_E_HEADER_LIMIT = -6,
    SCK_E_ALIGN = -7,
    SCK_E_HEADER_CRC = -8,
    SCK_E_COLUMN = -9,
    SCK_E_DTYPE = -10,
    SCK_E_NDIM = -11,
    SCK_E_DIM = -12,
    SCK_E_TOO_LARGE = -13,
    SCK_E_NBYTES = -14,
    SCK_E_MISALIGNED = -15,
    SCK_E_OVERLAP = -16,
    SCK_E_GAP = -17,
    SCK_E_TENSOR_TRUNCATED = -18,
    SCK_E_TRAILING = -19,
    SCK_E_PADDING = -20,
    SCK_E_CRC = -21,
    SCK_E_IO = -22,
    SCK_E_NOMEM = -23,
    SCK_E_ARG = -24
} sck_code;

/* ---- Dtypes (safeckpt/dtypes.py, FORMAT.md section 4) ----------------------------------- */

#define SCK_DTYPE_COUNT 35

/* Bits per element of a dtype code (8 times the item size for the byte types; 1, 2, 4 or 6 for
 * the packed codes 24-32), 0 for a code this reader does not know. A tensor of N elements holds
 * exactly ceil(N * bits / 8) bytes [T5]: the packed codes are a bit stream, LSB first. */
int sck_dtype_bits(int code);
/* Item size in bytes of the code's numpy dtype (1 for a packed code: unpacked, one element per
 * byte), 0 for a code this reader does not know. Not the size in the file: see sck_dtype_bits. */
int sck_dtype_itemsize(int code);

/* ---- CRC32C (Castagnoli, reflected, init and final xor 0xFFFFFFFF) ---------------------- */

/* CRC32C of buf[0..len), continuing from crc (0 to start), like zlib's crc32():
 * sck_crc32c(sck_crc32c(0, a, la), b, lb) == crc32c of a followed by b.
 * Uses SSE4.2 (x86-64) or the ARMv8 CRC instructions (aarch64 Linux and macOS) when the CPU
 * has them, else tables. */
uint32_t sck_crc32c(uint32_t crc, const void *buf, size_t len);
/* The portable table-driven (slicing-by-8) implementation, for tests and benchmarks. */
uint32_t sck_crc32c_sw(uint32_t crc, const void *buf, size_t len);
/* 1 when sck_crc32c uses a hardware instruction, else 0. */
int sck_crc32c_hw_available(void);
/* The CRC32C of a followed by b, from crc_a, crc_b and the length of b (as zlib's crc32_combine). */
uint32_t sck_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
/* For each i < n: crcs[i] = CRC32C of base[offsets[i] .. offsets[i] + lengths[i]) (0 when empty).
 * Every range must lie inside base[0..size) (else SCK_E_ARG, *bad_index = the range). From
 * SCK_CRC_THREAD_MIN bytes in all, up to nthreads threads (<= 0: min(online CPUs,
 * SCK_MAX_THREADS)) share the work in pieces of at most SCK_READ_PIECE bytes, joined with
 * sck_crc32c_combine: over a cold mapping, the page faults (the reads) run in parallel too. */
int sck_crc32c_ranges(const void *base, uint64_t size, uint64_t n, const uint64_t *offsets,
                      const uint64_t *lengths, uint32_t *crcs, int nthreads, uint64_t *bad_index);

/* ---- Prefix [P1]-[P7] ------------------------------------------------------------------- */

typedef struct sck_prefix {
    uint32_t major;
    uint32_t minor;
    uint32_t flags;
    uint32_t align;
    uint64_t header_len;
    uint32_t header_crc;
} sck_prefix;

/* Checks [P1]..[P7] in the spec's order on the first buf_len bytes of a file of file_size bytes
 * and fills *out (zeroed first; only trustworthy when SCK_OK is returned). [P8] (the header CRC)
 * is left to the caller, who has the header bytes. */
int sck_parse_prefix(const uint8_t *buf, uint64_t buf_len, uint64_t file_size,
                     uint64_t max_header_size, sck_prefix *out);

/* ---- Tensor table [H4 lengths], [T1]-[T8] ------------------------------------------------ */

/* The raw columns of the header, as msgpack `bin` values: u8 dtypes and ndims, u64 little-endian
 * shape, offsets and nbytes (no alignment assumed). */
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

/* Validates the table against a file of file_size bytes whose header ends at header_end.
 * Order: align [P7] (SCK_E_ALIGN), the column lengths [H4] (SCK_E_COLUMN), header_end <=
 * file_size (SCK_E_TRUNCATED), then [T1]-[T7] tensor by tensor, then no shape bytes left over
 * [H4] and no trailing bytes [T8]. On error *bad_index is the first bad tensor, or n for a
 * whole-table error; 0 on success. Linear in n, allocates nothing. */
int sck_validate_table(const sck_table *t, uint64_t header_end, uint64_t align,
                       uint64_t file_size, uint32_t max_ndim, uint64_t *bad_index);

/* ---- Padding [T9] ------------------------------------------------------------------------ */

/* Checks that every byte between header_end and tensor 0 and between tensors is zero, on a table
 * that sck_validate_table accepted (only n, offsets and nbytes are read). SCK_E_PADDING sets
 * *bad_index to the tensor that follows the bad byte. Still safe on any table: it never reads
 * outside [0, size); a gap past size is SCK_E_TRUNCATED, a tensor starting before the previous
 * end has no gap to check, and offset/nbytes columns of the wrong length are SCK_E_COLUMN. */
int sck_check_padding_mem(const uint8_t *base, uint64_t size, const sck_table *t,
                          uint64_t header_end, uint64_t *bad_index);
/* The same on a file descriptor, read with pread in bounded chunks (EINTR-safe). A read error
 * gives SCK_E_IO with *err = errno; end of file before size gives SCK_E_TRUNCATED. */
int sck_check_padding_fd(int fd, uint64_t size, const sck_table *t, uint64_t header_end,
                         uint64_t *bad_index, int *err);

/* ---- Memory mapping ---------------------------------------------------------------------- */

#define SCK_ADVICE_NORMAL 0
#define SCK_ADVICE_SEQUENTIAL 1
#define SCK_ADVICE_WILLNEED 2
#define SCK_ADVICE_RANDOM 3

/* Maps the first size bytes of fd privately (copy-on-write: readable and writable, the file never
 * changes). size must be > 0 and fit in size_t (else SCK_E_ARG); mmap failure: SCK_E_IO, *err. */
int sck_map(int fd, uint64_t size, void **out, int *err);
/* Unmaps what sck_map returned (NULL is ignored). */
void sck_unmap(void *base, uint64_t size);
/* Best-effort madvise of [offset, offset+length) clamped to [0, size), widened to whole pages.
 * SCK_E_ARG for an unknown advice; a failing madvise is ignored. */
int sck_advise(void *base, uint64_t size, uint64_t offset, uint64_t length, int advice);

/* ---- Parallel read ----------------------------------------------------------------------- */

#define SCK_READ_PIECE (8u << 20) /* largest single pread, or CRC piece, of one thread */
#define SCK_MAX_THREADS 8

/* Reads lengths[i] bytes at offsets[i] of fd into dests[i], for i < n, with nthreads threads
 * (<= 0: min(online CPUs, SCK_MAX_THREADS); at most SCK_MAX_THREADS, and never more threads than
 * pieces of <= SCK_READ_PIECE bytes; a single piece is read on the calling thread). End of file
 * first: SCK_E_TRUNCATED; read error: SCK_E_IO with *err = errno; both set *bad_index to the
 * (lowest) failing tensor.
 * crcs: NULL, or n entries: crcs[i] = the CRC32C of the bytes read into dests[i] for each range
 * with want_crc == NULL or want_crc[i] != 0, else 0 (all 0 unless SCK_OK). Each thread checksums
 * the piece it has just read, while it is in cache, and the pieces are joined with
 * sck_crc32c_combine: a checked read costs little more than an unchecked one. */
int sck_pread_many(int fd, uint64_t n, const uint64_t *offsets, const uint64_t *lengths,
                   void *const *dests, const uint8_t *want_crc, uint32_t *crcs, int nthreads,
                   uint64_t *bad_index, int *err);

/* ---- Streaming write --------------------------------------------------------------------- */

#define SCK_WRITE_CHUNK (4u << 20) /* CRC-then-write unit, and the size of one pwritev batch */
#define SCK_CRC_THREAD_MIN (16u << 20) /* a write this large checksums on a second thread */

/* For each tensor i < n: zero bytes from pos up to the next multiple of align, then lens[i] bytes
 * of srcs[i]; pos moves to its end. Streams from the sources: small tensors and their padding go
 * out in pwritev batches, big ones chunk by chunk (the CRC of a chunk is taken just before it is
 * written, while it is in cache). Extra memory: one zero buffer of align bytes and the iovec
 * array. When want_crc, crcs[i] = CRC32C of tensor i (0 when empty). *end = final position.
 * align must be a power of two in [SCK_ALIGN_MIN, SCK_ALIGN_MAX] (SCK_E_ALIGN); positions must
 * stay below 2**63 (SCK_E_ARG); write error: SCK_E_IO with *err = errno and *bad_index = the
 * tensor being written. */
int sck_write_tensors(int fd, uint64_t pos, uint64_t n, const void *const *srcs,
                      const uint64_t *lens, uint64_t align, int want_crc, uint32_t *crcs,
                      uint64_t *end, uint64_t *bad_index, int *err);

/* ---- Byte comparison (compare.c) --------------------------------------------------------- */

#define SCK_COMPARE_THREAD_MIN (16u << 20) /* a comparison this large is shared by threads */

/* *equal = 1 when a[0..len) and b[0..len) hold the same bytes, else 0: exact (memcmp), for
 * incremental checkpoints [X7]. From SCK_COMPARE_THREAD_MIN bytes, up to nthreads threads (<= 0:
 * min(online CPUs, SCK_MAX_THREADS)) compare pieces of at most SCK_READ_PIECE bytes, and the
 * first piece that differs stops the others. len > 0 with a NULL buffer, or len past SIZE_MAX:
 * SCK_E_ARG (and *equal = 0). */
int sck_bytes_equal(const void *a, const void *b, uint64_t len, int nthreads, int *equal);

/* ---- Copies (copy.c) --------------------------------------------------------------------- */

#define SCK_COPY_THREAD_MIN (16u << 20) /* copies this large in all are shared by threads */

/* memcpy(dsts[i], srcs[i], lens[i]) for each i < n: the snapshot of a state before an async save
 * returns. From SCK_COPY_THREAD_MIN bytes in all, up to nthreads threads (<= 0: min(online CPUs,
 * SCK_MAX_THREADS)) copy pieces of at most SCK_READ_PIECE bytes (on the calling thread alone if
 * the piece table cannot be allocated). Every range is checked before any byte is copied: a NULL
 * buffer with a length, a length past SIZE_MAX, lengths summing past 2**64 - 1, or a destination
 * that overlaps its own source give SCK_E_ARG with *bad_index = the range (0 on success); a
 * destination that is its source (the same start) is left as it is. Ranges of different i must
 * not overlap one another (not checked: the caller's buffers are distinct). */
int sck_copy_many(uint64_t n, void *const *dsts, const void *const *srcs, const uint64_t *lens,
                  int nthreads, uint64_t *bad_index);

#ifdef __cplusplus
}
#endif

#endif /* SCK_H */
