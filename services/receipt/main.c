/* receipt: turns message-store's delivered/read facts into `receipt` events.
 * Consumes parley.receipts (keyed by the reader) in the consumer group
 * <prefix>receipt, keeps (reader, msg_id) -> sender tracking in the store
 * from the ack until the read, and produces each receipt as an InboxRecord
 * onto parley.inbox keyed by the sender, where message-store keeps it until
 * one of the sender's connections acks it. This file owns what is
 * receipt's own in its life (service.c runs it): its topics, metrics and
 * the tracking retention sweep; batch.c and apply.c handle the records. */
#include "common.h"
#include "log.h"
#include "receipt.h"
#include "service.h"

#include <jansson.h>

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
    m->repeats = metrics_counter("parley_receipt_repeats_total",
                                 "Delivered or read facts applied already: skipped");
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

static void main_setup(void *arg)
{
    receipt *rs = arg;
    rs->topic_receipts = service_topic(&rs->svc, "receipts", SERVICE_SUBSCRIBE);
    rs->topic_inbox = service_topic(&rs->svc, "inbox", SERVICE_ENSURE);
    rs->topic_dead = service_topic(&rs->svc, "dead", SERVICE_ENSURE);
    main_metrics(rs);
}

static int main_start(void *arg, char *err, size_t errlen)
{
    receipt *rs = arg;
    rs->applied = recent_new(RECEIPT_APPLIED_BITS);
    return PX_OK;
}

static void main_drain(void *arg)
{
    receipt *rs = arg;
    recent_free(rs->applied);
    rs->applied = NULL;
}

static void main_started(void *arg, json_t *fields)
{
    receipt *rs = arg;
    json_object_set_new(fields, "retention_days", json_integer(rs->svc.cfg.retention_days));
    json_object_set_new(fields, "sweep_ms", json_integer(rs->svc.cfg.sweep_ms));
    rs->next_sweep_ms = px_mono_ms() + rs->svc.cfg.sweep_ms;
}

/* Tracking of messages never read ends with the retention period, like the
 * inbox events. Every instance sweeps everything (idempotent deletes). It
 * runs on the consume thread: receipts are not latency-critical, and the
 * delete is one bounded store call. A failure only postpones it. */
static void main_sweep(void *arg)
{
    receipt *rs = arg;
    int64_t now = px_mono_ms();
    if (now < rs->next_sweep_ms)
        return;
    rs->next_sweep_ms = now + rs->svc.cfg.sweep_ms;
    char err[PX_ERRLEN] = "";
    int64_t removed = 0;
    int64_t cutoff = px_now_ms() - rs->svc.cfg.retention_days * 86400000LL;
    int64_t t0 = service_clock_us();
    if (store_track_sweep(rs->svc.st, cutoff, &removed, err, sizeof(err)) != PX_OK) {
        log_warn("tracking sweep failed", "{s:s}", "error", err);
        return;
    }
    service_observe(rs->m.lat_sweep, t0);
    metric_add(rs->m.swept, removed);
    log_info("retention sweep", "{s:I, s:I}", "cutoff_ms", (json_int_t)cutoff,
             "tracking_removed", (json_int_t)removed);
}

static void main_process(void *arg, bus_msg *msgs, size_t n)
{
    batch_process(arg, msgs, n);
}

int main(void)
{
    static const service_def def = {
        .name = "receipt", .group = RECEIPT_GROUP, .batch = RECEIPT_BATCH,
        .consume_wait_ms = RECEIPT_CONSUME_WAIT_MS, .dr_cb = batch_on_delivery,
        .setup = main_setup, .start = main_start, .started = main_started,
        .process = main_process, .tick = main_sweep, .drain = main_drain,
    };
    static receipt rs;
    return service_run(&rs.svc, &def, &rs);
}
