/* Owns the metric registry. Registration takes a mutex (start-up only);
 * updates are relaxed atomics so hot paths never lock. */
#include "metrics.h"
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define METRICS_MAX 256
#define METRICS_BUCKETS 16

enum metric_type { M_COUNTER, M_GAUGE, M_HISTOGRAM };

struct metric {
    char *name;
    char *help;
    enum metric_type type;
    _Atomic int64_t value;              /* counter, gauge */
    double buckets[METRICS_BUCKETS];
    size_t nbuckets;
    _Atomic uint64_t counts[METRICS_BUCKETS + 1]; /* last is +Inf */
    _Atomic uint64_t sum_micro;         /* sum * 1e6, for sub-unit sums */
};

static pthread_mutex_t metrics_lock = PTHREAD_MUTEX_INITIALIZER;
static metric *metrics_all[METRICS_MAX];
static size_t metrics_n;

static metric *metrics_register(const char *name, const char *help, enum metric_type t)
{
    metric *m = NULL;
    pthread_mutex_lock(&metrics_lock);
    for (size_t i = 0; i < metrics_n; i++)
        if (strcmp(metrics_all[i]->name, name) == 0) {
            m = metrics_all[i];
            goto out;
        }
    if (metrics_n == METRICS_MAX) {
        fprintf(stderr, "parley: metrics registry full (%d)\n", METRICS_MAX);
        abort();
    }
    m = px_calloc(1, sizeof(*m));
    m->name = px_strdup(name);
    m->help = px_strdup(help);
    m->type = t;
    metrics_all[metrics_n++] = m;
out:
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

metric *metrics_counter(const char *name, const char *help)
{
    return metrics_register(name, help, M_COUNTER);
}

metric *metrics_gauge(const char *name, const char *help)
{
    return metrics_register(name, help, M_GAUGE);
}

metric *metrics_histogram(const char *name, const char *help,
                          const double *buckets, size_t nbuckets)
{
    metric *m = metrics_register(name, help, M_HISTOGRAM);
    pthread_mutex_lock(&metrics_lock);
    if (m->nbuckets == 0) {
        m->nbuckets = PX_MIN(nbuckets, (size_t)METRICS_BUCKETS);
        memcpy(m->buckets, buckets, m->nbuckets * sizeof(double));
    }
    pthread_mutex_unlock(&metrics_lock);
    return m;
}

void metric_add(metric *m, int64_t v)
{
    atomic_fetch_add_explicit(&m->value, v, memory_order_relaxed);
}

void metric_set(metric *m, int64_t v)
{
    atomic_store_explicit(&m->value, v, memory_order_relaxed);
}

int64_t metric_value(const metric *m)
{
    return atomic_load_explicit(&m->value, memory_order_relaxed);
}

void metric_observe(metric *m, double v)
{
    size_t i = 0;
    while (i < m->nbuckets && v > m->buckets[i])
        i++;
    atomic_fetch_add_explicit(&m->counts[i], 1, memory_order_relaxed);
    if (v > 0)
        atomic_fetch_add_explicit(&m->sum_micro, (uint64_t)(v * 1e6), memory_order_relaxed);
}

/* Splits name{labels} so histogram series can add their own le label. */
static void metrics_split(const char *name, char *base, size_t blen, const char **labels)
{
    const char *brace = strchr(name, '{');
    size_t n = brace ? (size_t)(brace - name) : strlen(name);
    snprintf(base, blen, "%.*s", (int)n, name);
    *labels = brace ? brace + 1 : NULL; /* points after '{', includes '}' */
}

static void metrics_render_histogram(FILE *f, const metric *m, const char *base,
                                     const char *labels)
{
    char lb[256] = "";
    if (labels != NULL)
        snprintf(lb, sizeof(lb), "%.*s,", (int)(strlen(labels) - 1), labels);
    uint64_t cum = 0;
    for (size_t i = 0; i <= m->nbuckets; i++) {
        cum += atomic_load_explicit(&m->counts[i], memory_order_relaxed);
        if (i < m->nbuckets)
            fprintf(f, "%s_bucket{%sle=\"%g\"} %llu\n", base, lb, m->buckets[i],
                    (unsigned long long)cum);
        else
            fprintf(f, "%s_bucket{%sle=\"+Inf\"} %llu\n", base, lb, (unsigned long long)cum);
    }
    const char *suffix = labels ? "{" : "";
    fprintf(f, "%s_sum%s%s %.6f\n", base, suffix, labels ? labels : "",
            (double)atomic_load_explicit(&m->sum_micro, memory_order_relaxed) / 1e6);
    fprintf(f, "%s_count%s%s %llu\n", base, suffix, labels ? labels : "",
            (unsigned long long)cum);
}

char *metrics_render(size_t *len)
{
    static const char *const types[] = { "counter", "gauge", "histogram" };
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (f == NULL)
        abort();
    pthread_mutex_lock(&metrics_lock);
    char prev[128] = "";
    for (size_t i = 0; i < metrics_n; i++) {
        const metric *m = metrics_all[i];
        char base[128];
        const char *labels;
        metrics_split(m->name, base, sizeof(base), &labels);
        if (strcmp(base, prev) != 0) {
            fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", base, m->help, base, types[m->type]);
            snprintf(prev, sizeof(prev), "%s", base);
        }
        if (m->type == M_HISTOGRAM)
            metrics_render_histogram(f, m, base, labels);
        else
            fprintf(f, "%s %lld\n", m->name,
                    (long long)atomic_load_explicit(&m->value, memory_order_relaxed));
    }
    pthread_mutex_unlock(&metrics_lock);
    fclose(f);
    if (len != NULL)
        *len = n;
    return buf;
}
