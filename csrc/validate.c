/*
 * validate.c - the validators of untrusted bytes: prefix [P1]-[P7], tensor table [H4 lengths,
 * T1-T8], padding [T9] in memory; and the dtype table (bits per element). Pure computation: no system calls, no
 * threads (the padding check on a file descriptor, which reads, is in io.c).
 *
 * Everything here reads untrusted bytes: lengths are compared before any access, little-endian
 * integers are loaded with memcpy, and arithmetic goes through overflow-checked helpers. An
 * overflow is reported as the error of the rule being checked (FORMAT.md section 3).
 */
#include "compat.h" /* first: feature-test macros */

#include <stdint.h>
#include <string.h>

#include "sck.h"
#include "sck_internal.h"

const unsigned char sck_magic[SCK_MAGIC_SIZE] = {0x89, 'S', 'C', 'K', '\r', '\n', 0x1a, '\n'};

/* ---- Dtypes ---------------------------------------------------------------------------------- */

/* Bits per element, by code (FORMAT.md section 4): 8 * item size for the byte types; the packed
 * codes (bits < 8) are a bit stream of ceil(N * bits / 8) bytes. */
static const uint8_t sck_bits[SCK_DTYPE_COUNT] = {
    8,   /* 0 bool */
    8,   /* 1 int8 */
    16,  /* 2 int16 */
    32,  /* 3 int32 */
    64,  /* 4 int64 */
    8,   /* 5 uint8 */
    16,  /* 6 uint16 */
    32,  /* 7 uint32 */
    64,  /* 8 uint64 */
    16,  /* 9 float16 */
    32,  /* 10 float32 */
    64,  /* 11 float64 */
    16,  /* 12 bfloat16 */
    8,   /* 13 float8_e4m3fn */
    8,   /* 14 float8_e5m2 */
    64,  /* 15 complex64 */
    128, /* 16 complex128 */
    8,   /* 17 float8_e4m3fnuz (version 1.3) */
    8,   /* 18 float8_e5m2fnuz (version 1.3) */
    8,   /* 19 float8_e4m3b11fnuz (version 1.5, as every code below) */
    8,   /* 20 float8_e3m4 */
    8,   /* 21 float8_e4m3 */
    8,   /* 22 float8_e8m0fnu */
    8,   /* 23 float8_e5m3fnu */
    6,   /* 24 float6_e2m3fn (packed) */
    6,   /* 25 float6_e3m2fn (packed) */
    4,   /* 26 float4_e2m1fn (packed) */
    4,   /* 27 int4 (packed) */
    4,   /* 28 uint4 (packed) */
    2,   /* 29 int2 (packed) */
    2,   /* 30 uint2 (packed) */
    1,   /* 31 int1 (packed) */
    1,   /* 32 uint1 (packed) */
    32,  /* 33 complex32 (2 x float16) */
    32,  /* 34 bcomplex32 (2 x bfloat16) */
};

int sck_dtype_bits(int code)
{
    if (code < 0 || code >= SCK_DTYPE_COUNT)
        return 0;
    return sck_bits[code];
}

int sck_dtype_itemsize(int code)
{
    if (code < 0 || code >= SCK_DTYPE_COUNT)
        return 0;
    return sck_bits[code] < 8 ? 1 : sck_bits[code] / 8;
}

/* *out = ceil(count * bits / 8) for count < 2**63, bits <= 255; returns 1 on u64 overflow.
 * count * bits itself may not fit in 64 bits (2**63 * 6), so count is split into whole groups of
 * 8 elements (bits bytes each) and the rest (fewer than 8 elements: at most 255 bytes). */
static int sck_nbytes_of(uint64_t count, uint32_t bits, uint64_t *out)
{
    uint64_t groups;
    if (sck_mul_u64(count >> 3, bits, &groups))
        return 1;
    return sck_add_u64(groups, ((count & 7) * bits + 7) >> 3, out);
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
    /* [T3] every dim; [T4] the product of the non-zero dims (the element count numpy holds
     * unpacked, one byte per element at least) and the byte size ceil(count * bits / 8) are both
     * below 2**63. */
    nonzero = 1;
    for (uint32_t d = 0; d < ndim; d++) {
        uint64_t dim = sck_load_u64le(t->shape + pos + 8 * (uint64_t)d);
        SCK_CHECK(dim < SCK_INT63_LIMIT, SCK_E_DIM);
        if (dim == 0)
            has_zero = 1;
        else if (!too_large && (sck_mul_u64(nonzero, dim, &nonzero) || nonzero >= SCK_INT63_LIMIT))
            too_large = 1;
    }
    SCK_CHECK(!too_large, SCK_E_TOO_LARGE);
    SCK_CHECK(!sck_nbytes_of(nonzero, sck_bits[code], &size) && size < SCK_INT63_LIMIT,
              SCK_E_TOO_LARGE);
    if (has_zero)
        size = 0;
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

int sck_all_zero(const uint8_t *p, uint64_t len)
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

/* (sck_internal.h) A table the validator accepted has no tensor starting before prev_end, so no
 * empty gap; the saturated end is beyond any offset. */
int sck_padding_gap(const sck_table *t, uint64_t i, uint64_t size, uint64_t prev_end,
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

int sck_padding_args(const sck_table *t, uint64_t *bad_index)
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
