/* Owns acks and the receipt facts they make. An AckRecord deletes the named
 * events from the acker's own inbox (the store matches on (user, id), so an
 * ack can never touch another user's events). Each acked message with a
 * sender becomes a ReceiptFact on parley.receipts keyed by the acker (the
 * reader): DELIVERED for an `ack`, READ for a `read` (read implies
 * delivered). A `read` id no longer in the inbox (acked earlier) becomes a
 * READ_CLAIM, which the receipt service resolves from its tracking of
 * (reader, msg_id) -> sender; a claim for a message the reader never
 * received resolves to nothing.
 *
 * Order per chunk of ids: read the events (store_inbox_get), produce the
 * facts, wait until Kafka holds them, and only then delete. Gating the
 * AckRecord's commit alone would not be enough: a retry after the delete
 * finds no events, so facts lost with a crash in between would never be
 * made again. A crash before the delete repeats the facts, which the
 * receipt ids (a hash of msg_id, reader, status) make harmless downstream. */
#include "common.h"
#include "msgstore.h"
#include "utf8.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define ACK_CHUNK 1000      /* ids per store call (PROTO_MAX_IDS per command) */
#define ACK_ID_MAX 255      /* as for inbox event ids */
#define ACK_GROUP_MAX 255   /* a group id read back from an event */
#define ACK_FLUSH_MS 10000  /* facts must be in Kafka before the delete */
#define ACK_FACT_VERSION 1

typedef struct ack_ctx {
    msgstore *ms;
    size_t idx;            /* batch record whose commit the facts gate */
    const char *user;
    int read;
    int64_t ts_ms;         /* the receipts' time: when the user acked */
    const char **ids;      /* the chunk: sorted, no repeats */
    size_t n;
    char *found;           /* per id: the inbox held it */
    size_t held, facts;
    char err[PX_ERRLEN];   /* a produce error from inside the store callback */
} ack_ctx;

static int ack_id_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
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

static int ack_fact(ack_ctx *c, Parley__ReceiptFact__Status status, const char *msg_id,
                    const char *sender, const char *group)
{
    msgstore *ms = c->ms;
    Parley__ReceiptFact f = PARLEY__RECEIPT_FACT__INIT;
    f.version = ACK_FACT_VERSION;
    f.status = status;
    f.msg_id = (char *)msg_id;
    f.reader = (char *)c->user;
    f.sender = (char *)(sender != NULL ? sender : "");
    f.group = (char *)(group != NULL ? group : "");
    f.ts_ms = c->ts_ms;
    size_t len = parley__receipt_fact__get_packed_size(&f);
    if (len > ms->pack_cap) {
        ms->pack_cap = PX_MAX(len, 2 * ms->pack_cap);
        ms->pack = px_realloc(ms->pack, ms->pack_cap);
    }
    parley__receipt_fact__pack(&f, ms->pack);
    int rc = batch_produce(ms, ms->topic_receipts, c->user, strlen(c->user), ms->pack, len,
                           batch_tag_for(ms, c->idx), c->err, sizeof(c->err));
    if (rc == PX_OK)
        c->facts++;
    return rc;
}

/* One held event of the chunk: remember it was there, and make the fact
 * of an acked message. */
static int ack_on_held(void *arg, const store_event *ev)
{
    ack_ctx *c = arg;
    const char **hit = bsearch(&ev->id, c->ids, c->n, sizeof(*c->ids), ack_id_cmp);
    if (hit != NULL)
        c->found[hit - c->ids] = 1;
    c->held++;
    if (ev->kind != STORE_MESSAGE || ev->sender == NULL)
        return PX_OK;
    metric_add(c->ms->m.acked_messages, 1);
    char *group = ack_group_of(ev);
    int rc = ack_fact(c, c->read ? PARLEY__RECEIPT_FACT__STATUS__STATUS_READ
                                 : PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED,
                      ev->id, ev->sender, group);
    free(group);
    return rc;
}

