/* Owns the skeleton the consumer services share: start, readiness, the
 * consume loop, the ordered shutdown and the whole-batch retry. Everything
 * per service lives in the service struct its caller passes: parleyd runs
 * several services on threads of one process over this one copy. */
#include "service.h"
#include "common.h"
#include "lifecycle.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SERVICE_SLEEP_SLICE_MS 50
#define SERVICE_TOPICS_WAIT_MS 15000

/* Runs on the lifecycle thread: the consumer may be inside a blocking
 * poll, which the wake-up interrupts. The flag comes last: once it is set
 * the main thread may destroy the bus, so the wake-up must be done. */
static void service_on_stop(void *arg)
{
    service *s = arg;
    if (s->b != NULL)
        bus_wakeup(s->b);
    s->stop = 1;
}

/* /readyz, on the admin thread: st is thread-safe and outlives the admin
 * daemon (service_shutdown stops admin before closing the store). */
static int service_ready(void *arg, char *err, size_t errlen)
{
    service *s = arg;
    if (atomic_load(&s->draining))
        return px_err(err, errlen, "draining");
    return store_ping(s->st, err, errlen);
}

const char *service_topic(service *s, const char *suffix, int subscribe)
{
    if (s->ntopics == SERVICE_TOPICS_MAX)
        abort();
    char *t = s->topic[s->ntopics];
    snprintf(t, SERVICE_TOPIC_LEN, "%s%s", s->cfg.topic_prefix, suffix);
    s->topics[s->ntopics++] = t;
    if (subscribe)
        s->subscribed[s->nsubscribed++] = t;
    return t;
}

