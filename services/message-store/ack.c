/* Owns acks and the receipt facts they make. An AckRecord acks the named
 * events for the acking device in the acker's own inbox (every store key
 * names the acker as the owner, so an ack can never touch another user's
 * events): an event every device that needs it has acked is deleted, else
 * the device is marked on it (devices.c says who needs what). Each acked
 * message with a sender becomes a ReceiptFact on parley.receipts keyed by
 * the acker (the reader): DELIVERED for the first device's `ack`, READ for
 * any device's `read` (read implies delivered). A `read` id no longer in
 * the inbox (acked earlier) becomes a READ_CLAIM, which the receipt
 * service resolves from its tracking of (reader, msg_id) -> sender; a
 * claim for a message the reader never received resolves to nothing.
 *
 * A run of consecutive AckRecords of many users is applied together (in
 * parts of ACK_RUN_KEYS ids; the acker consumes up to MSGSTORE_ACK_BATCH
 * records at once, since its store calls cost per user, not per id), in
 * chunks of ACK_CHUNK (user, id) keys: one store read for the whole chunk,
 * the facts, one wait until Kafka holds them (instead of one per user),
 * one delete.
 *
 * Order per chunk: read the events with their marks, then the devices of
 * the users whose kept lists cannot decide for them (devcache.c: a list
 * read after the event was seen stored can), produce the facts, wait until
 * Kafka holds them, and only then delete (and unmark) the events every
 * device has acked and mark the others. Gating the AckRecords' commit alone would not be enough: a retry
 * after the delete finds no events, so facts lost with a crash in between
 * would never be made again. A crash before the delete repeats the facts,
 * which the receipt ids (a hash of msg_id, reader, status) make harmless
 * downstream; a crash after a mark finds it on the retry, which then makes
 * no second `delivered` fact (there would be no harm if it did).
 *
 * An ack whose event is not in the store yet (another message-store
 * process, or a takeover, is still storing it: putgate.c covers only this
 * process's puts) waits in the acker's ackwait.c and is applied the same
 * way, on a retry, once the event is there (ack_retry_due).
 *
 * With a hold (PARLEY_MSGSTORE_HOLD_MS > 0), an ack of an event this
 * process pushed and has not stored yet (held in the putgate, waiting for
 * its store round) is settled without the store when every device that
 * needs the event has acked it in this run: its
 * fact is made from the held event, and once Kafka holds the fact the
 * event is marked settled, which keeps it out of the inbox put (ack_held).
 * A device list read after the event was consumed names every device that
 * needs it (a device linked later needs only later events), so the one
 * read here, or a kept one (devcache.c), decides. An event the writer took
 * meanwhile goes the store's way below (its fact made again: harmless). A
 * crash before the inbox record's commit pushes the event again, and its
 * repeated ack settles it again. Acks of events already stored, or taken
 * by a store round, are applied late, between batches (ack_late), so they
 * do not hold up the acks behind them; only acks of a held event another
 * device still needs, and reads, wait at the gate. */
#include "common.h"
#include "log.h"
#include "msgstore.h"
#include "utf8.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define ACK_CHUNK 1000      /* keys per store call */
#define ACK_RUN_KEYS 4096   /* keys read from a run of records at once */
#define ACK_ID_MAX 255      /* as for inbox event ids */
#define ACK_FLUSH_MS 10000  /* facts must be in Kafka before the delete */
#define ACK_FACT_VERSION 1
#define ACK_GATE_MS 5000    /* longest wait for the puts of pushed events */
#define ACK_DEVS_MAX 32     /* devices acking one event in one chunk, counted */

/* One acked id of one device: what the user asked and when. */
typedef struct ack_entry {
    store_key key;
    const char *dev;       /* the acking device */
    int read;              /* a `read` (any of the run's records) */
    int acked;             /* an `ack` (any of the run's records) */
    int64_t ts_ms;         /* the receipts' time: when the user acked */
    int found;             /* the inbox held it */
    int gone;              /* every device that needs it has acked: delete it */
    int marked;            /* some device had acked it before */
    int64_t seq, ev_ts;    /* the held event's, for its marks */
    int settled;           /* its event was settled before its store round */
    uint64_t run;          /* ack_held: the store round its event is on its way to, or 0 */
    int hurry;             /* ack_held: that round is held, and another device needs it */
    int32_t part;          /* the AckRecord's place in parley.acks (the oldest) */
    int64_t off;
} ack_entry;

/* A held event no kept device list could decide for: decided once its
 * user's devices are read (ack_decide_deferred). */
typedef struct ack_deferred {
    size_t lo, hi;         /* its entries */
    int64_t seq;
    size_t nacked;
    char *acked[STORE_ACKED_MAX]; /* copies of the stored marks */
} ack_deferred;

