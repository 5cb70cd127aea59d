/*
 * sck_internal.h - helpers shared by the C sources of safeckpt; not part of the public API.
 *
 * Little-endian loads go through memcpy (no pointer casts, no alignment assumed), so they are
 * right on big-endian hosts; arithmetic on untrusted values goes through the overflow-checked
 * helpers of compat.h, which return 1 on overflow. Each .c file includes compat.h first.
 */
#ifndef SCK_INTERNAL_H
#define SCK_INTERNAL_H

#include "compat.h" /* first: feature-test macros */

#include <stdint.h>
#include <string.h>

#include "sck.h"

/* "Check, and return the error": one line per rule. */
#define SCK_CHECK(cond, code) \
    do {                      \
        if (!(cond))          \
            return (code);    \
    } while (0)

#define SCK_INT63_LIMIT (UINT64_C(1) << 63)

static inline uint16_t sck_load_u16le(const uint8_t *p)
{
    uint8_t b[2];
    memcpy(b, p, 2);
    return (uint16_t)(b[0] | (b[1] << 8));
}

static inline uint32_t sck_load_u32le(const uint8_t *p)
{
    uint8_t b[4];
    memcpy(b, p, 4);
    return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}

static inline uint64_t sck_load_u64le(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
#else
    return (uint64_t)sck_load_u32le(p) | ((uint64_t)sck_load_u32le(p + 4) << 32);
#endif
}

/* *out = x rounded up to a multiple of align (a power of two); returns 1 on overflow. */
static inline int sck_align_up_u64(uint64_t x, uint64_t align, uint64_t *out)
{
    uint64_t t;
    if (sck_add_u64(x, align - 1, &t))
        return 1;
    *out = t & ~(align - 1);
    return 0;
}

/* ---- Validation helpers shared with io.c (validate.c) ---- */

/* The arguments of a padding check [T9]: bad_index set, offsets and nbytes columns of 8n bytes. */
int sck_padding_args(const sck_table *t, uint64_t *bad_index);
/* The gap before tensor i is [prev_end, *gap_end): empty when the tensor starts at or before
 * prev_end. *next_end is the tensor's end, saturated at 2**64 - 1 on overflow. A gap that is not
 * inside [0, size) is SCK_E_TRUNCATED; nothing outside it is ever read. */
int sck_padding_gap(const sck_table *t, uint64_t i, uint64_t size, uint64_t prev_end,
                    uint64_t *gap_end, uint64_t *next_end);
/* 1 when p[0..len) are all zero bytes. */
int sck_all_zero(const uint8_t *p, uint64_t len);

/* ---- Work in pieces on several threads (parallel.c) ---- */

/* Online CPUs, between 1 and SCK_MAX_THREADS. */
int sck_online_cpus(void);
/* The number of pieces of at most SCK_READ_PIECE bytes in len bytes. */
uint64_t sck_piece_count(uint64_t len);
/* Handles bytes [off, off + len) of range i, the k-th piece of all; returns SCK_OK or an error,
 * which stops the others from claiming more pieces. */
typedef int (*sck_piece_fn)(void *ctx, uint64_t i, uint64_t off, uint64_t len, uint64_t k);
/* Cuts n ranges of lengths[i] bytes into pieces of at most SCK_READ_PIECE bytes and runs fn on
 * each, on up to nthreads threads (<= 0: sck_online_cpus()), the calling thread among them.
 * Fills first_piece (n + 1 entries): the first piece of range i; first_piece[n] is the count,
 * whose sum the caller has checked for overflow and which fits size_t (the caller allocated an
 * array of that many entries). */
void sck_run_pieces(uint64_t n, const uint64_t *lengths, uint64_t *first_piece, int nthreads,
                    sck_piece_fn fn, void *ctx);
/* crcs[i] = the CRC32C of range i, joined from piece_crcs[first_piece[i] .. first_piece[i + 1]),
 * the CRC32C of each of its pieces as sck_run_pieces cut them (0 for an empty range). */
void sck_join_pieces(uint64_t n, const uint64_t *lengths, const uint64_t *first_piece,
                     const uint32_t *piece_crcs, uint32_t *crcs);

static inline int sck_is_pow2(uint64_t x)
{
    return x != 0 && (x & (x - 1)) == 0;
}

static inline int sck_align_ok(uint64_t align)
{
    return sck_is_pow2(align) && align >= SCK_ALIGN_MIN && align <= SCK_ALIGN_MAX;
}

#endif /* SCK_INTERNAL_H */
