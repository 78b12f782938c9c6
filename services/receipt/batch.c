/* Owns the life of one consumed batch of parley.receipts: decoding and
 * validating each ReceiptFact (the bad ones become dead letters), applying
 * the batch as a whole (apply.c), committing it once every effect is
 * durable, and retrying it with backoff otherwise. Unlike presence's
 * deltas, every effect here is idempotent (tracking puts absorb repeats,
 * receipt ids are deterministic), so a retry simply starts over. */
#include "common.h"
#include "ids.h"
#include "log.h"
#include "receipt.h"
#include "utf8.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH_QUEUE_WAIT_MS 5000

/* A stale report (outliving a flush timeout) only costs one needless retry. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset)
{
    receipt *rs = opaque;
    if (status == PX_OK || rs == NULL)
        return;
    rs->dr_failures++;
    metric_add(rs->m.produce_failures, 1);
    log_warn("produce failed", "{s:s}", "error", err ? err : "");
}

int batch_produce(receipt *rs, const char *topic, const char *key, size_t key_len,
                  const void *value, size_t len, char *err, size_t errlen)
{
    return bus_produce_wait(rs->svc.b, topic, key, key_len, value, len, rs, BATCH_QUEUE_WAIT_MS,
                            err, errlen);
}

/* ---- decoding ---- */

static void batch_dead(receipt_rec *r, const char *why)
{
    r->kind = REC_DEAD;
    snprintf(r->reason, sizeof(r->reason), "ReceiptFact: %s", why);
}

/* Strings the store would refuse on every retry (wedging the partition)
 * are caught here instead. */
static int batch_id_ok(const char *s, int may_be_empty)
{
    size_t n = strlen(s);
    if (n == 0)
        return may_be_empty;
    return n <= RECEIPT_ID_MAX && utf8_valid((const unsigned char *)s, n);
}

static void batch_validate(receipt_rec *r)
{
    const Parley__ReceiptFact *f = r->f;
    int needs_sender = f->status == PARLEY__RECEIPT_FACT__STATUS__STATUS_DELIVERED ||
                       f->status == PARLEY__RECEIPT_FACT__STATUS__STATUS_READ;
    if (f->version != RECEIPT_RECORD_VERSION)
        batch_dead(r, "unknown version");
    else if (!id_valid_user(f->reader))
        batch_dead(r, "bad reader");
    else if (!bus_key_is(r->m, f->reader))
        batch_dead(r, "key is not the reader"); /* tracking lives with the reader's partition */
    else if (!batch_id_ok(f->msg_id, 0))
        batch_dead(r, "bad msg_id");
    else if (!needs_sender && f->status != PARLEY__RECEIPT_FACT__STATUS__STATUS_READ_CLAIM)
        batch_dead(r, "unknown status");
    else if (needs_sender && !id_valid_user(f->sender))
        batch_dead(r, "bad sender");
    else if (!batch_id_ok(f->group, 1))
        batch_dead(r, "bad group");
    else
        r->kind = REC_FACT;
}

static void batch_decode(receipt *rs, const bus_msg *m, receipt_rec *r)
{
    memset(r, 0, sizeof(*r));
    r->m = m;
    r->f = parley__receipt_fact__unpack(NULL, m->len, m->value);
    if (strcmp(m->topic, rs->topic_receipts) != 0)
        batch_dead(r, "unexpected topic");
    else if (r->f == NULL)
        batch_dead(r, "not a protobuf");
    else
        batch_validate(r);
    if (r->kind == REC_FACT && r->f->ts_ms <= 0)
        r->f->ts_ms = m->ts_ms; /* a producer that left it out: the bus time */
    if (r->kind == REC_DEAD) {
        metric_add(rs->m.dead, 1);
        log_warn("dead letter", "{s:s, s:s, s:i, s:I}", "reason", r->reason, "topic", m->topic,
                 "partition", (int)m->partition, "offset", (json_int_t)m->offset);
    }
}

/* ---- running ---- */

typedef struct batch_job {
    receipt *rs;
    receipt_rec *recs;
    size_t n;
} batch_job;

static int batch_attempt(void *arg, char *err, size_t errlen)
{
    batch_job *j = arg;
    return apply_batch(j->rs, j->recs, j->n, err, errlen);
}

void batch_process(receipt *rs, bus_msg *msgs, size_t n)
{
    receipt_rec *recs = px_calloc(n, sizeof(*recs));
    for (size_t i = 0; i < n; i++)
        batch_decode(rs, &msgs[i], &recs[i]);
    batch_job j = { rs, recs, n };
    service_retry_batch(&rs->svc, msgs, n, rs->m.retries, batch_attempt, &j);
    bus_release(rs->svc.b, msgs, n);
    for (size_t i = 0; i < n; i++) {
        free(recs[i].sender);
        free(recs[i].group);
        if (recs[i].f != NULL)
            parley__receipt_fact__free_unpacked(recs[i].f, NULL);
    }
    free(recs);
}