typedef struct ack_ctx {
    msgstore *ms;
    size_t idx;            /* the run's first record: the facts gate its commit */
    int retry;             /* a retry of waiting acks (ack_retry_due) */
    ack_entry *e;          /* the chunk, sorted by (user, id, dev), no repeats */
    size_t n;
    devices_list *devs;    /* the devices read for the deferred events' users, in user order */
    size_t ndevs;
    ack_deferred *deferred; /* capacity: one per entry */
    size_t ndeferred;
    size_t held, facts;
    /* ack_held: the latest run whose store round an entry waits for, and
     * whether one of those is still held (pending, not just storing). */
    uint64_t gate_run;
    int gate_hurry;
    char err[PX_ERRLEN];   /* a produce error from inside the store callback */
} ack_ctx;

/* By (user, id): the entries of one event, whichever device. */
static int ack_event_cmp(const void *a, const void *b)
{
    const ack_entry *x = a, *y = b;
    int c = strcmp(x->key.user, y->key.user);
    return c != 0 ? c : strcmp(x->key.id, y->key.id);
}

static int ack_entry_cmp(const void *a, const void *b)
{
    int c = ack_event_cmp(a, b);
    return c != 0 ? c : strcmp(((const ack_entry *)a)->dev, ((const ack_entry *)b)->dev);
}


static int ack_fact(ack_ctx *c, const ack_entry *e, Parley__ReceiptFact__Status status,
                    const char *sender, const char *group)
{
    msgstore *ms = c->ms;
    Parley__ReceiptFact f = PARLEY__RECEIPT_FACT__INIT;
    f.version = ACK_FACT_VERSION;
    f.status = status;
    f.msg_id = (char *)e->key.id;
    f.reader = (char *)e->key.user;
    f.sender = (char *)(sender != NULL ? sender : "");
    f.group = (char *)(group != NULL ? group : "");
    f.ts_ms = e->ts_ms;
    size_t len = parley__receipt_fact__get_packed_size(&f);
    if (len > ms->pack_cap) {
        ms->pack_cap = PX_MAX(len, 2 * ms->pack_cap);
        ms->pack = px_realloc(ms->pack, ms->pack_cap);
    }
    parley__receipt_fact__pack(&f, ms->pack);
    int rc = batch_produce(ms, ms->topic_receipts, e->key.user, strlen(e->key.user), ms->pack,
                           len, batch_tag_for(ms, c->idx), c->err, sizeof(c->err));
    if (rc == PX_OK)
        c->facts++;
    return rc;
}

/* The chunk's entries of the event (user, id): [*lo, *hi), or 0. */
static int ack_range(ack_ctx *c, const char *user, const char *id, size_t *lo, size_t *hi)
{
    ack_entry probe = { .key = { user, id } };
    const ack_entry *e = bsearch(&probe, c->e, c->n, sizeof(*c->e), ack_event_cmp);
    if (e == NULL)
        return 0;
    size_t a = (size_t)(e - c->e), b = a + 1;
    while (a > 0 && ack_event_cmp(&c->e[a - 1], e) == 0)
        a--;
    while (b < c->n && ack_event_cmp(&c->e[b], e) == 0)
        b++;
    *lo = a;
    *hi = b;
    return 1;
}

/* The fact of an acked message: READ if any of its entries reads, else
 * DELIVERED when no device had acked it before (nacked: the first one's
 * ack is the delivery; later ones repeat nothing). */
static int ack_message_fact(ack_ctx *c, size_t lo, size_t hi, size_t nacked, const char *sender,
                            const char *group)
{
    const ack_entry *r = NULL;
    for (size_t i = lo; i < hi && r == NULL; i++)
        if (c->e[i].read)
            r = &c->e[i];
    if (r == NULL && nacked > 0)
        return PX_OK;
    metric_add(c->ms->m.acked_messages, 1);
    return ack_fact(c, r != NULL ? r : &c->e[lo],
                    r != NULL ? PARLEY__RECEIPT_FACT__STATUS__STATUS_READ
                              : PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED,
                    sender, group);
}

/* The acking devices of entries [lo, hi), at most ACK_DEVS_MAX. */
static size_t ack_now(const ack_ctx *c, size_t lo, size_t hi, const char **now)
{
    size_t nnow = 0;
    for (size_t i = lo; i < hi && nnow < ACK_DEVS_MAX; i++)
        now[nnow++] = c->e[i].dev;
    return nnow;
}

static void ack_defer(ack_ctx *c, const store_event *ev, size_t lo, size_t hi)
{
    ack_deferred *d = &c->deferred[c->ndeferred++];
    d->lo = lo;
    d->hi = hi;
    d->seq = ev->seq;
    d->nacked = ev->nacked;
    for (size_t i = 0; i < ev->nacked; i++)
        d->acked[i] = px_strdup(ev->acked[i]);
}

/* One held event of the chunk: remember it was there, whether this ack
 * completes it (now, or once its user's devices are read), and make the
 * fact of an acked message. */
