/*
 * sck.c - error strings, dtype table, and the validators: prefix [P1]-[P7], tensor table
 * [H4 lengths, T1-T8], padding [T9].
 *
 * Everything here reads untrusted bytes: lengths are compared before any access, little-endian
 * integers are loaded with memcpy, and arithmetic goes through overflow-checked helpers. An
 * overflow is reported as the error of the rule being checked (FORMAT.md section 3).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sck.h"
#include "sck_internal.h"

const unsigned char sck_magic[SCK_MAGIC_SIZE] = {0x89, 'S', 'C', 'K', '\r', '\n', 0x1a, '\n'};

/* ---- Error strings: the one table ---------------------------------------------------------- */

static const char *const sck_messages[] = {
    /* SCK_OK */ "ok",
    /* SCK_E_TRUNCATED */ "file is shorter than the 32-byte prefix or its header [P1, P6]",
    /* SCK_E_MAGIC */ "not a safeckpt file: the magic bytes do not match [P2]",
    /* SCK_E_MAGIC_TEXT */ "the magic bytes look converted by a text-mode transfer [P2]",
    /* SCK_E_VERSION */ "unsupported major version [P3]",
    /* SCK_E_FLAGS */ "unknown flag bits are set [P4]",
    /* SCK_E_HEADER_LIMIT */ "header is larger than max_header_size [P5]",
    /* SCK_E_ALIGN */ "alignment is not a power of two between 8 and 1 MiB [P7]",
    /* SCK_E_HEADER_CRC */ "header checksum mismatch [P8]",
    /* SCK_E_COLUMN */ "a column of the tensor table has the wrong length [H4]",
    /* SCK_E_DTYPE */ "unknown dtype code [T1]",
    /* SCK_E_NDIM */ "more dimensions than max_ndim [T2]",
    /* SCK_E_DIM */ "a dimension is not below 2**63 [T3]",
    /* SCK_E_TOO_LARGE */ "shape times item size is 2**63 bytes or more [T4]",
    /* SCK_E_NBYTES */ "byte length does not equal prod(shape) x itemsize [T5]",
    /* SCK_E_MISALIGNED */ "offset is not a multiple of the alignment [T6]",
    /* SCK_E_OVERLAP */ "tensor overlaps the header or the previous tensor [T6]",
    /* SCK_E_GAP */ "unexplained gap before the tensor [T6]",
    /* SCK_E_TENSOR_TRUNCATED */ "tensor data runs past the end of the file [T7]",
    /* SCK_E_TRAILING */ "trailing bytes after the last tensor [T8]",
    /* SCK_E_PADDING */ "non-zero padding byte before the tensor [T9]",
    /* SCK_E_CRC */ "tensor checksum mismatch [T10]",
    /* SCK_E_IO */ "I/O error",
    /* SCK_E_NOMEM */ "out of memory",
    /* SCK_E_ARG */ "invalid argument",
};

const char *sck_strerror(int code)
{
    if (code > 0 || code < SCK_E_ARG)
        return "unknown error code";
    return sck_messages[-code];
}

/* ---- Dtypes ---------------------------------------------------------------------------------- */

static const uint8_t sck_itemsizes[SCK_DTYPE_COUNT] = {
    1, /* 0 bool */
    1, /* 1 int8 */
    2, /* 2 int16 */
    4, /* 3 int32 */
    8, /* 4 int64 */
    1, /* 5 uint8 */
    2, /* 6 uint16 */
    4, /* 7 uint32 */
    8, /* 8 uint64 */
    2, /* 9 float16 */
    4, /* 10 float32 */
    8, /* 11 float64 */
    2, /* 12 bfloat16 */
    1, /* 13 float8_e4m3fn */
    1, /* 14 float8_e5m2 */
    8, /* 15 complex64 */
    16, /* 16 complex128 */
    1, /* 17 float8_e4m3fnuz (version 1.3) */
    1, /* 18 float8_e5m2fnuz (version 1.3) */
};

int sck_dtype_itemsize(int code)
{
    if (code < 0 || code >= SCK_DTYPE_COUNT)
        return 0;
    return sck_itemsizes[code];
}

/* ---- Prefix [P1]-[P7] ------------------------------------------------------------------------ */

