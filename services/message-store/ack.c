/* Owns acks and the receipt facts they make. An AckRecord deletes the named
 * events from the acker's own inbox (every store key names the acker as the
 * owner, so an ack can never touch another user's events). Each acked
 * message with a sender becomes a ReceiptFact on parley.receipts keyed by
 * the acker (the reader): DELIVERED for an `ack`, READ for a `read` (read
 * implies delivered). A `read` id no longer in the inbox (acked earlier)
 * becomes a READ_CLAIM, which the receipt service resolves from its
 * tracking of (reader, msg_id) -> sender; a claim for a message the reader
 * never received resolves to nothing.
 *
 * A run of consecutive AckRecords of many users is applied together, in
 * chunks of ACK_CHUNK (user, id) keys: one store read for the whole chunk,
 * the facts, one wait until Kafka holds them (instead of one per user),
 * one delete.
 *
 * Order per chunk: read the events, produce the facts, wait until Kafka
 * holds them, and only then delete. Gating the AckRecords' commit alone
 * would not be enough: a retry after the delete finds no events, so facts
 * lost with a crash in between would never be made again. A crash before
 * the delete repeats the facts, which the receipt ids (a hash of msg_id,
 * reader, status) make harmless downstream. */
#include "common.h"
#include "log.h"
#include "msgstore.h"
#include "utf8.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define ACK_CHUNK 1000      /* keys per store call */
#define ACK_ID_MAX 255      /* as for inbox event ids */
#define ACK_GROUP_MAX 255   /* a group id read back from an event */
#define ACK_FLUSH_MS 10000  /* facts must be in Kafka before the delete */
#define ACK_FACT_VERSION 1
#define ACK_GATE_MS 5000    /* longest wait for the puts of pushed events */

/* One acked id: what the user asked and when. */
typedef struct ack_entry {
    store_key key;
    int read;              /* a `read` (any of the run's records) */
    int64_t ts_ms;         /* the receipts' time: when the user acked */
    int found;             /* the inbox held it */
} ack_entry;

typedef struct ack_ctx {
    msgstore *ms;
    size_t idx;            /* the run's first record: the facts gate its commit */
    ack_entry *e;          /* the chunk, sorted by (user, id), no repeats */
    size_t n;
    size_t held, facts;
    char err[PX_ERRLEN];   /* a produce error from inside the store callback */
} ack_ctx;

static int ack_entry_cmp(const void *a, const void *b)
{
    const ack_entry *x = a, *y = b;
    int c = strcmp(x->key.user, y->key.user);
    return c != 0 ? c : strcmp(x->key.id, y->key.id);
}

/* The group of a group message, read from its event text (the inbox keeps
 * no separate field); NULL for a 1:1 message. Caller frees. */
