/* Owns the life of one consumed batch: decoding and validating each record
 * (the bad ones become dead letters), running the records in batch order
 * (which keeps every partition's order; consecutive InboxRecords share one
 * bulk store call), committing the prefix whose effects are durable, and
 * retrying the rest with backoff without consuming anything new. Also owns
 * the delivery-report bookkeeping that lets a produce gate a commit. */
#include "common.h"
#include "ids.h"
#include "log.h"
#include "msgstore.h"
#include "utf8.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH_FLUSH_MS 10000       /* wait for gating produces before a commit */
#define BATCH_QUEUE_WAIT_MS 5000   /* ride out a full producer queue this long */
#define BATCH_EVENT_ID_MAX 255

void batch_init(msgstore *ms)
{
    for (size_t i = 0; i < MSGSTORE_BATCH_MAX; i++)
        ms->tags[i] = (batch_tag){ .ms = ms, .idx = i };
    ms->best_effort = (batch_tag){ .ms = ms, .idx = BATCH_BEST_EFFORT };
}

void *batch_tag_for(msgstore *ms, size_t idx)
{
    if (idx < ms->first_durable)
        ms->first_durable = idx;
    return &ms->tags[idx];
}

void *batch_tag_best_effort(msgstore *ms)
{
    return ms->live_tag != NULL ? ms->live_tag : &ms->best_effort;
}

/* A report can be stale (a produce of an earlier attempt that outlived a
 * flush timeout): it then names an index of the current batch that did not
 * fail. That only costs one needless retry, so no generation check. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset)
{
    batch_tag *t = opaque;
    if (t == NULL)
        return;
    if (t->pending > 0)
        t->pending--;
    if (status == PX_OK)
        return;
    t->failed++;
    msgstore *ms = t->ms;
    metric_add(ms->m.produce_failures, 1);
    if (t->idx != BATCH_BEST_EFFORT && t->idx < ms->failed_at)
        ms->failed_at = t->idx;
    /* A broker outage fails thousands of records at once: one line a second. */
    int64_t now = px_mono_ms();
    if (now - ms->dr_log_ms < 1000) {
        ms->dr_suppressed++;
        return;
    }
    log_warn("produce failed", "{s:s, s:b, s:I}", "error", err ? err : "",
             "gates_commit", t->idx != BATCH_BEST_EFFORT, "suppressed",
             (json_int_t)ms->dr_suppressed);
    ms->dr_log_ms = now;
    ms->dr_suppressed = 0;
}

int batch_produce(msgstore *ms, const char *topic, const char *key, size_t key_len,
                  const void *value, size_t len, void *opaque, char *err, size_t errlen)
{
    int rc = bus_produce_wait(ms->svc.b, topic, key, key_len, value, len, opaque,
                              BATCH_QUEUE_WAIT_MS, err, errlen);
    if (rc == PX_OK && opaque != NULL)
        ((batch_tag *)opaque)->pending++;
    return rc;
}

/* ---- decoding ---- */

static void batch_dead(msgstore_rec *r, const char *fmt, const char *what)
{
    r->kind = REC_DEAD;
    snprintf(r->reason, sizeof(r->reason), fmt, what);
}

/* Strings the store would refuse (and keep refusing on every retry, which
 * would wedge the partition) are caught here and dead-lettered instead. */
static int batch_text_ok(const void *s, size_t n)
{
    return memchr(s, '\0', n) == NULL && utf8_valid(s, n);
}

static int batch_valid_gateway(const char *g)
{
    /* The id becomes part of a topic name: same alphabet as a user id. */
    return id_valid_user(g);
}

/* A sync request rides the user's inbox partition (InboxRecord.sync), so
 * it runs after every event produced before it. */
static void batch_check_sync(msgstore_rec *r, const Parley__SyncRequest *x)
{
    r->kind = REC_SYNC;
    if (x->version != MSGSTORE_RECORD_VERSION)
        batch_dead(r, "%s: unknown version", "SyncRequest");
    else if (strcmp(x->user, r->u.inbox->user) != 0)
        batch_dead(r, "%s: user is not the record's", "SyncRequest");
    else if (!batch_valid_gateway(x->gateway))
        batch_dead(r, "%s: bad gateway id", "SyncRequest");
    else if (x->conn == 0)
        batch_dead(r, "%s: conn 0 (would sync every connection)", "SyncRequest");
}

