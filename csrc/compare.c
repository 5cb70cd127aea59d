/*
 * compare.c - exact byte comparison of two buffers (sck_bytes_equal), for incremental
 * checkpoints: a tensor is referred to, not written again, only when its bytes equal the stored
 * ones, never on a checksum alone (FORMAT.md [X7]).
 *
 * Large buffers are cut in pieces of SCK_READ_PIECE bytes shared by threads (parallel.c); the
 * first piece that differs stops the others from claiming more. Over a cold mapping of the
 * earlier file the page faults (the reads) run in parallel too.
 */
#include "compat.h" /* first: feature-test macros */

#include <stdint.h>
#include <string.h>

#include "sck.h"
#include "sck_internal.h"

typedef struct sck_compare_job {
    const uint8_t *a;
    const uint8_t *b;
    sck_atomic_int differ; /* set by the first piece found different */
} sck_compare_job;

#define SCK_PIECE_DIFFERS 1 /* not SCK_OK: sck_run_pieces stops claiming pieces */

static int sck_compare_piece(void *ctx, uint64_t i, uint64_t off, uint64_t len, uint64_t k)
{
    sck_compare_job *job = ctx;
    (void)i;
    (void)k;
    if (memcmp(job->a + off, job->b + off, (size_t)len) != 0) {
        sck_atomic_store(&job->differ, 1);
        return SCK_PIECE_DIFFERS;
    }
    return SCK_OK;
}

int sck_bytes_equal(const void *a, const void *b, uint64_t len, int nthreads, int *equal)
{
    uint64_t first_piece[2];
    sck_compare_job job;

    SCK_CHECK(equal != NULL, SCK_E_ARG);
    *equal = 0;
    SCK_CHECK(len <= (uint64_t)SIZE_MAX, SCK_E_ARG);
    SCK_CHECK(len == 0 || (a != NULL && b != NULL), SCK_E_ARG);
    if (len == 0 || a == b) {
        *equal = 1;
        return SCK_OK;
    }
    if (nthreads == 1 || len < SCK_COMPARE_THREAD_MIN) {
        *equal = memcmp(a, b, (size_t)len) == 0;
        return SCK_OK;
    }
    job.a = a;
    job.b = b;
    sck_atomic_init(&job.differ, 0);
    sck_run_pieces(1, &len, first_piece, nthreads, sck_compare_piece, &job);
    *equal = !sck_atomic_load(&job.differ);
    return SCK_OK;
}