static char *ack_group_of(const store_event *ev)
{
    char *group = NULL;
    if (memmem(ev->json, ev->json_len, "\"group\"", 7) == NULL)
        return NULL;
    json_t *o = json_loadb(ev->json, ev->json_len, 0, NULL);
    const char *g = json_string_value(json_object_get(o, "group"));
    if (g != NULL && g[0] != '\0' && strlen(g) <= ACK_GROUP_MAX)
        group = px_strdup(g);
    json_decref(o);
    return group;
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

/* One held event of the chunk: remember it was there, and make the fact
 * of an acked message. */
static int ack_on_held(void *arg, const store_event *ev)
{
    ack_ctx *c = arg;
    ack_entry probe = { .key = { ev->user, ev->id } };
    ack_entry *e = bsearch(&probe, c->e, c->n, sizeof(*c->e), ack_entry_cmp);
    if (e == NULL || e->found)
        return PX_OK;
    e->found = 1;
    c->held++;
    if (ev->kind != STORE_MESSAGE || ev->sender == NULL)
        return PX_OK;
    metric_add(c->ms->m.acked_messages, 1);
    char *group = ack_group_of(ev);
    int rc = ack_fact(c, e, e->read ? PARLEY__RECEIPT_FACT__STATUS__STATUS_READ
                                    : PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED,
                      ev->sender, group);
    free(group);
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

/* Deletes the held events of the chunk. */
static int ack_delete(ack_ctx *c, char *err, size_t errlen)
{
    store_key *keys = px_malloc(c->held * sizeof(*keys));
    size_t k = 0;
    for (size_t i = 0; i < c->n; i++)
        if (c->e[i].found)
            keys[k++] = c->e[i].key;
    int64_t t0 = service_clock_us();
    int rc = store_inbox_delete(c->ms->svc.st, keys, k, NULL, err, errlen);
    service_observe(c->ms->m.lat_ack, t0);
    free(keys);
    return rc;
}

static int ack_chunk(ack_ctx *c, char *err, size_t errlen)
{
    msgstore *ms = c->ms;
    store_key *keys = px_malloc(c->n * sizeof(*keys));
    for (size_t i = 0; i < c->n; i++) {
        keys[i] = c->e[i].key;
        c->e[i].found = 0;
    }
    c->held = c->facts = 0;
    c->err[0] = '\0';
    int64_t t0 = service_clock_us();
    int rc = store_inbox_get(ms->svc.st, keys, c->n, ack_on_held, c, err, errlen);
    service_observe(ms->m.lat_ack, t0);
    free(keys);
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
    if (rc == PX_OK)
        metric_add(ms->m.acked_events, (int64_t)c->held);
    return rc;
}

/* Sorts by (user, id) and merges repeats: a client may name an id twice,
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
        last->ts_ms = PX_MAX(last->ts_ms, e[i].ts_ms);
    }
    return k;
}

/* Only ids that could name a stored event go to the store: an empty or
 * non-UTF-8 id matches nothing anyway, and the store would refuse the whole
 * call for it on every retry. Appends to e; returns the new count. */
static size_t ack_entries(const Parley__AckRecord *r, ack_entry *e, size_t n)
{
    int64_t ts = r->ts_ms > 0 ? r->ts_ms : px_now_ms();
    for (size_t i = 0; i < r->n_ids; i++) {
        size_t len = strlen(r->ids[i]);
        if (len > 0 && len <= ACK_ID_MAX && utf8_valid((const unsigned char *)r->ids[i], len))
            e[n++] = (ack_entry){ .key = { r->user, r->ids[i] }, .read = r->read != 0,
                                  .ts_ms = ts };
    }
    return n;
}

/* Every step is idempotent, so a retried run is harmless. The facts of the
 * whole run gate its first record's commit: nothing from there on commits
 * until they are durable. */
int ack_apply_run(msgstore *ms, size_t idx, msgstore_rec *recs, size_t n, char *err,
                  size_t errlen)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += recs[i].u.ack->n_ids;
    ack_entry *e = px_calloc(total + 1, sizeof(*e));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        k = ack_entries(recs[i].u.ack, e, k);
        metric_add(ms->m.acks, 1);
    }
    k = ack_unique(e, k);
    /* The events acked here were pushed before their puts; wait for those
     * (one store round trip at most, off the delivery path). A gate that
     * does not open in time means the inbox consumer is retrying a failing
     * store: go on, an event not found yet comes again at the next sync. */
    int64_t t0 = service_clock_us();
    if (putgate_wait(ms->gate, ACK_GATE_MS) != PX_OK)
        log_warn("acks applied before the inbox puts they follow", "{s:i}", "waited_ms",
                 ACK_GATE_MS);
    service_observe(ms->m.lat_gate, t0);
    int rc = PX_OK;
    ack_ctx c = { .ms = ms, .idx = idx };
    for (size_t off = 0; off < k && rc == PX_OK; off += ACK_CHUNK) {
        c.e = e + off;
        c.n = PX_MIN((size_t)ACK_CHUNK, k - off);
        rc = ack_chunk(&c, err, errlen);
    }
    free(e);
    return rc;
}