/* A device command rides the user's inbox partition too: an unlink takes
 * effect at one point of the user's order. */
static void batch_check_devcmd(msgstore_rec *r, const Parley__DeviceCommand *x)
{
    r->kind = REC_DEVCMD;
    if (x->version != MSGSTORE_RECORD_VERSION)
        batch_dead(r, "%s: unknown version", "DeviceCommand");
    else if (strcmp(x->user, r->u.inbox->user) != 0)
        batch_dead(r, "%s: user is not the record's", "DeviceCommand");
    else if (!batch_valid_gateway(x->gateway) || x->conn == 0)
        batch_dead(r, "%s: bad gateway id or conn", "DeviceCommand");
    else if (x->type == PARLEY__DEVICE_COMMAND__TYPE__TYPE_UNLINK && !id_valid_user(x->device))
        batch_dead(r, "%s: bad device", "DeviceCommand");
    else if (x->type != PARLEY__DEVICE_COMMAND__TYPE__TYPE_LIST &&
             x->type != PARLEY__DEVICE_COMMAND__TYPE__TYPE_UNLINK)
        batch_dead(r, "%s: unknown type", "DeviceCommand");
}

static void batch_decode_inbox(msgstore_rec *r)
{
    const bus_msg *m = r->m;
    Parley__InboxRecord *x = parley__inbox_record__unpack(NULL, m->len, m->value);
    if (x == NULL) {
        batch_dead(r, "%s: not a protobuf", "InboxRecord");
        return;
    }
    r->u.inbox = x;
    r->kind = REC_INBOX;
    if (x->version != MSGSTORE_RECORD_VERSION)
        batch_dead(r, "%s: unknown version", "InboxRecord");
    else if (!id_valid_user(x->user))
        batch_dead(r, "%s: bad user", "InboxRecord");
    else if (!bus_key_is(m, x->user))
        batch_dead(r, "%s: key is not the user", "InboxRecord");
    else if (x->sync != NULL)
        batch_check_sync(r, x->sync);
    else if (x->device_cmd != NULL)
        batch_check_devcmd(r, x->device_cmd);
    else if (x->id[0] == '\0' || strlen(x->id) > BATCH_EVENT_ID_MAX ||
             !batch_text_ok(x->id, strlen(x->id)))
        batch_dead(r, "%s: bad event id", "InboxRecord");
    else if (x->sender[0] != '\0' && !id_valid_user(x->sender))
        batch_dead(r, "%s: bad sender", "InboxRecord");
    else if (x->kind < PARLEY__EVENT_KIND__EVENT_KIND_MESSAGE ||
             x->kind > PARLEY__EVENT_KIND__EVENT_KIND_TYPING)
        batch_dead(r, "%s: unknown kind", "InboxRecord");
    else if (x->origin_device[0] != '\0' && !id_valid_user(x->origin_device))
        batch_dead(r, "%s: bad origin device", "InboxRecord");
    else if (x->event_json.len == 0 || !batch_text_ok(x->event_json.data, x->event_json.len))
        batch_dead(r, "%s: event_json empty or not UTF-8", "InboxRecord");
}

static void batch_decode_ack(msgstore_rec *r)
{
    const bus_msg *m = r->m;
    Parley__AckRecord *x = parley__ack_record__unpack(NULL, m->len, m->value);
    if (x == NULL) {
        batch_dead(r, "%s: not a protobuf", "AckRecord");
        return;
    }
    r->u.ack = x;
    r->kind = REC_ACK;
    if (x->version != MSGSTORE_RECORD_VERSION)
        batch_dead(r, "%s: unknown version", "AckRecord");
    else if (!id_valid_user(x->user))
        batch_dead(r, "%s: bad user", "AckRecord");
    else if (!bus_key_is(m, x->user))
        batch_dead(r, "%s: key is not the user", "AckRecord");
}

static void batch_decode(msgstore *ms, bus_msg *m, msgstore_rec *r)
{
    memset(r, 0, sizeof(*r));
    r->m = m;
    if (strcmp(m->topic, ms->topic_inbox) == 0)
        batch_decode_inbox(r);
    else if (strcmp(m->topic, ms->topic_acks) == 0)
        batch_decode_ack(r);
    else
        batch_dead(r, "unexpected topic %s", m->topic);
    if (r->kind == REC_DEAD) {
        metric_add(ms->m.dead, 1);
        log_warn("dead letter", "{s:s, s:s, s:i, s:I}", "reason", r->reason, "topic", m->topic,
                 "partition", (int)m->partition, "offset", (json_int_t)m->offset);
    }
}

