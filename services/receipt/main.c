/* receipt: turns message-store's delivered/read facts into `receipt` events.
 * Consumes parley.receipts (keyed by the reader) in the consumer group
 * <prefix>receipt, keeps (reader, msg_id) -> sender tracking in the store
 * from the ack until the read, and produces each receipt as an InboxRecord
 * onto parley.inbox keyed by the sender, where message-store keeps it until
 * one of the sender's connections acks it. This file owns configuration,
 * the consume loop, the tracking retention sweep and the ordered shutdown;
 * batch.c and apply.c handle the records. */
#include "admin_http.h"
#include "common.h"
#include "config.h"
#include "lifecycle.h"
#include "log.h"
#include "receipt.h"

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
    receipt *rs = arg;
    if (rs->b != NULL)
        bus_wakeup(rs->b);
    main_stop = 1;
}

int64_t receipt_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void receipt_observe(metric *m, int64_t t0_us)
{
    metric_observe(m, (double)(receipt_clock_us() - t0_us) / 1000.0);
}

static void main_metrics(receipt *rs)
{
    static const double b[] = { 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000 };
    static const double lag[] = { 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000, 30000 };
    receipt_metrics *m = &rs->m;
#define FACTS(s) metrics_counter("parley_receipt_facts_total{status=\"" s "\"}", \
                                 "Receipt facts applied")
    m->delivered = FACTS("delivered");
    m->read = FACTS("read");
    m->claims = FACTS("read_claim");
#undef FACTS
    m->claims_unknown = metrics_counter("parley_receipt_claims_untracked_total",
                                        "Read claims with no tracking (never received, "
                                        "already read, or expired): no receipt");
    m->receipts = metrics_counter("parley_receipt_receipts_total",
                                  "Receipt events produced to the senders' inboxes");
    m->tracked = metrics_counter("parley_receipt_tracking_total{op=\"put\"}",
                                 "Tracking records written or removed");
    m->untracked = metrics_counter("parley_receipt_tracking_total{op=\"read\"}",
                                   "Tracking records written or removed");
    m->swept = metrics_counter("parley_receipt_tracking_total{op=\"expired\"}",
                               "Tracking records written or removed");
    m->dead = metrics_counter("parley_receipt_dead_letters_total",
                              "Records sent to the dead-letter topic");
    m->retries = metrics_counter("parley_receipt_batch_retries_total",
                                 "Batch attempts that failed and were retried");
    m->produce_failures = metrics_counter("parley_receipt_produce_failures_total",
                                          "Produced records the bus did not acknowledge");
#define LAT(op) metrics_histogram("parley_receipt_store_ms{op=\"" op "\"}", \
                                  "Store call latency, ms", b, PX_ARRAY_LEN(b))
    m->lat_put = LAT("track_put");
    m->lat_get = LAT("track_get");
    m->lat_delete = LAT("track_delete");
    m->lat_sweep = LAT("track_sweep");
#undef LAT
    m->lag = metrics_histogram("parley_receipt_lag_ms",
                               "From the reader's ack or read to its receipts in Kafka, ms", lag,
                               PX_ARRAY_LEN(lag));
}

static int main_setup(receipt *rs, char *err, size_t errlen)
{
    if (config_load(&rs->cfg, err, errlen) != PX_OK)
        return PX_ERROR;
    if (admin_check_listen(admin_listen_config(), err, errlen) != PX_OK)
        return PX_ERROR;
    log_init("receipt", rs->cfg.log_level);
    const char *p = rs->cfg.topic_prefix;
    snprintf(rs->topic_receipts, sizeof(rs->topic_receipts), "%sreceipts", p);
    snprintf(rs->topic_inbox, sizeof(rs->topic_inbox), "%sinbox", p);
    snprintf(rs->topic_dead, sizeof(rs->topic_dead), "%sdead", p);
    rs->stop = &main_stop;
    main_metrics(rs);
    return PX_OK;
}

/* /readyz, on the admin thread: st is thread-safe and outlives the admin
 * daemon (main_shutdown stops admin before closing the store). */
static int main_ready(void *arg, char *err, size_t errlen)
{
    receipt *rs = arg;
    if (atomic_load(&rs->draining))
        return px_err(err, errlen, "draining");
    return store_ping(rs->st, err, errlen);
}