/* A `read` of ids the inbox no longer holds: claims for the receipt service. */
static int ack_claims(ack_ctx *c)
{
    for (size_t i = 0; i < c->n; i++)
        if (!c->found[i] &&
            ack_fact(c, PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM, c->ids[i], NULL, NULL) !=
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
    if (bus_flush(ms->b, ACK_FLUSH_MS) != PX_OK)
        return px_err(err, errlen, "receipt facts not acknowledged within %d ms", ACK_FLUSH_MS);
    if (ms->failed_at <= c->idx)
        return px_err(err, errlen, "receipt facts not accepted by the bus");
    return PX_OK;
}

static int ack_chunk(ack_ctx *c, char *err, size_t errlen)
{
    msgstore *ms = c->ms;
    int rc = PX_ERROR;
    c->found = px_calloc(c->n, 1);
    c->held = c->facts = 0;
    c->err[0] = '\0';
    int64_t t0 = msgstore_clock_us();
    rc = store_inbox_get(ms->st, c->user, c->ids, c->n, ack_on_held, c, err, errlen);
    msgstore_observe(ms->m.lat_ack, t0);
    if (rc == PX_OK && c->read)
        rc = ack_claims(c);
    if (rc != PX_OK && c->err[0] != '\0')
        px_err(err, errlen, "%s", c->err);
    if (rc == PX_OK)
        rc = ack_facts_durable(c, err, errlen);
    /* Nothing held, nothing to delete: duplicate acks and late reads cost
     * one read, not two. */
    if (rc == PX_OK && c->held > 0) {
        t0 = msgstore_clock_us();
        rc = store_inbox_ack(ms->st, c->user, c->ids, c->n, NULL, NULL, err, errlen);
        msgstore_observe(ms->m.lat_ack, t0);
    }
    if (rc == PX_OK)
        metric_add(ms->m.acked_events, (int64_t)c->held);
    free(c->found);
    c->found = NULL;
    return rc;
}

/* Sorts ids and drops repeats (a client may name an id twice, and merged
 * records often do); returns the new count. */
static size_t ack_unique(const char **ids, size_t n)
{
    if (n == 0)
        return 0;
    qsort(ids, n, sizeof(*ids), ack_id_cmp);
    size_t k = 1;
    for (size_t i = 1; i < n; i++)
        if (strcmp(ids[i], ids[k - 1]) != 0)
            ids[k++] = ids[i];
    return k;
}

/* Only ids that could name a stored event go to the store: an empty or
 * non-UTF-8 id matches nothing anyway, and the store would refuse the whole
 * call for it on every retry. Appends to ids; returns the new count. */
static size_t ack_usable_ids(const Parley__AckRecord *r, const char **ids, size_t n)
{
    for (size_t i = 0; i < r->n_ids; i++) {
        size_t len = strlen(r->ids[i]);
        if (len > 0 && len <= ACK_ID_MAX && utf8_valid((const unsigned char *)r->ids[i], len))
            ids[n++] = r->ids[i];
    }
    return n;
}

static int ack_same(const Parley__AckRecord *a, const Parley__AckRecord *b)
{
    return strcmp(a->user, b->user) == 0 && (a->read != 0) == (b->read != 0);
}

/* Applies the ids of one (user, read) group in chunks of ACK_CHUNK. */
static int ack_group(ack_ctx *c, const char **ids, size_t n, char *err, size_t errlen)
{
    n = ack_unique(ids, n);
    for (size_t off = 0; off < n; off += ACK_CHUNK) {
        c->ids = ids + off;
        c->n = PX_MIN((size_t)ACK_CHUNK, n - off);
        if (ack_chunk(c, err, errlen) != PX_OK)
            return PX_ERROR;
    }
    return PX_OK;
}

/* A run of consecutive AckRecords is applied as one group per (user, read):
 * clients ack one event at a time, and the store's cost is per call, not
 * per id. Every step is idempotent, so a retried run is harmless. */
int ack_apply_run(msgstore *ms, size_t idx, msgstore_rec *recs, size_t n, char *err,
                  size_t errlen)
{
    int rc = PX_OK;
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += recs[i].u.ack->n_ids;
    const char **ids = px_calloc(total + 1, sizeof(*ids));
    char *done = px_calloc(n, 1);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        if (done[i])
            continue;
        const Parley__AckRecord *r = recs[i].u.ack;
        /* The group's facts gate record idx + i, the group's first: nothing
         * from there on commits until they are durable. */
        ack_ctx c = { .ms = ms, .idx = idx + i, .user = r->user, .read = r->read != 0 };
        size_t k = 0;
        for (size_t j = i; j < n; j++)
            if (!done[j] && ack_same(r, recs[j].u.ack)) {
                k = ack_usable_ids(recs[j].u.ack, ids, k);
                c.ts_ms = PX_MAX(c.ts_ms, recs[j].u.ack->ts_ms);
                done[j] = 1;
                metric_add(ms->m.acks, 1);
            }
        if (c.ts_ms <= 0)
            c.ts_ms = px_now_ms();
        rc = ack_group(&c, ids, k, err, errlen);
    }
    free(done);
    free(ids);
    return rc;
}
