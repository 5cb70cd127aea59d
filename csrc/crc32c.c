/*
 * crc32c.c - CRC32C (Castagnoli): hardware instructions when the CPU has them, else
 * slicing-by-8 tables.
 *
 * The hardware instruction has a latency of about 3 cycles for 8 bytes but can start one per
 * cycle, so one dependent chain runs at a third of the possible speed. Large inputs are therefore
 * cut into blocks of three equal streams, CRCed side by side, and joined with a precomputed
 * "shift by one stream length" operator: for the raw CRC register (no pre/post inversion),
 * reg(r, A||B) = shift_|B|(reg(r, A)) ^ reg(0, B), and shift_N is linear over GF(2), so it is a
 * 32x32 bit matrix, applied with four 256-entry tables. (Mark Adler's crc32c.c popularised this.)
 *
 * A leaf: pure computation, calling nothing else of the core (the parallel driver over many
 * ranges is in parallel.c). Its only system dependency is pthread_once, which builds the tables
 * on first use.
 */
#include "compat.h" /* first: feature-test macros */

#include <stdint.h>
#include <string.h>

#include "sck.h"
#include "sck_internal.h"

/* Which CRC instructions: SSE4.2 on x86-64 (cpuid at run time), the ARMv8 CRC extension on
 * aarch64 Linux (HWCAP at run time) and on Apple Silicon (always present: every Apple aarch64
 * CPU has it, so there is nothing to check). -DSCK_NO_HW_CRC or -DSCK_PORTABLE: tables only. */
#if defined(SCK_NO_HW_CRC) || defined(SCK_PORTABLE)
/* tables only */
#elif defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
#define SCK_CRC_X86 1
#elif defined(__aarch64__) && defined(__GNUC__) && defined(__linux__)
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#define SCK_CRC_ARM 1
#elif defined(__aarch64__) && defined(__APPLE__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define SCK_CRC_ARM 1
#define SCK_CRC_ARM_ALWAYS 1
#endif

#define SCK_CRC_POLY 0x82F63B78u /* 0x1EDC6F41 bit-reflected */
#define SCK_CRC_LONG 8192        /* bytes per stream in the long 3-way loop */
#define SCK_CRC_SHORT 256        /* bytes per stream in the short 3-way loop */

static uint32_t sck_crc_table[8][256];   /* slicing-by-8 */
static uint32_t sck_crc_long[4][256];    /* shift by SCK_CRC_LONG zero bytes */
static uint32_t sck_crc_short[4][256];   /* shift by SCK_CRC_SHORT zero bytes */
static pthread_once_t sck_crc_once = PTHREAD_ONCE_INIT;
static int sck_crc_hw;                   /* set once by sck_crc_init */

/* Polynomial arithmetic modulo the CRC polynomial, in the reflected bit order of the register
 * (bit 31 is the coefficient of x^0, bit 0 that of x^31). Appending one zero byte to a raw
 * register multiplies it by x^8, so appending n zero bytes multiplies it by x^(8n): the shift
 * tables below are built from x^(8n) in a few hundred steps, not 32 x n table lookups. */
static uint32_t sck_crc_mulmod(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    for (uint32_t bit = UINT32_C(1) << 31; bit; bit >>= 1) { /* a's terms x^0, x^1, ... */
        if (a & bit)
            product ^= b;
        b = (b & 1) ? (b >> 1) ^ SCK_CRC_POLY : b >> 1; /* b *= x */
    }
    return product;
}

static uint32_t sck_crc_xpow(uint64_t e) /* x^e modulo the polynomial, by squaring */
{
    uint32_t result = UINT32_C(1) << 31, square = UINT32_C(1) << 30; /* 1 and x */
    for (; e; e >>= 1) {
        if (e & 1)
            result = sck_crc_mulmod(result, square);
        square = sck_crc_mulmod(square, square);
    }
    return result;
}

static void sck_crc_shift_table(uint32_t table[4][256], size_t nbytes)
{
    uint32_t basis[32];
    uint32_t shift = sck_crc_xpow((uint64_t)nbytes * 8);
    for (int j = 0; j < 32; j++)
        basis[j] = sck_crc_mulmod(UINT32_C(1) << j, shift);
    for (int k = 0; k < 4; k++) {
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int bit = 0; bit < 8; bit++)
                if (b & (1 << bit))
                    v ^= basis[8 * k + bit];
            table[k][b] = v;
        }
    }
}

static inline uint32_t sck_crc_shift(uint32_t table[4][256], uint32_t reg)
{
    return table[0][reg & 0xff] ^ table[1][(reg >> 8) & 0xff] ^ table[2][(reg >> 16) & 0xff] ^
           table[3][reg >> 24];
}

static void sck_crc_init(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int i = 0; i < 8; i++)
            c = (c & 1) ? (c >> 1) ^ SCK_CRC_POLY : c >> 1;
        sck_crc_table[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = sck_crc_table[0][b];
        for (int k = 1; k < 8; k++) {
            c = sck_crc_table[0][c & 0xff] ^ (c >> 8);
            sck_crc_table[k][b] = c;
        }
    }
    sck_crc_shift_table(sck_crc_long, SCK_CRC_LONG);
    sck_crc_shift_table(sck_crc_short, SCK_CRC_SHORT);
#if defined(SCK_CRC_X86)
    __builtin_cpu_init();
    sck_crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#elif defined(SCK_CRC_ARM_ALWAYS)
    sck_crc_hw = 1;
