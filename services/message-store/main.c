/* message-store: every user's inbox. Consumes parley.inbox, parley.acks and
 * parley.sync in the consumer group parley-message-store; stores inbox
 * events, pushes them to the gateways holding the recipient, serves the
 * backlog on connect and deletes on ack. This file owns configuration, the
 * consume loop and the ordered shutdown; the work per record is in
 * batch.c (dispatch, commit, retry), inbox.c, route.c, deliv.c, sync.c,
 * ack.c and sweep.c. */
#include "admin_http.h"
#include "common.h"
#include "config.h"
#include "lifecycle.h"
#include "log.h"
#include "msgstore.h"

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
    msgstore *ms = arg;
    if (ms->b != NULL)
        bus_wakeup(ms->b);
    main_stop = 1;
}

int64_t msgstore_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void msgstore_observe(metric *m, int64_t t0_us)
{
    metric_observe(m, (double)(msgstore_clock_us() - t0_us) / 1000.0);
}

static void main_metrics(msgstore *ms)
{
    static const double b[] = { 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000 };
    msgstore_metrics *m = &ms->m;
    m->stored = metrics_counter("parley_msgstore_inbox_stored_total", "Inbox events newly stored");
    m->duplicates = metrics_counter("parley_msgstore_duplicates_total",
                                    "Inbox records absorbed as duplicates");
    m->deliveries = metrics_counter("parley_msgstore_deliveries_total",
                                    "Delivery records produced to gateway topics");
    m->produce_failures = metrics_counter("parley_msgstore_produce_failures_total",
                                          "Produced records the bus did not acknowledge");
    m->offline = metrics_counter("parley_msgstore_offline_events_total",
                                 "Stored events whose recipient had no live gateway");
    m->syncs = metrics_counter("parley_msgstore_syncs_total", "Sync requests served");
    m->sync_events = metrics_counter("parley_msgstore_sync_events_total",
                                     "Events pushed by syncs");
    m->acks = metrics_counter("parley_msgstore_acks_total", "Ack records applied");
    m->acked_events = metrics_counter("parley_msgstore_acked_events_total",
                                      "Inbox events deleted by acks");
    m->acked_messages = metrics_counter("parley_msgstore_acked_messages_total",
                                        "Acked messages with a sender (each made a receipt fact)");
    m->dead = metrics_counter("parley_msgstore_dead_letters_total",
                              "Records sent to the dead-letter topic");
    m->retries = metrics_counter("parley_msgstore_batch_retries_total",
                                 "Batch attempts that failed and were retried");
    m->cache_hits = metrics_counter("parley_msgstore_presence_cache_total{result=\"hit\"}",
                                    "Presence cache lookups");
    m->cache_misses = metrics_counter("parley_msgstore_presence_cache_total{result=\"miss\"}",
                                      "Presence cache lookups");
    m->lookup_failures = metrics_counter("parley_msgstore_presence_lookup_failures_total",
                                         "Presence registry lookups that failed");
    m->swept_inbox = metrics_counter("parley_msgstore_swept_total{what=\"inbox\"}",
                                     "Records removed by the retention sweep");
    m->swept_seen = metrics_counter("parley_msgstore_swept_total{what=\"seen\"}",
                                    "Records removed by the retention sweep");
    m->swept_media = metrics_counter("parley_msgstore_swept_total{what=\"media\"}",
                                     "Records removed by the retention sweep");
#define LAT(op) metrics_histogram("parley_msgstore_store_ms{op=\"" op "\"}", \
                                  "Store call latency, ms", b, PX_ARRAY_LEN(b))
    m->lat_seen_claim = LAT("seen_claim");
    m->lat_put = LAT("inbox_put");
    m->lat_scan = LAT("inbox_scan");
    m->lat_ack = LAT("inbox_ack");
    m->lat_lookup = LAT("presence_lookup");
    m->lat_sweep = LAT("sweep");
#undef LAT
}

