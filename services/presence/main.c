/* presence: the central connection registry. Consumes parley.presence in the
 * consumer group parley-presence and keeps the store's registry of which
 * gateway (of which boot epoch) holds connections of which user, and when
 * each gateway last beat. Others read it with store_presence_lookup behind
 * their own short-TTL cache. This file owns configuration, the consume loop,
 * the expiry timer and the ordered shutdown; batch.c applies the records. */
#include "admin_http.h"
#include "common.h"
#include "config.h"
#include "lifecycle.h"
#include "log.h"
#include "presence.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t main_stop;

/* Runs on the lifecycle thread: the consumer may be inside a blocking
 * poll, which the wake-up interrupts. The flag comes last: once it is set
 * the main thread may destroy the bus, so the wake-up must be done. */
static void main_on_stop(void *arg)
{
    presence *p = arg;
    if (p->b != NULL)
        bus_wakeup(p->b);
    main_stop = 1;
}

int64_t presence_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void presence_observe(metric *m, int64_t t0_us)
{
    metric_observe(m, (double)(presence_clock_us() - t0_us) / 1000.0);
}

static void main_metrics(presence *p)
{
    static const double b[] = { 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000 };
    presence_metrics *m = &p->m;
    m->connects = metrics_counter("parley_presence_records_total{type=\"connect\"}",
                                  "Presence records applied");
    m->disconnects = metrics_counter("parley_presence_records_total{type=\"disconnect\"}",
                                     "Presence records applied");
    m->beats = metrics_counter("parley_presence_records_total{type=\"heartbeat\"}",
                               "Presence records applied");
    m->resets = metrics_counter("parley_presence_records_total{type=\"reset\"}",
                                "Presence records applied");
    m->expired = metrics_counter("parley_presence_expired_total",
                                 "Presence records of silent gateways removed");
    m->dead = metrics_counter("parley_presence_dead_letters_total",
                              "Records sent to the dead-letter topic");
    m->retries = metrics_counter("parley_presence_batch_retries_total",
                                 "Batch attempts that failed and were retried");
    m->produce_failures = metrics_counter("parley_presence_produce_failures_total",
                                          "Dead letters the bus did not acknowledge");
#define LAT(op) metrics_histogram("parley_presence_store_ms{op=\"" op "\"}", \
                                  "Store call latency, ms", b, PX_ARRAY_LEN(b))
    m->lat_apply = LAT("presence_apply");
    m->lat_beat = LAT("gateway_beat");
    m->lat_expire = LAT("presence_expire");
#undef LAT
}

