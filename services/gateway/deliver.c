/* Owns the gateway's two Kafka-facing threads: the poll thread serves
 * delivery reports (which answer `sent`) and beats presence; the consume
 * thread reads this gateway's delivery topic and hands each event to the
 * worker that holds the connection (a consumed batch's mails to one worker
 * in one hand-over). Deliveries are pushes of inbox state
 * that message-store keeps until acked, so they are committed once handed
 * over: a lost push is repaired by the next sync, never lost. */
#include "common.h"
#include "gateway.h"
#include "log.h"
#include "parley.pb-c.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DELIVER_BATCH 256
#define DELIVER_MAX_CONNS 64 /* connections of one user on one gateway */

/* This gateway is its delivery topic's only reader, so holding none of it
 * is never right; this long after the last look, its group is joined
 * again (bus_resubscribe). The first join takes ~3 s. */
#define DELIVER_REJOIN_MS 20000

static pthread_t deliver_poll_th, deliver_consume_th;
static int deliver_started;

/* *empty_since: when the gateway was first seen holding none of its
 * topic (0: it holds some). */
static void deliver_check_assigned(gw *g, int64_t now, int64_t *empty_since)
{
    if (bus_assigned(g->b) > 0) {
        *empty_since = 0;
        return;
    }
    if (*empty_since == 0)
        *empty_since = now;
    if (now - *empty_since < DELIVER_REJOIN_MS)
        return;
    char err[PX_ERRLEN] = "";
    int rc = bus_resubscribe(g->b, err, sizeof(err));
    log_warn("none of the delivery topic assigned; joining its group again", "{s:I, s:s}",
             "after_ms", (json_int_t)(now - *empty_since), "error", rc == PX_OK ? "" : err);
    *empty_since = now;
}

static void *deliver_poll_main(void *arg)
{
    gw *g = arg;
    px_thread_name("gw-deliv-poll");
    int64_t next_beat = 0, empty_since = 0;
    while (!g->stopping) {
        int64_t now = px_mono_ms();
        if (now >= next_beat) {
            commands_heartbeat(g, 0);
            deliver_check_assigned(g, now, &empty_since);
            next_beat = now + g->cfg.heartbeat_ms;
        }
        bus_poll(g->b, 50);
    }
    return NULL;
}

/* The mails of one consumed batch, per worker, handed over together. */
typedef struct deliver_out {
    mail **head, **tail;
} deliver_out;

static void deliver_add(gw *g, deliver_out *o, mail *m)
{
    size_t i = CONN_WORKER(m->conn_id) % g->nworkers;
    if (o->tail[i] != NULL)
        o->tail[i]->next = m;
    else
        o->head[i] = m;
    o->tail[i] = m;
}

static void deliver_to_conn(gw *g, deliver_out *o, uint64_t conn_id, const Parley__Delivery *d)
{
    enum mail_kind kind = d->conn != 0 ? MAIL_EVENT : MAIL_LIVE;
    int seqs = d->n_seqs == d->n_events_json;
    for (size_t i = 0; i < d->n_events_json; i++) {
        mail *m = mail_new_skip(kind, conn_id, d->events_json[i].data, d->events_json[i].len,
                                i < d->n_skip_devices ? d->skip_devices[i] : NULL);
        m->seq = seqs && d->seqs[i] >= 0 ? d->seqs[i] : -1;
        deliver_add(g, o, m);
    }
    if (d->synced)
        deliver_add(g, o, mail_new(MAIL_SYNCED, conn_id, NULL, 0));
    if (d->more_from_seq > 0) {
        mail *m = mail_new(MAIL_SYNC_MORE, conn_id, NULL, 0);
        m->from_seq = d->more_from_seq;
        deliver_add(g, o, m);
    }
}

/* watch.c's emit: a presence event for one watcher, in the batch's mails. */
typedef struct deliver_ctx {
    gw *g;
    deliver_out *o;
} deliver_ctx;

static void deliver_watcher(void *arg, uint64_t conn_id, const char *json, size_t len)
{
    deliver_ctx *x = arg;
    deliver_add(x->g, x->o, mail_new(MAIL_EVENT, conn_id, json, len));
}

/* Presence (issue 18): a change of d->user for its watchers here, or the
 * answer to a presence_sub (its events first, then what it makes ready). */
