/* Internal interfaces of the receipt service: the process state and the
 * contracts between main.c (topics, metrics, retention sweep; service.c
 * runs the rest), batch.c (one consumed batch: decode, dead letters, commit,
 * retry) and apply.c (tracking and the receipt events a batch makes). The
 * main thread owns everything; delivery reports arrive on it (inside
 * bus_poll and bus_flush). */
#ifndef PARLEY_RECEIPT_H
#define PARLEY_RECEIPT_H

#include "bus.h"
#include "metrics.h"
#include "recent.h"
#include "service.h"
#include "store.h"
#include "parley.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#define RECEIPT_GROUP "receipt"
#define RECEIPT_BATCH 512
#define RECEIPT_CONSUME_WAIT_MS 50
#define RECEIPT_RECORD_VERSION 1    /* the only ReceiptFact version we know */
#define RECEIPT_ID_MAX 255          /* msg_id and group, as for inbox event ids */
#define RECEIPT_APPLIED_BITS 16     /* 512 KiB: the facts applied lately (apply.c) */

typedef struct receipt_metrics {
    metric *delivered, *read, *claims, *claims_unknown, *receipts, *tracked, *untracked,
        *dead, *retries, *produce_failures, *swept, *repeats;
    metric *lat_put, *lat_get, *lat_delete, *lat_sweep, *lag;
} receipt_metrics;

typedef struct receipt {
    service svc;
    const char *topic_receipts, *topic_inbox, *topic_dead;
    long dr_failures;               /* produces the bus refused, ever */
    int64_t next_sweep_ms;          /* monotonic */
    recent *applied;                /* apply.c: facts whose effects are durable */
    receipt_metrics m;
} receipt;

enum receipt_rec_kind { REC_FACT, REC_DEAD };

/* One consumed record and, once apply.c resolved it, who is told. */
typedef struct receipt_rec {
    enum receipt_rec_kind kind;
    const bus_msg *m;
    Parley__ReceiptFact *f;         /* REC_FACT (also kept for a dead one that decoded) */
    char reason[128];               /* REC_DEAD: why */
    char *sender, *group;           /* READ_CLAIM resolved from tracking; NULL: unknown */
    int repeat;                     /* a fact applied already: nothing to do */
} receipt_rec;

/* ---- batch.c ---- */

/* Decodes n consumed records, applies them (apply_batch) until that
 * succeeds, retrying with backoff without consuming anything new, commits
 * them and releases them. Returns early, uncommitted, when rs->svc.stop is set
 * during a retry: everything is then consumed again. */
void batch_process(receipt *rs, bus_msg *msgs, size_t n);

/* bus_conf.dr_cb: opaque is the receipt. Counts refusals in dr_failures. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset);

/* bus_produce that rides out a full local queue by polling for a while. */
int batch_produce(receipt *rs, const char *topic, const char *key, size_t key_len,
                  const void *value, size_t len, char *err, size_t errlen);

/* ---- apply.c ---- */

/* The effects of one batch, all idempotent, in this order (a DELIVERED or
 * READ fact this process applied lately, or that came earlier in the batch,
 * is skipped: apply.c says why); tracking put for
 * DELIVERED facts; tracking lookup for READ_CLAIMs; receipt InboxRecords
 * (and dead letters) produced in record order and confirmed by Kafka;
 * tracking deleted for the claims that resolved. PX_OK when all of it is
 * durable, so the batch may be committed; on error the whole batch is
 * applied again (receipt ids are deterministic, so repeats are absorbed). */
int apply_batch(receipt *rs, receipt_rec *recs, size_t n, char *err, size_t errlen);

#endif