int sck_parse_prefix(const uint8_t *buf, uint64_t buf_len, uint64_t file_size,
                     uint64_t max_header_size, sck_prefix *out)
{
    uint64_t header_end;

    SCK_CHECK(out != NULL, SCK_E_ARG);
    memset(out, 0, sizeof *out);
    /* [P1] */
    SCK_CHECK(buf_len >= SCK_PREFIX_SIZE && file_size >= SCK_PREFIX_SIZE, SCK_E_TRUNCATED);
    SCK_CHECK(buf != NULL, SCK_E_ARG);
    /* [P2] */
    if (memcmp(buf, sck_magic, SCK_MAGIC_SIZE) != 0) {
        if (memcmp(buf, SCK_MAGIC_TEXT_MANGLED, SCK_MAGIC_TEXT_MANGLED_SIZE) == 0)
            return SCK_E_MAGIC_TEXT;
        return SCK_E_MAGIC;
    }
    out->major = sck_load_u16le(buf + 8);
    out->minor = sck_load_u16le(buf + 10);
    out->flags = sck_load_u32le(buf + 12);
    out->header_len = sck_load_u64le(buf + 16);
    out->align = sck_load_u32le(buf + 24);
    out->header_crc = sck_load_u32le(buf + 28);
    /* [P3] [P4] [P5] */
    SCK_CHECK(out->major == SCK_VERSION_MAJOR, SCK_E_VERSION);
    SCK_CHECK((out->flags & ~(uint32_t)SCK_KNOWN_FLAGS) == 0, SCK_E_FLAGS);
    SCK_CHECK(out->header_len <= max_header_size, SCK_E_HEADER_LIMIT);
    /* [P6] */
    SCK_CHECK(!sck_add_u64(SCK_PREFIX_SIZE, out->header_len, &header_end), SCK_E_TRUNCATED);
    SCK_CHECK(header_end <= file_size, SCK_E_TRUNCATED);
    /* [P7] */
    SCK_CHECK(sck_align_ok(out->align), SCK_E_ALIGN);
    return SCK_OK;
}

/* ---- Tensor table ---------------------------------------------------------------------------- */

/* The column lengths [H4]: dtypes and ndims n bytes, offsets and nbytes 8n bytes. */
static int sck_check_columns(const sck_table *t)
{
    uint64_t n8;
    SCK_CHECK(!sck_mul_u64(t->n, 8, &n8), SCK_E_COLUMN);
    SCK_CHECK(t->dtypes_len == t->n && t->ndims_len == t->n, SCK_E_COLUMN);
    SCK_CHECK(t->offsets_len == n8 && t->nbytes_len == n8, SCK_E_COLUMN);
    SCK_CHECK(t->n == 0 || (t->dtypes && t->ndims && t->offsets && t->nbytes), SCK_E_ARG);
    SCK_CHECK(t->shape_len == 0 || t->shape, SCK_E_ARG);
    return SCK_OK;
}

/* [T1]-[T7] for tensor i; *shape_pos advances past its dims, *prev_end moves to its end. */
static int sck_check_tensor(const sck_table *t, uint64_t i, uint64_t align, uint64_t file_size,
                            uint32_t max_ndim, uint64_t *shape_pos, uint64_t *prev_end)
{
    uint8_t code = t->dtypes[i];
    uint32_t ndim = t->ndims[i];
    uint64_t pos = *shape_pos, size, nonzero, expected, offset, nbytes, end;
    int has_zero = 0, too_large = 0;

    /* [T1] [T2] */
    SCK_CHECK(code < SCK_DTYPE_COUNT, SCK_E_DTYPE);
    SCK_CHECK(ndim <= max_ndim, SCK_E_NDIM);
    /* The shape column must hold this tensor's dims (pos <= shape_len always holds). */
    SCK_CHECK((t->shape_len - pos) / 8 >= ndim, SCK_E_COLUMN);
    /* [T3] every dim; [T4] the product of the non-zero dims times the item size. */
    nonzero = sck_itemsizes[code];
    for (uint32_t d = 0; d < ndim; d++) {
        uint64_t dim = sck_load_u64le(t->shape + pos + 8 * (uint64_t)d);
        SCK_CHECK(dim < SCK_INT63_LIMIT, SCK_E_DIM);
        if (dim == 0)
            has_zero = 1;
        else if (!too_large && (sck_mul_u64(nonzero, dim, &nonzero) || nonzero >= SCK_INT63_LIMIT))
            too_large = 1;
    }
    SCK_CHECK(!too_large, SCK_E_TOO_LARGE);
    size = has_zero ? 0 : nonzero;
    *shape_pos = pos + 8 * (uint64_t)ndim;
    /* [T5] */
    nbytes = sck_load_u64le(t->nbytes + 8 * i);
    SCK_CHECK(nbytes == size, SCK_E_NBYTES);
    /* [T6]: an align_up that overflows is beyond any offset, so the offset overlaps. */
    offset = sck_load_u64le(t->offsets + 8 * i);
    SCK_CHECK((offset & (align - 1)) == 0, SCK_E_MISALIGNED);
    SCK_CHECK(!sck_align_up_u64(*prev_end, align, &expected), SCK_E_OVERLAP);
    SCK_CHECK(offset >= expected, SCK_E_OVERLAP);
    SCK_CHECK(offset == expected, SCK_E_GAP);
    /* [T7] */
    SCK_CHECK(!sck_add_u64(offset, nbytes, &end) && end <= file_size, SCK_E_TENSOR_TRUNCATED);
    *prev_end = end;
    return SCK_OK;
}

