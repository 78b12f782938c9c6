/* The life of a consumer service (presence, message-store, receipt,
 * group-fanout), which all run the same way: configuration, store, bus,
 * topics, subscription, admin endpoint with the store as readiness, a
 * consume loop until a stop signal, and an ordered shutdown. A service
 * embeds a `service` in its own state and describes what is its own in a
 * `service_def`; service_run is then its whole main. No state lives in this
 * module: parleyd runs all four in one process, each with its own struct. */
#ifndef PARLEY_SERVICE_H
#define PARLEY_SERVICE_H

#include "admin_http.h"
#include "bus.h"
#include "config.h"
#include "metrics.h"
#include "store.h"

#include <jansson.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define SERVICE_TOPICS_MAX 8
#define SERVICE_TOPIC_LEN 96
#define SERVICE_BACKOFF_MIN_MS 100  /* first wait after a failed batch attempt */
#define SERVICE_BACKOFF_MAX_MS 5000 /* doubling stops here */

/* What service_run owns. Threads: the service's main thread uses all of
 * it; the lifecycle thread sets stop (after waking b); the admin thread's
 * ready callback reads only draining and st (thread-safe). */
typedef struct service {
    config cfg;
    store *st;
    bus *b;
    admin *admin;
    volatile sig_atomic_t stop;     /* a stop signal arrived, or failed */
    volatile sig_atomic_t failed;   /* the bus failed for good (bus_failed): exit 1 */
    atomic_int draining;            /* /readyz answers 503 from here on */
    char topic[SERVICE_TOPICS_MAX][SERVICE_TOPIC_LEN];
    const char *topics[SERVICE_TOPICS_MAX];     /* ensured at start, in service_topic order */
    const char *subscribed[SERVICE_TOPICS_MAX];
    size_t ntopics, nsubscribed;
} service;

/* What a service says about itself. The hooks get service_run's arg (the
 * service's own state, in which the service is embedded). */
typedef struct service_def {
    const char *name;       /* log name; the bus client id is "<name>-<hostname>" */
    const char *group;      /* consumer group, "<topic prefix><group>" on the bus */
    size_t batch;           /* records per consume */
    int consume_wait_ms;    /* longest wait of one consume */
    bus_dr_cb dr_cb;        /* delivery reports of what the service produces */
    /* After the configuration loaded and logging started: names the topics
     * (service_topic), registers the metrics. */
    void (*setup)(void *arg);
    /* Optional: the service's own resources, once the bus is subscribed
     * and before the admin endpoint says ready. PX_ERROR fails the start. */
    int (*start)(void *arg, char *err, size_t errlen);
    /* Optional: once started, before the first consume: adds the service's
     * own settings to the "started" log line and arms its timers. */
    void (*started)(void *arg, json_t *fields);
    /* One consumed batch (n > 0): commits what is durable and releases all
     * of it; returns early when stop is set. */
    void (*process)(void *arg, bus_msg *msgs, size_t n);
    /* Optional: once per loop turn, after the batch and its delivery
     * reports (periodic work such as sweeps). */
    void (*tick)(void *arg);
    /* Optional: first step of the shutdown, while bus and store are still
     * open: stops what start started. */
    void (*drain)(void *arg);
} service_def;

/* The whole main of a service: lifecycle_init, config_load and the admin
 * address check, log_init(d->name), d->setup; store_open, bus_new,
 * bus_ensure_topics, bus_subscribe, d->start, admin_start; the consume
 * loop; then draining, d->drain, bus_destroy (commits what was marked,
 * leaves the group), admin_stop, store_close (admin goes first: /readyz
 * pings the store). Returns the exit code: 0 after a stop signal, 1 when
 * the start or the consumer failed, 2 on a bad configuration. */
int service_run(service *s, const service_def *d, void *arg);

/* For d->setup: the topic "<topic prefix><suffix>", ensured at start and,
 * when subscribe is set, consumed. The name lives as long as s. Aborts past
 * SERVICE_TOPICS_MAX (a programming error). */
enum { SERVICE_ENSURE = 0, SERVICE_SUBSCRIBE = 1 };
const char *service_topic(service *s, const char *suffix, int subscribe);

/* Sleeps up to ms, serving delivery reports; returns early on stop. For
 * the backoff between batch attempts; a bus that failed for good
 * (bus_failed) sets stop and failed instead, ending the retries. */
void service_sleep(service *s, int64_t ms);

/* One attempt at a whole batch: PX_OK once every effect is durable. */
typedef int (*service_attempt_fn)(void *arg, char *err, size_t errlen);

/* For batches whose effects are all idempotent, so a retry simply starts
 * over: runs attempt(arg) until it succeeds and then commits msgs; after a
 * failure counts it in retries, logs, and sleeps with backoff. Returns
 * early, uncommitted, on a stop. The caller releases msgs. */
void service_retry_batch(service *s, bus_msg *msgs, size_t n, metric *retries,
                         service_attempt_fn attempt, void *arg);

/* Store call latency: service_observe(m, t0) puts the milliseconds since
 * t0 = service_clock_us() into histogram m (sub-millisecond precision). */
int64_t service_clock_us(void);
void service_observe(metric *m, int64_t t0_us);

#endif
