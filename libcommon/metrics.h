/* Prometheus metrics: a process-wide registry of counters, gauges and
 * histograms, updated lock-free and rendered in the text exposition format. */
#ifndef PARLEY_METRICS_H
#define PARLEY_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct metric metric;

/* name may carry labels: parley_ws_closed_total{code="1009"}. Series of one
 * base name share help and type. Registering the same name twice returns
 * the same metric. Metrics live for the whole process. */
metric *metrics_counter(const char *name, const char *help);
metric *metrics_gauge(const char *name, const char *help);
/* Buckets in the metric's own unit (e.g. milliseconds), ascending. */
metric *metrics_histogram(const char *name, const char *help,
                          const double *buckets, size_t nbuckets);

void metric_add(metric *m, int64_t v);
void metric_set(metric *m, int64_t v);
void metric_observe(metric *m, double v);
int64_t metric_value(const metric *m);

/* The whole registry as exposition text; the caller frees it. */
char *metrics_render(size_t *len);

#endif