static int ack_on_held(void *arg, const store_event *ev)
{
    ack_ctx *c = arg;
    size_t lo, hi;
    if (!ack_range(c, ev->user, ev->id, &lo, &hi) || c->e[lo].found)
        return PX_OK;
    const char *now[ACK_DEVS_MAX];
    size_t nnow = ack_now(c, lo, hi, now);
    int gone = 0;
    if (!devcache_covered(c->ms->devcache, ev->user, ev->seq, ev->acked, ev->nacked, now, nnow,
                          &gone))
        ack_defer(c, ev, lo, hi);
    for (size_t i = lo; i < hi; i++) {
        c->e[i].found = 1;
        c->e[i].gone = gone;
        c->e[i].marked = ev->nacked > 0;
        c->e[i].seq = ev->seq;
        c->e[i].ev_ts = ev->ts_ms;
    }
    c->held++;
    if (ev->kind != STORE_MESSAGE || ev->sender == NULL)
        return PX_OK;
    char *group = stored_group_of(ev);
    int rc = ack_message_fact(c, lo, hi, ev->nacked, ev->sender, group);
    free(group);
    return rc;
}

/* How ack_known_user found a user's events. */
enum ack_known_how {
    ACK_KNOWN,       /* applied from memory */
    ACK_UNKNOWN,     /* some event not remembered, or one other devices still need */
    ACK_UNDECIDED,   /* all remembered, some beyond what the kept device list decides */
};

/* The events of one user's entries [a, b) when this process stored each
 * of them lately and a kept device list says this chunk's acks complete
 * each: found and gone, their facts made, no store read (stored.c says why
 * that is safe). All or nothing per user: a user read from the store costs
 * one query for all their events anyway. *upto: the highest seq of them;
 * fresh: the user's device list was read for this chunk (a cache miss). */
static int ack_known_user(ack_ctx *c, size_t a, size_t b, int fresh, size_t *known,
                          enum ack_known_how *how, int64_t *upto)
{
    const char *user = c->e[a].key.user;
    size_t nev = 0;
    for (size_t i = a; i < b; i++)
        nev += i == a || ack_event_cmp(&c->e[i - 1], &c->e[i]) != 0;
    stored_event *sev = px_calloc(nev, sizeof(*sev));
    size_t *at = px_malloc((nev + 1) * sizeof(*at)); /* where each event's entries start */
    size_t k = 0;
    *how = ACK_KNOWN;
    *upto = -1;
    for (size_t lo = a; lo < b && *how != ACK_UNKNOWN; k++) {
        size_t hi = lo + 1;
        while (hi < b && ack_event_cmp(&c->e[lo], &c->e[hi]) == 0)
            hi++;
        const char *now[ACK_DEVS_MAX];
        size_t nnow = ack_now(c, lo, hi, now);
        int gone = 0;
        at[k] = lo;
        if (!stored_get(c->ms->stored, user, c->e[lo].key.id, &sev[k]))
            *how = ACK_UNKNOWN;
        else if (!devcache_lookup(c->ms->devcache, user, sev[k].seq, NULL, 0, now, nnow, &gone))
            *how = ACK_UNDECIDED;
        else if (!gone)
            *how = ACK_UNKNOWN;
        *upto = PX_MAX(*upto, sev[k].seq);
        lo = hi;
    }
    at[k] = b;
    int rc = PX_OK;
    for (size_t j = 0; j < k && *how == ACK_KNOWN && rc == PX_OK; j++) {
        for (size_t i = at[j]; i < at[j + 1]; i++) {
            c->e[i].found = c->e[i].gone = 1;
            c->e[i].marked = 0;
            c->e[i].seq = sev[j].seq;
        }
        c->held++;
        (*known)++;
        /* Counted here, once: a user who goes the store's way is counted there. */
        metric_add(fresh ? c->ms->m.devcache_misses : c->ms->m.devcache_hits, 1);
        if (sev[j].kind == STORE_MESSAGE && sev[j].sender != NULL)
            rc = ack_message_fact(c, at[j], at[j + 1], 0, sev[j].sender, sev[j].group);
    }
    for (size_t j = 0; j < nev; j++)
        stored_event_clear(&sev[j]);
    free(sev);
    free(at);
    return rc;
}

/* A user whose events are all remembered but not all decided: their
 * devices are read (one query, instead of reading the events and their
 * marks too), kept, and the user is tried again. */
typedef struct ack_undecided {
    size_t a, b;
    int64_t upto;
} ack_undecided;

/* The chunk's users whose acks memory can apply (ack_known_user). */
static int ack_known(ack_ctx *c, char *err, size_t errlen)
{
    size_t known = 0, nu = 0;
    ack_undecided *u = px_malloc((c->n + 1) * sizeof(*u));
    enum ack_known_how how;
    int64_t upto;
    int rc = PX_OK;
    for (size_t a = 0; a < c->n && rc == PX_OK;) {
        size_t b = a + 1;
        while (b < c->n && strcmp(c->e[b].key.user, c->e[a].key.user) == 0)
            b++;
        rc = ack_known_user(c, a, b, 0, &known, &how, &upto);
        if (how == ACK_UNDECIDED)
            u[nu++] = (ack_undecided){ a, b, upto };
        a = b;
    }
    uint64_t *epoch = px_malloc((nu + 1) * sizeof(*epoch));
    for (size_t i = 0; i < nu; i++) {
        c->devs[i].user = c->e[u[i].a].key.user;
        epoch[i] = devcache_epoch(c->ms->devcache, c->devs[i].user);
    }
    if (rc == PX_OK && nu > 0)
        rc = devices_load(c->ms, c->devs, nu, err, errlen);
    for (size_t i = 0; i < nu && rc == PX_OK; i++) {
        devcache_put(c->ms->devcache, &c->devs[i], u[i].upto, epoch[i]);
        rc = ack_known_user(c, u[i].a, u[i].b, 1, &known, &how, &upto);
    }
    metric_add(c->ms->m.acked_from_memory, (int64_t)known);
    free(epoch);
    free(u);
    return rc;
}

