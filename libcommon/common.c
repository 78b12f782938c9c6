/* Allocation that cannot fail for internal sizes, error formatting, clocks. */
#include "common.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void px_thread_name(const char *fmt, ...)
{
    char name[16];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    pthread_setname_np(pthread_self(), name);
}

static void px_oom(size_t n)
{
    fprintf(stderr, "parley: out of memory allocating %zu bytes\n", n);
    abort();
}

void *px_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        px_oom(n);
    return p;
}

void *px_calloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        px_oom(n * size);
    return p;
}

void *px_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        px_oom(n);
    return q;
}

static uint64_t px_hash_from(uint64_t h, const char *s)
{
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

uint64_t px_hash(const char *s)
{
    return px_hash_from(1469598103934665603ULL, s);
}

uint64_t px_hash_pair(const char *a, const char *b)
{
    return px_hash_from(px_hash(a) * 1099511628211ULL, b); /* a NUL between them */
}

char *px_strdup(const char *s)
{
    return px_strndup(s, strlen(s));
}

char *px_strndup(const char *s, size_t n)
{
    char *d = px_malloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

void *px_try_malloc(size_t n)
{
    return malloc(n ? n : 1);
}

int px_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return PX_ERROR;
}

static int64_t px_clock_ms(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t px_now_ms(void)
{
    return px_clock_ms(CLOCK_REALTIME);
}

int64_t px_mono_ms(void)
{
    return px_clock_ms(CLOCK_MONOTONIC);
}

void px_mono_deadline(struct timespec *ts, int64_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

void px_cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &ca);
    pthread_condattr_destroy(&ca);
}

typedef struct px_par {
    void (*fn)(void *arg, size_t i);
    void *arg;
    size_t n;
    atomic_size_t next;
} px_par;

static void *px_par_worker(void *p_)
{
    px_par *p = p_;
    size_t i;
    while ((i = atomic_fetch_add(&p->next, 1)) < p->n)
        p->fn(p->arg, i);
    return NULL;
}

#define PX_PARALLEL_MAX 16

void px_parallel(size_t n, size_t threads, void (*fn)(void *arg, size_t i), void *arg)
{
    px_par p = { .fn = fn, .arg = arg, .n = n };
    atomic_init(&p.next, 0);
    pthread_t th[PX_PARALLEL_MAX - 1];
    size_t want = PX_MIN(PX_MIN(threads, n), (size_t)PX_PARALLEL_MAX), nth = 0;
    while (nth + 1 < want && pthread_create(&th[nth], NULL, px_par_worker, &p) == 0)
        nth++;
    px_par_worker(&p);
    for (size_t t = 0; t < nth; t++)
        pthread_join(th[t], NULL);
}
