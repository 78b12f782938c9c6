/* Owns presence to contacts (issue 18) on the presence side: telling the
 * gateways when a user's online state changes, answering a connection's
 * presence_sub with the state of each user it asks for, and the hide
 * setting.
 *
 * Changes. After a run of connects and disconnects is applied, each of its
 * users is marked dirty; the tick re-reads the dirty users' state from the
 * registry (online: any connection record left) and, for those whose state
 * differs from what was last told, records last seen (going offline) and
 * sends a `presence` event to every live gateway (a Delivery with
 * to_watchers set on parley.gw.<id>), which passes it to the connections
 * watching that user. Damping: a user is told at most once per
 * NOTIFY_DAMP_MS; a change inside that window waits for its end and is
 * re-read then, so a connection that flaps costs its watchers at most one
 * event a second and the last one is the true state. A gateway that dies
 * loses its connection records at store_presence_expire (possibly run by
 * another presence instance), so every heartbeat period the users last told
 * online are re-read as well. The memory of what was told is per instance
 * and lost on restart: a user is then told again at its next change (a
 * repeat a watcher ignores). Delivery is best effort, like a live push:
 * a lost event is corrected by the next change or a new presence_sub.
 *
 * Privacy is decided at presence_sub: only users who share a contacts
 * record with the subscriber (message-store writes them) are watched; the
 * others are answered exactly as a user never seen is, and the gateway
 * never passes their changes on. */
#include "common.h"
#include "log.h"
#include "presence.h"
#include "parley.pb-c.h"
#include "protocol.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NOTIFY_DAMP_MS 1000
#define NOTIFY_BUCKETS 4096
#define NOTIFY_EVAL_MAX 256       /* users re-read per store call */
#define NOTIFY_MAX_GWS 1024
#define NOTIFY_SWEEP_MS 10000     /* forgetting users told offline */

typedef struct nt_user {
    struct nt_user *next;
    int told;          /* a state was sent since this process started */
    int online;        /* the state last sent */
    int dirty;         /* in the dirty list: re-read and tell if changed */
    int force;         /* tell even if unchanged (the hide setting changed) */
    int64_t told_ms;   /* monotonic */
    char user[];
} nt_user;

struct notify {
    nt_user *buckets[NOTIFY_BUCKETS];
    nt_user **dirty;
    size_t ndirty, cap;
    char (*gws)[65];                /* live gateways, re-read every heartbeat */
    size_t ngws;
    int64_t gws_ms, recheck_ms, sweep_ms;  /* monotonic */
    int64_t stamp;                  /* the last presence_ts given */
};

notify *notify_new(void)
{
    notify *nt = px_calloc(1, sizeof(*nt));
    nt->gws = px_calloc(NOTIFY_MAX_GWS, sizeof(*nt->gws));
    return nt;
}

void notify_free(notify *nt)
{
    if (nt == NULL)
        return;
    for (size_t i = 0; i < NOTIFY_BUCKETS; i++)
        for (nt_user *u = nt->buckets[i], *next; u != NULL; u = next) {
            next = u->next;
            free(u);
        }
    free(nt->dirty);
    free(nt->gws);
    free(nt);
}

static nt_user *notify_get(notify *nt, const char *user)
{
    nt_user **pp = &nt->buckets[px_hash(user) % NOTIFY_BUCKETS];
    for (; *pp != NULL; pp = &(*pp)->next)
        if (strcmp((*pp)->user, user) == 0)
            return *pp;
    size_t n = strlen(user);
    nt_user *u = px_calloc(1, sizeof(*u) + n + 1);
    memcpy(u->user, user, n + 1);
    *pp = u;
    return u;
}

static void notify_mark(notify *nt, nt_user *u, int force)
{
    u->force |= force;
    if (u->dirty)
        return;
    if (nt->ndirty == nt->cap) {
        nt->cap = nt->cap ? nt->cap * 2 : 64;
        nt->dirty = px_realloc(nt->dirty, nt->cap * sizeof(*nt->dirty));
    }
    u->dirty = 1;
    nt->dirty[nt->ndirty++] = u;
}

void notify_touch(presence *p, const char *user, int force)
{
    notify_mark(p->nt, notify_get(p->nt, user), force);
}

/* A Delivery's presence_ts: wall-clock microseconds, strictly increasing
 * in this process, so a gateway never sees two of its events as equal (it
 * passes on only what is newer: an answer and a change read in the same
 * millisecond were a lost change); across instances the clocks order them. */
static int64_t notify_stamp(notify *nt)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    int64_t us = (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
    nt->stamp = us > nt->stamp ? us : nt->stamp + 1;
    return nt->stamp;
}

/* ---- producing ---- */

