/* presence: the central connection registry. Consumes parley.presence in the
 * consumer group parley-presence and keeps the store's registry of which
 * gateway (of which boot epoch) holds connections of which user, and when
 * each gateway last beat. Others read it with store_presence_lookup behind
 * their own short-TTL cache. This file owns what is presence's own in its
 * life (service.c runs it): its topics, metrics and the expiry timer;
 * batch.c applies the records, notify.c tells watchers (issue 18). */
#include "common.h"
#include "log.h"
#include "presence.h"
#include "service.h"

#include <jansson.h>

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
    m->notify_changes = metrics_counter("parley_presence_notify_changes_total",
                                        "Presence changes sent to the gateways' watchers");
    m->notify_subs = metrics_counter("parley_presence_notify_subs_total",
                                     "presence_sub commands answered");
    m->notify_dropped = metrics_counter("parley_presence_notify_dropped_total",
                                        "Presence events the bus refused (best effort)");
#define LAT(op) metrics_histogram("parley_presence_store_ms{op=\"" op "\"}", \
                                  "Store call latency, ms", b, PX_ARRAY_LEN(b))
    m->lat_apply = LAT("presence_apply");
    m->lat_beat = LAT("gateway_beat");
    m->lat_expire = LAT("presence_expire");
#undef LAT
}

static void main_setup(void *arg)
{
    presence *p = arg;
    p->topic_presence = service_topic(&p->svc, "presence", SERVICE_SUBSCRIBE);
    p->topic_dead = service_topic(&p->svc, "dead", SERVICE_ENSURE);
    main_metrics(p);
    batch_init(p);
    p->nt = notify_new();
}

static void main_started(void *arg, json_t *fields)
{
    presence *p = arg;
    json_object_set_new(fields, "heartbeat_ms", json_integer(p->svc.cfg.heartbeat_ms));
    p->next_expire_ms = px_mono_ms() + p->svc.cfg.heartbeat_ms;
}

/* Whether every partition this replica owns has been read up to what a
 * few beats ago was written to it: nothing left unread, or the last record
 * read from it under PRESENCE_CATCHUP_BEATS old (what is unread came after
 * it; a live gateway beating there has a beat applied at most one more
 * beat before that, far from the 10 of the cutoff; and a beat that lands
 * while the check asks the brokers, which takes a while on a busy box, is
 * no lag to speak of). Each partition
 * on its own: one partition read up to now says nothing of another that
 * lags, such as one a rebalance just gave this replica with the backlog of
 * a replica that died (under a connect storm, reading behind on a beat's
 * partition wiped every live user's presence). No partition, no claim: a
 * restarted presence waits for its partitions (up to the session timeout
 * of its killed predecessor), and expiring then wiped every live user's
 * presence. */
static int main_caught_up(presence *p)
{
    static bus_lag lags[PRESENCE_MAX_PARTS];
    char err[PX_ERRLEN] = "";
    int64_t fresh = px_now_ms() - PRESENCE_CATCHUP_BEATS * p->svc.cfg.heartbeat_ms;
    int n = bus_lags(p->svc.b, lags, PRESENCE_MAX_PARTS, PRESENCE_LAG_WAIT_MS, err, sizeof(err));
    if (n < 0)
        log_warn("consumer lag unknown; expiry postponed", "{s:s}", "error", err);
    for (int i = 0; i < n; i++) {
        int32_t part = lags[i].partition;
        int64_t read = part >= 0 && part < PRESENCE_MAX_PARTS ? p->read_ts[part] : 0;
        if (lags[i].records != 0 && (lags[i].records < 0 || read < fresh)) {
            log_debug("partition behind; expiry postponed", "{s:i, s:I}", "partition", (int)part,
                      "records", (json_int_t)lags[i].records);
            return 0;
        }
    }
    return n > 0;
}

/* Gateways silent for PRESENCE_EXPIRE_BEATS beats died without saying so:
 * forget their connections. Generous on purpose: expired records are not
 * restored by a later beat, so a live gateway whose beat came late under
 * load would leave its users "offline" (their events waiting for the next
 * sync) until they reconnect, while a dead gateway's records cost only
 * pushes nobody reads. Silent means silent in what presence has read, and
 * so once this replica has caught up on each of its partitions
 * (main_caught_up), and plus twice the bus's session timeout: a partition
 * whose replica died waits unread that long for another to own it (the
 * session to evict the dead one, then a rebalance, seconds more on a busy
 * box), and its beats with it, while this replica (not owning it, so not
 * judging it) would see its gateways silent. A failure only postpones this to the
 * next period. */
static void main_expire(void *arg)
{
    presence *p = arg;
    int64_t now = px_mono_ms();
    if (now < p->next_expire_ms)
        return;
    p->next_expire_ms = now + p->svc.cfg.heartbeat_ms;
    if (!main_caught_up(p))
        return;
    char err[PX_ERRLEN] = "";
    int64_t removed = 0;
    int64_t cutoff = px_now_ms() - PRESENCE_EXPIRE_BEATS * p->svc.cfg.heartbeat_ms -
                     2 * (int64_t)bus_session_ms(p->svc.b);
    int64_t t0 = service_clock_us();
    if (store_presence_expire(p->svc.st, cutoff, &removed, err, sizeof(err)) != PX_OK) {
        log_warn("presence expire failed", "{s:s}", "error", err);
        return;
    }
    service_observe(p->m.lat_expire, t0);
    metric_add(p->m.expired, removed);
    if (removed > 0)
        log_info("expired silent gateways' presence", "{s:I, s:I}", "removed",
                 (json_int_t)removed, "cutoff_ms", (json_int_t)cutoff);
}

/* The registry comes first: while consumes return full batches (a connect
 * storm, a backlog), watchers wait, so routing never lags behind telling
 * who is online; what is dirty is told once presence has caught up. */
static void main_tick(void *arg)
{
    presence *p = arg;
    int busy = p->last_batch >= PRESENCE_BATCH;
    p->last_batch = 0;
    main_expire(p);
    if (!busy)
        notify_tick(p);
}

static void main_process(void *arg, bus_msg *msgs, size_t n)
{
    presence *p = arg;
    for (size_t i = 0; i < n; i++)
        if (msgs[i].partition >= 0 && msgs[i].partition < PRESENCE_MAX_PARTS)
            p->read_ts[msgs[i].partition] = PX_MAX(p->read_ts[msgs[i].partition], msgs[i].ts_ms);
    p->last_batch = n;
    batch_process(p, msgs, n);
}

int main(void)
{
    static const service_def def = {
        .name = "presence", .group = PRESENCE_GROUP, .batch = PRESENCE_BATCH,
        .consume_wait_ms = PRESENCE_CONSUME_WAIT_MS, .dr_cb = batch_on_delivery,
        .setup = main_setup, .started = main_started, .process = main_process,
        .tick = main_tick,
    };
    static presence p;
    int rc = service_run(&p.svc, &def, &p);
    notify_free(p.nt);
    return rc;
}