/* `read` ids the inbox no longer holds: claims for the receipt service. */
static int ack_claims(ack_ctx *c)
{
    for (size_t i = 0; i < c->n; i++)
        if (c->e[i].read && !c->e[i].found &&
            ack_fact(c, &c->e[i], PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM, NULL, NULL) !=
                PX_OK)
            return PX_ERROR;
    return PX_OK;
}

/* Waits until every fact of the chunk is acknowledged by Kafka. */
static int ack_facts_durable(ack_ctx *c, char *err, size_t errlen)
{
    msgstore *ms = c->ms;
    if (c->facts == 0)
        return PX_OK;
    if (bus_flush(ms->svc.b, ACK_FLUSH_MS) != PX_OK)
        return px_err(err, errlen, "receipt facts not acknowledged within %d ms", ACK_FLUSH_MS);
    if (ms->failed_at <= c->idx)
        return px_err(err, errlen, "receipt facts not accepted by the bus");
    return PX_OK;
}

/* Deletes the held events of the chunk that every device has acked now,
 * then the marks of those that had some. */
static int ack_delete(ack_ctx *c, char *err, size_t errlen)
{
    store_key *keys = px_malloc(c->n * sizeof(*keys));
    store_key *marked = px_malloc(c->n * sizeof(*marked));
    size_t k = 0, km = 0;
    for (size_t i = 0; i < c->n; i++)
        if (c->e[i].found && c->e[i].gone &&
            (i == 0 || ack_event_cmp(&c->e[i - 1], &c->e[i]) != 0)) {
            keys[k++] = c->e[i].key;
            if (c->e[i].marked)
                marked[km++] = c->e[i].key;
        }
    int64_t t0 = service_clock_us();
    int rc = k > 0 ? store_inbox_delete(c->ms->svc.st, keys, k, NULL, err, errlen) : PX_OK;
    if (rc == PX_OK)
        stored_forget(c->ms->stored, keys, k);
    if (rc == PX_OK && km > 0)
        rc = store_inbox_unmark(c->ms->svc.st, marked, km, err, errlen);
    service_observe(c->ms->m.lat_ack, t0);
    free(keys);
    free(marked);
    return rc;
}

static int ack_mark_cmp(const void *a, const void *b)
{
    return strcmp(((const ack_entry *const *)a)[0]->dev, ((const ack_entry *const *)b)[0]->dev);
}

/* Marks the acking devices on the held events other devices still need:
 * one store call per device. */
static int ack_mark(ack_ctx *c, char *err, size_t errlen)
{
    const ack_entry **m = px_malloc(c->n * sizeof(*m));
    store_event *ev = px_calloc(c->n, sizeof(*ev));
    size_t nm = 0;
    int rc = PX_OK;
    for (size_t i = 0; i < c->n; i++)
        if (c->e[i].found && !c->e[i].gone)
            m[nm++] = &c->e[i];
    qsort(m, nm, sizeof(*m), ack_mark_cmp);
    for (size_t a = 0; a < nm && rc == PX_OK;) {
        size_t b = a;
        while (b < nm && strcmp(m[b]->dev, m[a]->dev) == 0) {
            ev[b - a] = (store_event){ .user = m[b]->key.user, .id = m[b]->key.id,
                                       .seq = m[b]->seq, .ts_ms = m[b]->ev_ts };
            b++;
        }
        rc = store_inbox_mark(c->ms->svc.st, ev, b - a, m[a]->dev, err, errlen);
        a = b;
    }
    free(ev);
    free(m);
    return rc;
}

static int ack_deferred_cmp(const void *a, const void *b)
{
    size_t x = ((const ack_deferred *)a)->lo, y = ((const ack_deferred *)b)->lo;
    return (x > y) - (x < y);
}

/* The highest seq of the events this chunk found stored for the user of
 * entry at (entries are in user order). */
static int64_t ack_upto(const ack_ctx *c, size_t at)
{
    const char *user = c->e[at].key.user;
    size_t a = at;
    while (a > 0 && strcmp(c->e[a - 1].key.user, user) == 0)
        a--;
    int64_t upto = -1;
    for (size_t i = a; i < c->n && strcmp(c->e[i].key.user, user) == 0; i++)
        if (c->e[i].found)
            upto = PX_MAX(upto, c->e[i].seq);
    return upto;
}

/* Reads the devices of the deferred events' users (the events were read
 * first, so each list may be kept for them: devcache.c) and decides them. */
