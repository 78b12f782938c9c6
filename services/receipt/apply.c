/* Owns what one batch of ReceiptFacts does. A DELIVERED fact tells the
 * sender "delivered" and starts tracking (reader, msg_id) -> sender, group,
 * because the message body is gone from the inbox and a later `read` only
 * names the msg_id. A READ fact (read before any ack) tells "delivered" and
 * "read". A READ_CLAIM (read after the ack) tells "read" only if tracking
 * knows the pair, and then ends the tracking; a claim for a message the
 * reader never received finds nothing and does nothing, which is what
 * makes a forged read a no-op.
 *
 * The receipts that need no lookup (those of DELIVERED and READ facts) go
 * out first: their delivery does not wait on the store, and the tracking
 * put runs while Kafka takes them. Then the lookups of the claims (after the
 * put: a claim may follow its DELIVERED in the same batch), their "read"
 * receipts, one wait until Kafka holds every receipt, and only then the
 * tracking of a read is deleted; the caller commits after all of it, so a
 * crash between any two steps repeats them (receipt ids and the tracking
 * put absorb the repeats). Receipts go to parley.inbox keyed by the
 * sender; a claim's "read" always follows its message's "delivered"
 * (the DELIVERED fact came first, in this batch or an earlier one), so a
 * sender sees "delivered" before "read".
 *
 * The same DELIVERED fact can come twice (message-store makes it again
 * when an ack it settled from memory also goes the store's way, and after
 * a crash); receipt ids make a repeat harmless, but not free: over FerretDB
 * one repeated key in a tracking insert fails the whole insert, which is
 * then retried a document at a time, each a PostgreSQL commit. At 1,000/s
 * 751 of 10,000 facts were repeats, and the receipt service fell to ~100
 * facts/s, seconds behind, while its single inserts took the database from
 * message-store. So a DELIVERED or READ fact this process applied
 * (effects durable) lately, or that came earlier in the same batch, is
 * skipped whole (applied, recent.h; a READ, which tells "delivered" too,
 * also marks its DELIVERED applied, in the batch as after it). A repeat the memory no longer holds is applied again, as
 * before. READ_CLAIMs are never skipped: each is a lookup that finds the
 * tracking or nothing. */
#include "common.h"
#include "ids.h"
#include "log.h"
#include "protocol.h"
#include "receipt.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define APPLY_FLUSH_MS 10000
#define APPLY_INBOX_VERSION 1

typedef struct apply_counts {
    int64_t delivered, read, claims, claims_unknown, receipts, tracked, untracked, repeats;
} apply_counts;

static int apply_status_is(const receipt_rec *r, Parley__ReceiptFact__Status s)
{
    return r->kind == REC_FACT && r->f->status == s;
}

static char *apply_dup_or_null(const char *s)
{
    return s != NULL && s[0] != '\0' ? px_strdup(s) : NULL;
}

/* The memory key of a fact: its pair and status. */
static uint64_t apply_key(const Parley__ReceiptFact *f, Parley__ReceiptFact__Status status)
{
    uint64_t k = recent_key(f->reader, f->msg_id) ^
                 (uint64_t)status * UINT64_C(0x9e3779b97f4a7c15);
    return k + (k == 0);
}

static int apply_remembered(const receipt_rec *r)
{
    return apply_status_is(r, PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED) ||
           apply_status_is(r, PARLEY__RECEIPT_FACT__STATUS__STATUS_READ);
}

/* Notes r's fact in m; a READ tells "delivered" too, so it notes that as
 * well (a DELIVERED after it, in the batch or later, is then a repeat). */
static void apply_note(recent *m, const receipt_rec *r)
{
    recent_note(m, apply_key(r->f, PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED));
    if (r->f->status != PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED)
        recent_note(m, apply_key(r->f, r->f->status));
}

/* Forgets what an earlier attempt resolved (this attempt looks again) and
 * marks the repeats: facts applied lately, or earlier in this batch. */
static void apply_reset(receipt *rs, receipt_rec *recs, size_t n)
{
    recent *batch = recent_new(12);
    for (size_t i = 0; i < n; i++) {
        free(recs[i].sender);
        free(recs[i].group);
        recs[i].sender = recs[i].group = NULL;
        recs[i].repeat = 0;
        if (!apply_remembered(&recs[i]))
            continue;
        uint64_t k = apply_key(recs[i].f, recs[i].f->status);
        recs[i].repeat = recent_has(rs->applied, k) || recent_has(batch, k);
        if (!recs[i].repeat)
            apply_note(batch, &recs[i]);
    }
    recent_free(batch);
}

