/* Owns what every consumer service does with a bus the same way, on top of
 * bus.h only (so it serves both the Kafka and the in-process bus):
 * producing through a momentarily full queue, and comparing record keys. */
#include "bus.h"
#include "common.h"

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