static int ack_decide_deferred(ack_ctx *c, char *err, size_t errlen)
{
    c->ndevs = 0;
    if (c->ndeferred == 0)
        return PX_OK;
    /* In entry order, which is user order. */
    qsort(c->deferred, c->ndeferred, sizeof(*c->deferred), ack_deferred_cmp);
    size_t *at = px_malloc(c->ndeferred * sizeof(*at)); /* an entry of each list's user */
    uint64_t *epoch = px_malloc(c->ndeferred * sizeof(*epoch));
    for (size_t i = 0; i < c->ndeferred; i++) {
        const char *user = c->e[c->deferred[i].lo].key.user;
        if (c->ndevs == 0 || strcmp(c->devs[c->ndevs - 1].user, user) != 0) {
            at[c->ndevs] = c->deferred[i].lo;
            epoch[c->ndevs] = devcache_epoch(c->ms->devcache, user);
            c->devs[c->ndevs++].user = user;
        }
    }
    int rc = devices_load(c->ms, c->devs, c->ndevs, err, errlen);
    for (size_t i = 0; i < c->ndevs && rc == PX_OK; i++)
        devcache_put(c->ms->devcache, &c->devs[i], ack_upto(c, at[i]), epoch[i]);
    free(epoch);
    free(at);
    if (rc != PX_OK)
        return rc;
    for (size_t i = 0; i < c->ndeferred; i++) {
        const ack_deferred *d = &c->deferred[i];
        const devices_list *l = devices_find(c->devs, c->ndevs, c->e[d->lo].key.user);
        const char *now[ACK_DEVS_MAX];
        size_t nnow = ack_now(c, d->lo, d->hi, now);
        int gone = l == NULL || devices_covered(l, d->seq, (const char *const *)d->acked,
                                                d->nacked, now, nnow);
        for (size_t k = d->lo; k < d->hi; k++)
            c->e[k].gone = gone;
    }
    return PX_OK;
}

static void ack_deferred_clear(ack_ctx *c)
{
    for (size_t i = 0; i < c->ndeferred; i++)
        for (size_t k = 0; k < c->deferred[i].nacked; k++)
            free(c->deferred[i].acked[k]);
    c->ndeferred = 0;
}

static int ack_chunk(ack_ctx *c, char *err, size_t errlen)
{
    msgstore *ms = c->ms;
    store_key *keys = px_malloc(c->n * sizeof(*keys));
    for (size_t i = 0; i < c->n; i++)
        c->e[i].found = c->e[i].gone = 0;
    c->held = c->facts = 0;
    c->err[0] = '\0';
    int rc = ack_known(c, err, errlen);
    size_t nk = 0;
    for (size_t i = 0; i < c->n; i++)
        if (!c->e[i].found)
            keys[nk++] = c->e[i].key;
    int64_t t0 = service_clock_us();
    if (rc == PX_OK && nk > 0)
        rc = store_inbox_get(ms->svc.st, keys, nk, ack_on_held, c, err, errlen);
    if (rc == PX_OK)
        rc = ack_decide_deferred(c, err, errlen);
    ack_deferred_clear(c);
    service_observe(ms->m.lat_ack, t0);
    free(keys);
    /* Claims again on every retry of a waiting read: the event may have been
     * acked and deleted meanwhile by another process, whose DELIVERED fact
     * now precedes this claim and lets it resolve. */
    if (rc == PX_OK)
        rc = ack_claims(c);
    if (rc != PX_OK && c->err[0] != '\0')
        px_err(err, errlen, "%s", c->err);
    if (rc == PX_OK)
        rc = ack_facts_durable(c, err, errlen);
    /* Nothing held, nothing to delete: duplicate acks and late reads cost
     * one read, not two. */
    if (rc == PX_OK && c->held > 0)
        rc = ack_delete(c, err, errlen);
    if (rc == PX_OK && c->held > 0)
        rc = ack_mark(c, err, errlen);
    if (rc == PX_OK)
        metric_add(ms->m.acked_events, (int64_t)c->held);
    for (size_t i = 0; i < c->n && rc != PX_OK; i++)
        c->e[i].found = 0; /* not applied: nothing counts as found */
    return rc;
}

/* After a chunk was applied: the ids found are remembered as applied;
 * on a first attempt, an ack not found waits (ackwait.c) for the event to
 * be stored by whoever is storing it. A `read` alone not found already made
 * its claim, which resolves when the event was acked before; it marks an
 * ack of the same id waiting here read, and else waits itself unless this
 * acker applied that id lately (the usual read after the ack: no wait). */
static void ack_note_outcome(ack_ctx *c)
{
    ackwait *w = c->ms->waits;
    for (size_t i = 0; i < c->n && w != NULL; i++) {
        const ack_entry *x = &c->e[i];
        if (x->found)
            ackwait_applied(w, x->key.user, x->key.id);
        else if (c->retry)
            continue;
        else if (x->acked || (!ackwait_note_read(w, x->key.user, x->key.id, x->ts_ms) &&
                              !ackwait_was_applied(w, x->key.user, x->key.id)))
            ackwait_add(w, x->key.user, x->key.id, x->dev, x->read, x->ts_ms, x->part, x->off,
                        0);
    }
}

/* One event of the run held in the putgate: what its fact needs, copied
 * under the gate's lock, and whether this run's devices cover it. */