int sck_validate_table(const sck_table *t, uint64_t header_end, uint64_t align,
                       uint64_t file_size, uint32_t max_ndim, uint64_t *bad_index)
{
    uint64_t shape_pos = 0, prev_end = header_end;
    int rc;

    if (bad_index == NULL)
        return SCK_E_ARG;
    *bad_index = 0;
    if (t == NULL)
        return SCK_E_ARG;
    *bad_index = t->n;
    /* whole-table checks first, in the spec's order: [P7], the column lengths [H4], [P6] */
    SCK_CHECK(sck_align_ok(align), SCK_E_ALIGN);
    rc = sck_check_columns(t);
    if (rc != SCK_OK)
        return rc;
    SCK_CHECK(header_end <= file_size, SCK_E_TRUNCATED);
    for (uint64_t i = 0; i < t->n; i++) {
        rc = sck_check_tensor(t, i, align, file_size, max_ndim, &shape_pos, &prev_end);
        if (SCK_UNLIKELY(rc != SCK_OK)) {
            *bad_index = i;
            return rc;
        }
    }
    SCK_CHECK(shape_pos == t->shape_len, SCK_E_COLUMN); /* [H4]: no dims left over */
    SCK_CHECK(prev_end == file_size, SCK_E_TRAILING);   /* [T8] */
    *bad_index = 0;
    return SCK_OK;
}

/* ---- Padding [T9] ---------------------------------------------------------------------------- */

static int sck_all_zero(const uint8_t *p, uint64_t len)
{
    uint64_t acc = 0;
    while (len >= 32) {
        acc |= sck_load_u64le(p) | sck_load_u64le(p + 8) | sck_load_u64le(p + 16) |
               sck_load_u64le(p + 24);
        if (acc)
            return 0;
        p += 32;
        len -= 32;
    }
    while (len >= 8) {
        acc |= sck_load_u64le(p);
        p += 8;
        len -= 8;
    }
    while (len--)
        acc |= *p++;
    return acc == 0;
}

/* The gap before tensor i is [prev_end, *gap_end): empty when the tensor starts at or before
 * prev_end (a table the validator accepted has no such tensor; nothing to read there).
 * *next_end is the tensor's end, saturated at 2**64 - 1 (beyond any offset) on overflow.
 * A gap that is not inside [0, size) is SCK_E_TRUNCATED; nothing outside it is ever read. */
static int sck_padding_gap(const sck_table *t, uint64_t i, uint64_t size, uint64_t prev_end,
                           uint64_t *gap_end, uint64_t *next_end)
{
    uint64_t offset = sck_load_u64le(t->offsets + 8 * i);
    uint64_t nbytes = sck_load_u64le(t->nbytes + 8 * i);
    if (sck_add_u64(offset, nbytes, next_end))
        *next_end = UINT64_MAX;
    *gap_end = prev_end;
    if (offset <= prev_end)
        return SCK_OK;
    SCK_CHECK(offset <= size, SCK_E_TRUNCATED);
    *gap_end = offset;
    return SCK_OK;
}

