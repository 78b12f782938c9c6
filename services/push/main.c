/* push: wakes devices that have no live connection (issue 18). Consumes
 * parley.push (PushRecords from message-store, keyed by user) in the
 * consumer group <prefix>push, coalesces each user's burst for
 * PARLEY_PUSH_COALESCE_MS, and then POSTs one signed JSON payload per
 * offline device to PARLEY_PUSH_URL (a push gateway that maps devices to
 * FCM, APNs or web-push), retrying failures with backoff until the burst is
 * PARLEY_PUSH_RETRY_S old. A record's offset is committed only once its
 * burst's calls are over (sent, dropped or the device gone), so the topic
 * is the durable retry queue: a crash repeats calls, never loses them.
 * This file owns what is push's own in its life (service.c runs it): its
 * topics, metrics and settings; queue.c, target.c and call.c do the work. */
#include "common.h"
#include "log.h"
#include "push.h"
#include "service.h"

#include <jansson.h>
#include <stdlib.h>

static void main_metrics(push *p)
{
    static const double b[] = { 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000, 30000 };
    push_metrics *m = &p->m;
    m->records = metrics_counter("parley_push_records_total", "Push records consumed");
    m->sent = metrics_counter("parley_push_sent_total",
                              "Webhook calls answered 2xx (one per device per burst)");
    m->failed = metrics_counter("parley_push_failed_total",
                                "Webhook calls that failed (transport, 408, 429, 5xx, or a "
                                "4xx other than 410)");
    m->retried = metrics_counter("parley_push_retried_total",
                                 "Failed webhook calls scheduled again with backoff");
    m->dropped = metrics_counter("parley_push_dropped_total",
                                 "Pushes given up: retries past PARLEY_PUSH_RETRY_S, a 4xx that "
                                 "a repeat cannot fix, or records past the hold limit");
    m->gone = metrics_counter("parley_push_gone_total",
                              "Webhook answers 410: the device is gone, no pushes until it "
                              "connects again");
    m->skipped_online = metrics_counter("parley_push_skipped_total{reason=\"online\"}",
                                        "Devices not called at the end of a burst");
    m->skipped_gone = metrics_counter("parley_push_skipped_total{reason=\"gone\"}",
                                      "Devices not called at the end of a burst");
    m->dead = metrics_counter("parley_push_dead_letters_total",
                              "Records sent to the dead-letter topic");
    m->pending = metrics_gauge("parley_push_pending_bursts",
                               "Bursts collecting or calling (not yet committed)");
    m->lat_call = metrics_histogram("parley_push_call_ms", "Webhook call latency, ms", b,
                                    PX_ARRAY_LEN(b));
}

static void main_setup(void *arg)
{
    push *p = arg;
    p->topic_push = service_topic(&p->svc, "push", SERVICE_SUBSCRIBE);
    p->topic_dead = service_topic(&p->svc, "dead", SERVICE_ENSURE);
    main_metrics(p);
}

/* Without a secret the gateway could not tell our calls from anyone's. */
static int main_start(void *arg, char *err, size_t errlen)
{
    push *p = arg;
    const config *cfg = &p->svc.cfg;
    if (cfg->push_url != NULL && cfg->push_secret == NULL)
        return px_err(err, errlen, "PARLEY_PUSH_URL is set but PARLEY_PUSH_SECRET is not: "
                      "calls must be signed");
    return call_init(p, err, errlen);
}

static void main_started(void *arg, json_t *fields)
{
    const config *cfg = &((push *)arg)->svc.cfg;
    json_object_set_new(fields, "push_url", cfg->push_url != NULL ? json_string(cfg->push_url)
                                                                  : json_null());
    json_object_set_new(fields, "coalesce_ms", json_integer(cfg->push_coalesce_ms));
    json_object_set_new(fields, "retry_s", json_integer(cfg->push_retry_s));
    json_object_set_new(fields, "timeout_ms", json_integer(cfg->push_timeout_ms));
    json_object_set_new(fields, "concurrency", json_integer(cfg->push_concurrency));
    json_object_set_new(fields, "preview", json_boolean(cfg->push_preview));
}

static void main_process(void *arg, bus_msg *msgs, size_t n)
{
    queue_add(arg, msgs, n);
}

static void main_tick(void *arg)
{
    queue_tick(arg);
}

/* Calls in flight are abandoned: their records are not committed, so the
 * next owner of the partition calls again. */
static void main_drain(void *arg)
{
    call_free(arg);
}

int main(void)
{
    static const service_def def = {
        .name = "push", .group = PUSH_GROUP, .batch = PUSH_BATCH,
        .consume_wait_ms = PUSH_CONSUME_WAIT_MS, .dr_cb = queue_on_delivery,
        .setup = main_setup, .start = main_start,
        .started = main_started, .process = main_process, .tick = main_tick,
        .drain = main_drain,
    };
    static push p;
    int rc = service_run(&p.svc, &def, &p);
    queue_free(&p);
    return rc;
}