static int main_start(receipt *rs, char *err, size_t errlen)
{
    char host[64] = "local", client[128], group[128];
    gethostname(host, sizeof(host) - 1);
    /* The group carries the topic prefix so stacks sharing a broker under
     * different prefixes never rebalance each other. */
    snprintf(group, sizeof(group), "%s%s", rs->cfg.topic_prefix, RECEIPT_GROUP);
    snprintf(client, sizeof(client), "receipt-%s", host);
    rs->st = store_open(rs->cfg.mongo_uri, rs->cfg.mongo_db, err, errlen);
    if (rs->st == NULL)
        return PX_ERROR;
    bus_conf bc = { .brokers = rs->cfg.kafka_brokers, .client_id = client,
                    .group = group, .partitions = (int)rs->cfg.partitions,
                    .dr_cb = batch_on_delivery };
    rs->b = bus_new(&bc, err, errlen);
    if (rs->b == NULL)
        return PX_ERROR;
    const char *all[] = { rs->topic_receipts, rs->topic_inbox, rs->topic_dead };
    if (bus_ensure_topics(rs->b, all, PX_ARRAY_LEN(all), 15000, err, errlen) != PX_OK)
        return PX_ERROR;
    const char *mine[] = { rs->topic_receipts };
    if (bus_subscribe(rs->b, mine, PX_ARRAY_LEN(mine), err, errlen) != PX_OK)
        return PX_ERROR;
    rs->admin = admin_start(admin_listen_config(), main_ready, rs, err, errlen);
    return rs->admin != NULL ? PX_OK : PX_ERROR;
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

static void main_log_started(const receipt *rs)
{
    char mongo[512];
    main_redact(rs->cfg.mongo_uri, mongo, sizeof(mongo));
    log_info("started", "{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I}", "group",
             RECEIPT_GROUP, "kafka", rs->cfg.kafka_brokers, "mongo", mongo, "mongo_db",
             rs->cfg.mongo_db, "topic_prefix", rs->cfg.topic_prefix, "admin",
             admin_listen_config(), "admin_port", (json_int_t)admin_port(rs->admin),
             "partitions", (json_int_t)rs->cfg.partitions, "retention_days",
             (json_int_t)rs->cfg.retention_days, "sweep_ms", (json_int_t)rs->cfg.sweep_ms);
}

/* Tracking of messages never read ends with the retention period, like the
 * inbox events. Every instance sweeps everything (idempotent deletes). It
 * runs on the consume thread: receipts are not latency-critical, and the
 * delete is one bounded store call. A failure only postpones it. */
static void main_sweep(receipt *rs)
{
    int64_t now = px_mono_ms();
    if (now < rs->next_sweep_ms)
        return;
    rs->next_sweep_ms = now + rs->cfg.sweep_ms;
    char err[PX_ERRLEN] = "";
    int64_t removed = 0;
    int64_t cutoff = px_now_ms() - rs->cfg.retention_days * 86400000LL;
    int64_t t0 = receipt_clock_us();
    if (store_track_sweep(rs->st, cutoff, &removed, err, sizeof(err)) != PX_OK) {
        log_warn("tracking sweep failed", "{s:s}", "error", err);
        return;
    }
    receipt_observe(rs->m.lat_sweep, t0);
    metric_add(rs->m.swept, removed);
    log_info("retention sweep", "{s:I, s:I}", "cutoff_ms", (json_int_t)cutoff,
             "tracking_removed", (json_int_t)removed);
}

/* Returns 0 on a signal, 1 when the consumer failed fatally. */
static int main_loop(receipt *rs, bus_msg *msgs)
{
    char err[PX_ERRLEN];
    rs->next_sweep_ms = px_mono_ms() + rs->cfg.sweep_ms;
    while (!main_stop) {
        int n = bus_consume(rs->b, msgs, RECEIPT_BATCH, RECEIPT_CONSUME_WAIT_MS, err,
                            sizeof(err));
        if (n < 0) {
            log_error("consumer failed", "{s:s}", "error", err);
            return 1;
        }
        if (n > 0)
            batch_process(rs, msgs, (size_t)n);
        bus_poll(rs->b, 0);
        main_sweep(rs);
    }
    return 0;
}

/* Reverse of start: bus_destroy commits what was marked and leaves the
 * group; admin stops before the store closes (its /readyz pings the store). */
static void main_shutdown(receipt *rs)
{
    atomic_store(&rs->draining, 1);
    if (rs->b != NULL)
        bus_destroy(rs->b);
    admin_stop(rs->admin);
    if (rs->st != NULL)
        store_close(rs->st);
}

int main(void)
{
    static receipt rs;
    static bus_msg msgs[RECEIPT_BATCH];
    char err[PX_ERRLEN] = "";
    if (lifecycle_init(main_on_stop, &rs) != PX_OK)
        return 1;
    if (main_setup(&rs, err, sizeof(err)) != PX_OK) {
        log_init("receipt", "info");
        log_error("bad configuration", "{s:s}", "error", err);
        return 2;
    }
    int rc = 0;
    if (main_start(&rs, err, sizeof(err)) != PX_OK) {
        log_error("start failed", "{s:s}", "error", err);
        rc = 1;
        goto out;
    }
    main_log_started(&rs);
    rc = main_loop(&rs, msgs);
    log_info("stopping", "{s:s}", "reason", rc == 0 ? "signal" : "consumer error");
out:
    main_shutdown(&rs);
    log_info("stopped", "{s:i}", "exit", rc);
    return rc;
}