typedef struct ack_held_ev {
    size_t lo, hi;         /* its entries */
    int64_t seq;
    int kind;
    char *sender, *group;  /* owned */
    int covered;           /* -1: undecided yet */
    uint64_t run;          /* its putgate run */
} ack_held_ev;

static void ack_held_copy(void *arg, const store_event *ev)
{
    ack_held_ev *h = arg;
    h->seq = ev->seq;
    h->kind = ev->kind;
    h->sender = ev->sender != NULL ? px_strdup(ev->sender) : NULL;
    h->group = stored_group_of(ev);
}

/* Decides the held events no kept list could, with one devices read for
 * their users (in entry order, which is user order). */
static int ack_held_devices(ack_ctx *c, ack_held_ev *h, size_t nh, char *err, size_t errlen)
{
    const char *last = NULL;
    size_t nl = 0;
    for (size_t i = 0; i < nh; i++)
        if (h[i].covered < 0 && (last == NULL || strcmp(last, c->e[h[i].lo].key.user) != 0)) {
            last = c->e[h[i].lo].key.user;
            nl++;
        }
    if (nl == 0)
        return PX_OK;
    devices_list *l = px_calloc(nl, sizeof(*l)); /* ~2.7 KiB each: only the users read */
    uint64_t *epoch = px_malloc(nl * sizeof(*epoch));
    nl = 0;
    for (size_t i = 0; i < nh; i++)
        if (h[i].covered < 0 &&
            (nl == 0 || strcmp(l[nl - 1].user, c->e[h[i].lo].key.user) != 0)) {
            epoch[nl] = devcache_epoch(c->ms->devcache, c->e[h[i].lo].key.user);
            l[nl++].user = c->e[h[i].lo].key.user;
        }
    int rc = devices_load(c->ms, l, nl, err, errlen);
    for (size_t i = 0; i < nh && rc == PX_OK; i++) {
        if (h[i].covered >= 0)
            continue;
        const devices_list *d = devices_find(l, nl, c->e[h[i].lo].key.user);
        const char *now[ACK_DEVS_MAX];
        size_t nnow = ack_now(c, h[i].lo, h[i].hi, now);
        h[i].covered = d != NULL && devices_covered(d, h[i].seq, NULL, 0, now, nnow);
    }
    /* Read after every one of these events was consumed: good for them. */
    for (size_t k = 0; k < nl && rc == PX_OK; k++) {
        int64_t upto = -1;
        for (size_t i = 0; i < nh; i++)
            if (strcmp(c->e[h[i].lo].key.user, l[k].user) == 0)
                upto = PX_MAX(upto, h[i].seq);
        devcache_put(c->ms->devcache, &l[k], upto, epoch[k]);
    }
    free(epoch);
    free(l);
    return rc;
}

/* The held events of the run (c->e, c->n) that its devices cover get their
 * facts, and once Kafka holds them are settled; their entries get settled.
 * *gate: some entry's event is on its way to the store (pending but not
 * covered, or taken by a store round): the store path must wait for it. */
static int ack_held(ack_ctx *c, int *gate, char *err, size_t errlen)
{
    msgstore *ms = c->ms;
    ack_held_ev *h = px_calloc(c->n + 1, sizeof(*h));
    size_t nh = 0;
    *gate = 0;
    for (size_t lo = 0, hi; lo < c->n; lo = hi) {
        for (hi = lo + 1; hi < c->n && ack_event_cmp(&c->e[hi], &c->e[lo]) == 0; hi++)
            ;
        uint64_t run = 0;
        enum putgate_state st = putgate_find(ms->gate, c->e[lo].key.user, c->e[lo].key.id,
                                             &run, ack_held_copy, &h[nh]);
        if (st == PUTGATE_STORING) {
            *gate = 1;
            c->gate_run = PX_MAX(c->gate_run, run);
            for (size_t i = lo; i < hi; i++)
                c->e[i].run = run;
        }
        for (size_t i = lo; i < hi && st == PUTGATE_SETTLED; i++)
            c->e[i].settled = !c->e[i].read; /* a later read claims (receipt.c resolves it) */
        if (st != PUTGATE_PENDING)
            continue;
        const char *now[ACK_DEVS_MAX];
        size_t nnow = ack_now(c, lo, hi, now);
        int gone = 0;
        h[nh].lo = lo;
        h[nh].hi = hi;
        h[nh].run = run;
        h[nh].covered = devcache_covered(ms->devcache, c->e[lo].key.user, h[nh].seq, NULL, 0,
                                         now, nnow, &gone) ? gone : -1;
        nh++;
    }
    c->facts = 0;
    c->err[0] = '\0';
    int rc = ack_held_devices(c, h, nh, err, errlen);
    for (size_t i = 0; i < nh && rc == PX_OK; i++)
        if (h[i].covered && h[i].kind == STORE_MESSAGE && h[i].sender != NULL)
            rc = ack_message_fact(c, h[i].lo, h[i].hi, 0, h[i].sender, h[i].group);
    if (rc != PX_OK && c->err[0] != '\0')
        px_err(err, errlen, "%s", c->err);
    if (rc == PX_OK)
        rc = ack_facts_durable(c, err, errlen);
    for (size_t i = 0; i < nh && rc == PX_OK; i++) {
        const ack_entry *x = &c->e[h[i].lo];
        if (!h[i].covered || !putgate_settle(ms->gate, x->key.user, x->key.id)) {
            *gate = 1; /* another device needs it, or a round took it: the store's way */
            c->gate_run = PX_MAX(c->gate_run, h[i].run);
            c->gate_hurry |= !h[i].covered; /* still held: its round must not wait */
            for (size_t k = h[i].lo; k < h[i].hi; k++) {
                c->e[k].run = h[i].run;
                c->e[k].hurry = !h[i].covered;
            }
            continue;
        }
        for (size_t k = h[i].lo; k < h[i].hi; k++)
            c->e[k].settled = 1;
        if (ms->waits != NULL)
            ackwait_applied(ms->waits, x->key.user, x->key.id);
    }
    for (size_t i = 0; i < nh; i++) {
        free(h[i].sender);
        free(h[i].group);
    }
    free(h);
    return rc;
}

