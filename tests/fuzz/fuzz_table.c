/*
 * fuzz_table.c - libFuzzer harness over the C entry points that read untrusted bytes:
 * sck_parse_prefix [P1]-[P7], sck_validate_table [H4 lengths, T1-T8] and the padding check [T9]
 * (from memory and from a file descriptor), all fed from one input.
 *
 * The input is the whole "file"; its first bytes also frame a tensor table (tests/fuzz/framing.py
 * is the same framing in Python, used by the corpus replay test and the seed generator):
 *
 *   byte 0      n = byte % 48 tensors
 *   byte 1      align = 1 << (byte % 22)      (so also invalid: 1, 2, 4, 2 MiB)
 *   byte 2      max_ndim = byte % 40
 *   bytes 3-4   header_end, u16 little-endian
 *   then        dtypes (n bytes), ndims (n), offsets (8n), nbytes (8n), shape (8 * sum of ndims),
 *               each cut short when the input ends (which tests the column-length checks)
 *
 * Besides "no crash, no sanitizer report", it checks what the validators promise: a table that
 * sck_validate_table accepts lies inside the file, aligned, in order, without gaps, ending at the
 * end of the file, each tensor's nbytes ceil(count * bits / 8) [T5] with its element count below
 * 2**63 [T4] (recomputed here in 128-bit arithmetic); on it the padding check answers OK or
 * PADDING; and the memory and file descriptor padding checks agree on every table.
 *
 * Build and run: tests/fuzz/run_fuzzers.sh (clang -fsanitize=fuzzer,address,undefined).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "sck.h"

#define CHECK(cond)                                                             \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "fuzz_table: property failed: %s (line %d)\n", #cond, \
                    __LINE__);                                                  \
            abort();                                                            \
        }                                                                       \
    } while (0)

static int memfd = -1;

static uint64_t take(const uint8_t *data, uint64_t size, uint64_t *pos, uint64_t want,
                     const uint8_t **out)
{
    uint64_t left = size - *pos, got = want < left ? want : left;
    *out = data + *pos;
    *pos += got;
    return got;
}

static uint64_t load_u64le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sck_prefix prefix;
    sck_table t;
    uint64_t pos = 5, bad = 0, bad_mem = 0, bad_fd = 0, header_end, align, sum_ndims = 0;
    uint32_t max_ndim;
    int rc, rc_mem, rc_fd, err = 0;

    /* the prefix, with the whole input as the file, under two header limits */
    rc = sck_parse_prefix(data, size, size, UINT64_MAX, &prefix);
    if (rc == SCK_OK)
        CHECK(prefix.header_len + SCK_PREFIX_SIZE <= size && prefix.align >= SCK_ALIGN_MIN);
    (void)sck_parse_prefix(data, size < 32 ? size : 32, size, 64, &prefix);

    if (size < 5)
        return 0;
    memset(&t, 0, sizeof t);
    t.n = data[0] % 48;
    align = (uint64_t)1 << (data[1] % 22);
    max_ndim = data[2] % 40;
    header_end = (uint64_t)data[3] | ((uint64_t)data[4] << 8);
    t.dtypes_len = take(data, size, &pos, t.n, &t.dtypes);
    t.ndims_len = take(data, size, &pos, t.n, &t.ndims);
    t.offsets_len = take(data, size, &pos, 8 * t.n, &t.offsets);
    t.nbytes_len = take(data, size, &pos, 8 * t.n, &t.nbytes);
    for (uint64_t i = 0; i < t.ndims_len; i++)
        sum_ndims += t.ndims[i];
    t.shape_len = take(data, size, &pos, 8 * sum_ndims, &t.shape);

    rc = sck_validate_table(&t, header_end, align, size, max_ndim, &bad);
    if (rc == SCK_OK) {
        uint64_t end = header_end, dim_pos = 0;
        CHECK(bad == 0);
        for (uint64_t i = 0; i < t.n; i++) {
            uint64_t offset = load_u64le(t.offsets + 8 * i), nbytes = load_u64le(t.nbytes + 8 * i);
            unsigned __int128 count = 1, nonzero = 1;
            CHECK(offset % align == 0 && offset >= end && offset - end < align);
            CHECK(nbytes <= size && offset <= size - nbytes);
            CHECK(t.dtypes[i] < SCK_DTYPE_COUNT && t.ndims[i] <= max_ndim);
            for (uint32_t d = 0; d < t.ndims[i]; d++, dim_pos += 8) {
                uint64_t dim = load_u64le(t.shape + dim_pos);
                count *= dim;
                nonzero *= dim ? dim : 1;
                CHECK(nonzero < ((unsigned __int128)1 << 63)); /* [T4], and no 128-bit wrap */
            }
            CHECK(nbytes == (count * (unsigned)sck_dtype_bits(t.dtypes[i]) + 7) / 8); /* [T5] */
            end = offset + nbytes;
        }
        CHECK(end == size);
    } else {
        CHECK(rc < 0 && rc >= SCK_E_ARG && rc != SCK_E_ARG);
        CHECK(bad <= t.n);
    }

    /* the padding check must be safe on any table, and both sources must agree */
    rc_mem = sck_check_padding_mem(data, size, &t, header_end, &bad_mem);
    if (memfd < 0)
        memfd = memfd_create("fuzz_table", 0);
    CHECK(memfd >= 0);
    CHECK(ftruncate(memfd, 0) == 0);
    CHECK(size == 0 || pwrite(memfd, data, size, 0) == (ssize_t)size);
    rc_fd = sck_check_padding_fd(memfd, size, &t, header_end, &bad_fd, &err);
    CHECK(rc_mem == rc_fd && bad_mem == bad_fd && err == 0);
    if (rc == SCK_OK)
        CHECK(rc_mem == SCK_OK || rc_mem == SCK_E_PADDING);
    return 0;
}
