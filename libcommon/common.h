/* Status vocabulary and allocation helpers shared by every Parley module. */
#ifndef PARLEY_COMMON_H
#define PARLEY_COMMON_H

#include <stddef.h>
#include <pthread.h>
#include <stdint.h>

/* Every fallible Parley call returns one of these; details go to an
 * (err, errlen) out-buffer supplied by the caller. */
#define PX_OK        0
#define PX_ERROR    -1
#define PX_AGAIN    -2  /* nothing now, try later (queue full, no data) */
#define PX_DECLINED -3  /* refused by rule: duplicate, forbidden, absent */

#define PX_ERRLEN 256

#define PX_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define PX_MIN(a, b) ((a) < (b) ? (a) : (b))
#define PX_MAX(a, b) ((a) > (b) ? (a) : (b))

/* For small internal sizes: abort on exhaustion instead of returning NULL.
 * Sizes chosen by a client go through px_try_malloc and are checked. */
void *px_malloc(size_t n);
void *px_calloc(size_t n, size_t size);
void *px_realloc(void *p, size_t n);

/* Calls fn(arg, i) once for every i < n, on up to `threads` threads (the
 * caller's among them), each taking the next index; returns when all are
 * done. For independent round trips to a store that answers slowly but
 * can serve several at once. Falls back to fewer threads if one cannot be
 * made. */
void px_parallel(size_t n, size_t threads, void (*fn)(void *arg, size_t i), void *arg);
char *px_strdup(const char *s);
char *px_strndup(const char *s, size_t n);
void *px_try_malloc(size_t n);

/* Names the calling thread (at most 15 characters are kept) so `top -H`
 * and perf tell the threads of a process apart: in parleyd every service
 * runs in one process, and the thread pegged at 100% is the one to find. */
void px_thread_name(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* snprintf into err when err is non-NULL; returns PX_ERROR for tail calls. */
int px_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* FNV-1a of a string: for in-memory hash tables keyed by ids. */
uint64_t px_hash(const char *s);
/* The same over a, a NUL, b: keys of two ids. */
uint64_t px_hash_pair(const char *a, const char *b);

/* Milliseconds since the epoch (wall clock) and monotonic milliseconds. */
int64_t px_now_ms(void);
int64_t px_mono_ms(void);

/* ms from now on CLOCK_MONOTONIC, as pthread_cond_timedwait takes it for a
 * condition variable whose clock attribute is CLOCK_MONOTONIC. */
struct timespec;
void px_mono_deadline(struct timespec *ts, int64_t ms);
/* Initializes a condition variable whose timed waits take px_mono_deadline's
 * deadlines (its clock CLOCK_MONOTONIC: a wall-clock step moves no wait). */
void px_cond_init_mono(pthread_cond_t *cv);

#endif
