/*
 * io.c - file access for safeckpt: private memory maps, parallel pread, streaming write.
 *
 * Every read and write loops over partial transfers and EINTR; failures come back as SCK_E_IO
 * with the errno in an out-parameter (the parallel reader fails in worker threads, where errno
 * would be lost). Positions are checked to stay below 2**63 so that they fit off_t.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
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
    /* MAP_NORESERVE: a private writable mapping is otherwise charged in full against the
     * overcommit limit, which refuses files larger than RAM + swap; pages are only copied when
     * written. */
    p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
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
    case SCK_ADVICE_NORMAL: adv = MADV_NORMAL; break;
    case SCK_ADVICE_SEQUENTIAL: adv = MADV_SEQUENTIAL; break;
    case SCK_ADVICE_WILLNEED: adv = MADV_WILLNEED; break;
    case SCK_ADVICE_RANDOM: adv = MADV_RANDOM; break;
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
    (void)madvise((uint8_t *)base + start, (size_t)(end - start), adv); /* best effort */
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

/* ---- Work in pieces, on several threads ------------------------------------------------------ */

int sck_online_cpus(void)
{
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c < 1 ? 1 : (c > SCK_MAX_THREADS ? SCK_MAX_THREADS : (int)c);
}

uint64_t sck_piece_count(uint64_t len)
{
    return len / SCK_READ_PIECE + (len % SCK_READ_PIECE != 0);
}

typedef struct sck_pieces {
    const uint64_t *lengths;
    const uint64_t *first_piece;
    uint64_t n;
    uint64_t npieces;
    uint64_t next; /* atomic: the next piece to claim */
    int stop;      /* atomic: set when fn fails */
    sck_piece_fn fn;
    void *ctx;
} sck_pieces;

