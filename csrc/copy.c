/*
 * copy.c - copies of many buffers into others (sck_copy_many), for the snapshot an async save
 * takes before it returns: one call copies every tensor of a state, and large states are cut in
 * pieces of SCK_READ_PIECE bytes shared by threads (parallel.c), since one thread's memcpy falls
 * well short of the memory bandwidth.
 */
#include "compat.h" /* first: feature-test macros */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sck.h"
#include "sck_internal.h"

typedef struct sck_copy_job {
    void *const *dsts;
    const void *const *srcs;
} sck_copy_job;

static int sck_copy_piece(void *ctx, uint64_t i, uint64_t off, uint64_t len, uint64_t k)
{
    sck_copy_job *job = ctx;
    (void)k;
    if (job->dsts[i] != job->srcs[i])
        memcpy((uint8_t *)job->dsts[i] + off, (const uint8_t *)job->srcs[i] + off, (size_t)len);
    return SCK_OK;
}

/* Checks the ranges of sck_copy_many (*bad_index = the first bad one) and sums their lengths. */
static int sck_copy_check(uint64_t n, void *const *dsts, const void *const *srcs,
                          const uint64_t *lens, uint64_t *total, uint64_t *bad_index)
{
    *total = 0;
    SCK_CHECK(n == 0 || (dsts && srcs && lens), SCK_E_ARG);
    for (uint64_t i = 0; i < n; i++) {
        uintptr_t d = (uintptr_t)dsts[i], s = (uintptr_t)srcs[i];
        *bad_index = i;
        if (lens[i] == 0)
            continue;
        SCK_CHECK(lens[i] <= (uint64_t)SIZE_MAX && dsts[i] != NULL && srcs[i] != NULL, SCK_E_ARG);
        /* overlapping ranges (memcpy's undefined behaviour): the starts are closer than len;
         * a range copied onto itself is left as it is */
        SCK_CHECK(d == s || (uint64_t)(d > s ? d - s : s - d) >= lens[i], SCK_E_ARG);
        SCK_CHECK(!sck_add_u64(*total, lens[i], total), SCK_E_ARG);
    }
    *bad_index = 0;
    return SCK_OK;
}

int sck_copy_many(uint64_t n, void *const *dsts, const void *const *srcs, const uint64_t *lens,
                  int nthreads, uint64_t *bad_index)
{
    uint64_t total, *first_piece = NULL;
    sck_copy_job job;
    int rc;

    SCK_CHECK(bad_index != NULL, SCK_E_ARG);
    *bad_index = 0;
    rc = sck_copy_check(n, dsts, srcs, lens, &total, bad_index);
    if (rc != SCK_OK)
        return rc;
    if (nthreads != 1 && total >= SCK_COPY_THREAD_MIN && n < SIZE_MAX / sizeof *first_piece)
        first_piece = malloc((size_t)(n + 1) * sizeof *first_piece);
    if (first_piece == NULL) { /* small, one thread asked for, or no memory: this thread copies */
        for (uint64_t i = 0; i < n; i++)
            if (lens[i] != 0 && dsts[i] != srcs[i])
                memcpy(dsts[i], srcs[i], (size_t)lens[i]);
        return SCK_OK;
    }
    job.dsts = dsts;
    job.srcs = srcs;
    sck_run_pieces(n, lens, first_piece, nthreads, sck_copy_piece, &job);
    free(first_piece);
    return SCK_OK;
}
