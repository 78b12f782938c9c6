/* message-store: every user's inbox. Consumes parley.inbox (events and
 * sync requests) in the consumer group parley-message-store, and parley.acks in
 * parley-message-store-acks on a thread of its own (acker.c); stores inbox
 * events, pushes them to the gateways holding the recipient, serves the
 * backlog on connect and deletes on ack. This file owns what is
 * message-store's own in its life (service.c runs it): its topics,
 * metrics, presence cache and sweep thread; the work per record is in
 * batch.c (dispatch, commit, retry), inbox.c, route.c, deliv.c, sync.c,
 * ack.c and sweep.c. */
#include "common.h"
#include "msgstore.h"
#include "service.h"

#include <jansson.h>
#include <stdlib.h>

static void main_metrics(msgstore *ms)
{
    static const double b[] = { 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000 };
    msgstore_metrics *m = &ms->m;
    m->stored = metrics_counter("parley_msgstore_inbox_stored_total", "Inbox events newly stored");
    m->duplicates = metrics_counter("parley_msgstore_duplicates_total",
                                    "Inbox records absorbed as duplicates");
    m->claims = metrics_counter("parley_msgstore_claims_total",
                                "Dedupe claims written (messages and group events; not receipts)");
    m->deliveries = metrics_counter("parley_msgstore_deliveries_total",
                                    "Delivery records produced to gateway topics");
    m->produce_failures = metrics_counter("parley_msgstore_produce_failures_total",
                                          "Produced records the bus did not acknowledge");
    m->offline = metrics_counter("parley_msgstore_offline_events_total",
                                 "Stored events whose recipient had no live gateway");
    m->syncs = metrics_counter("parley_msgstore_syncs_total", "Sync requests served");
#define PAGES(r) metrics_counter("parley_msgstore_sync_pages_total{read=\"" r "\"}", \
                                "Sync pages served, by where their first event was read: a " \
                                "store scan, or the rest an earlier scan kept (synckept.c)")
    m->sync_pages_scan = PAGES("scan");
    m->sync_pages_kept = PAGES("kept");
#undef PAGES
    m->sync_kept_bytes = metrics_gauge("parley_msgstore_sync_kept_bytes",
                                       "Memory of sync scans kept for the next pages");
    m->sync_events = metrics_counter("parley_msgstore_sync_events_total",
                                     "Events pushed by syncs");
    m->acks = metrics_counter("parley_msgstore_acks_total", "Ack records applied");
    m->acked_from_memory = metrics_counter("parley_msgstore_acked_from_memory_total",
                                           "Acked events applied without reading them back: "
                                           "stored lately by this process (stored.c) and "
                                           "decided by a kept device list");
    m->contact_pairs = metrics_counter("parley_msgstore_contact_pairs_written_total",
                                       "Contact pairs written to the store (contacts.c): pairs "
                                       "its memory of recent pairs did not hold, once per round");
    m->acked_events = metrics_counter("parley_msgstore_acked_events_total",
                                      "Inbox events deleted by acks");
    m->settled = metrics_counter("parley_msgstore_settled_events_total",
                                 "Events acked while held for their store round: never stored");
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
    m->devcache_hits = metrics_counter("parley_msgstore_devices_cache_total{result=\"hit\"}",
                                       "Acked events decided by a kept device list (devcache.c)");
    m->devcache_misses = metrics_counter("parley_msgstore_devices_cache_total{result=\"miss\"}",
                                         "Acked events decided by a list read from the store");
    m->lookup_failures = metrics_counter("parley_msgstore_presence_lookup_failures_total",
                                         "Presence registry lookups that failed");
    m->push_records = metrics_counter("parley_msgstore_push_records_total",
                                      "Push records produced for stored messages and group "
                                      "events (PARLEY_PUSH_URL set)");
    m->swept_inbox = metrics_counter("parley_msgstore_swept_total{what=\"inbox\"}",
                                     "Records removed by the retention sweep");
    m->swept_seen = metrics_counter("parley_msgstore_swept_total{what=\"seen\"}",
                                    "Records removed by the retention sweep");
    m->swept_media = metrics_counter("parley_msgstore_swept_total{what=\"media\"}",
                                     "Records removed by the retention sweep");
#define WAITS(r) metrics_counter("parley_msgstore_ack_waits_total{result=\"" r "\"}", \
                                "Acks that found nothing yet (ackwait.c): kept to retry, then " \
                                "found, expired, or refused when full")
    m->ack_waits = WAITS("waiting");
    m->ack_waits_found = WAITS("found");
    m->ack_waits_expired = WAITS("expired");
    m->ack_waits_full = WAITS("full");