static void notify_produce(presence *p, const char *gateway, const Parley__Delivery *d)
{
    char topic[SERVICE_TOPIC_LEN + 80], err[PX_ERRLEN];
    size_t len = parley__delivery__get_packed_size(d);
    uint8_t *buf = px_malloc(len);
    parley__delivery__pack(d, buf);
    snprintf(topic, sizeof(topic), "%sgw.%s", p->svc.cfg.topic_prefix, gateway);
    if (bus_produce(p->svc.b, topic, d->user, strlen(d->user), buf, len, NULL, err,
                    sizeof(err)) != PX_OK)
        metric_add(p->m.notify_dropped, 1);
    free(buf);
}

/* The live gateways, read again once a heartbeat period. A failed read
 * keeps the last list. */
static void notify_gateways(presence *p)
{
    notify *nt = p->nt;
    int64_t now = px_mono_ms();
    if (nt->gws_ms != 0 && now - nt->gws_ms < p->svc.cfg.heartbeat_ms)
        return;
    char err[PX_ERRLEN] = "";
    size_t n = 0;
    int64_t alive = px_now_ms() - PRESENCE_EXPIRE_BEATS * p->svc.cfg.heartbeat_ms;
    if (store_gateway_list(p->svc.st, alive, nt->gws, NOTIFY_MAX_GWS, &n, err, sizeof(err)) !=
        PX_OK) {
        log_warn("gateway list failed", "{s:s}", "error", err);
        return;
    }
    nt->ngws = n;
    nt->gws_ms = now;
}

/* What watchers see of s, read at ts_ms: last_seen is now while online,
 * the stored time once offline, 0 when hidden or unknown. */
static char *notify_render(const char *user, const store_user_presence *s, int64_t ts_ms,
                           size_t *len)
{
    int64_t seen = s->hide_last_seen ? 0 : s->online ? ts_ms : s->last_seen;
    return proto_render_presence(user, s->online, seen, len);
}

static void notify_tell(presence *p, const char *user, const store_user_presence *s,
                        int64_t ts_ms, int64_t stamp)
{
    size_t len;
    char *json = notify_render(user, s, ts_ms, &len);
    ProtobufCBinaryData ev = { len, (uint8_t *)json };
    Parley__Delivery d = PARLEY__DELIVERY__INIT;
    d.version = 1;
    d.user = (char *)user;
    d.to_watchers = 1;
    d.presence_ts = stamp;
    d.events_json = &ev;
    d.n_events_json = 1;
    notify_gateways(p);
    for (size_t i = 0; i < p->nt->ngws; i++)
        notify_produce(p, p->nt->gws[i], &d);
    metric_add(p->m.notify_changes, 1);
    free(json);
}

/* ---- changes ---- */

/* Re-reads us[0..n) and tells the gateways about those whose state moved
 * from what was told (or who were never told, or forced). Users going
 * offline get their last seen first. On a store failure they stay dirty. */
static int notify_eval(presence *p, nt_user **us, size_t n, char *err, size_t errlen)
{
    const char **names = px_malloc(n * sizeof(*names));
    const char **gone = px_malloc(n * sizeof(*gone));
    store_user_presence *s = px_calloc(n, sizeof(*s));
    size_t ngone = 0;
    for (size_t i = 0; i < n; i++)
        names[i] = us[i]->user;
    int64_t now = px_now_ms(), stamp = notify_stamp(p->nt); /* before the read */
    int rc = store_presence_state(p->svc.st, names, n, s, err, errlen);
    for (size_t i = 0; rc == PX_OK && i < n; i++)
        if (!s[i].online && (!us[i]->told || us[i]->online))
            gone[ngone++] = names[i];
    if (rc == PX_OK && ngone > 0)
        rc = store_last_seen_put(p->svc.st, gone, ngone, now, err, errlen);
    for (size_t i = 0; rc == PX_OK && i < n; i++) {
        nt_user *u = us[i];
        int changed = !u->told || u->online != s[i].online || u->force;
        if (changed) {
            if (!s[i].online && (!u->told || u->online))
                s[i].last_seen = now;
            notify_tell(p, u->user, &s[i], now, stamp);
            u->told = 1;
            u->online = s[i].online;
            u->told_ms = px_mono_ms();
        }
        u->force = 0;
    }
    free(names);
    free(gone);
    free(s);
    return rc;
}

/* Takes from the dirty list up to NOTIFY_EVAL_MAX users whose damping
 * window has passed (the others stay) and evaluates them. */
static void notify_changes(presence *p)
{
    notify *nt = p->nt;
    nt_user *due[NOTIFY_EVAL_MAX];
    size_t n = 0, keep = 0;
    int64_t now = px_mono_ms();
    for (size_t i = 0; i < nt->ndirty; i++) {
        nt_user *u = nt->dirty[i];
        if (n < NOTIFY_EVAL_MAX && (!u->told || now - u->told_ms >= NOTIFY_DAMP_MS)) {
            due[n++] = u;
            u->dirty = 0;
        } else {
            nt->dirty[keep++] = u;
        }
    }
    nt->ndirty = keep;
    if (n == 0)
        return;
    char err[PX_ERRLEN] = "";
    if (notify_eval(p, due, n, err, sizeof(err)) == PX_OK)
        return;
    log_warn("presence notify failed; retrying", "{s:s}", "error", err);
    for (size_t i = 0; i < n; i++)
        notify_mark(nt, due[i], 0);
}