static int sck_padding_args(const sck_table *t, uint64_t *bad_index)
{
    uint64_t n8;
    if (bad_index == NULL)
        return SCK_E_ARG;
    *bad_index = 0;
    SCK_CHECK(t != NULL, SCK_E_ARG);
    *bad_index = t->n;
    SCK_CHECK(!sck_mul_u64(t->n, 8, &n8), SCK_E_COLUMN);
    SCK_CHECK(t->offsets_len == n8 && t->nbytes_len == n8, SCK_E_COLUMN);
    SCK_CHECK(t->n == 0 || (t->offsets && t->nbytes), SCK_E_ARG);
    *bad_index = 0;
    return SCK_OK;
}

int sck_check_padding_mem(const uint8_t *base, uint64_t size, const sck_table *t,
                          uint64_t header_end, uint64_t *bad_index)
{
    uint64_t prev_end = header_end, gap_end, next;
    int rc = sck_padding_args(t, bad_index);
    if (rc != SCK_OK)
        return rc;
    SCK_CHECK(size == 0 || base != NULL, SCK_E_ARG);
    for (uint64_t i = 0; i < t->n; i++) {
        rc = sck_padding_gap(t, i, size, prev_end, &gap_end, &next);
        if (rc == SCK_OK && gap_end > prev_end &&
            !sck_all_zero(base + prev_end, gap_end - prev_end))
            rc = SCK_E_PADDING;
        if (rc != SCK_OK) {
            *bad_index = i;
            return rc;
        }
        prev_end = next;
    }
    return SCK_OK;
}

/* pread of file bytes into a window buffer that serves several small gaps in a row. */
#define SCK_PAD_WINDOW (256u << 10)

typedef struct sck_window {
    int fd;
    uint64_t size;  /* file size the caller vouches for */
    uint8_t *buf;   /* SCK_PAD_WINDOW bytes */
    uint64_t start; /* file offset of buf[0] */
    uint64_t len;   /* valid bytes in buf */
    int err;
} sck_window;

/* Makes sure [pos, pos+need) is in the window (need <= SCK_PAD_WINDOW, pos+need <= size);
 * reads ahead up to a full window, since the next gaps of small tensors are close by. */
static int sck_window_fill(sck_window *w, uint64_t pos, uint64_t need)
{
    uint64_t want, got = 0;
    if (pos >= w->start && pos - w->start <= w->len && w->len - (pos - w->start) >= need)
        return SCK_OK;
    want = w->size - pos < SCK_PAD_WINDOW ? w->size - pos : SCK_PAD_WINDOW;
    w->start = pos;
    w->len = 0;
    while (got < need) {
        ssize_t r = pread(w->fd, w->buf + got, (size_t)(want - got), (off_t)(pos + got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            w->err = errno;
            return SCK_E_IO;
        }
        if (r == 0)
            return SCK_E_TRUNCATED;
        got += (uint64_t)r;
        w->len = got;
    }
    return SCK_OK;
}

int sck_check_padding_fd(int fd, uint64_t size, const sck_table *t, uint64_t header_end,
                         uint64_t *bad_index, int *err)
{
    uint64_t prev_end = header_end, gap_end, next;
    sck_window w;
    int rc;

    if (err == NULL)
        return SCK_E_ARG;
    *err = 0;
    rc = sck_padding_args(t, bad_index);
    if (rc != SCK_OK)
        return rc;
    SCK_CHECK(size < SCK_INT63_LIMIT, SCK_E_ARG); /* every pread offset fits off_t */
    memset(&w, 0, sizeof w);
    w.fd = fd;
    w.size = size;
    for (uint64_t i = 0; i < t->n && rc == SCK_OK; i++) {
        rc = sck_padding_gap(t, i, size, prev_end, &gap_end, &next);
        while (rc == SCK_OK && prev_end < gap_end) {
            uint64_t piece = gap_end - prev_end;
            if (piece > SCK_PAD_WINDOW)
                piece = SCK_PAD_WINDOW;
            if (w.buf == NULL && (w.buf = malloc(SCK_PAD_WINDOW)) == NULL)
                rc = SCK_E_NOMEM;
            else if ((rc = sck_window_fill(&w, prev_end, piece)) == SCK_OK &&
                     !sck_all_zero(w.buf + (prev_end - w.start), piece))
                rc = SCK_E_PADDING;
            prev_end += piece;
        }
        if (rc != SCK_OK)
            *bad_index = i;
        prev_end = next;
    }
    free(w.buf);
    *err = w.err;
    return rc;
}