static int main_setup(presence *p, char *err, size_t errlen)
{
    if (config_load(&p->cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    if (admin_check_listen(admin_listen_config(), err, errlen) != PX_OK)
        return PX_ERROR;
    log_init("presence", p->cfg.log_level);
    snprintf(p->topic_presence, sizeof(p->topic_presence), "%spresence", p->cfg.topic_prefix);
    snprintf(p->topic_dead, sizeof(p->topic_dead), "%sdead", p->cfg.topic_prefix);
    p->stop = &main_stop;
    main_metrics(p);
    batch_init(p);
    return PX_OK;
}

/* /readyz, on the admin thread: st is thread-safe and outlives the admin
 * daemon (main_shutdown stops admin before closing the store). */
static int main_ready(void *arg, char *err, size_t errlen)
{
    presence *p = arg;
    if (atomic_load(&p->draining))
        return px_err(err, errlen, "draining");
    return store_ping(p->st, err, errlen);
}

static int main_start(presence *p, char *err, size_t errlen)
{
    char host[64] = "local", client[128], group[128];
    gethostname(host, sizeof(host) - 1);
    /* The group carries the topic prefix so stacks sharing a broker under
     * different prefixes never rebalance each other. */
    snprintf(group, sizeof(group), "%s%s", p->cfg.topic_prefix, PRESENCE_GROUP);
    snprintf(client, sizeof(client), "presence-%s", host);
    p->st = store_open(p->cfg.mongo_uri, p->cfg.mongo_db, err, errlen);
    if (p->st == NULL)
        return PX_ERROR;
    bus_conf bc = { .brokers = p->cfg.kafka_brokers, .client_id = client,
                    .group = group, .partitions = (int)p->cfg.partitions,
                    .dr_cb = batch_on_delivery };
    p->b = bus_new(&bc, err, errlen);
    if (p->b == NULL)
        return PX_ERROR;
    const char *all[] = { p->topic_presence, p->topic_dead };
    if (bus_ensure_topics(p->b, all, PX_ARRAY_LEN(all), 15000, err, errlen) != PX_OK)
        return PX_ERROR;
    const char *mine[] = { p->topic_presence };
    if (bus_subscribe(p->b, mine, PX_ARRAY_LEN(mine), err, errlen) != PX_OK)
        return PX_ERROR;
    p->admin = admin_start(admin_listen_config(), main_ready, p, err, errlen);
    return p->admin != NULL ? PX_OK : PX_ERROR;
}

/* The URI may carry credentials: log it without its userinfo. */
static void main_redact(const char *uri, char *out, size_t outlen)
{
    const char *scheme = strstr(uri, "://");
    const char *at = scheme ? strchr(scheme + 3, '@') : NULL;
    const char *slash = scheme ? strchr(scheme + 3, '/') : NULL;
    if (at != NULL && (slash == NULL || at < slash))
        snprintf(out, outlen, "%.*s***%s", (int)(scheme + 3 - uri), uri, at);
    else
        snprintf(out, outlen, "%s", uri);
}

static void main_log_started(const presence *p)
{
    char mongo[512];
    main_redact(p->cfg.mongo_uri, mongo, sizeof(mongo));
    log_info("started", "{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:I}", "group", PRESENCE_GROUP,
             "kafka", p->cfg.kafka_brokers, "mongo", mongo, "mongo_db", p->cfg.mongo_db,
             "topic_prefix", p->cfg.topic_prefix, "admin", admin_listen_config(), "admin_port",
             (json_int_t)admin_port(p->admin), "partitions", (json_int_t)p->cfg.partitions,
             "heartbeat_ms", (json_int_t)p->cfg.heartbeat_ms);
}

/* Gateways silent for PRESENCE_EXPIRE_BEATS beats died without saying so:
 * forget their connections. Generous on purpose: expired records are not
 * restored by a later beat, so a live gateway whose beat came late under
 * load would leave its users "offline" (their events waiting for the next
 * sync) until they reconnect, while a dead gateway's records cost only
 * pushes nobody reads. Silent means silent in what this process has read: while it
 * is behind on its topic by a beat or more, the beats it has not applied
 * yet would make live gateways look dead (under a connect storm that wiped
 * every live user's presence), so it waits until it has caught up. A
 * failure only postpones this to the next period. */
static void main_expire(presence *p)
{
    int64_t now = px_mono_ms();
    if (now < p->next_expire_ms || p->behind_ms >= p->cfg.heartbeat_ms)
        return;
    p->next_expire_ms = now + p->cfg.heartbeat_ms;
    char err[PX_ERRLEN] = "";
    int64_t removed = 0;
    int64_t cutoff = px_now_ms() - PRESENCE_EXPIRE_BEATS * p->cfg.heartbeat_ms;
    int64_t t0 = presence_clock_us();
    if (store_presence_expire(p->st, cutoff, &removed, err, sizeof(err)) != PX_OK) {
        log_warn("presence expire failed", "{s:s}", "error", err);
        return;
    }
    presence_observe(p->m.lat_expire, t0);
    metric_add(p->m.expired, removed);
    if (removed > 0)
        log_info("expired silent gateways' presence", "{s:I, s:I}", "removed",
                 (json_int_t)removed, "cutoff_ms", (json_int_t)cutoff);
}

/* How far behind the producers the consumer is: the age of the oldest
 * record just consumed; 0 when nothing was waiting. */
static int64_t main_behind_ms(const bus_msg *msgs, int n)
{
    int64_t now = px_now_ms(), behind = 0;
    for (int i = 0; i < n; i++)
        if (msgs[i].ts_ms > 0)
            behind = PX_MAX(behind, now - msgs[i].ts_ms);
    return behind;
}

/* Returns 0 on a signal, 1 when the consumer failed fatally. */
static int main_loop(presence *p, bus_msg *msgs)
{
    char err[PX_ERRLEN];
    p->next_expire_ms = px_mono_ms() + p->cfg.heartbeat_ms;
    while (!main_stop) {
        int n = bus_consume(p->b, msgs, PRESENCE_BATCH, PRESENCE_CONSUME_WAIT_MS, err,
                            sizeof(err));
        if (n < 0) {
            log_error("consumer failed", "{s:s}", "error", err);
            return 1;
        }
        p->behind_ms = main_behind_ms(msgs, n);
        if (n > 0)
            batch_process(p, msgs, (size_t)n);
        bus_poll(p->b, 0);
        main_expire(p);
    }
    return 0;
}

/* Reverse of start: bus_destroy commits what was marked and leaves the
 * group; admin stops before the store closes (its /readyz pings the store). */
static void main_shutdown(presence *p)
{
    atomic_store(&p->draining, 1);
    if (p->b != NULL)
        bus_destroy(p->b);
    admin_stop(p->admin);
    if (p->st != NULL)
        store_close(p->st);
}

int main(void)
{
    static presence p;
    static bus_msg msgs[PRESENCE_BATCH];
    char err[PX_ERRLEN] = "";
    if (lifecycle_init(main_on_stop, &p) != PX_OK)
        return 1;
    if (main_setup(&p, err, sizeof(err)) != PX_OK) {
        log_init("presence", "info");
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    int rc = 0;
    if (main_start(&p, err, sizeof(err)) != PX_OK) {
        log_error("start failed", "{s:s}", "error", err);
        rc = 1;
        goto out;
    }
    main_log_started(&p);
    rc = main_loop(&p, msgs);
    log_info("stopping", "{s:s}", "reason", rc == 0 ? "signal" : "consumer error");
out:
    main_shutdown(&p);
    log_info("stopped", "{s:i}", "exit", rc);
    return rc;
}
