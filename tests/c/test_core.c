/*
 * test_core.c - the C core of safeckpt tested from C alone (no Python), on any CPU.
 *
 *   test_core FIXTURE_DIR      (tests/c/fixtures; .ci/cross builds and runs it natively on x86-64
 *                               and under qemu-user on aarch64 and big-endian s390x)
 *
 * The fixtures are .sckpt files written on x86-64 by safeckpt's Python writer
 * (tests/c/make_fixtures.py), each with a NAME.txt of what it must hold. Checked bit-exactly:
 * the prefix fields [P1]-[P7] and the header CRC [P8]; the table [H4, T1-T8] and the padding [T9]
 * (in memory and through a file descriptor); every tensor's bytes against the formula that made
 * them (expect_element, the same as make_fixtures.py's; packed codes bit by bit, with zero
 * padding bits [T11]) and its CRC32C [T10]; mmap and the parallel pread; the CRC32C test vectors
 * of RFC 3720 B.4; hostile prefixes and tables giving the right error code and tensor index, and
 * the [T4]/[T5] rules of the packed codes on hand-made tables; C writer round trips, which must reproduce each fixture's
 * data section byte for byte; and the exact byte comparison, on one thread and on several.
 * Prints one line per failure and a summary; exits 1 on any failure.
 */
#define _POSIX_C_SOURCE 200809L
#define _FILE_OFFSET_BITS 64

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sck.h"