/* The batch is durable: its facts are remembered as applied. */
static void apply_remember(receipt *rs, const receipt_rec *recs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (apply_remembered(&recs[i]) && !recs[i].repeat)
            apply_note(rs->applied, &recs[i]);
}

static int apply_track_put(receipt *rs, const receipt_rec *recs, size_t n, apply_counts *ct,
                           char *err, size_t errlen)
{
    store_track *t = px_calloc(n, sizeof(*t));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!apply_status_is(&recs[i], PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED) ||
            recs[i].repeat)
            continue;
        const Parley__ReceiptFact *f = recs[i].f;
        t[k++] = (store_track){ .reader = f->reader, .msg_id = f->msg_id, .sender = f->sender,
                                .group = f->group[0] != '\0' ? f->group : NULL,
                                .ts_ms = f->ts_ms };
    }
    int rc = PX_OK;
    if (k > 0) {
        int64_t t0 = service_clock_us();
        rc = store_track_put(rs->svc.st, t, k, err, errlen);
        service_observe(rs->m.lat_put, t0);
    }
    ct->tracked = (int64_t)k;
    free(t);
    return rc;
}

typedef struct apply_lookup {
    receipt_rec *recs;
    size_t n;
} apply_lookup;

/* A tracking record found: every claim of the batch for that pair learns
 * its sender. A record whose sender is not a user id (written by something
 * else) resolves nothing: the receipt could not be routed anyway. */
static int apply_on_tracked(void *arg, const store_track *t)
{
    apply_lookup *lk = arg;
    if (!id_valid_user(t->sender))
        return PX_OK;
    for (size_t i = 0; i < lk->n; i++) {
        receipt_rec *r = &lk->recs[i];
        if (!apply_status_is(r, PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM) ||
            r->sender != NULL || strcmp(r->f->reader, t->reader) != 0 ||
            strcmp(r->f->msg_id, t->msg_id) != 0)
            continue;
        r->sender = px_strdup(t->sender);
        r->group = apply_dup_or_null(t->group);
    }
    return PX_OK;
}

/* Fills recs[i].sender of the claims whose pair is tracked; the keys of
 * the claims go out in one lookup. */
static int apply_claims(receipt *rs, receipt_rec *recs, size_t n, apply_counts *ct,
                        char *err, size_t errlen)
{
    store_track *keys = px_calloc(n, sizeof(*keys));
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (apply_status_is(&recs[i], PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM))
            keys[k++] = (store_track){ .reader = recs[i].f->reader, .msg_id = recs[i].f->msg_id };
    int rc = PX_OK;
    if (k > 0) {
        apply_lookup lk = { recs, n };
        int64_t t0 = service_clock_us();
        rc = store_track_get(rs->svc.st, keys, k, apply_on_tracked, &lk, err, errlen);
        service_observe(rs->m.lat_get, t0);
    }
    ct->claims = (int64_t)k;
    free(keys);
    return rc;
}

/* One receipt event into the sender's inbox. */
static int apply_emit(receipt *rs, const Parley__ReceiptFact *f, const char *status,
                      const char *sender, const char *group, char *err, size_t errlen)
{
    char id[ID_BUF];
    size_t jlen;
    id_for_receipt(f->msg_id, f->reader, status, id);
    proto_receipt pr = { .id = id, .msg_id = f->msg_id, .status = status, .by = f->reader,
                         .group = group, .ts = f->ts_ms };
    char *json = proto_render_receipt(&pr, &jlen);
    Parley__InboxRecord x = PARLEY__INBOX_RECORD__INIT;
    x.version = APPLY_INBOX_VERSION;
    x.kind = PARLEY__EVENT_KIND__EVENT_KIND_RECEIPT;
    x.user = (char *)sender;
    x.id = id;
    x.sender = ""; /* nobody is told about a receipt */
    x.ts_ms = f->ts_ms;
    x.event_json = (ProtobufCBinaryData){ jlen, (uint8_t *)json };
    size_t len = parley__inbox_record__get_packed_size(&x);
    uint8_t *buf = px_malloc(len);
    parley__inbox_record__pack(&x, buf);
    int rc = batch_produce(rs, rs->topic_inbox, sender, strlen(sender), buf, len, err, errlen);
    free(buf);
    free(json);
    return rc;
}

/* The receipts (and dead letters) of one record, in the order the sender
 * must see them. */