static int service_setup(service *s, const service_def *d, void *arg, char *err,
                         size_t errlen)
{
    if (config_load(&s->cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    if (admin_check_listen(admin_listen_config(), err, errlen) != PX_OK)
        return PX_ERROR;
    log_init(d->name, s->cfg.log_level);
    d->setup(arg);
    return PX_OK;
}

static int service_start(service *s, const service_def *d, void *arg, char *err,
                         size_t errlen)
{
    char host[64] = "local", client[128], group[128];
    gethostname(host, sizeof(host) - 1);
    /* The group carries the topic prefix so stacks sharing a broker under
     * different prefixes never rebalance each other. */
    snprintf(group, sizeof(group), "%s%s", s->cfg.topic_prefix, d->group);
    snprintf(client, sizeof(client), "%s-%s", d->name, host);
    s->st = store_open(s->cfg.mongo_uri, s->cfg.mongo_db, err, errlen);
    if (s->st == NULL)
        return PX_ERROR;
    bus_conf bc = { .brokers = s->cfg.kafka_brokers, .client_id = client,
                    .group = group, .partitions = (int)s->cfg.partitions,
                    .dr_cb = d->dr_cb };
    s->b = bus_new(&bc, err, errlen);
    if (s->b == NULL)
        return PX_ERROR;
    if (bus_ensure_topics(s->b, s->topics, s->ntopics, SERVICE_TOPICS_WAIT_MS, err,
                          errlen) != PX_OK)
        return PX_ERROR;
    if (bus_subscribe(s->b, s->subscribed, s->nsubscribed, err, errlen) != PX_OK)
        return PX_ERROR;
    if (d->start != NULL && d->start(arg, err, errlen) != PX_OK)
        return PX_ERROR;
    s->admin = admin_start(admin_listen_config(), service_ready, s, err, errlen);
    return s->admin != NULL ? PX_OK : PX_ERROR;
}

/* Logs what this build uses (bus_where/store_where: parleyd's file, not
 * the Kafka and MongoDB settings it ignores); the admin address only when
 * an admin server runs. */
static void service_log_started(const service *s, const service_def *d, void *arg)
{
    char bus_at[512], store_at[600];
    bus_where(s->cfg.kafka_brokers, bus_at, sizeof(bus_at));
    store_where(s->cfg.mongo_uri, s->cfg.mongo_db, store_at, sizeof(store_at));
    json_t *fields = json_pack("{s:s, s:s, s:s, s:s, s:I}", "group", d->group, "bus", bus_at,
                               "store", store_at, "topic_prefix", s->cfg.topic_prefix,
                               "partitions", (json_int_t)s->cfg.partitions);
    if (admin_port(s->admin) != 0)
        json_object_set_new(fields, "admin_port", json_integer(admin_port(s->admin)));
    if (d->started != NULL)
        d->started(arg, fields);
    log_info("started", "o", fields); /* takes fields */
}

/* Returns 0 on a signal, 1 when the consumer or the bus failed fatally. */
static int service_loop(service *s, const service_def *d, void *arg, bus_msg *msgs)
{
    char err[PX_ERRLEN];
    metric *age = bus_age_histogram(d->name);
    while (!s->stop) {
        int n = bus_consume(s->b, msgs, d->batch, d->consume_wait_ms, err, sizeof(err));
        if (n < 0) {
            log_error("consumer failed", "{s:s}", "error", err);
            return 1;
        }
        bus_observe_age(age, msgs, (size_t)n);
        if (n > 0)
            d->process(arg, msgs, (size_t)n);
        bus_poll(s->b, 0); /* delivery reports the batch did not wait for */
        if (d->tick != NULL)
            d->tick(arg);
    }
    if (s->failed)
        log_error("the bus failed for good; stopping, to be restarted", NULL);
    return s->failed ? 1 : 0;
}

/* Reverse of start. The batch in hand was finished (or abandoned
 * uncommitted) by the loop; bus_destroy commits what was marked, leaves the
 * group and flushes what was produced. */
static void service_shutdown(service *s, const service_def *d, void *arg)
{
    atomic_store(&s->draining, 1);
    if (d->drain != NULL)
        d->drain(arg);
    if (s->b != NULL)
        bus_destroy(s->b);
    admin_stop(s->admin);
    if (s->st != NULL)
        store_close(s->st);
}

int service_run(service *s, const service_def *d, void *arg)
{
    char err[PX_ERRLEN] = "";
    if (lifecycle_init(service_on_stop, s) != PX_OK)
        return 1;
    if (service_setup(s, d, arg, err, sizeof(err)) != PX_OK) {
        log_init(d->name, "info");
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    bus_msg *msgs = px_calloc(d->batch, sizeof(*msgs));
    int rc = 0;
    if (service_start(s, d, arg, err, sizeof(err)) != PX_OK) {
        log_error("start failed", "{s:s}", "error", err);
        rc = 1;
        goto out;
    }
    service_log_started(s, d, arg);
    rc = service_loop(s, d, arg, msgs);
    log_info("stopping", "{s:s}", "reason", rc == 0 ? "signal" : "consumer error");
out:
    service_shutdown(s, d, arg);
    free(msgs);
    log_info("stopped", "{s:i}", "exit", rc);
    return rc;
}

void service_sleep(service *s, int64_t ms)
{
    /* Every retry loop sleeps here: one whose bus failed for good would
     * retry for ever, holding its partitions. It stops instead. */
    if (bus_failed(s->b))
        s->failed = s->stop = 1;
    int64_t end = px_mono_ms() + ms;
    while (!s->stop && px_mono_ms() < end)
        bus_poll(s->b, SERVICE_SLEEP_SLICE_MS);
}

void service_retry_batch(service *s, bus_msg *msgs, size_t n, metric *retries,
                         service_attempt_fn attempt, void *arg)
{
    int64_t backoff = SERVICE_BACKOFF_MIN_MS;
    for (;;) {
        char err[PX_ERRLEN] = "";
        if (attempt(arg, err, sizeof(err)) == PX_OK) {
            bus_commit(s->b, msgs, n);
            return;
        }
        metric_add(retries, 1);
        log_warn("batch failed; retrying", "{s:s, s:i, s:I, s:I, s:I}", "error", err,
                 "partition", (int)msgs[0].partition, "offset", (json_int_t)msgs[0].offset,
                 "records", (json_int_t)n, "backoff_ms", (json_int_t)backoff);
        service_sleep(s, backoff);
        if (s->stop) {
            log_warn("stopping with uncommitted records; they will be consumed again",
                     "{s:I}", "records", (json_int_t)n);
            return;
        }
        backoff = PX_MIN(backoff * 2, SERVICE_BACKOFF_MAX_MS);
    }
}

int64_t service_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void service_observe(metric *m, int64_t t0_us)
{
    metric_observe(m, (double)(service_clock_us() - t0_us) / 1000.0);
}
