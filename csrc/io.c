/*
 * io.c - file access for safeckpt: private memory maps, the padding check on a file descriptor,
 * parallel pread (driven by parallel.c), streaming write.
 *
 * Every read and write loops over partial transfers and EINTR; failures come back as SCK_E_IO
 * with the errno in an out-parameter (the parallel reader fails in worker threads, where errno
 * would be lost). Positions are checked to stay below 2**63 so that they fit off_t, which
 * compat.h makes 64 bits wide on 32-bit hosts too.
 */
#include "compat.h" /* first: feature-test macros */

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "sck.h"
#include "sck_internal.h"

#ifdef IOV_MAX
#define SCK_IOV_BATCH (IOV_MAX < 1024 ? IOV_MAX : 1024)
#else
#define SCK_IOV_BATCH 1024
#endif

/* A checked read reads and checksums this much at a time, so that the checksum finds the bytes
 * in the core's own cache (L2) where the copy left them: measured 256 KiB to 1 MiB best on a
 * 475 MiB read on 2 cores: the checksum added about 20 ms, against about 30 ms when whole
 * 8 MiB pieces were checksummed after their pread. */
#define SCK_READ_CRC_CHUNK (256u << 10)

/* ---- Memory mapping -------------------------------------------------------------------------- */

int sck_map(int fd, uint64_t size, void **out, int *err)
{
    void *p;
    SCK_CHECK(out != NULL && err != NULL, SCK_E_ARG);
    *out = NULL;
    *err = 0;
    SCK_CHECK(size > 0 && size <= (uint64_t)SIZE_MAX, SCK_E_ARG);
    /* MAP_NORESERVE (where there is one): a private writable mapping is otherwise charged in
     * full against the overcommit limit, which refuses files larger than RAM + swap; pages are
     * only copied when written. */
    p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | SCK_MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return SCK_E_IO;
    }
    *out = p;
    return SCK_OK;
}

void sck_unmap(void *base, uint64_t size)
{
    if (base != NULL && size > 0 && size <= (uint64_t)SIZE_MAX)
        munmap(base, (size_t)size);
}

int sck_advise(void *base, uint64_t size, uint64_t offset, uint64_t length, int advice)
{
    int adv;
    uint64_t page, start, end;
    long ps;

    switch (advice) {
    case SCK_ADVICE_NORMAL: adv = POSIX_MADV_NORMAL; break;
    case SCK_ADVICE_SEQUENTIAL: adv = POSIX_MADV_SEQUENTIAL; break;
    case SCK_ADVICE_WILLNEED: adv = POSIX_MADV_WILLNEED; break;
    case SCK_ADVICE_RANDOM: adv = POSIX_MADV_RANDOM; break;
    default: return SCK_E_ARG;
    }
    if (base == NULL || offset >= size || length == 0)
        return SCK_OK;
    ps = sysconf(_SC_PAGESIZE);
    page = ps > 0 ? (uint64_t)ps : 4096;
    end = offset + (length < size - offset ? length : size - offset); /* <= size */
    start = offset & ~(page - 1);
    if (sck_align_up_u64(end, page, &end))
        return SCK_OK;
    /* best effort; the POSIX spelling of madvise (glibc passes these four straight to it) */
    (void)posix_madvise((uint8_t *)base + start, (size_t)(end - start), adv);
    return SCK_OK;
}

/* ---- Whole transfers -------------------------------------------------------------------------- */