static int apply_record(receipt *rs, const receipt_rec *r, apply_counts *ct, char *err,
                        size_t errlen)
{
    const Parley__ReceiptFact *f = r->f;
    const char *group = f != NULL && f->group[0] != '\0' ? f->group : NULL;
    int rc = PX_OK;
    if (r->kind == REC_DEAD)
        return batch_produce(rs, rs->topic_dead, r->m->key, r->m->key_len, r->m->value,
                             r->m->len, err, errlen);
    switch (f->status) {
    case PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED:
        ct->delivered++;
        rc = apply_emit(rs, f, "delivered", f->sender, group, err, errlen);
        ct->receipts++;
        break;
    case PARLEY__RECEIPT_FACT__STATUS__STATUS_READ:
        ct->read++;
        rc = apply_emit(rs, f, "delivered", f->sender, group, err, errlen);
        if (rc == PX_OK)
            rc = apply_emit(rs, f, "read", f->sender, group, err, errlen);
        ct->receipts += 2;
        break;
    default: /* READ_CLAIM */
        if (r->sender == NULL) {
            ct->claims_unknown++;
            break;
        }
        rc = apply_emit(rs, f, "read", r->sender, r->group, err, errlen);
        ct->receipts++;
        break;
    }
    return rc;
}

/* Produces the receipts (and dead letters) of the records that are
 * (claims) or are not (!claims) READ_CLAIMs, in record order. */
static int apply_produce(receipt *rs, const receipt_rec *recs, size_t n, int claims,
                         apply_counts *ct, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        if (recs[i].repeat) {
            ct->repeats += !claims;
            continue;
        }
        if (apply_status_is(&recs[i], PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM) ==
                claims &&
            apply_record(rs, &recs[i], ct, err, errlen) != PX_OK)
            return PX_ERROR;
    }
    return PX_OK;
}

/* Everything produced for this batch is acknowledged by Kafka. */
static int apply_confirm(receipt *rs, long failures, char *err, size_t errlen)
{
    if (bus_flush(rs->svc.b, APPLY_FLUSH_MS) != PX_OK)
        return px_err(err, errlen, "receipts not acknowledged within %d ms", APPLY_FLUSH_MS);
    if (rs->dr_failures != failures)
        return px_err(err, errlen, "a receipt or dead letter was not accepted by the bus");
    return PX_OK;
}

/* The read ended the need for tracking; only now that its receipt is in
 * Kafka may the pair be forgotten. */
static int apply_untrack(receipt *rs, const receipt_rec *recs, size_t n, apply_counts *ct,
                         char *err, size_t errlen)
{
    store_track *keys = px_calloc(n, sizeof(*keys));
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (apply_status_is(&recs[i], PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM) &&
            recs[i].sender != NULL)
            keys[k++] = (store_track){ .reader = recs[i].f->reader, .msg_id = recs[i].f->msg_id };
    int rc = PX_OK;
    int64_t removed = 0;
    if (k > 0) {
        int64_t t0 = service_clock_us();
        rc = store_track_delete(rs->svc.st, keys, k, &removed, err, errlen);
        service_observe(rs->m.lat_delete, t0);
    }
    ct->untracked = removed;
    free(keys);
    return rc;
}

static void apply_count(receipt *rs, const receipt_rec *recs, size_t n, const apply_counts *ct)
{
    int64_t now = px_now_ms();
    metric_add(rs->m.delivered, ct->delivered);
    metric_add(rs->m.read, ct->read);
    metric_add(rs->m.claims, ct->claims);
    metric_add(rs->m.claims_unknown, ct->claims_unknown);
    metric_add(rs->m.receipts, ct->receipts);
    metric_add(rs->m.tracked, ct->tracked);
    metric_add(rs->m.untracked, ct->untracked);
    metric_add(rs->m.repeats, ct->repeats);
    /* From the reader's ack to the receipt being in Kafka. */
    for (size_t i = 0; i < n; i++)
        if (recs[i].kind == REC_FACT && recs[i].f->ts_ms > 0)
            metric_observe(rs->m.lag, (double)(now - recs[i].f->ts_ms));
}

int apply_batch(receipt *rs, receipt_rec *recs, size_t n, char *err, size_t errlen)
{
    apply_counts ct = { 0 };
    long failures = rs->dr_failures;
    apply_reset(rs, recs, n);
    if (apply_produce(rs, recs, n, 0, &ct, err, errlen) != PX_OK ||
        apply_track_put(rs, recs, n, &ct, err, errlen) != PX_OK ||
        apply_claims(rs, recs, n, &ct, err, errlen) != PX_OK ||
        apply_produce(rs, recs, n, 1, &ct, err, errlen) != PX_OK ||
        apply_confirm(rs, failures, err, errlen) != PX_OK ||
        apply_untrack(rs, recs, n, &ct, err, errlen) != PX_OK)
        return PX_ERROR;
    apply_remember(rs, recs, n);
    apply_count(rs, recs, n, &ct);
    return PX_OK;
}