#elif defined(SCK_CRC_ARM)
    sck_crc_hw = (getauxval(AT_HWCAP) & HWCAP_CRC32) ? 1 : 0;
#else
    sck_crc_hw = 0;
#endif
}

static uint32_t sck_crc_sw_raw(uint32_t reg, const uint8_t *p, size_t len)
{
    while (len && ((uintptr_t)p & 7)) {
        reg = sck_crc_table[0][(reg ^ *p++) & 0xff] ^ (reg >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w = sck_load_u64le(p) ^ reg;
        reg = sck_crc_table[7][w & 0xff] ^ sck_crc_table[6][(w >> 8) & 0xff] ^
              sck_crc_table[5][(w >> 16) & 0xff] ^ sck_crc_table[4][(w >> 24) & 0xff] ^
              sck_crc_table[3][(w >> 32) & 0xff] ^ sck_crc_table[2][(w >> 40) & 0xff] ^
              sck_crc_table[1][(w >> 48) & 0xff] ^ sck_crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        reg = sck_crc_table[0][(reg ^ *p++) & 0xff] ^ (reg >> 8);
    return reg;
}

uint32_t sck_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    sck_once(&sck_crc_once, sck_crc_init);
    if (len == 0)
        return crc;
    return ~sck_crc_sw_raw(~crc, (const uint8_t *)buf, len);
}

#if defined(SCK_CRC_X86) || defined(SCK_CRC_ARM)

#if defined(SCK_CRC_X86)
#define SCK_CRC_TARGET __attribute__((target("sse4.2")))
#define SCK_CRC_U64(reg, v) ((uint32_t)_mm_crc32_u64((reg), (v)))
#define SCK_CRC_U8(reg, v) _mm_crc32_u8((reg), (v))
#elif defined(SCK_CRC_ARM_ALWAYS)
#define SCK_CRC_TARGET /* the compiler's target has the CRC extension (__ARM_FEATURE_CRC32) */
#define SCK_CRC_U64(reg, v) __crc32cd((reg), (v))
#define SCK_CRC_U8(reg, v) __crc32cb((reg), (v))
#else
#define SCK_CRC_TARGET __attribute__((target("+crc")))
#define SCK_CRC_U64(reg, v) __crc32cd((reg), (v))
#define SCK_CRC_U8(reg, v) __crc32cb((reg), (v))
#endif

/* Three streams of `block` bytes each, side by side; returns the register after all 3*block. */
#define SCK_CRC_3WAY(p, reg, block, table)                               \
    do {                                                                 \
        uint32_t r1_ = 0, r2_ = 0;                                       \
        const uint8_t *end_ = (p) + (block);                             \
        do {                                                             \
            reg = SCK_CRC_U64(reg, sck_load_u64le(p));                   \
            r1_ = SCK_CRC_U64(r1_, sck_load_u64le((p) + (block)));       \
            r2_ = SCK_CRC_U64(r2_, sck_load_u64le((p) + 2 * (block)));   \
            (p) += 8;                                                    \
        } while ((p) < end_);                                            \
        reg = sck_crc_shift(table, reg) ^ r1_;                           \
        reg = sck_crc_shift(table, reg) ^ r2_;                           \
        (p) += 2 * (block);                                              \
    } while (0)

SCK_CRC_TARGET
static uint32_t sck_crc_hw_raw(uint32_t reg, const uint8_t *p, size_t len)
{
    while (len && ((uintptr_t)p & 7)) {
        reg = SCK_CRC_U8(reg, *p++);
        len--;
    }
    while (len >= 3 * (size_t)SCK_CRC_LONG) {
        SCK_CRC_3WAY(p, reg, SCK_CRC_LONG, sck_crc_long);
        len -= 3 * (size_t)SCK_CRC_LONG;
    }
    while (len >= 3 * (size_t)SCK_CRC_SHORT) {
        SCK_CRC_3WAY(p, reg, SCK_CRC_SHORT, sck_crc_short);
        len -= 3 * (size_t)SCK_CRC_SHORT;
    }
    while (len >= 8) {
        reg = SCK_CRC_U64(reg, sck_load_u64le(p));
        p += 8;
        len -= 8;
    }
    while (len--)
        reg = SCK_CRC_U8(reg, *p++);
    return reg;
}
#endif

uint32_t sck_crc32c(uint32_t crc, const void *buf, size_t len)
{
    sck_once(&sck_crc_once, sck_crc_init);
    if (len == 0)
        return crc;
#if defined(SCK_CRC_X86) || defined(SCK_CRC_ARM)
    if (sck_crc_hw)
        return ~sck_crc_hw_raw(~crc, (const uint8_t *)buf, len);
#endif
    return ~sck_crc_sw_raw(~crc, (const uint8_t *)buf, len);
}

int sck_crc32c_hw_available(void)
{
    sck_once(&sck_crc_once, sck_crc_init);
    return sck_crc_hw;
}

uint32_t sck_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    uint32_t shift = sck_crc_xpow(len_b); /* x^len_b, then cubed by squaring: x^(8 len_b) */
    shift = sck_crc_mulmod(shift, shift);
    shift = sck_crc_mulmod(shift, shift);
    shift = sck_crc_mulmod(shift, shift);
    return sck_crc_mulmod(crc_a, shift) ^ crc_b;
}