/* Frees the decoded form; the kind may have turned to REC_DEAD after the
 * unpack succeeded, so free by topic, not by kind. */
static void batch_free_rec(msgstore *ms, msgstore_rec *r)
{
    const char *t = r->m->topic;
    if (r->u.inbox != NULL && strcmp(t, ms->topic_inbox) == 0)
        parley__inbox_record__free_unpacked(r->u.inbox, NULL);
    else if (r->u.ack != NULL && strcmp(t, ms->topic_acks) == 0)
        parley__ack_record__free_unpacked(r->u.ack, NULL);
}

/* ---- running ---- */

/* Value = the original bytes, key = the original key; the reason is in the
 * log (the bus has no headers). */
static int batch_send_dead(msgstore *ms, size_t idx, const msgstore_rec *r, char *err,
                           size_t errlen)
{
    const bus_msg *m = r->m;
    return batch_produce(ms, ms->topic_dead, m->key, m->key_len, m->value, m->len,
                         batch_tag_for(ms, idx), err, errlen);
}

/* Serves the syncs pending (indexes in syncs) and empties the list: PX_OK,
 * or PX_ERROR with *failed the first one not served. */
static int batch_syncs(msgstore *ms, const msgstore_rec *recs, size_t *syncs, size_t *nsyncs,
                       size_t *failed, char *err, size_t errlen)
{
    size_t n = *nsyncs, done = n > 0 ? sync_serve(ms, recs, syncs, n, err, errlen) : 0;
    *nsyncs = 0;
    if (done == n)
        return PX_OK;
    *failed = syncs[done];
    return PX_ERROR;
}

/* 1 when no record of recs[from..i) is of the user of sync i: its scan
 * needs nothing of the batch stored first. */
static int batch_sync_early(const msgstore_rec *recs, size_t from, size_t i)
{
    const char *user = recs[i].u.inbox->user;
    for (size_t k = from; k < i; k++)
        if ((recs[k].kind == REC_INBOX || recs[k].kind == REC_SYNC ||
             recs[k].kind == REC_DEVCMD) &&
            strcmp(recs[k].u.inbox->user, user) == 0)
            return 0;
    return 1;
}

/* Runs recs[from..n) in order, but for syncs, which are served together
 * (sync.c). A sync whose user has no earlier record in the batch goes
 * first, before the batch's events are stored (storing a few hundred
 * takes seconds on a loaded FerretDB, and a reconnecting client's live
 * events are held until its sync ends); its user's later events are
 * pushed after it noted the connection's gateway, as in order. The others
 * wait for the end of their run of records (the batch's end or a device
 * command, which takes effect at its own place in the user's order); one
 * moved past later events of its user scans them too, and a page then
 * carries an event its live push may carry as well, a copy the gateway
 * drops (Delivery.seqs). Returns the index of the first record whose step
 * failed or that was not served (n when all succeeded), err saying why;
 * syncs served before a failure may be served again (at-least-once). */
static size_t batch_attempt(msgstore *ms, msgstore_rec *recs, size_t from, size_t n,
                            char *err, size_t errlen)
{
    size_t i = from, syncs[MSGSTORE_BATCH_MAX], nsyncs = 0, failed = n;
    unsigned char early[MSGSTORE_BATCH_MAX] = { 0 };
    for (size_t k = from; k < n; k++)
        if (recs[k].kind == REC_SYNC && batch_sync_early(recs, from, k)) {
            early[k] = 1;
            syncs[nsyncs++] = k;
        }
    if (batch_syncs(ms, recs, syncs, &nsyncs, &failed, err, errlen) != PX_OK)
        return from;
    while (i < n) {
        size_t j = i + 1;
        int rc = PX_OK;
        if (recs[i].kind == REC_DEVCMD &&
            batch_syncs(ms, recs, syncs, &nsyncs, &failed, err, errlen) != PX_OK)
            return failed;
        switch (recs[i].kind) {
        case REC_INBOX:
            while (j < n && recs[j].kind == REC_INBOX)
                j++;
            rc = inbox_store_run(ms, recs + i, j - i, err, errlen);
            if (rc == PX_OK)
                rc = pushrec_emit(ms, recs + i, j - i, batch_tag_for(ms, i), err, errlen);
            break;
        case REC_SYNC:
            if (!early[i])
                syncs[nsyncs++] = i;
            break;
        case REC_DEVCMD:
            rc = devcmd_serve(ms, i, recs[i].u.inbox->device_cmd, err, errlen);
            break;
        case REC_ACK:
            while (j < n && recs[j].kind == REC_ACK)
                j++;
            rc = ack_apply_run(ms, i, recs + i, j - i, err, errlen);
            break;
        default:
            rc = batch_send_dead(ms, i, &recs[i], err, errlen);
            break;
        }
        if (rc != PX_OK)
            return nsyncs > 0 ? syncs[0] : i; /* the syncs before it are tried again too */
        i = j;
    }
    batch_syncs(ms, recs, syncs, &nsyncs, &failed, err, errlen);
    return failed;
}

