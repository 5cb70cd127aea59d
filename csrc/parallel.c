/*
 * parallel.c - work cut in pieces and shared by threads: the driver of the parallel read (io.c)
 * and the CRC32C of many ranges of memory (sck_crc32c_ranges).
 *
 * A piece is at most SCK_READ_PIECE bytes of one range; threads claim pieces from an atomic
 * counter, and the CRC32C of a range is joined from its pieces' with sck_crc32c_combine.
 */
#include "compat.h" /* first: feature-test macros */

#include <stdint.h>
#include <stdlib.h>

#include "sck.h"
#include "sck_internal.h"

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
    sck_atomic_size next; /* the next piece to claim */
    sck_atomic_int stop;  /* set when fn fails */
    sck_piece_fn fn;
    void *ctx;
} sck_pieces;

static void *sck_pieces_work(void *arg)
{
    sck_pieces *w = arg;
    for (;;) {
        uint64_t k, lo = 0, hi = w->n, off, len;
        if (sck_atomic_load(&w->stop))
            break;
        k = sck_atomic_fetch_add(&w->next, 1);
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
            sck_atomic_store(&w->stop, 1);
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
    sck_atomic_init(&w.next, 0);
    sck_atomic_init(&w.stop, 0);
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
        sck_join(threads[t]);
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

/* ---- Many ranges, in parallel ----------------------------------------------------------------- */

typedef struct sck_ranges_job {
    const uint8_t *base;
    const uint64_t *offsets;
    uint32_t *piece_crcs;
} sck_ranges_job;

static int sck_crc_piece(void *ctx, uint64_t i, uint64_t off, uint64_t len, uint64_t k)
{
    sck_ranges_job *job = ctx;
    job->piece_crcs[k] = sck_crc32c(0, job->base + job->offsets[i] + off, (size_t)len);
    return SCK_OK;
}

int sck_crc32c_ranges(const void *base, uint64_t size, uint64_t n, const uint64_t *offsets,
                      const uint64_t *lengths, uint32_t *crcs, int nthreads, uint64_t *bad_index)
{
    uint64_t total = 0, npieces = 0, *first_piece;
    sck_ranges_job job;

    SCK_CHECK(bad_index != NULL, SCK_E_ARG);
    *bad_index = 0;
    SCK_CHECK(n == 0 || (base != NULL && offsets != NULL && lengths != NULL && crcs != NULL),
              SCK_E_ARG);
    SCK_CHECK(size <= (uint64_t)SIZE_MAX, SCK_E_ARG);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t end;
        if (sck_add_u64(offsets[i], lengths[i], &end) || end > size ||
            sck_add_u64(npieces, sck_piece_count(lengths[i]), &npieces)) {
            *bad_index = i;
            return SCK_E_ARG;
        }
        /* saturating: past the threshold the sum is not needed */
        total = lengths[i] >= SCK_CRC_THREAD_MIN - total ? SCK_CRC_THREAD_MIN : total + lengths[i];
    }
    /* Ranges of a checked table do not overlap, so npieces <= n + size / SCK_READ_PIECE; other
     * ranges (overlapping) are checked on this thread, with no memory sized by them. */
    if (nthreads == 1 || total < SCK_CRC_THREAD_MIN || n >= SIZE_MAX / 16 ||
        npieces > n + size / SCK_READ_PIECE) {
        for (uint64_t i = 0; i < n; i++)
            crcs[i] = sck_crc32c(0, (const uint8_t *)base + offsets[i], (size_t)lengths[i]);
        return SCK_OK;
    }
    first_piece = malloc((size_t)(n + 1) * sizeof *first_piece);
    job.piece_crcs = malloc((size_t)npieces * sizeof *job.piece_crcs);
    if (first_piece == NULL || job.piece_crcs == NULL) {
        free(first_piece);
        free(job.piece_crcs);
        return SCK_E_NOMEM;
    }
    job.base = base;
    job.offsets = offsets;
    sck_run_pieces(n, lengths, first_piece, nthreads, sck_crc_piece, &job);
    sck_join_pieces(n, lengths, first_piece, job.piece_crcs, crcs);
    free(first_piece);
    free(job.piece_crcs);
    return SCK_OK;
}