/* Every heartbeat period: the users told online are read again (their
 * gateway may have died), and those told offline a while ago are
 * forgotten, so the memory follows the online users. */
static void notify_periodic(presence *p)
{
    notify *nt = p->nt;
    int64_t now = px_mono_ms();
    int recheck = now - nt->recheck_ms >= p->svc.cfg.heartbeat_ms;
    int sweep = now - nt->sweep_ms >= NOTIFY_SWEEP_MS;
    if (!recheck && !sweep)
        return;
    if (recheck)
        nt->recheck_ms = now;
    if (sweep)
        nt->sweep_ms = now;
    for (size_t i = 0; i < NOTIFY_BUCKETS; i++) {
        nt_user **pp = &nt->buckets[i];
        while (*pp != NULL) {
            nt_user *u = *pp;
            if (sweep && !u->dirty && u->told && !u->online &&
                now - u->told_ms >= NOTIFY_DAMP_MS) {
                *pp = u->next;
                free(u);
                continue;
            }
            if (recheck && u->told && u->online)
                notify_mark(nt, u, 0);
            pp = &u->next;
        }
    }
}

void notify_tick(presence *p)
{
    notify_periodic(p);
    notify_changes(p);
}

/* ---- presence_sub and settings ---- */

/* Answers x (a SUBSCRIBE) on its connection: one `presence` event per
 * user asked for, the real state of contacts and the never-seen state of
 * anyone else, and which users the gateway may pass changes of on. */
int notify_subscribe(presence *p, const Parley__PresenceRecord *x, char *err, size_t errlen)
{
    size_t n = x->n_users, nok = 0, nno = 0;
    int *is = px_calloc(n > 0 ? n : 1, sizeof(*is));
    char **ok = px_malloc((n > 0 ? n : 1) * sizeof(*ok));
    char **no = px_malloc((n > 0 ? n : 1) * sizeof(*no));
    store_user_presence *s = px_calloc(n > 0 ? n : 1, sizeof(*s));
    ProtobufCBinaryData *ev = px_calloc(n > 0 ? n : 1, sizeof(*ev));
    int64_t ts = px_now_ms(), stamp = notify_stamp(p->nt); /* before the read */
    int rc = store_contacts_check(p->svc.st, x->user, (const char *const *)x->users, n, is, err,
                                  errlen);
    for (size_t i = 0; rc == PX_OK && i < n; i++) {
        if (is[i])
            ok[nok++] = x->users[i];
        else
            no[nno++] = x->users[i];
    }
    if (rc == PX_OK)
        rc = store_presence_state(p->svc.st, (const char *const *)ok, nok, s, err, errlen);
    if (rc != PX_OK)
        goto out;
    const store_user_presence never = { 0 };
    for (size_t i = 0, j = 0; i < n; i++) {
        const store_user_presence *st = is[i] ? &s[j++] : &never;
        ev[i].data = (uint8_t *)notify_render(x->users[i], st, ts, &ev[i].len);
    }
    Parley__Delivery d = PARLEY__DELIVERY__INIT;
    d.version = 1;
    d.user = x->user;
    d.conn = x->conn;
    d.presence_ts = stamp;
    d.events_json = ev;
    d.n_events_json = n;
    d.watch = ok;
    d.n_watch = nok;
    d.unwatch = no;
    d.n_unwatch = nno;
    notify_produce(p, x->gateway, &d);
    metric_add(p->m.notify_subs, 1);
out:
    for (size_t i = 0; i < n; i++)
        free(ev[i].data);
    free(ev);
    free(s);
    free(no);
    free(ok);
    free(is);
    return rc;
}

/* Applies x (a SETTINGS), answers its connection and tells the watchers
 * (forced: the online state is the same, what they see of it is not). A
 * query only reads the setting for the answer. */
int notify_settings(presence *p, const Parley__PresenceRecord *x, char *err, size_t errlen)
{
    store_user_presence s = { .hide_last_seen = x->hide_last_seen };
    const char *user = x->user;
    int rc = x->query ? store_presence_state(p->svc.st, &user, 1, &s, err, errlen)
                      : store_presence_hide(p->svc.st, x->user, x->hide_last_seen, err, errlen);
    if (rc != PX_OK)
        return PX_ERROR;
    size_t len;
    char *json = proto_render_presence_settings(x->ref, s.hide_last_seen, &len);
    ProtobufCBinaryData ev = { len, (uint8_t *)json };
    Parley__Delivery d = PARLEY__DELIVERY__INIT;
    d.version = 1;
    d.user = x->user;
    d.conn = x->conn;
    d.events_json = &ev;
    d.n_events_json = 1;
    notify_produce(p, x->gateway, &d);
    free(json);
    if (!x->query)
        notify_touch(p, x->user, 1);
    return PX_OK;
}
