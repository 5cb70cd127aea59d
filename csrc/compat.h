/*
 * compat.h - what the C core of safeckpt needs from the platform, in one place.
 *
 * The portability contract:
 * - C11 (-std=c11, no GNU extensions needed) on a POSIX.1-2008 system: Linux (glibc, musl),
 *   macOS, the BSDs. Threads are pthreads; files are read with pread, written with pwrite
 *   (pwritev where the system has it) and mapped with mmap. Anything else stops at the #error
 *   below.
 * - Any byte order and word size: integers in files are read with the memcpy-based
 *   little-endian helpers of sck_internal.h, never through pointer casts, and
 *   _FILE_OFFSET_BITS=64 gives 32-bit hosts a 64-bit off_t.
 * - CRC32C in hardware on x86-64 with SSE4.2 (checked at run time), on aarch64 Linux with the CRC
 *   extension (getauxval HWCAP_CRC32) and on Apple Silicon (aarch64 macOS, which always has it);
 *   slicing-by-8 tables on every other CPU (s390x, 32-bit hosts, -DSCK_NO_HW_CRC).
 * - GCC or Clang builtins (__builtin_*_overflow, __atomic_*) are used where the compiler has
 *   them, with a portable fallback for the overflow checks and C11 <stdatomic.h> first.
 * .ci/cross builds the core and tests/c/ with -std=c11 -pedantic for x86-64, aarch64 and s390x
 * (big-endian) and runs them under qemu-user.
 *
 * Every .c file of the core includes this header FIRST, before any system header: it sets the
 * feature-test macros that decide what the system headers declare.
 */
#ifndef SCK_COMPAT_H
#define SCK_COMPAT_H

/* ---- Feature-test macros (before any system header) ------------------------------------- */

#if !(defined(__unix__) || defined(__unix) || (defined(__APPLE__) && defined(__MACH__)))
#error "safeckpt's C core needs a POSIX system (pthreads, pread/pwrite, mmap); use SAFECKPT_BACKEND=python elsewhere"
#endif

#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64 /* 64-bit off_t for pread/pwrite/mmap on 32-bit hosts */
#endif
/* Linux and macOS headers declare only ISO C under -std=c11 unless asked for more; the BSDs
 * declare everything by default, and _POSIX_C_SOURCE there would hide pwritev. */
#if defined(__linux__) || defined(__APPLE__) || defined(__CYGWIN__)
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE 1 /* glibc, musl: pwritev, MAP_NORESERVE, _SC_NPROCESSORS_ONLN */
#endif
#if defined(__APPLE__) && !defined(_DARWIN_C_SOURCE)
#define _DARWIN_C_SOURCE 1 /* macOS: pwritev, MAP_NORESERVE */
#endif
#endif

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(_POSIX_VERSION) || _POSIX_VERSION < 200112L
#error "safeckpt's C core needs POSIX.1-2001 or later (_POSIX_VERSION)"
#endif

/* ---- Compiler hints ------------------------------------------------------------------------ */

#if defined(__GNUC__) || defined(__clang__)
#define SCK_LIKELY(x) __builtin_expect(!!(x), 1)
#define SCK_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define SCK_LIKELY(x) (x)
#define SCK_UNLIKELY(x) (x)
#endif

/* -DSCK_PORTABLE builds only the portable code: no compiler builtins for the overflow checks,
 * no pwritev, no CRC instructions (crc32c.c), so that tests can run the fallbacks too. */
#if defined(__has_builtin) && !defined(SCK_PORTABLE)
#define SCK_HAS_BUILTIN(x) __has_builtin(x)
#elif defined(__GNUC__) && __GNUC__ >= 5 && !defined(SCK_PORTABLE)
#define SCK_HAS_BUILTIN(x) 1 /* GCC 5 to 9 have the overflow builtins but not __has_builtin */
#else
#define SCK_HAS_BUILTIN(x) 0
#endif