static void deliver_presence(gw *g, deliver_out *o, const Parley__Delivery *d)
{
    deliver_ctx x = { g, o };
    if (d->to_watchers) {
        for (size_t i = 0; i < d->n_events_json; i++)
            watch_change(g->watch, d->user, d->presence_ts,
                         (const char *)d->events_json[i].data, d->events_json[i].len,
                         deliver_watcher, &x);
        return;
    }
    deliver_to_conn(g, o, d->conn, d);
    watch_answer(g->watch, d->conn, d->watch, d->n_watch, d->unwatch, d->n_unwatch,
                 d->presence_ts, deliver_watcher, &x);
}

static void deliver_one(gw *g, deliver_out *o, const bus_msg *bm)
{
    Parley__Delivery *d = parley__delivery__unpack(NULL, bm->len, bm->value);
    if (d == NULL || d->version != 1 || d->user == NULL) {
        log_warn("undecodable delivery dropped", "{s:I}", "offset", (long long)bm->offset);
        if (d != NULL)
            parley__delivery__free_unpacked(d, NULL);
        return;
    }
    if (d->to_watchers || d->n_watch > 0 || d->n_unwatch > 0) {
        deliver_presence(g, o, d);
    } else if (d->close_device[0] != '\0') {
        uint64_t ids[DELIVER_MAX_CONNS];
        size_t n = registry_get(g->reg, d->user, ids, DELIVER_MAX_CONNS);
        for (size_t i = 0; i < n; i++)
            deliver_add(g, o, mail_new(MAIL_UNLINKED, ids[i], d->close_device,
                                       strlen(d->close_device)));
    } else if (d->conn != 0) {
        deliver_to_conn(g, o, d->conn, d);
    } else {
        uint64_t ids[DELIVER_MAX_CONNS];
        size_t n = registry_get(g->reg, d->user, ids, DELIVER_MAX_CONNS);
        for (size_t i = 0; i < n; i++)
            deliver_to_conn(g, o, ids[i], d);
    }
    parley__delivery__free_unpacked(d, NULL);
}

static void *deliver_consume_main(void *arg)
{
    gw *g = arg;
    bus_msg msgs[DELIVER_BATCH];
    px_thread_name("gw-deliver");
    char err[PX_ERRLEN];
    deliver_out o = { px_calloc(g->nworkers, sizeof(mail *)),
                      px_calloc(g->nworkers, sizeof(mail *)) };
    metric *age = bus_age_histogram("gateway");
    while (!g->stopping) {
        int n = bus_consume(g->b, msgs, DELIVER_BATCH, 100, err, sizeof(err));
        if (n < 0 && bus_failed(g->b)) {
            /* Every send would be answered `unavailable` for good: stop,
             * to be restarted (clients reconnect to another gateway). */
            log_error("the bus failed for good; stopping, to be restarted", "{s:s}", "error",
                      err);
            g->failed = 1;
            kill(getpid(), SIGTERM);
            break;
        }
        if (n < 0) {
            log_error("delivery consumer failed", "{s:s}", "error", err);
            continue;
        }
        bus_observe_age(age, msgs, (size_t)n);
        for (int i = 0; i < n; i++)
            deliver_one(g, &o, &msgs[i]);
        for (size_t i = 0; i < g->nworkers; i++) {
            worker_post_chain(g->workers[i], o.head[i]);
            o.head[i] = o.tail[i] = NULL;
        }
        if (n > 0) {
            bus_commit(g->b, msgs, (size_t)n);
            bus_release(g->b, msgs, (size_t)n);
        }
    }
    free(o.head);
    free(o.tail);
    return NULL;
}

int deliver_start(gw *g, char *err, size_t errlen)
{
    const char *topics[] = { g->topic_deliver };
    if (bus_subscribe(g->b, topics, 1, err, errlen) != PX_OK)
        return PX_ERROR;
    if (commands_heartbeat(g, 1) != PX_OK)
        return px_err(err, errlen, "could not produce the presence reset");
    if (pthread_create(&deliver_poll_th, NULL, deliver_poll_main, g) != 0 ||
        pthread_create(&deliver_consume_th, NULL, deliver_consume_main, g) != 0)
        return px_err(err, errlen, "could not start delivery threads");
    deliver_started = 1;
    return PX_OK;
}

/* Called after g->stopping is set. */
void deliver_stop(gw *g)
{
    if (!deliver_started)
        return;
    bus_wakeup(g->b);
    pthread_join(deliver_consume_th, NULL);
    pthread_join(deliver_poll_th, NULL);
}