/* How far [from, upto) may be committed: waits for the produces that gate
 * records in it and stops before the first one that failed. */
static size_t batch_settle(msgstore *ms, size_t upto, char *err, size_t errlen)
{
    if (ms->first_durable < upto && bus_flush(ms->svc.b, BATCH_FLUSH_MS) != PX_OK) {
        px_err(err, errlen, "deliveries not acknowledged within %d ms", BATCH_FLUSH_MS);
        if (ms->first_durable < ms->failed_at)
            ms->failed_at = ms->first_durable;
    }
    if (ms->failed_at < upto) {
        if (err[0] == '\0')
            px_err(err, errlen, "a delivery or dead letter was not accepted by the bus");
        upto = ms->failed_at;
    }
    return upto;
}

void batch_release(msgstore *ms, bus_msg *msgs, msgstore_rec *recs, size_t n)
{
    bus_release(ms->svc.b, msgs, n);
    for (size_t i = 0; i < n; i++)
        batch_free_rec(ms, &recs[i]);
    free(recs);
}

/* 1 when every record is an InboxRecord event: the batch can go through
 * the write-behind pipeline (writer.c). */
static int batch_only_events(const msgstore_rec *recs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (recs[i].kind != REC_INBOX)
            return 0;
    return 1;
}

void batch_process(msgstore *ms, bus_msg *msgs, size_t n)
{
    msgstore_rec *recs = px_calloc(n, sizeof(*recs));
    for (size_t i = 0; i < n; i++)
        batch_decode(ms, &msgs[i], &recs[i]);

    if (ms->writer != NULL) {
        if (batch_only_events(recs, n)) {
            writer_add(ms, msgs, recs, n); /* takes recs */
            return;
        }
        /* A sync's scan must see every event consumed before it, and no
         * commit may pass a batch still queued. */
        if (!writer_drain(ms)) {
            batch_release(ms, msgs, recs, n);
            return;
        }
    }
    size_t done = 0;
    int64_t backoff = SERVICE_BACKOFF_MIN_MS;
    while (done < n) {
        char err[PX_ERRLEN] = "";
        ms->first_durable = SIZE_MAX;
        ms->failed_at = SIZE_MAX;
        size_t upto = batch_attempt(ms, recs, done, n, err, sizeof(err));
        upto = batch_settle(ms, upto, err, sizeof(err));
        if (upto > done) {
            /* The acker's commits stop at an ack that waits (ackwait.c). */
            if (ms->waits != NULL)
                ackwait_commit(ms->waits, ms->svc.b, msgs + done, upto - done);
            else
                bus_commit(ms->svc.b, msgs + done, upto - done);
            done = upto;
            backoff = SERVICE_BACKOFF_MIN_MS;
        }
        if (done == n)
            break;
        const bus_msg *m = &msgs[done];
        metric_add(ms->m.retries, 1);
        log_warn("batch step failed; retrying", "{s:s, s:s, s:i, s:I, s:I, s:I}", "error", err,
                 "topic", m->topic, "partition", (int)m->partition, "offset",
                 (json_int_t)m->offset, "pending", (json_int_t)(n - done), "backoff_ms",
                 (json_int_t)backoff);
        service_sleep(&ms->svc, backoff);
        if (ms->svc.stop) {
            log_warn("stopping with uncommitted records; they will be consumed again",
                     "{s:I}", "records", (json_int_t)(n - done));
            break;
        }
        backoff = PX_MIN(backoff * 2, SERVICE_BACKOFF_MAX_MS);
    }
    batch_release(ms, msgs, recs, n);
}
