/* Owns what every consumer service does with a bus the same way, on top of
 * bus.h only (so it serves both the Kafka and the in-process bus):
 * producing through a momentarily full queue, comparing record keys, and
 * timing the hop each consumed record just made. */
#include "bus.h"
#include "common.h"
#include "metrics.h"

#include <stdio.h>

#include <string.h>

int bus_produce_wait(bus *b, const char *topic, const char *key, size_t key_len,
                     const void *value, size_t len, void *opaque, int wait_ms, char *err,
                     size_t errlen)
{
    int64_t deadline = px_mono_ms() + wait_ms;
    int rc;
    for (;;) {
        rc = bus_produce(b, topic, key, key_len, value, len, opaque, err, errlen);
        if (rc != PX_AGAIN || px_mono_ms() >= deadline)
            break;
        bus_poll(b, 10); /* delivery reports free queue room */
    }
    if (rc == PX_AGAIN)
        rc = px_err(err, errlen, "producer queue to %s full for %d ms", topic, wait_ms);
    return rc;
}

int bus_key_is(const bus_msg *m, const char *s)
{
    size_t n = strlen(s);
    return m->key != NULL && m->key_len == n && memcmp(m->key, s, n) == 0;
}

metric *bus_age_histogram(const char *consumer)
{
    static const double buckets[] = { 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100, 250, 1000, 5000 };
    char name[128];
    snprintf(name, sizeof(name), "parley_bus_record_age_ms{consumer=\"%s\"}", consumer);
    return metrics_histogram(name, "Age of each record when consumed (now - its bus timestamp), "
                             "ms: the hop from its producer's produce call to this consumer",
                             buckets, PX_ARRAY_LEN(buckets));
}

void bus_observe_age(metric *m, const bus_msg *msgs, size_t n)
{
    int64_t now = px_now_ms();
    for (size_t i = 0; i < n; i++)
        if (msgs[i].ts_ms > 0)
            metric_observe(m, (double)PX_MAX(0, now - msgs[i].ts_ms));
}