static void *sck_pieces_work(void *arg)
{
    sck_pieces *w = arg;
    for (;;) {
        uint64_t k, lo = 0, hi = w->n, off, len;
        if (__atomic_load_n(&w->stop, __ATOMIC_RELAXED))
            break;
        k = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (k >= w->npieces)
            break;
        while (hi - lo > 1) { /* the last range i with first_piece[i] <= k owns piece k */
            uint64_t mid = lo + (hi - lo) / 2;
            if (w->first_piece[mid] <= k)
                lo = mid;
            else
                hi = mid;
        }
        off = (k - w->first_piece[lo]) * (uint64_t)SCK_READ_PIECE;
        len = w->lengths[lo] - off < SCK_READ_PIECE ? w->lengths[lo] - off : SCK_READ_PIECE;
        if (w->fn(w->ctx, lo, off, len, k) != SCK_OK)
            __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

void sck_run_pieces(uint64_t n, const uint64_t *lengths, uint64_t *first_piece, int nthreads,
                    sck_piece_fn fn, void *ctx)
{
    pthread_t threads[SCK_MAX_THREADS];
    int nthr, started = 0;
    sck_pieces w;

    first_piece[0] = 0;
    for (uint64_t i = 0; i < n; i++)
        first_piece[i + 1] = first_piece[i] + sck_piece_count(lengths[i]);
    memset(&w, 0, sizeof w);
    w.lengths = lengths;
    w.first_piece = first_piece;
    w.n = n;
    w.npieces = first_piece[n];
    w.fn = fn;
    w.ctx = ctx;
    nthr = nthreads <= 0 ? sck_online_cpus() : (nthreads > SCK_MAX_THREADS ? SCK_MAX_THREADS
                                                                            : nthreads);
    if ((uint64_t)nthr > w.npieces)
        nthr = (int)w.npieces;
    /* the calling thread is worker 0; a thread that cannot start just leaves more for others */
    for (int t = 1; t < nthr; t++)
        if (pthread_create(&threads[started], NULL, sck_pieces_work, &w) == 0)
            started++;
    sck_pieces_work(&w);
    for (int t = 0; t < started; t++)
        pthread_join(threads[t], NULL);
}

void sck_join_pieces(uint64_t n, const uint64_t *lengths, const uint64_t *first_piece,
                     const uint32_t *piece_crcs, uint32_t *crcs)
{
    for (uint64_t i = 0; i < n; i++) { /* the pieces of each range, in order */
        uint32_t crc = 0;
        for (uint64_t k = first_piece[i]; k < first_piece[i + 1]; k++) {
            uint64_t off = (k - first_piece[i]) * (uint64_t)SCK_READ_PIECE;
            uint64_t len = lengths[i] - off < SCK_READ_PIECE ? lengths[i] - off : SCK_READ_PIECE;
            crc = k == first_piece[i] ? piece_crcs[k] : sck_crc32c_combine(crc, piece_crcs[k], len);
        }
        crcs[i] = crc;
    }
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
        pthread_mutex_lock(&r->lock);
        if (r->rc == SCK_OK || i < r->bad) {
            r->rc = rc;
            r->bad = i;
            r->err = err;
        }
        pthread_mutex_unlock(&r->lock);
    }
    return rc;
}

int sck_pread_many(int fd, uint64_t n, const uint64_t *offsets, const uint64_t *lengths,
                   void *const *dests, const uint8_t *want_crc, uint32_t *crcs, int nthreads,
                   uint64_t *bad_index, int *err)
{
    uint64_t npieces = 0, *first_piece;
    uint32_t *piece_crcs = NULL;
    sck_reader r;

    SCK_CHECK(bad_index != NULL && err != NULL, SCK_E_ARG);
    *bad_index = 0;
    *err = 0;
    SCK_CHECK(n == 0 || (offsets && lengths && dests), SCK_E_ARG);
    if (crcs != NULL)
        for (uint64_t i = 0; i < n; i++)
            crcs[i] = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t end;
        if (lengths[i] == 0)
            continue;
        if (dests[i] == NULL || sck_add_u64(offsets[i], lengths[i], &end) ||
            end >= SCK_INT63_LIMIT || sck_add_u64(npieces, sck_piece_count(lengths[i]), &npieces)) {
            *bad_index = i;
            return SCK_E_ARG;
        }
    }
    if (npieces == 0)
        return SCK_OK;
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
    pthread_mutex_init(&r.lock, NULL);
    sck_run_pieces(n, lengths, first_piece, nthreads, sck_read_piece, &r);
    pthread_mutex_destroy(&r.lock);
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

/* The CRC32C of every tensor of a write, computed on a second thread while the first writes:
 * writing to the page cache and checksumming are each bound by one core, so on two cores the
 * checksums come for free. */
typedef struct sck_crc_job {
    uint64_t n;
    const void *const *srcs;
    const uint64_t *lens;
    uint32_t *crcs;
} sck_crc_job;

static void *sck_crc_work(void *arg)
{
    const sck_crc_job *job = arg;
    for (uint64_t i = 0; i < job->n; i++)
        job->crcs[i] = job->lens[i] ? sck_crc32c(0, job->srcs[i], (size_t)job->lens[i]) : 0;
    return NULL;
}

int sck_write_tensors(int fd, uint64_t pos, uint64_t n, const void *const *srcs,
                      const uint64_t *lens, uint64_t align, int want_crc, uint32_t *crcs,
                      uint64_t *end, uint64_t *bad_index, int *err)
{
    sck_writer w;
    uint8_t *zeros = NULL;
    uint64_t p = pos, i, total;
    int rc = SCK_OK, crc_thread_started = 1;
    pthread_t crc_thread;
    sck_crc_job job = {n, srcs, lens, crcs};

    SCK_CHECK(end != NULL && bad_index != NULL && err != NULL, SCK_E_ARG);
    *end = 0;
    *bad_index = 0;
    *err = 0;
    SCK_CHECK(n == 0 || (srcs && lens), SCK_E_ARG);
    SCK_CHECK(!want_crc || n == 0 || crcs, SCK_E_ARG);
    SCK_CHECK(sck_align_ok(align), SCK_E_ALIGN);
    SCK_CHECK(pos < SCK_INT63_LIMIT, SCK_E_ARG);
    /* every position must fit off_t: check them all before writing anything */
    for (i = 0; i < n; i++) {
        if ((lens[i] > 0 && srcs[i] == NULL) || lens[i] > (uint64_t)SIZE_MAX ||
            sck_align_up_u64(p, align, &p) || sck_add_u64(p, lens[i], &p) ||
            p >= SCK_INT63_LIMIT) {
            *bad_index = i;
            return SCK_E_ARG;
        }
        if (want_crc)
            crcs[i] = 0;
    }
    total = p - pos;
    if (n == 0) {
        *end = pos;
        return SCK_OK;
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
        pthread_create(&crc_thread, NULL, sck_crc_work, &job) == 0)
        want_crc = 0; /* the loop below only writes */
    else
        crc_thread_started = 0;

    p = pos;
    for (i = 0; i < n && rc == SCK_OK; i++) {
        const uint8_t *src = srcs[i];
        uint64_t len = lens[i], aligned = p;
        (void)sck_align_up_u64(p, align, &aligned); /* cannot overflow: checked above */
        if (aligned > p)
            rc = sck_writer_add(&w, i, zeros, aligned - p);
        p = aligned;
        if (rc != SCK_OK || len == 0)
            continue;
        if (len <= SCK_WRITE_CHUNK) {
            if (want_crc)
                crcs[i] = sck_crc32c(0, src, (size_t)len);
            rc = sck_writer_add(&w, i, src, len);
        } else {
            /* big tensor: CRC each chunk right before writing it, while it is in cache */
            uint32_t crc = 0;
            rc = sck_writer_flush(&w);
            for (uint64_t off = 0; off < len && rc == SCK_OK; off += SCK_WRITE_CHUNK) {
                uint64_t c = len - off < SCK_WRITE_CHUNK ? len - off : SCK_WRITE_CHUNK;
                if (want_crc)
                    crc = sck_crc32c(crc, src + off, (size_t)c);
                rc = sck_pwrite_full(fd, src + off, c, p + off, &w.err);
                if (rc != SCK_OK)
                    w.first = i;
            }
            if (want_crc)
                crcs[i] = crc;
            w.start = p + len;
        }
        p += len;
    }
    if (rc == SCK_OK)
        rc = sck_writer_flush(&w);
    if (crc_thread_started)
        pthread_join(crc_thread, NULL);
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