static int sck_pread_full(int fd, uint8_t *dst, uint64_t len, uint64_t off, int *err)
{
    while (len > 0) {
        size_t want = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t r = pread(fd, dst, want, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return SCK_E_IO;
        }
        if (r == 0)
            return SCK_E_TRUNCATED;
        dst += r;
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return SCK_OK;
}

static int sck_pwrite_full(int fd, const uint8_t *src, uint64_t len, uint64_t off, int *err)
{
    while (len > 0) {
        size_t want = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t r = pwrite(fd, src, want, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return SCK_E_IO;
        }
        if (r == 0) {
            *err = EIO;
            return SCK_E_IO;
        }
        src += r;
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return SCK_OK;
}

/* Writes iov[0..cnt) at off, following partial writes; modifies iov. */
#if SCK_HAVE_PWRITEV
static int sck_pwritev_full(int fd, struct iovec *iov, int cnt, uint64_t off, int *err)
{
    int i = 0;
    while (i < cnt) {
        ssize_t r;
        if (iov[i].iov_len == 0) {
            i++;
            continue;
        }
        r = pwritev(fd, iov + i, cnt - i, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return SCK_E_IO;
        }
        if (r == 0) {
            *err = EIO;
            return SCK_E_IO;
        }
        off += (uint64_t)r;
        while (r > 0 && i < cnt) {
            if ((size_t)r >= iov[i].iov_len) {
                r -= (ssize_t)iov[i].iov_len;
                i++;
            } else {
                iov[i].iov_base = (uint8_t *)iov[i].iov_base + r;
                iov[i].iov_len -= (size_t)r;
                r = 0;
            }
        }
    }
    return SCK_OK;
}
#else
static int sck_pwritev_full(int fd, struct iovec *iov, int cnt, uint64_t off, int *err)
{
    for (int i = 0; i < cnt; i++) {
        int rc = sck_pwrite_full(fd, iov[i].iov_base, iov[i].iov_len, off, err);
        if (rc != SCK_OK)
            return rc;
        off += iov[i].iov_len;
    }
    return SCK_OK;
}
#endif

/* ---- Padding [T9] on a file descriptor -------------------------------------------------------- */

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

/* ---- Parallel read ---------------------------------------------------------------------------- */

typedef struct sck_reader {
    int fd;
    const uint64_t *offsets;
    void *const *dests;
    const uint8_t *want_crc; /* NULL: every range */
    uint32_t *piece_crcs;    /* NULL: no checksums */
    pthread_mutex_t lock;
    int rc;       /* the failure of the lowest failing tensor, under lock */
    uint64_t bad;
    int err;
} sck_reader;

static int sck_read_piece(void *ctx, uint64_t i, uint64_t off, uint64_t len, uint64_t k)
{
    sck_reader *r = ctx;
    uint8_t *dst = (uint8_t *)r->dests[i] + off;
    int err = 0, rc;
    if (r->piece_crcs != NULL && (r->want_crc == NULL || r->want_crc[i])) {
        /* read and checksum in chunks small enough to be checksummed while still in the
         * core's own cache */
        uint32_t crc = 0;
        rc = SCK_OK;
        for (uint64_t at = 0; at < len && rc == SCK_OK; at += SCK_READ_CRC_CHUNK) {
            uint64_t c = len - at < SCK_READ_CRC_CHUNK ? len - at : SCK_READ_CRC_CHUNK;
            rc = sck_pread_full(r->fd, dst + at, c, r->offsets[i] + off + at, &err);
            if (rc == SCK_OK)
                crc = sck_crc32c(crc, dst + at, (size_t)c);
        }
        r->piece_crcs[k] = crc;
    } else {
        rc = sck_pread_full(r->fd, dst, len, r->offsets[i] + off, &err);
    }
    if (rc != SCK_OK) {
        sck_lock(&r->lock);
        if (r->rc == SCK_OK || i < r->bad) {
            r->rc = rc;
            r->bad = i;
            r->err = err;
        }
        sck_unlock(&r->lock);
    }
    return rc;
}

/* Checks the arguments of sck_pread_many and that every range ends below 2**63 (fits off_t);
 * zeroes crcs; *npieces = the pieces of SCK_READ_PIECE bytes to read. */
static int sck_read_check(uint64_t n, const uint64_t *offsets, const uint64_t *lengths,
                          void *const *dests, uint32_t *crcs, uint64_t *npieces,
                          uint64_t *bad_index)
{
    *npieces = 0;
    SCK_CHECK(n == 0 || (offsets && lengths && dests), SCK_E_ARG);
    for (uint64_t i = 0; crcs != NULL && i < n; i++)
        crcs[i] = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t end;
        if (lengths[i] == 0)
            continue;
        if (dests[i] == NULL || sck_add_u64(offsets[i], lengths[i], &end) ||
            end >= SCK_INT63_LIMIT || sck_add_u64(*npieces, sck_piece_count(lengths[i]), npieces)) {
            *bad_index = i;
            return SCK_E_ARG;
        }
    }
    return SCK_OK;
}

int sck_pread_many(int fd, uint64_t n, const uint64_t *offsets, const uint64_t *lengths,
                   void *const *dests, const uint8_t *want_crc, uint32_t *crcs, int nthreads,
                   uint64_t *bad_index, int *err)
{
    uint64_t npieces = 0, *first_piece;
    uint32_t *piece_crcs = NULL;
    sck_reader r;
    int rc;

    SCK_CHECK(bad_index != NULL && err != NULL, SCK_E_ARG);
    *bad_index = 0;
    *err = 0;
    rc = sck_read_check(n, offsets, lengths, dests, crcs, &npieces, bad_index);
    if (rc != SCK_OK || npieces == 0)
        return rc;
    SCK_CHECK(n < SIZE_MAX / sizeof *first_piece, SCK_E_NOMEM);
    SCK_CHECK(npieces < SIZE_MAX / sizeof *piece_crcs, SCK_E_NOMEM);
    first_piece = malloc((size_t)(n + 1) * sizeof *first_piece);
    /* zeroed: a range that is not checksummed still gets joined (then zeroed again) */
    if (crcs != NULL)
        piece_crcs = calloc((size_t)npieces, sizeof *piece_crcs);
    if (first_piece == NULL || (crcs != NULL && piece_crcs == NULL)) {
        free(first_piece);
        free(piece_crcs);
        return SCK_E_NOMEM;
    }
    memset(&r, 0, sizeof r);
    r.fd = fd;
    r.offsets = offsets;
    r.dests = dests;
    r.want_crc = want_crc;
    r.piece_crcs = piece_crcs;
    rc = pthread_mutex_init(&r.lock, NULL);
    if (rc != 0) { /* EAGAIN, ENOMEM: out of resources; EPERM */
        free(first_piece);
        free(piece_crcs);
        if (rc == EAGAIN || rc == ENOMEM)
            return SCK_E_NOMEM;
        *err = rc;
        return SCK_E_IO;
    }
    sck_run_pieces(n, lengths, first_piece, nthreads, sck_read_piece, &r);
    sck_mutex_destroy(&r.lock);
    if (crcs != NULL && r.rc == SCK_OK) {
        sck_join_pieces(n, lengths, first_piece, piece_crcs, crcs);
        for (uint64_t i = 0; want_crc != NULL && i < n; i++)
            if (!want_crc[i])
                crcs[i] = 0;
    }
    free(first_piece);
    free(piece_crcs);
    *bad_index = r.rc == SCK_OK ? 0 : r.bad;
    *err = r.err;
    return r.rc;
}

/* ---- Streaming write -------------------------------------------------------------------------- */

typedef struct sck_writer {
    int fd;
    struct iovec *iov;
    int cnt;
    uint64_t bytes;     /* queued in iov */
    uint64_t start;     /* file position of iov[0] */
    uint64_t first;     /* first tensor with bytes in the batch, for error reports */
    int err;
} sck_writer;

static int sck_writer_flush(sck_writer *w)
{
    int rc = SCK_OK;
    if (w->cnt > 0)
        rc = sck_pwritev_full(w->fd, w->iov, w->cnt, w->start, &w->err);
    w->start += w->bytes;
    w->cnt = 0;
    w->bytes = 0;
    return rc;
}

static int sck_writer_add(sck_writer *w, uint64_t i, const void *p, uint64_t len)
{
    int rc;
    if (w->cnt == SCK_IOV_BATCH || (w->bytes > 0 && w->bytes + len > SCK_WRITE_CHUNK)) {
        rc = sck_writer_flush(w);
        if (rc != SCK_OK)
            return rc;
    }
    if (w->cnt == 0)
        w->first = i;
    w->iov[w->cnt].iov_base = (void *)p;
    w->iov[w->cnt].iov_len = (size_t)len;
    w->cnt++;
    w->bytes += len;
    return SCK_OK;
}

/* The CRC32C of every tensor of a write [T10], computed on a second thread while the first
 * writes: writing to the page cache and checksumming are each bound by one core, so on two cores
 * the checksums come for free. */
typedef struct sck_write_crc_job {
    uint64_t n;
    const void *const *srcs;
    const uint64_t *lens;
    uint32_t *crcs;
} sck_write_crc_job;

static void *sck_write_crc_work(void *arg)
{
    const sck_write_crc_job *job = arg;
    for (uint64_t i = 0; i < job->n; i++)
        job->crcs[i] = job->lens[i] ? sck_crc32c(0, job->srcs[i], (size_t)job->lens[i]) : 0;
    return NULL;
}

/* Checks the arguments and that every position of the data section fits off_t, before anything
 * is written; zeroes crcs; *total = the bytes the tensors and their padding take from pos. */
static int sck_write_check(uint64_t pos, uint64_t n, const void *const *srcs,
                           const uint64_t *lens, uint64_t align, int want_crc, uint32_t *crcs,
                           uint64_t *total, uint64_t *bad_index)
{
    uint64_t p = pos;
    SCK_CHECK(n == 0 || (srcs && lens), SCK_E_ARG);
    SCK_CHECK(!want_crc || n == 0 || crcs, SCK_E_ARG);
    SCK_CHECK(sck_align_ok(align), SCK_E_ALIGN);
    SCK_CHECK(pos < SCK_INT63_LIMIT, SCK_E_ARG);
    for (uint64_t i = 0; i < n; i++) {
        if ((lens[i] > 0 && srcs[i] == NULL) || lens[i] > (uint64_t)SIZE_MAX ||
            sck_align_up_u64(p, align, &p) || sck_add_u64(p, lens[i], &p) ||
            p >= SCK_INT63_LIMIT) {
            *bad_index = i;
            return SCK_E_ARG;
        }
        if (want_crc)
            crcs[i] = 0;
    }
    *total = p - pos;
    return SCK_OK;
}

/* A tensor larger than SCK_WRITE_CHUNK, at file position p: the batch is flushed, then the
 * tensor goes out chunk by chunk, each checksummed (when crc != NULL) right before it is written,
 * while it is in cache. */
static int sck_write_big(sck_writer *w, uint64_t i, const uint8_t *src, uint64_t len, uint64_t p,
                         uint32_t *crc)
{
    uint32_t c32 = 0;
    int rc = sck_writer_flush(w);
    for (uint64_t off = 0; off < len && rc == SCK_OK; off += SCK_WRITE_CHUNK) {
        uint64_t c = len - off < SCK_WRITE_CHUNK ? len - off : SCK_WRITE_CHUNK;
        if (crc != NULL)
            c32 = sck_crc32c(c32, src + off, (size_t)c);
        rc = sck_pwrite_full(w->fd, src + off, c, p + off, &w->err);
        if (rc != SCK_OK)
            w->first = i;
    }
    if (crc != NULL)
        *crc = c32;
    w->start = p + len;
    return rc;
}

/* Tensor i of the data section [T6]: zero padding from *p up to the next multiple of align [T9],
 * then its len bytes; *p moves to its end. Small tensors join the pwritev batch. crc: NULL, or
 * where its CRC32C goes [T10]. */
static int sck_write_tensor(sck_writer *w, uint64_t i, const uint8_t *src, uint64_t len,
                            const uint8_t *zeros, uint64_t align, uint64_t *p, uint32_t *crc)
{
    uint64_t aligned = *p;
    int rc = SCK_OK;
    (void)sck_align_up_u64(*p, align, &aligned); /* cannot overflow: sck_write_check */
    if (aligned > *p)
        rc = sck_writer_add(w, i, zeros, aligned - *p);
    *p = aligned;
    if (rc != SCK_OK || len == 0)
        return rc;
    if (len <= SCK_WRITE_CHUNK) {
        if (crc != NULL)
            *crc = sck_crc32c(0, src, (size_t)len);
        rc = sck_writer_add(w, i, src, len);
    } else {
        rc = sck_write_big(w, i, src, len, *p, crc);
    }
    *p += len;
    return rc;
}

int sck_write_tensors(int fd, uint64_t pos, uint64_t n, const void *const *srcs,
                      const uint64_t *lens, uint64_t align, int want_crc, uint32_t *crcs,
                      uint64_t *end, uint64_t *bad_index, int *err)
{
    sck_writer w;
    uint8_t *zeros;
    uint64_t p = pos, total = 0;
    int rc, crc_inline = want_crc, crc_thread_started = 0;
    pthread_t crc_thread;
    sck_write_crc_job job = {n, srcs, lens, crcs};

    SCK_CHECK(end != NULL && bad_index != NULL && err != NULL, SCK_E_ARG);
    *end = 0;
    *bad_index = 0;
    *err = 0;
    rc = sck_write_check(pos, n, srcs, lens, align, want_crc, crcs, &total, bad_index);
    if (rc != SCK_OK || n == 0) {
        *end = rc == SCK_OK ? pos : 0;
        return rc;
    }
    memset(&w, 0, sizeof w);
    w.fd = fd;
    w.start = pos;
    w.iov = malloc(SCK_IOV_BATCH * sizeof *w.iov);
    zeros = calloc(1, (size_t)align);
    if (w.iov == NULL || zeros == NULL) {
        free(w.iov);
        free(zeros);
        return SCK_E_NOMEM;
    }
    /* checksums on a helper thread when there is enough to write; inline if it cannot start */
    if (want_crc && total >= SCK_CRC_THREAD_MIN &&
        pthread_create(&crc_thread, NULL, sck_write_crc_work, &job) == 0) {
        crc_thread_started = 1;
        crc_inline = 0; /* the loop below only writes */
    }
    for (uint64_t i = 0; i < n && rc == SCK_OK; i++)
        rc = sck_write_tensor(&w, i, srcs[i], lens[i], zeros, align, &p,
                              crc_inline ? &crcs[i] : NULL);
    if (rc == SCK_OK)
        rc = sck_writer_flush(&w);
    if (crc_thread_started)
        sck_join(crc_thread);
    free(w.iov);
    free(zeros);
    if (rc != SCK_OK) {
        *bad_index = w.first;
        *err = w.err;
        return rc;
    }
    *end = p;
    return SCK_OK;
}