/* Drops the settled entries of e[0..k); returns how many are left. */
static size_t ack_unsettled(ack_entry *e, size_t k)
{
    size_t n = 0;
    for (size_t i = 0; i < k; i++)
        if (!e[i].settled)
            e[n++] = e[i];
    return n;
}

/* Applies the sorted, unique entries e[0..k) chunk by chunk; on a first
 * attempt, what was not found may wait. On failure the entries of the chunk
 * that failed and of those after it read as not found. */
static int ack_chunks(ack_ctx *c, ack_entry *e, size_t k, char *err, size_t errlen)
{
    int rc = PX_OK;
    c->devs = px_calloc(PX_MIN((size_t)ACK_CHUNK, k) + 1, sizeof(*c->devs));
    c->deferred = px_malloc((PX_MIN((size_t)ACK_CHUNK, k) + 1) * sizeof(*c->deferred));
    for (size_t off = 0; off < k && rc == PX_OK; off += ACK_CHUNK) {
        c->e = e + off;
        c->n = PX_MIN((size_t)ACK_CHUNK, k - off);
        rc = ack_chunk(c, err, errlen);
        if (rc == PX_OK)
            ack_note_outcome(c);
    }
    free(c->devs);
    free(c->deferred);
    return rc;
}

/* After ack_held: the acks of events already stored, or taken by a store
 * round, are applied later (ackwait.c keeps them, due at once, and holds
 * their records' commits; ack_retry_due applies ACK_CHUNK of them between
 * batches). On the store's way an ack costs a read and a delete under
 * the store's lock (FerretDB: per user), and a run of them kept the
 * acker behind the hold for good: every ack that came after found its
 * event written too, and the acker stayed there (one of three parleyd
 * runs at 10,000/s for 20 s: p99 4 s, 8,800 delivered/s). Applied after
 * the batch, they no longer hold up the acks behind them, whose events
 * are still held and settle. What stays: reads (a read mostly finds its event deleted, and
 * its claim must not wait), acks of a held event another device still
 * needs (its round is hurried and waited for, so the first device's
 * receipt does not wait for the hold), and late acks past ACKWAIT_MAX.
 * Returns what stays in e and sets the gate's wait for it. */
static size_t ack_late(ack_ctx *c, ack_entry *e, size_t k, int *gate)
{
    ackwait *w = c->ms->waits;
    size_t n = 0;
    *gate = 0;
    c->gate_run = 0;
    c->gate_hurry = 0;
    for (size_t i = 0; i < k; i++) {
        const ack_entry *x = &e[i];
        if (w != NULL && x->acked && !x->hurry &&
            ackwait_add(w, x->key.user, x->key.id, x->dev, x->read, x->ts_ms, x->part, x->off,
                        1) == PX_OK)
            continue;
        e[n++] = *x;
        if (x->run > 0) {
            *gate = 1;
            c->gate_run = PX_MAX(c->gate_run, x->run);
            c->gate_hurry |= x->hurry;
        }
    }
    return n;
}

/* Sorts by (user, id, dev) and merges repeats: a client may name an id twice,
 * and an id both acked and read is read (read implies delivered), at the
 * latest time. Returns the new count. */
static size_t ack_unique(ack_entry *e, size_t n)
{
    if (n == 0)
        return 0;
    qsort(e, n, sizeof(*e), ack_entry_cmp);
    size_t k = 1;
    for (size_t i = 1; i < n; i++) {
        ack_entry *last = &e[k - 1];
        if (ack_entry_cmp(&e[i], last) != 0) {
            e[k++] = e[i];
            continue;
        }
        last->read |= e[i].read;
        last->acked |= e[i].acked;
        last->ts_ms = PX_MAX(last->ts_ms, e[i].ts_ms);
        last->off = PX_MIN(last->off, e[i].off);
    }
    return k;
}

/* Only ids that could name a stored event go to the store: an empty or
 * non-UTF-8 id matches nothing anyway, and the store would refuse the whole
 * call for it on every retry. Appends to e; returns the new count. */