#undef WAITS
    m->acks_late = metrics_counter("parley_msgstore_acks_late_total",
                                   "Acks of events already stored or being stored, applied "
                                   "between batches in slices (ack.c: ack_late)");
    m->ack_commits_held = metrics_gauge("parley_msgstore_ack_commits_held",
                                        "Acks partitions whose commit waits for an ack "
                                        "that waits (ackwait.c)");
#define LAT(op) metrics_histogram("parley_msgstore_store_ms{op=\"" op "\"}", \
                                  "Store call latency, ms", b, PX_ARRAY_LEN(b))
    m->lat_seen_claim = LAT("seen_claim");
    m->lat_put = LAT("inbox_put");
    m->lat_scan = LAT("inbox_scan");
    m->lat_ack = LAT("inbox_ack");
    m->lat_lookup = LAT("presence_lookup");
    m->lat_sweep = LAT("sweep");
    /* Not a call: an ack run's wait for the inbox puts of pushed events
     * (putgate.c), listed with the calls it waits for. */
    m->lat_gate = LAT("ack_gate");
#undef LAT
}

static void main_setup(void *arg)
{
    msgstore *ms = arg;
    service *s = &ms->svc;
    ms->topic_inbox = service_topic(s, "inbox", SERVICE_SUBSCRIBE);
    ms->topic_acks = service_topic(s, "acks", SERVICE_ENSURE); /* acker.c's */
    ms->topic_presence = service_topic(s, "presence", SERVICE_ENSURE);
    ms->topic_receipts = service_topic(s, "receipts", SERVICE_ENSURE);
    ms->topic_groups = service_topic(s, "groups", SERVICE_ENSURE);
    ms->topic_dead = service_topic(s, "dead", SERVICE_ENSURE);
    ms->topic_push = service_topic(s, "push", SERVICE_ENSURE);
    main_metrics(ms);
    batch_init(ms);
}

static int main_start(void *arg, char *err, size_t errlen)
{
    msgstore *ms = arg;
    ms->cache = route_cache_new();
    ms->recent = recent_new(MSGSTORE_RECENT_BITS);
    ms->gate = putgate_new();
    ms->contacts = contacts_new();
    ms->devcache = devcache_new(&ms->m);
    ms->stored = stored_new();
    ms->kept = synckept_new(ms->m.sync_kept_bytes);
    if (sweep_start(ms, err, errlen) != PX_OK || writer_start(ms, err, errlen) != PX_OK)
        return PX_ERROR;
    return acker_start(ms, err, errlen);
}

static void main_started(void *arg, json_t *fields)
{
    const config *cfg = &((msgstore *)arg)->svc.cfg;
    json_object_set_new(fields, "heartbeat_ms", json_integer(cfg->heartbeat_ms));
    json_object_set_new(fields, "presence_cache_ms", json_integer(cfg->presence_ttl_ms));
    json_object_set_new(fields, "presence_online_cache_ms",
                        json_integer(cfg->presence_online_ttl_ms));
    json_object_set_new(fields, "retention_days", json_integer(cfg->retention_days));
    json_object_set_new(fields, "sweep_ms", json_integer(cfg->sweep_ms));
    json_object_set_new(fields, "hold_ms", json_integer(cfg->msgstore_hold_ms));
    json_object_set_new(fields, "push_records", json_boolean(cfg->push_url != NULL));
}

static void main_process(void *arg, bus_msg *msgs, size_t n)
{
    batch_process(arg, msgs, n);
}

/* Commits what the store writer has finished since the last consume; ends
 * the process when the acker's bus failed for good (acks would wait for
 * ever on partitions it holds). */
static void main_tick(void *arg)
{
    msgstore *ms = arg;
    writer_reap(ms);
    if (acker_failed(ms))
        ms->svc.failed = ms->svc.stop = 1;
}

/* The writer, ack and sweep threads use the store: they stop before it
 * closes; the writer commits what it finished before the bus goes. */
static void main_drain(void *arg)
{
    writer_stop(arg);
    acker_stop(arg);
    sweep_stop(arg);
}

int main(void)
{
    static const service_def def = {
        .name = "message-store", .group = MSGSTORE_GROUP, .batch = MSGSTORE_BATCH,
        .consume_wait_ms = MSGSTORE_CONSUME_WAIT_MS, .dr_cb = batch_on_delivery,
        .setup = main_setup, .start = main_start, .started = main_started,
        .process = main_process, .tick = main_tick, .drain = main_drain,
    };
    static msgstore ms;
    int rc = service_run(&ms.svc, &def, &ms);
    writer_free(&ms);
    route_cache_free(ms.cache);
    recent_free(ms.recent);
    putgate_free(ms.gate);
    contacts_free(ms.contacts);
    devcache_free(ms.devcache);
    stored_free(ms.stored);
    synckept_free(ms.kept);
    free(ms.pack);
    return rc;
}