static int main_setup(msgstore *ms, char *err, size_t errlen)
{
    if (config_load(&ms->cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    if (admin_check_listen(admin_listen_config(), err, errlen) != PX_OK)
        return PX_ERROR;
    log_init("message-store", ms->cfg.log_level);
    const char *p = ms->cfg.topic_prefix;
    snprintf(ms->topic_inbox, sizeof(ms->topic_inbox), "%sinbox", p);
    snprintf(ms->topic_acks, sizeof(ms->topic_acks), "%sacks", p);
    snprintf(ms->topic_sync, sizeof(ms->topic_sync), "%ssync", p);
    snprintf(ms->topic_presence, sizeof(ms->topic_presence), "%spresence", p);
    snprintf(ms->topic_receipts, sizeof(ms->topic_receipts), "%sreceipts", p);
    snprintf(ms->topic_groups, sizeof(ms->topic_groups), "%sgroups", p);
    snprintf(ms->topic_dead, sizeof(ms->topic_dead), "%sdead", p);
    ms->stop = &main_stop;
    main_metrics(ms);
    batch_init(ms);
    return PX_OK;
}

/* /readyz: called on the admin thread; st is thread-safe and outlives the
 * admin daemon (main_shutdown stops admin before closing the store). */
static int main_ready(void *arg, char *err, size_t errlen)
{
    msgstore *ms = arg;
    if (atomic_load(&ms->draining))
        return px_err(err, errlen, "draining");
    return store_ping(ms->st, err, errlen);
}

static int main_start(msgstore *ms, char *err, size_t errlen)
{
    char host[64] = "local", client[128], group[128];
    gethostname(host, sizeof(host) - 1);
    /* The group carries the topic prefix so stacks sharing a broker under
     * different prefixes never rebalance each other. */
    snprintf(group, sizeof(group), "%s%s", ms->cfg.topic_prefix, MSGSTORE_GROUP);
    snprintf(client, sizeof(client), "message-store-%s", host);
    ms->st = store_open(ms->cfg.mongo_uri, ms->cfg.mongo_db, err, errlen);
    if (ms->st == NULL)
        return PX_ERROR;
    bus_conf bc = { .brokers = ms->cfg.kafka_brokers, .client_id = client,
                    .group = group, .partitions = (int)ms->cfg.partitions,
                    .dr_cb = batch_on_delivery };
    ms->b = bus_new(&bc, err, errlen);
    if (ms->b == NULL)
        return PX_ERROR;
    const char *all[] = { ms->topic_inbox, ms->topic_acks, ms->topic_sync, ms->topic_presence,
                          ms->topic_receipts, ms->topic_groups, ms->topic_dead };
    if (bus_ensure_topics(ms->b, all, PX_ARRAY_LEN(all), 15000, err, errlen) != PX_OK)
        return PX_ERROR;
    const char *mine[] = { ms->topic_inbox, ms->topic_sync };
    if (bus_subscribe(ms->b, mine, PX_ARRAY_LEN(mine), err, errlen) != PX_OK ||
        acker_start(ms, err, errlen) != PX_OK)
        return PX_ERROR;
    ms->cache = route_cache_new();
    if (sweep_start(ms, err, errlen) != PX_OK)
        return PX_ERROR;
    ms->admin = admin_start(admin_listen_config(), main_ready, ms, err, errlen);
    return ms->admin != NULL ? PX_OK : PX_ERROR;
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

static void main_log_started(const msgstore *ms)
{
    char mongo[512];
    main_redact(ms->cfg.mongo_uri, mongo, sizeof(mongo));
    log_info("started", "{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I}",
             "group", MSGSTORE_GROUP, "kafka", ms->cfg.kafka_brokers, "mongo", mongo,
             "mongo_db", ms->cfg.mongo_db, "topic_prefix", ms->cfg.topic_prefix,
             "admin", admin_listen_config(), "admin_port", (json_int_t)admin_port(ms->admin),
             "partitions", (json_int_t)ms->cfg.partitions, "heartbeat_ms",
             (json_int_t)ms->cfg.heartbeat_ms, "presence_cache_ms",
             (json_int_t)ms->cfg.presence_ttl_ms, "retention_days",
             (json_int_t)ms->cfg.retention_days, "sweep_ms", (json_int_t)ms->cfg.sweep_ms);
}

/* Returns 0 on a signal, 1 when the consumer failed fatally. */
static int main_loop(msgstore *ms, bus_msg *msgs)
{
    char err[PX_ERRLEN];
    while (!main_stop) {
        int n = bus_consume(ms->b, msgs, MSGSTORE_BATCH, MSGSTORE_CONSUME_WAIT_MS, err,
                            sizeof(err));
        if (n < 0) {
            log_error("consumer failed", "{s:s}", "error", err);
            return 1;
        }
        if (n > 0)
            batch_process(ms, msgs, (size_t)n);
        bus_poll(ms->b, 0); /* delivery reports of live deliveries */
    }
    return 0;
}

/* Reverse of start. The batch in hand was finished (or abandoned
 * uncommitted) by main_loop; bus_destroy commits what was marked, leaves
 * the group and flushes deliveries. The admin daemon stops before the store
 * closes because /readyz pings the store from the admin thread. */
static void main_shutdown(msgstore *ms)
{
    atomic_store(&ms->draining, 1);
    acker_stop(ms);
    sweep_stop(ms);
    if (ms->b != NULL)
        bus_destroy(ms->b);
    admin_stop(ms->admin);
    if (ms->st != NULL)
        store_close(ms->st);
    route_cache_free(ms->cache);
    free(ms->pack);
}

int main(void)
{
    static msgstore ms;
    static bus_msg msgs[MSGSTORE_BATCH];
    char err[PX_ERRLEN] = "";
    if (lifecycle_init(main_on_stop, &ms) != PX_OK)
        return 1;
    if (main_setup(&ms, err, sizeof(err)) != PX_OK) {
        log_init("message-store", "info");
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    int rc = 0;
    if (main_start(&ms, err, sizeof(err)) != PX_OK) {
        log_error("start failed", "{s:s}", "error", err);
        rc = 1;
        goto out;
    }
    main_log_started(&ms);
    rc = main_loop(&ms, msgs);
    log_info("stopping", "{s:s}", "reason", rc == 0 ? "signal" : "consumer error");
out:
    main_shutdown(&ms);
    log_info("stopped", "{s:i}", "exit", rc);
    return rc;
}