static size_t ack_entries(const Parley__AckRecord *r, const bus_msg *m, ack_entry *e, size_t n)
{
    int64_t ts = r->ts_ms > 0 ? r->ts_ms : px_now_ms();
    for (size_t i = 0; i < r->n_ids; i++) {
        size_t len = strlen(r->ids[i]);
        if (len > 0 && len <= ACK_ID_MAX && utf8_valid((const unsigned char *)r->ids[i], len))
            e[n++] = (ack_entry){ .key = { r->user, r->ids[i] }, .dev = devices_name(r->device),
                                  .read = r->read != 0, .acked = r->read == 0, .ts_ms = ts,
                                  .part = m->partition, .off = m->offset };
    }
    return n;
}

/* Every step is idempotent, so a retried run is harmless. The facts of the
 * whole part gate its first record's commit: nothing from there on commits
 * until they are durable. */
static int ack_apply_part(msgstore *ms, size_t idx, msgstore_rec *recs, size_t n, char *err,
                          size_t errlen)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += recs[i].u.ack->n_ids;
    ack_entry *e = px_calloc(total + 1, sizeof(*e));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        k = ack_entries(recs[i].u.ack, recs[i].m, e, k);
        metric_add(ms->m.acks, 1);
    }
    k = ack_unique(e, k);
    ack_ctx c = { .ms = ms, .idx = idx, .e = e, .n = k };
    /* Without a hold the writer takes events at once and what is held is
     * mostly being stored: every ack waits at the gate, as before. */
    int gate = 1, rc = PX_OK;
    if (ms->svc.cfg.msgstore_hold_ms > 0) {
        rc = ack_held(&c, &gate, err, errlen);
        k = ack_unsettled(e, k);
        if (rc == PX_OK)
            k = ack_late(&c, e, k, &gate);
    }
    /* What is left and was pushed before its put waits for it (one store
     * round trip at most, off the delivery path). A gate that does not
     * open in time means the inbox consumer is retrying a failing store:
     * go on, an ack whose event is not found yet waits (ackwait.c). */
    if (rc == PX_OK && gate && k > 0) {
        int64_t t0 = service_clock_us();
        int held = ms->svc.cfg.msgstore_hold_ms > 0;
        if (putgate_wait(ms->gate, held ? c.gate_run : 0, held ? c.gate_hurry : 1,
                         ACK_GATE_MS) != PX_OK)
            log_warn("acks applied before the inbox puts they follow", "{s:i}", "waited_ms",
                     ACK_GATE_MS);
        service_observe(ms->m.lat_gate, t0);
    }
    if (rc == PX_OK && k > 0)
        rc = ack_chunks(&c, e, k, err, errlen);
    free(e);
    return rc;
}

/* In parts of at most ACK_RUN_KEYS ids (a record alone may carry more), so
 * a run of a whole consumed batch costs bounded memory. */
int ack_apply_run(msgstore *ms, size_t idx, msgstore_rec *recs, size_t n, char *err,
                  size_t errlen)
{
    int rc = PX_OK;
    for (size_t i = 0; i < n && rc == PX_OK;) {
        size_t j = i + 1, keys = recs[i].u.ack->n_ids;
        while (j < n && keys + recs[j].u.ack->n_ids <= ACK_RUN_KEYS)
            keys += recs[j++].u.ack->n_ids;
        rc = ack_apply_part(ms, idx + i, recs + i, j - i, err, errlen);
        i = j;
    }
    return rc;
}

void ack_retry_due(msgstore *ms)
{
    int64_t now = px_mono_ms();
    size_t n;
    ackwait_report(ms->waits, now);
    ackwait_entry *due = ackwait_take(ms->waits, now, ACK_CHUNK, &n);
    if (n == 0) {
        ackwait_taken_free(due, n);
        return;
    }
    ack_entry *e = px_calloc(n, sizeof(*e));
    int *found = px_calloc(n, sizeof(*found));
    for (size_t i = 0; i < n; i++)
        e[i] = (ack_entry){ .key = { due[i].user, due[i].id }, .dev = due[i].dev,
                            .read = due[i].read, .acked = 1, .ts_ms = due[i].ts_ms };
    /* Outside any batch: record 0's tags only carry the facts' reports. */
    ms->first_durable = ms->failed_at = SIZE_MAX;
    ack_ctx c = { .ms = ms, .idx = 0, .retry = 1 };
    char err[PX_ERRLEN] = "";
    if (ack_chunks(&c, e, n, err, sizeof(err)) != PX_OK)
        log_warn("retry of waiting acks failed; trying again later", "{s:s, s:I}", "error", err,
                 "waiting", (json_int_t)n);
    /* One applied meanwhile by another ack or read of its id (a `read`
     * right after a late ack that waited for its store round) has nothing
     * left to do: it leaves as found instead of retrying for ACKWAIT_MS. */
    for (size_t i = 0; i < n; i++)
        found[i] = e[i].found || ackwait_was_applied(ms->waits, e[i].key.user, e[i].key.id);
    free(e);
    ackwait_settle(ms->waits, due, n, found, now); /* the acker recommits what left */
    free(found);
}