/* ---- Overflow-checked arithmetic: 1 on overflow (*out then undefined), else 0 ------------- */

static inline int sck_add_u64(uint64_t a, uint64_t b, uint64_t *out)
{
#if SCK_HAS_BUILTIN(__builtin_add_overflow)
    return __builtin_add_overflow(a, b, out);
#else
    *out = a + b; /* unsigned: wraps, never undefined */
    return *out < a;
#endif
}

static inline int sck_mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
#if SCK_HAS_BUILTIN(__builtin_mul_overflow)
    return __builtin_mul_overflow(a, b, out);
#else
    *out = a * b;
    return a != 0 && *out / a != b;
#endif
}

/* ---- Atomics: relaxed counters and flags shared by worker threads ------------------------ */

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__)
#include <stdatomic.h>
typedef atomic_size_t sck_atomic_size;
typedef atomic_int sck_atomic_int;
#define sck_atomic_init(p, v) atomic_init((p), (v))
#define sck_atomic_load(p) atomic_load_explicit((p), memory_order_relaxed)
#define sck_atomic_store(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define sck_atomic_fetch_add(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
#elif defined(__ATOMIC_RELAXED)
typedef size_t sck_atomic_size;
typedef int sck_atomic_int;
#define sck_atomic_init(p, v) (*(p) = (v))
#define sck_atomic_load(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define sck_atomic_store(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define sck_atomic_fetch_add(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#else
#error "safeckpt's C core needs C11 <stdatomic.h> or the GCC/Clang __atomic builtins"
#endif

/* ---- Threads ---------------------------------------------------------------------------------
 * pthread_create and pthread_mutex_init can fail for want of resources: their callers handle it
 * (fewer threads, or SCK_E_NOMEM). The calls below cannot fail when used correctly (joining a
 * thread we started, locking a mutex we initialised, pthread_once on a static control); their
 * result is checked all the same, and a failure aborts with a message, since going on would free
 * memory another thread still uses or return wrong checksums. */

static inline void sck_thread_must(int rc, const char *call)
{
    if (SCK_UNLIKELY(rc != 0)) {
        fprintf(stderr, "safeckpt: %s failed (error %d)\n", call, rc);
        abort();
    }
}

#define sck_once(once, fn) sck_thread_must(pthread_once((once), (fn)), "pthread_once")
#define sck_join(thread) sck_thread_must(pthread_join((thread), NULL), "pthread_join")
#define sck_lock(m) sck_thread_must(pthread_mutex_lock(m), "pthread_mutex_lock")
#define sck_unlock(m) sck_thread_must(pthread_mutex_unlock(m), "pthread_mutex_unlock")
#define sck_mutex_destroy(m) sck_thread_must(pthread_mutex_destroy(m), "pthread_mutex_destroy")

/* ---- Memory mapping -------------------------------------------------------------------------- */

/* MAP_NORESERVE (Linux, macOS) keeps a private writable mapping from being charged in full
 * against the overcommit limit; systems without it do not charge it that way. */
#ifdef MAP_NORESERVE
#define SCK_MAP_NORESERVE MAP_NORESERVE
#else
#define SCK_MAP_NORESERVE 0
#endif

/* pwritev: Linux, the BSDs, macOS 11 and later; elsewhere each buffer goes out with pwrite. */
#if defined(SCK_PORTABLE)
#define SCK_HAVE_PWRITEV 0
#elif defined(__linux__) || defined(__FreeBSD__) || defined(__NetBSD__) || defined(__OpenBSD__) || \
    defined(__DragonFly__)
#define SCK_HAVE_PWRITEV 1
#elif defined(__APPLE__) && defined(__MAC_OS_X_VERSION_MIN_REQUIRED) && \
    __MAC_OS_X_VERSION_MIN_REQUIRED >= 110000
#define SCK_HAVE_PWRITEV 1
#else
#define SCK_HAVE_PWRITEV 0
#endif

#endif /* SCK_COMPAT_H */