static long checks, failures;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        checks++;                                                         \
        if (!(cond)) {                                                    \
            failures++;                                                   \
            fprintf(stderr, "%s:%d: FAIL %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                 \
            fputc('\n', stderr);                                          \
        }                                                                 \
    } while (0)

/* a == b as unsigned 64-bit numbers, printing both (and what) on failure */
#define CHECK_EQ(a, b, what)                                                                  \
    CHECK((uint64_t)(a) == (uint64_t)(b), "%s: %llu != %llu", (what),                         \
          (unsigned long long)(uint64_t)(a), (unsigned long long)(uint64_t)(b))
/* a C call's code: compared as signed ints */
#define CHECK_CODE(got, want, what) \
    CHECK((got) == (want), "%s: code %d, expected %d", (what), (int)(got), (int)(want))

/* ---- Little-endian bytes, by shifts (the test does not trust the core's helpers) ---------- */

static uint64_t le_load(const uint8_t *p, int size)
{
    uint64_t v = 0;
    for (int i = size - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void le_store(uint8_t *p, uint64_t v, int size)
{
    for (int i = 0; i < size; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static void store_f32(uint8_t *p, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    le_store(p, u, 4);
}

static void store_f64(uint8_t *p, double d)
{
    uint64_t u;
    memcpy(&u, &d, 8);
    le_store(p, u, 8);
}

/* The bytes of element k of a tensor of dtype code with seed s, as tests/c/make_fixtures.py
 * wrote them (its docstring gives the formulas). */
static void expect_element(int code, uint64_t s, uint64_t k, uint8_t *out)
{
    uint64_t h = k * UINT64_C(0x9E3779B97F4A7C15) + s * UINT64_C(0x0123456789ABCDEF);
    int64_t ks = (int64_t)k, ss = (int64_t)s;
    int size = sck_dtype_itemsize(code);
    switch (code) {
    case 0: out[0] = (uint8_t)(h >> 63); break;                         /* bool */
    case 10: store_f32(out, (float)(ks - 3 * ss) * 0.375f); break;        /* float32 */
    case 11: store_f64(out, (double)(ks - ss) * 0.1); break;              /* float64 */
    case 12: {                                                            /* bfloat16 */
        float f = (float)(ks - ss) * 0.5f;
        uint32_t u;
        memcpy(&u, &f, 4);
        le_store(out, u >> 16, 2);
        break;
    }
    case 15:                                                              /* complex64 */
        store_f32(out, (float)(ks + ss) * 0.5f);
        store_f32(out + 4, (float)ks * -0.25f);
        break;
    case 16:                                                              /* complex128 */
        store_f64(out, (double)(ks + ss) * 0.1);
        store_f64(out + 8, (double)ks * -0.001);
        break;
    default: le_store(out, h >> (64 - 8 * size), size); break;          /* raw bits */
    }
}

/* The top `bits` bits of the hash of element k: what a packed tensor (bits < 8) holds for it. */
static uint64_t expect_packed(uint64_t s, uint64_t k, int bits)
{
    uint64_t h = k * UINT64_C(0x9E3779B97F4A7C15) + s * UINT64_C(0x0123456789ABCDEF);
    return h >> (64 - bits);
}

/* Stream bits [k * bits, (k + 1) * bits) of p, bit j being bit j % 8 of byte j / 8 (FORMAT.md
 * section 4), read one bit at a time. */
static uint64_t stream_field(const uint8_t *p, uint64_t k, int bits)
{
    uint64_t v = 0;
    for (int b = 0; b < bits; b++) {
        uint64_t j = k * (uint64_t)bits + (uint64_t)b;
        v |= (uint64_t)((p[j / 8] >> (j % 8)) & 1) << b;
    }
    return v;
}

/* ---- Fixtures ----------------------------------------------------------------------------- */

enum { COL_DTYPES, COL_NDIMS, COL_SHAPE, COL_OFFSETS, COL_NBYTES, COL_CRC, NCOLS };
static const char *const column_names[NCOLS] = {"dtypes", "ndims", "shape", "offsets", "nbytes",
                                                "crc32c"};

typedef struct tensor {
    char name[64];
    int code;
    uint64_t seed;
    uint32_t ndim;
    uint64_t dims[8];
    uint64_t offset, nbytes;
    uint32_t crc;
} tensor;

typedef struct fixture {
    char path[512];
    uint8_t *data;
    uint64_t size;
    uint32_t major, minor, flags, align, header_crc;
    uint64_t header_len;
    uint64_t col_at[NCOLS], col_len[NCOLS];
    int col_present[NCOLS];
    uint64_t n;
    tensor *t;
} fixture;

static uint8_t *read_file(const char *path, uint64_t *size)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long len;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
        fprintf(stderr, "cannot read %s: %s\n", path, strerror(errno));
        exit(2);
    }
    buf = malloc((size_t)len + 1);
    if (buf == NULL || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    *size = (uint64_t)len;
    return buf;
}

static uint64_t next_u64(char **save)
{
    char *tok = strtok_r(NULL, " \n", save);
    if (tok == NULL) {
        fprintf(stderr, "fixture description: a number is missing\n");
        exit(2);
    }
    return strtoull(tok, NULL, 10);
}

static void load_fixture(const char *dir, const char *name, fixture *fx)
{
    char path[600], line[1024];
    FILE *f;
    uint64_t ti = 0;

    memset(fx, 0, sizeof *fx);
    snprintf(fx->path, sizeof fx->path, "%s/%s.sckpt", dir, name);
    fx->data = read_file(fx->path, &fx->size);
    snprintf(path, sizeof path, "%s/%s.txt", dir, name);
    if ((f = fopen(path, "r")) == NULL) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    while (fgets(line, sizeof line, f) != NULL) {
        char *save, *key = strtok_r(line, " \n", &save);
        if (key == NULL || key[0] == '#')
            continue;
        if (strcmp(key, "size") == 0) {
            CHECK_EQ(next_u64(&save), fx->size, "file size");
        } else if (strcmp(key, "prefix") == 0) {
            fx->major = (uint32_t)next_u64(&save);
            fx->minor = (uint32_t)next_u64(&save);
            fx->flags = (uint32_t)next_u64(&save);
            fx->align = (uint32_t)next_u64(&save);
            fx->header_len = next_u64(&save);
            fx->header_crc = (uint32_t)next_u64(&save);
        } else if (strcmp(key, "column") == 0) {
            const char *col = strtok_r(NULL, " \n", &save);
            for (int c = 0; c < NCOLS; c++) {
                if (col != NULL && strcmp(col, column_names[c]) == 0) {
                    fx->col_at[c] = next_u64(&save);
                    fx->col_len[c] = next_u64(&save);
                    fx->col_present[c] = 1;
                }
            }
        } else if (strcmp(key, "tensors") == 0) {
            fx->n = next_u64(&save);
            fx->t = calloc(fx->n + 1, sizeof *fx->t);
        } else if (strcmp(key, "tensor") == 0 && fx->t != NULL && ti < fx->n) {
            tensor *t = &fx->t[ti++];
            snprintf(t->name, sizeof t->name, "%s", strtok_r(NULL, " \n", &save));
            t->code = (int)next_u64(&save);
            t->seed = next_u64(&save);
            t->ndim = (uint32_t)next_u64(&save);
            for (uint32_t d = 0; d < t->ndim && d < 8; d++)
                t->dims[d] = next_u64(&save);
            t->offset = next_u64(&save);
            t->nbytes = next_u64(&save);
            t->crc = (uint32_t)next_u64(&save);
        }
    }
    fclose(f);
    CHECK_EQ(ti, fx->n, "tensor lines");
    for (int c = 0; c < NCOLS; c++)
        if (fx->col_present[c])
            CHECK(fx->col_at[c] + fx->col_len[c] <= fx->size, "column %s outside the file",
                  column_names[c]);
}

/* The table as the header holds it: pointers into the fixture's bytes. */
static sck_table table_of(const fixture *fx)
{
    sck_table t;
    memset(&t, 0, sizeof t);
    t.n = fx->n;
    t.dtypes = fx->data + fx->col_at[COL_DTYPES];
    t.dtypes_len = fx->col_len[COL_DTYPES];
    t.ndims = fx->data + fx->col_at[COL_NDIMS];
    t.ndims_len = fx->col_len[COL_NDIMS];
    t.shape = fx->data + fx->col_at[COL_SHAPE];
    t.shape_len = fx->col_len[COL_SHAPE];
    t.offsets = fx->data + fx->col_at[COL_OFFSETS];
    t.offsets_len = fx->col_len[COL_OFFSETS];
    t.nbytes = fx->data + fx->col_at[COL_NBYTES];
    t.nbytes_len = fx->col_len[COL_NBYTES];
    return t;
}

static uint64_t header_end_of(const fixture *fx)
{
    return SCK_PREFIX_SIZE + fx->header_len;
}

/* ---- CRC32C -------------------------------------------------------------------------------- */

static uint32_t crc32c_bitwise(const uint8_t *p, size_t len)
{
    uint32_t crc = 0xFFFFFFFFu;
    while (len--) {
        crc ^= *p++;
        for (int b = 0; b < 8; b++)
            crc = (crc >> 1) ^ ((crc & 1) ? 0x82F63B78u : 0);
    }
    return ~crc;
}

static void test_crc32c(void)
{
    uint8_t buf[32], big[70000];
    uint32_t state = 12345;

    /* RFC 3720 B.4, and the check value of the CRC catalogue */
    memset(buf, 0, 32);
    CHECK_EQ(sck_crc32c(0, buf, 32), 0x8A9136AA, "RFC 3720: 32 zeros");
    CHECK_EQ(sck_crc32c_sw(0, buf, 32), 0x8A9136AA, "RFC 3720: 32 zeros (tables)");
    memset(buf, 0xFF, 32);
    CHECK_EQ(sck_crc32c(0, buf, 32), 0x62A8AB43, "RFC 3720: 32 x 0xFF");
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    CHECK_EQ(sck_crc32c(0, buf, 32), 0x46DD794E, "RFC 3720: 0..31");
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)(31 - i);
    CHECK_EQ(sck_crc32c(0, buf, 32), 0x113FDB5C, "RFC 3720: 31..0");
    CHECK_EQ(sck_crc32c(0, "123456789", 9), 0xE3069283, "check value");
    CHECK_EQ(sck_crc32c(0, "", 0), 0, "empty");
    CHECK_EQ(sck_crc32c(0x1234, "", 0), 0x1234, "empty keeps the value");

    /* hardware (if any), tables and the bitwise reference agree on every length and alignment
     * around the 3-way blocks (256 and 8192 bytes a stream) */
    for (size_t i = 0; i < sizeof big; i++) {
        state = state * 1103515245u + 12345u;
        big[i] = (uint8_t)(state >> 16);
    }
    {
        const size_t lengths[] = {1, 7, 8, 9, 63, 767, 768, 769, 3 * 256 + 13, 24575, 24576,
                                  24577, 3 * 8192 * 2 + 100, sizeof big - 8};
        for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
            for (size_t a = 0; a < 8; a++) {
                size_t len = lengths[li];
                uint32_t ref = crc32c_bitwise(big + a, len);
                CHECK_EQ(sck_crc32c(0, big + a, len), ref, "crc32c vs bitwise");
                CHECK_EQ(sck_crc32c_sw(0, big + a, len), ref, "crc32c_sw vs bitwise");
                /* continuing from a value, and combining, give the CRC of the whole */
                CHECK_EQ(sck_crc32c(sck_crc32c(0, big + a, len / 3), big + a + len / 3,
                                    len - len / 3), ref, "crc32c continued");
                CHECK_EQ(sck_crc32c_combine(sck_crc32c(0, big + a, len / 3),
                                            sck_crc32c(0, big + a + len / 3, len - len / 3),
                                            len - len / 3), ref, "crc32c_combine");
            }
        }
    }
}

/* ---- One fixture: prefix, table, padding, tensors, I/O ------------------------------------- */

static void test_prefix(const fixture *fx)
{
    sck_prefix p;
    int rc = sck_parse_prefix(fx->data, fx->size, fx->size, SCK_MAX_HEADER_SIZE, &p);
    CHECK_CODE(rc, SCK_OK, fx->path);
    CHECK_EQ(p.major, fx->major, "major");
    CHECK_EQ(p.minor, fx->minor, "minor");
    CHECK_EQ(p.flags, fx->flags, "flags");
    CHECK_EQ(p.align, fx->align, "align");
    CHECK_EQ(p.header_len, fx->header_len, "header_len");
    CHECK_EQ(p.header_crc, fx->header_crc, "header_crc");
    CHECK_EQ(p.major, SCK_VERSION_MAJOR, "major is this reader's");
    CHECK(p.minor <= SCK_VERSION_MINOR, "minor %u", (unsigned)p.minor);
    /* [P8] */
    CHECK_EQ(sck_crc32c(0, fx->data + SCK_PREFIX_SIZE, (size_t)fx->header_len), p.header_crc,
             "header CRC [P8]");
    CHECK_EQ(fx->col_present[COL_CRC], (p.flags & SCK_FLAG_TENSOR_CRC) != 0,
             "crc32c column iff TENSOR_CRC [H4]");
}

static void test_table(const fixture *fx)
{
    sck_table t = table_of(fx);
    uint64_t bad = 99, shape_pos = 0;
    int fd, err = -1;

    CHECK_CODE(sck_validate_table(&t, header_end_of(fx), fx->align, fx->size, SCK_MAX_NDIM, &bad),
               SCK_OK, fx->path);
    CHECK_EQ(bad, 0, "bad_index on success");
    CHECK_CODE(sck_check_padding_mem(fx->data, fx->size, &t, header_end_of(fx), &bad), SCK_OK,
               "padding in memory [T9]");
    fd = open(fx->path, O_RDONLY);
    CHECK(fd >= 0, "open %s", fx->path);
    CHECK_CODE(sck_check_padding_fd(fd, fx->size, &t, header_end_of(fx), &bad, &err), SCK_OK,
               "padding through a file descriptor [T9]");
    CHECK_EQ(err, 0, "err");
    close(fd);

    /* the columns hold what the description says, and each tensor the formula's bytes */
    for (uint64_t i = 0; i < fx->n; i++) {
        const tensor *e = &fx->t[i];
        uint64_t count = 1;
        uint8_t want[16];
        int size, bits;
        CHECK_EQ(t.dtypes[i], e->code, e->name);
        CHECK_EQ(t.ndims[i], e->ndim, e->name);
        for (uint32_t d = 0; d < e->ndim; d++) {
            CHECK_EQ(le_load(t.shape + shape_pos, 8), e->dims[d], e->name);
            count *= e->dims[d];
            shape_pos += 8;
        }
        CHECK_EQ(le_load(t.offsets + 8 * i, 8), e->offset, e->name);
        CHECK_EQ(le_load(t.nbytes + 8 * i, 8), e->nbytes, e->name);
        CHECK_EQ(e->offset % fx->align, 0, e->name);
        size = sck_dtype_itemsize(e->code);
        bits = sck_dtype_bits(e->code);
        CHECK_EQ((count * (uint64_t)bits + 7) / 8, e->nbytes, e->name); /* [T5] */
        if (bits < 8) { /* packed: each element's bits in the stream, zero padding bits [T11] */
            const uint8_t *p = fx->data + e->offset;
            for (uint64_t k = 0; k < count; k++)
                if (stream_field(p, k, bits) != expect_packed(e->seed, k, bits)) {
                    CHECK(0, "%s: packed element %llu differs from the formula", e->name,
                          (unsigned long long)k);
                    break;
                }
            if (count * (uint64_t)bits % 8)
                CHECK_EQ(p[e->nbytes - 1] >> (count * (uint64_t)bits % 8), 0, e->name);
        }
        for (uint64_t k = 0; k < count && bits >= 8; k++) {
            expect_element(e->code, e->seed, k, want);
            if (memcmp(fx->data + e->offset + k * (uint64_t)size, want, (size_t)size) != 0) {
                CHECK(0, "%s: element %llu differs from the formula", e->name,
                      (unsigned long long)k);
                break;
            }
        }
        if (fx->col_present[COL_CRC]) {
            uint32_t crc = sck_crc32c(0, fx->data + e->offset, (size_t)e->nbytes);
            CHECK_EQ(crc, e->crc, e->name);
            CHECK_EQ(le_load(fx->data + fx->col_at[COL_CRC] + 4 * i, 4), crc, e->name);
        }
    }
    CHECK_EQ(shape_pos, t.shape_len, "shape column used up");
}

static void test_read(const fixture *fx)
{
    uint64_t n = fx->n, bad = 99;
    uint64_t *offsets = calloc(n + 1, 8), *lengths = calloc(n + 1, 8);
    void **dests = calloc(n + 1, sizeof *dests);
    uint32_t *crcs = calloc(n + 1, 4), *crcs2 = calloc(n + 1, 4);
    void *map = NULL;
    int fd = open(fx->path, O_RDONLY), err = -1;

    CHECK(fd >= 0, "open %s", fx->path);
    CHECK_CODE(sck_map(fd, fx->size, &map, &err), SCK_OK, "sck_map");
    if (map != NULL) {
        CHECK(memcmp(map, fx->data, (size_t)fx->size) == 0, "the mapping holds the file");
        CHECK_CODE(sck_advise(map, fx->size, 0, fx->size, SCK_ADVICE_WILLNEED), SCK_OK, "advise");
        CHECK_CODE(sck_advise(map, fx->size, 0, fx->size, 99), SCK_E_ARG, "advise 99");
        ((uint8_t *)map)[0] ^= 1; /* private: the file does not change */
        sck_unmap(map, fx->size);
    }
    for (uint64_t i = 0; i < n; i++) {
        offsets[i] = fx->t[i].offset;
        lengths[i] = fx->t[i].nbytes;
        dests[i] = malloc((size_t)lengths[i] + 1);
    }
    CHECK_CODE(sck_pread_many(fd, n, offsets, lengths, dests, NULL, crcs, 3, &bad, &err), SCK_OK,
               "sck_pread_many");
    CHECK_CODE(sck_crc32c_ranges(fx->data, fx->size, n, offsets, lengths, crcs2, 3, &bad), SCK_OK,
               "sck_crc32c_ranges");
    for (uint64_t i = 0; i < n; i++) {
        uint32_t want = sck_crc32c(0, fx->data + offsets[i], (size_t)lengths[i]);
        CHECK(memcmp(dests[i], fx->data + offsets[i], (size_t)lengths[i]) == 0, "pread %s",
              fx->t[i].name);
        CHECK_EQ(crcs[i], want, fx->t[i].name);
        CHECK_EQ(crcs2[i], want, fx->t[i].name);
        free(dests[i]);
    }
    close(fd);
    free(offsets);
    free(lengths);
    free(dests);
    free(crcs);
    free(crcs2);
}

/* The C writer, given the fixture's header and tensors, writes the fixture again: every byte. */
static void test_write_round_trip(const fixture *fx)
{
    char path[] = "/tmp/sck_test_core_XXXXXX";
    int fd = mkstemp(path), err = -1;
    uint64_t n = fx->n, end = 0, bad = 99, size;
    const void **srcs = calloc(n + 1, sizeof *srcs);
    uint64_t *lens = calloc(n + 1, 8);
    uint32_t *crcs = calloc(n + 1, 4);
    int want_crc = (fx->flags & SCK_FLAG_TENSOR_CRC) != 0;
    uint8_t *back;

    CHECK(fd >= 0, "mkstemp: %s", strerror(errno));
    CHECK(pwrite(fd, fx->data, (size_t)header_end_of(fx), 0) == (ssize_t)header_end_of(fx),
          "write the header");
    for (uint64_t i = 0; i < n; i++) {
        srcs[i] = fx->data + fx->t[i].offset;
        lens[i] = fx->t[i].nbytes;
    }
    CHECK_CODE(sck_write_tensors(fd, header_end_of(fx), n, srcs, lens, fx->align, want_crc, crcs,
                                 &end, &bad, &err), SCK_OK, "sck_write_tensors");
    CHECK_EQ(end, fx->size, "end of the data section");
    for (uint64_t i = 0; i < n && want_crc; i++)
        CHECK_EQ(crcs[i], fx->t[i].crc, fx->t[i].name);
    close(fd);
    back = read_file(path, &size);
    CHECK_EQ(size, fx->size, "written size");
    CHECK(size == fx->size && memcmp(back, fx->data, (size_t)size) == 0,
          "%s written again by the C writer differs", fx->path);
    unlink(path);
    free(back);
    free(srcs);
    free(lens);
    free(crcs);
}

/* ---- Hostile prefixes and tables ---------------------------------------------------------- */

static void test_hostile_prefix(const fixture *fx)
{
    uint8_t b[SCK_PREFIX_SIZE];
    sck_prefix p;
    uint64_t s = fx->size;
#define PREFIX_CASE(edit, file_size, max, want)                                          \
    do {                                                                                 \
        memcpy(b, fx->data, SCK_PREFIX_SIZE);                                            \
        edit;                                                                            \
        CHECK_CODE(sck_parse_prefix(b, SCK_PREFIX_SIZE, (file_size), (max), &p), (want), \
                   #edit);                                                               \
    } while (0)
    PREFIX_CASE((void)0, s, SCK_MAX_HEADER_SIZE, SCK_OK);
    PREFIX_CASE((void)0, SCK_PREFIX_SIZE - 1, SCK_MAX_HEADER_SIZE, SCK_E_TRUNCATED);   /* [P1] */
    PREFIX_CASE(b[1] = 'X', s, SCK_MAX_HEADER_SIZE, SCK_E_MAGIC);                     /* [P2] */
    PREFIX_CASE(memcpy(b, "\x89SCK\n\x1a\n", 7), s, SCK_MAX_HEADER_SIZE, SCK_E_MAGIC_TEXT);
    PREFIX_CASE(le_store(b + 8, 2, 2), s, SCK_MAX_HEADER_SIZE, SCK_E_VERSION);        /* [P3] */
    PREFIX_CASE(le_store(b + 12, 0x80, 4), s, SCK_MAX_HEADER_SIZE, SCK_E_FLAGS);      /* [P4] */
    PREFIX_CASE((void)0, s, fx->header_len - 1, SCK_E_HEADER_LIMIT);                  /* [P5] */
    PREFIX_CASE((void)0, header_end_of(fx) - 1, SCK_MAX_HEADER_SIZE, SCK_E_TRUNCATED); /* [P6] */
    PREFIX_CASE(le_store(b + 16, UINT64_MAX, 8), s, UINT64_MAX, SCK_E_TRUNCATED);     /* overflow */
    PREFIX_CASE(le_store(b + 24, 48, 4), s, SCK_MAX_HEADER_SIZE, SCK_E_ALIGN);        /* [P7] */
    PREFIX_CASE(le_store(b + 24, 4, 4), s, SCK_MAX_HEADER_SIZE, SCK_E_ALIGN);
    PREFIX_CASE(le_store(b + 24, 2u << 20, 4), s, SCK_MAX_HEADER_SIZE, SCK_E_ALIGN);
#undef PREFIX_CASE
}

/* mixed.sckpt with one column edited: the validator's code and the tensor it names */
static void test_hostile_table(const fixture *fx)
{
    uint64_t n = fx->n, he = header_end_of(fx), bad;
    sck_table base = table_of(fx), t;
    uint8_t *dtypes = malloc((size_t)n), *ndims = malloc((size_t)n);
    uint8_t *shape = malloc((size_t)base.shape_len + 8), *offsets = malloc((size_t)n * 8);
    uint8_t *nbytes = malloc((size_t)n * 8), *file = malloc((size_t)fx->size);

#define TABLE_CASE(edit, file_size, want, want_bad)                                              \
    do {                                                                                         \
        memcpy(dtypes, base.dtypes, (size_t)n);                                                  \
        memcpy(ndims, base.ndims, (size_t)n);                                                    \
        memcpy(shape, base.shape, (size_t)base.shape_len);                                       \
        memcpy(offsets, base.offsets, (size_t)n * 8);                                            \
        memcpy(nbytes, base.nbytes, (size_t)n * 8);                                              \
        t = base;                                                                                \
        t.dtypes = dtypes;                                                                       \
        t.ndims = ndims;                                                                         \
        t.shape = shape;                                                                         \
        t.offsets = offsets;                                                                     \
        t.nbytes = nbytes;                                                                       \
        edit;                                                                                    \
        bad = 99;                                                                                \
        CHECK_CODE(sck_validate_table(&t, he, fx->align, (file_size), SCK_MAX_NDIM, &bad),       \
                   (want), #edit);                                                               \
        CHECK_EQ(bad, (want_bad), #edit);                                                        \
    } while (0)

    TABLE_CASE((void)0, fx->size, SCK_OK, 0);
    /* [H4] truncated columns: the whole table is named (index n) */
    TABLE_CASE(t.dtypes_len--, fx->size, SCK_E_COLUMN, n);
    TABLE_CASE(t.offsets_len -= 8, fx->size, SCK_E_COLUMN, n);
    TABLE_CASE(t.nbytes_len--, fx->size, SCK_E_COLUMN, n);
    TABLE_CASE(t.shape_len -= 8, fx->size, SCK_E_COLUMN, n - 1); /* the last tensor's dims */
    TABLE_CASE(t.shape_len += 8, fx->size, SCK_E_COLUMN, n);     /* dims left over */
    TABLE_CASE(t.n++, fx->size, SCK_E_COLUMN, n + 1);
    TABLE_CASE((void)0, he - 1, SCK_E_TRUNCATED, n);
    /* [T1]-[T5] */
    TABLE_CASE(dtypes[2] = SCK_DTYPE_COUNT, fx->size, SCK_E_DTYPE, 2);
    TABLE_CASE(ndims[0] = SCK_MAX_NDIM + 1, fx->size, SCK_E_NDIM, 0);
    TABLE_CASE(le_store(shape, UINT64_C(1) << 63, 8), fx->size, SCK_E_DIM, 0);
    TABLE_CASE(le_store(shape, UINT64_C(1) << 62, 8), fx->size, SCK_E_TOO_LARGE, 0);
    TABLE_CASE(le_store(nbytes + 8, le_load(nbytes + 8, 8) + 1, 8), fx->size, SCK_E_NBYTES, 1);
    /* [T6]: overlapping, misaligned, a gap */
    TABLE_CASE(le_store(offsets + 8, le_load(offsets, 8), 8), fx->size, SCK_E_OVERLAP, 1);
    TABLE_CASE(le_store(offsets, he - (he % fx->align), 8), fx->size, SCK_E_OVERLAP, 0);
    TABLE_CASE(le_store(offsets + 16, le_load(offsets + 16, 8) + 8, 8), fx->size,
               SCK_E_MISALIGNED, 2);
    TABLE_CASE(le_store(offsets + 16, le_load(offsets + 16, 8) + fx->align, 8), fx->size,
               SCK_E_GAP, 2);
    TABLE_CASE(le_store(offsets + 8 * (n - 1), UINT64_MAX - 63, 8), fx->size, SCK_E_GAP, n - 1);
    /* [T7] [T8] */
    TABLE_CASE((void)0, fx->size - 1, SCK_E_TENSOR_TRUNCATED, n - 1);
    TABLE_CASE((void)0, fx->size + 1, SCK_E_TRAILING, n);
#undef TABLE_CASE

    /* [T9]: a non-zero padding byte names the tensor after it, in memory and in a file */
    memcpy(file, fx->data, (size_t)fx->size);
    file[fx->t[2].offset - 1] = 0x5A; /* between tensors 1 and 2 */
    bad = 99;
    CHECK_CODE(sck_check_padding_mem(file, fx->size, &base, he, &bad), SCK_E_PADDING, "padding");
    CHECK_EQ(bad, 2, "padding: the tensor after the byte");
    {
        char path[] = "/tmp/sck_test_core_XXXXXX";
        int fd = mkstemp(path), err = -1;
        CHECK(fd >= 0 && pwrite(fd, file, (size_t)fx->size, 0) == (ssize_t)fx->size, "temp");
        bad = 99;
        CHECK_CODE(sck_check_padding_fd(fd, fx->size, &base, he, &bad, &err), SCK_E_PADDING,
                   "padding (fd)");
        CHECK_EQ(bad, 2, "padding (fd): the tensor after the byte");
        /* a file shorter than the size its caller claims: truncated, not a read past the end */
        CHECK(ftruncate(fd, (off_t)fx->t[2].offset - 2) == 0, "ftruncate");
        CHECK_CODE(sck_check_padding_fd(fd, fx->size, &base, he, &bad, &err), SCK_E_TRUNCATED,
                   "padding (fd) of a cut file");
        close(fd);
        unlink(path);
    }
    /* [T10]: one bit flipped in a tensor changes its CRC32C */
    file[fx->t[2].offset - 1] = 0;
    file[fx->t[5].offset + 3] ^= 0x10;
    CHECK(sck_crc32c(0, file + fx->t[5].offset, (size_t)fx->t[5].nbytes) != fx->t[5].crc,
          "a flipped bit changes the CRC");
    free(dtypes);
    free(ndims);
    free(shape);
    free(offsets);
    free(nbytes);
    free(file);
}

/* ---- Bits per element: the packed codes [T4] [T5] (FORMAT.md section 4) ------------------- */

/* sck_validate_table on one tensor of `code` and dims[0..ndim) at offset 64 (header_end 40,
 * align 64), with nbytes and a file just long enough for them (capped at 2**64 - 1). */
static int validate_one(int code, uint32_t ndim, const uint64_t *dims, uint64_t nbytes)
{
    uint8_t dtype = (uint8_t)code, nd = (uint8_t)ndim, shape[8 * 4], offset[8], nb[8];
    uint64_t bad = 99, file_size = nbytes > UINT64_MAX - 64 ? UINT64_MAX : 64 + nbytes;
    sck_table t;
    int rc;

    for (uint32_t d = 0; d < ndim; d++)
        le_store(shape + 8 * d, dims[d], 8);
    le_store(offset, 64, 8);
    le_store(nb, nbytes, 8);
    memset(&t, 0, sizeof t);
    t.n = 1;
    t.dtypes = &dtype;
    t.dtypes_len = 1;
    t.ndims = &nd;
    t.ndims_len = 1;
    t.shape = shape;
    t.shape_len = 8 * (uint64_t)ndim;
    t.offsets = offset;
    t.offsets_len = 8;
    t.nbytes = nb;
    t.nbytes_len = 8;
    rc = sck_validate_table(&t, 40, 64, file_size, SCK_MAX_NDIM, &bad);
    CHECK_EQ(bad, 0, "bad_index of a one-tensor table");
    return rc;
}

static void test_packed_table(void)
{
    /* code, bits: the plan's table of version 1.5 (safeckpt/dtypes.py BITS_BY_CODE) */
    static const int bits[][2] = {{19, 8}, {20, 8}, {21, 8}, {22, 8}, {23, 8}, {24, 6}, {25, 6},
                                  {26, 4}, {27, 4}, {28, 4}, {29, 2}, {30, 2}, {31, 1}, {32, 1},
                                  {33, 32}, {34, 32}};
    const uint64_t t62 = UINT64_C(1) << 62, t63 = UINT64_C(1) << 63;
    uint64_t dims[3];

    CHECK_EQ(SCK_DTYPE_COUNT, 35, "SCK_DTYPE_COUNT");
    CHECK_EQ(sck_dtype_bits(SCK_DTYPE_COUNT), 0, "bits of an unknown code");
    CHECK_EQ(sck_dtype_bits(-1), 0, "bits of -1");
    for (size_t i = 0; i < sizeof bits / sizeof bits[0]; i++) {
        int code = bits[i][0], b = bits[i][1];
        CHECK_EQ(sck_dtype_bits(code), b, "bits");
        CHECK_EQ(sck_dtype_itemsize(code), b < 8 ? 1 : b / 8, "numpy item size");
        /* counts 0..17: nbytes = ceil(count * bits / 8) exactly, one more or less refused */
        for (uint64_t count = 0; count < 18; count++) {
            uint64_t want = (count * (uint64_t)b + 7) / 8;
            dims[0] = count;
            CHECK_CODE(validate_one(code, 1, dims, want), SCK_OK, "packed nbytes");
            CHECK_CODE(validate_one(code, 1, dims, want + 1), SCK_E_NBYTES, "one byte more");
            if (want)
                CHECK_CODE(validate_one(code, 1, dims, want - 1), SCK_E_NBYTES, "one byte less");
        }
    }
    /* [T4]: 2**63 one-bit elements are 2**60 bytes, but numpy unpacks one byte per element */
    dims[0] = t62, dims[1] = 2;
    CHECK_CODE(validate_one(32, 2, dims, t63 / 8), SCK_E_TOO_LARGE, "uint1 2**63 elements");
    CHECK_CODE(validate_one(24, 2, dims, 3 * (t63 / 4)), SCK_E_TOO_LARGE, "float6 2**63");
    dims[0] = UINT64_C(1) << 32, dims[1] = UINT64_C(1) << 32; /* wraps u64 to 0 unchecked */
    CHECK_CODE(validate_one(25, 2, dims, 0), SCK_E_TOO_LARGE, "float6 2**64 elements");
    dims[0] = t62, dims[1] = 0, dims[2] = 2; /* a zero dim does not excuse the others */
    CHECK_CODE(validate_one(31, 3, dims, 0), SCK_E_TOO_LARGE, "int1 with a zero dim");
    dims[0] = UINT64_C(1) << 61; /* complex32: 2**63 bytes */
    CHECK_CODE(validate_one(33, 1, dims, 0), SCK_E_TOO_LARGE, "complex32 2**63 bytes");
    /* the largest counts: count * 6 needs 66 bits, the byte size does not */
    dims[0] = t63 - 1;
    CHECK_CODE(validate_one(24, 1, dims, 3 * (t63 / 4)), SCK_OK, "float6 2**63 - 1");
    CHECK_CODE(validate_one(32, 1, dims, t63 / 8), SCK_OK, "uint1 2**63 - 1");
    CHECK_CODE(validate_one(28, 1, dims, t63 / 2), SCK_OK, "uint4 2**63 - 1");
    dims[0] = t62; /* 2**62 * 6 wraps u64 to 2**63: the wrapped nbytes is refused */
    CHECK_CODE(validate_one(25, 1, dims, 3 * (t62 / 4)), SCK_OK, "float6 2**62");
    CHECK_CODE(validate_one(25, 1, dims, t63 / 8), SCK_E_NBYTES, "float6 2**62, wrapped");
    dims[0] = (UINT64_C(1) << 61) - 1;
    CHECK_CODE(validate_one(33, 1, dims, t63 - 4), SCK_OK, "complex32, the largest");
}

/* ---- Big tensors: write in chunks, CRC on a second thread, read in parallel pieces --------- */

static void test_big_round_trip(void)
{
    const uint64_t big = (uint64_t)SCK_CRC_THREAD_MIN + 3 * (uint64_t)SCK_WRITE_CHUNK + 5;
    uint8_t *src = malloc((size_t)big), *dst = malloc((size_t)big), small[100];
    const void *srcs[3] = {small, src, small};
    void *dests[3];
    uint64_t lens[3] = {sizeof small, big, 7}, offsets[3], end = 0, bad = 99;
    uint32_t crcs[3] = {0}, got[3] = {0}, ranges[3] = {0}, want[3];
    char path[] = "/tmp/sck_test_core_XXXXXX";
    int fd = mkstemp(path), err = -1;
    uint8_t *scratch = malloc(sizeof small);

    CHECK(src && dst && scratch && fd >= 0, "set-up");
    for (uint64_t i = 0; i < big; i++)
        src[i] = (uint8_t)((i * 2654435761u) >> 13);
    for (size_t i = 0; i < sizeof small; i++)
        small[i] = (uint8_t)(i + 1);
    for (int i = 0; i < 3; i++)
        want[i] = sck_crc32c_sw(0, srcs[i], (size_t)lens[i]);
    CHECK_CODE(sck_write_tensors(fd, 100, 3, srcs, lens, 4096, 1, crcs, &end, &bad, &err), SCK_OK,
               "write big");
    offsets[0] = 4096;
    offsets[1] = 8192;
    offsets[2] = (8192 + big + 4095) / 4096 * 4096;
    CHECK_EQ(end, offsets[2] + 7, "end");
    for (int i = 0; i < 3; i++)
        CHECK_EQ(crcs[i], want[i], "CRC of the writer (helper thread)");
    dests[0] = scratch;
    dests[1] = dst;
    dests[2] = scratch;
    CHECK_CODE(sck_pread_many(fd, 2, offsets, lens, dests, NULL, got, 4, &bad, &err), SCK_OK,
               "pread big, 4 threads");
    CHECK(memcmp(dst, src, (size_t)big) == 0 && memcmp(scratch, small, sizeof small) == 0,
          "read back");
    CHECK_EQ(got[0], want[0], "pread CRC small");
    CHECK_EQ(got[1], want[1], "pread CRC big (joined from pieces)");
    CHECK_CODE(sck_crc32c_ranges(src, big, 1, (const uint64_t[]){0}, &big, ranges, 4, &bad),
               SCK_OK, "crc32c_ranges 4 threads");
    CHECK_EQ(ranges[0], want[1], "crc32c_ranges of the big buffer");
    /* cut short: SCK_E_TRUNCATED naming the tensor */
    CHECK(ftruncate(fd, (off_t)(offsets[1] + big - 1)) == 0, "ftruncate");
    CHECK_CODE(sck_pread_many(fd, 2, offsets, lens, dests, NULL, got, 4, &bad, &err),
               SCK_E_TRUNCATED, "pread past the end");
    CHECK_EQ(bad, 1, "the tensor cut short");
    close(fd);
    /* a write error: SCK_E_IO with errno and the tensor */
    fd = open(path, O_RDONLY);
    CHECK_CODE(sck_write_tensors(fd, 0, 1, srcs, lens, 64, 1, crcs, &end, &bad, &err), SCK_E_IO,
               "write to a read-only descriptor");
    CHECK_EQ(err, EBADF, "errno of the write");
    CHECK_EQ(bad, 0, "the tensor being written");
    CHECK_CODE(sck_write_tensors(fd, 0, 1, srcs, lens, 48, 1, crcs, &end, &bad, &err), SCK_E_ALIGN,
               "write with align 48");
    close(fd);
    unlink(path);
    free(src);
    free(dst);
    free(scratch);
}

/* ---- Exact byte comparison: one piece on the calling thread, many pieces on threads -------- */

static void test_bytes_equal(void)
{
    const uint64_t big = (uint64_t)SCK_COMPARE_THREAD_MIN + 3 * (uint64_t)SCK_READ_PIECE + 5;
    const uint64_t positions[] = {0, 1, SCK_READ_PIECE - 1, SCK_READ_PIECE,
                                  2 * (uint64_t)SCK_READ_PIECE + 77, big - 1};
    static const int threads[] = {1, 3, 0};
    uint8_t *a = malloc((size_t)big), *b = malloc((size_t)big);
    int equal = -1;

    CHECK(a && b, "set-up");
    for (uint64_t i = 0; i < big; i++)
        a[i] = b[i] = (uint8_t)((i * 2654435761u) >> 11);
    CHECK_CODE(sck_bytes_equal(NULL, NULL, 0, 0, &equal), SCK_OK, "empty, NULL");
    CHECK_EQ(equal, 1, "empty buffers are equal");
    CHECK_CODE(sck_bytes_equal(a, NULL, 1, 0, &equal), SCK_E_ARG, "NULL with a length");
    CHECK_EQ(equal, 0, "*equal zeroed on error");
    CHECK_CODE(sck_bytes_equal(a, b, 1, 0, NULL), SCK_E_ARG, "NULL out-pointer");
    CHECK_CODE(sck_bytes_equal(a, a + 1, 100, 0, &equal), SCK_OK, "shifted");
    CHECK_EQ(equal, 0, "a buffer against itself shifted by one");
    CHECK_CODE(sck_bytes_equal(a, a, big, 0, &equal), SCK_OK, "same buffer");
    CHECK_EQ(equal, 1, "a buffer against itself");
    for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
        CHECK_CODE(sck_bytes_equal(a, b, big, threads[t], &equal), SCK_OK, "big equal");
        CHECK(equal == 1, "big equal buffers, %d threads", threads[t]);
        for (size_t p = 0; p < sizeof positions / sizeof positions[0]; p++) {
            b[positions[p]] ^= 0x10;
            CHECK_CODE(sck_bytes_equal(a, b, big, threads[t], &equal), SCK_OK, "big unequal");
            CHECK(equal == 0, "bit flipped at %llu, %d threads",
                  (unsigned long long)positions[p], threads[t]);
            CHECK_CODE(sck_bytes_equal(a, b, positions[p], threads[t], &equal), SCK_OK, "prefix");
            CHECK(equal == 1, "the %llu bytes before the flipped bit, %d threads",
                  (unsigned long long)positions[p], threads[t]);
            b[positions[p]] ^= 0x10;
        }
    }
    free(a);
    free(b);
}

/* ---- Copies: checked before any byte moves, many ranges on one thread or shared by threads -- */

static void test_copy_many(void)
{
    /* ranges of every kind: empty, a byte, across piece edges, past the thread threshold */
    const uint64_t lens[] = {0, 1, 7, SCK_READ_PIECE - 1, SCK_READ_PIECE + 1, 0,
                             (uint64_t)SCK_COPY_THREAD_MIN + 2 * (uint64_t)SCK_READ_PIECE + 3,
                             4096};
    enum { N = sizeof lens / sizeof lens[0] };
    static const int threads[] = {1, 3, 0};
    uint64_t total = 0, at[N], bad = 99;
    void *dsts[N];
    const void *srcs[N];
    uint8_t *src, *dst;

    for (size_t i = 0; i < N; i++) {
        at[i] = total;
        total += lens[i] + 3; /* 3 bytes between ranges stay untouched */
    }
    src = malloc((size_t)total);
    dst = malloc((size_t)total);
    CHECK(src && dst, "set-up");
    for (uint64_t i = 0; i < total; i++)
        src[i] = (uint8_t)((i * 2654435761u) >> 13);
    for (size_t i = 0; i < N; i++) {
        dsts[i] = dst + at[i];
        srcs[i] = src + at[i];
    }
    for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
        int same = 1, gaps = 1;
        memset(dst, 0xA5, (size_t)total);
        CHECK_CODE(sck_copy_many(N, dsts, srcs, lens, threads[t], &bad), SCK_OK, "copy");
        CHECK_EQ(bad, 0, "bad_index zeroed on success");
        for (size_t i = 0; i < N; i++) {
            same &= memcmp(dst + at[i], src + at[i], (size_t)lens[i]) == 0;
            for (uint64_t g = at[i] + lens[i]; g < at[i] + lens[i] + 3; g++)
                gaps &= dst[g] == 0xA5;
        }
        CHECK(same, "every range copied, %d threads", threads[t]);
        CHECK(gaps, "nothing written between ranges, %d threads", threads[t]);
    }
    CHECK_CODE(sck_copy_many(0, NULL, NULL, NULL, 0, &bad), SCK_OK, "no ranges");
    CHECK_CODE(sck_copy_many(1, dsts, srcs, lens, 0, NULL), SCK_E_ARG, "NULL bad_index");
    {
        /* a bad range anywhere: SCK_E_ARG naming it, and no byte of any range copied */
        uint8_t scratch[32];
        void *to[4] = {dst, NULL, src + 200, scratch + 10};
        const void *from[4] = {src, src + 300, src + 200, scratch}; /* 2: a range onto itself */
        uint64_t len4[4] = {64, 64, 64, 11}, zeros = 0;
        for (int i = 0; i < 32; i++)
            scratch[i] = (uint8_t)i;
        memset(dst, 0, 512);
        CHECK_CODE(sck_copy_many(4, to, from, len4, 0, &bad), SCK_E_ARG, "NULL with a length");
        CHECK_EQ(bad, 1, "the NULL destination named");
        to[1] = dst + 100;
        CHECK_CODE(sck_copy_many(4, to, from, len4, 0, &bad), SCK_E_ARG, "overlapping its source");
        CHECK_EQ(bad, 3, "the range one byte into its source named");
        for (int i = 0; i < 512; i++)
            zeros += dst[i] == 0;
        CHECK_EQ(zeros, 512, "nothing copied before the refusal");
        len4[3] = 10; /* scratch + 10 from scratch, 10 bytes: they touch, they do not overlap */
        CHECK_CODE(sck_copy_many(4, to, from, len4, 0, &bad), SCK_OK, "adjacent, and onto itself");
        CHECK(memcmp(dst, src, 64) == 0 && memcmp(dst + 100, src + 300, 64) == 0, "copied");
        CHECK(memcmp(scratch + 10, scratch, 10) == 0 && scratch[20] == 20, "the adjacent copy");
    }
    {
        void *to[2] = {dst, dst + 8};
        const void *from[2] = {src, src + 8};
        uint64_t huge[2] = {8, UINT64_MAX}; /* no buffer has it: refused before any byte moves */
        CHECK_CODE(sck_copy_many(2, to, from, huge, 0, &bad), SCK_E_ARG, "a length past memory");
        CHECK_EQ(bad, 1, "the huge range named");
    }
    free(src);
    free(dst);
}

int main(int argc, char **argv)
{
    static const char *const names[] = {"mixed", "align256_nocrc", "empty", "packed"};
    const char *dir = argc > 1 ? argv[1] : "tests/c/fixtures";
    int mixed_seen = 0;

    test_crc32c();
    for (size_t f = 0; f < sizeof names / sizeof names[0]; f++) {
        fixture fx;
        load_fixture(dir, names[f], &fx);
        test_prefix(&fx);
        test_table(&fx);
        test_read(&fx);
        test_write_round_trip(&fx);
        test_hostile_prefix(&fx);
        if (strcmp(names[f], "mixed") == 0) {
            test_hostile_table(&fx);
            mixed_seen = 1;
        }
        free(fx.data);
        free(fx.t);
    }
    CHECK(mixed_seen, "mixed.sckpt tested");
    test_packed_table();
    test_big_round_trip();
    test_bytes_equal();
    test_copy_many();
    printf("test_core: %ld checks, %ld failed (CRC32C in %s, %s-endian)\n", checks, failures,
           sck_crc32c_hw_available() ? "hardware" : "tables",
           le_load((const uint8_t *)&(uint32_t){1}, 1) ? "little" : "big");
    return failures ? 1 : 0;
}
