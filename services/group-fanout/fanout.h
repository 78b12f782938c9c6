/* Internal interfaces of group-fanout: the process state and the contracts
 * between main.c (topics, metrics; service.c runs the rest), batch.c (one
 * consumed batch: decode, dead letters, retry, commit) and apply.c (group
 * state, membership checks, fan-out, answers). The main thread owns
 * everything; delivery reports arrive on it (inside bus_poll and
 * bus_flush). */
#ifndef PARLEY_FANOUT_H
#define PARLEY_FANOUT_H

#include "bus.h"
#include "metrics.h"
#include "service.h"
#include "store.h"
#include "parley.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#define FANOUT_GROUP "group-fanout"
#define FANOUT_BATCH 512
#define FANOUT_CONSUME_WAIT_MS 50
#define FANOUT_RECORD_VERSION 1     /* the only GroupCommand version we know */
#define FANOUT_ID_MAX 255           /* group, cmd and msg ids, as inbox event ids */

typedef struct fanout_metrics {
    metric *commands, *sends, *refused, *events, *inbox, *skipped, *dead, *retries,
        *produce_failures;
    metric *fanout_size, *fanout_ms, *lat_get, *lat_put;
} fanout_metrics;

typedef struct fanout {
    service svc;
    const char *topic_groups, *topic_inbox, *topic_dead;
    long dr_failures;               /* produces the bus refused, ever */
    fanout_metrics m;
} fanout;

enum fanout_rec_kind { REC_CMD, REC_DEAD };

typedef struct fanout_rec {
    enum fanout_rec_kind kind;
    const bus_msg *m;
    Parley__GroupCommand *x;        /* decoded, also for a dead one that decoded */
    char reason[128];               /* REC_DEAD: why */
} fanout_rec;

/* ---- batch.c ---- */

/* Decodes n consumed records, applies them (apply_batch) until that
 * succeeds, retrying with backoff without consuming anything new, commits
 * and releases them. Returns early, uncommitted, when f->svc.stop is set
 * during a retry: everything is then consumed again. */
void batch_process(fanout *f, bus_msg *msgs, size_t n);

/* bus_conf.dr_cb: opaque is the fanout. Counts refusals in dr_failures. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset);

/* bus_produce that rides out a full local queue by polling for a while. */
int batch_produce(fanout *f, const char *topic, const char *key, size_t key_len,
                  const void *value, size_t len, char *err, size_t errlen);

/* ---- apply.c ---- */

/* The effects of one batch, in this order: the groups it names are read;
 * each command not yet applied (its offset above the group's `applied`) is
 * checked and applied in memory in record order; its group_events and
 * message copies (and the batch's dead letters) are produced and confirmed
 * by Kafka; then the answers to the requesting connections are produced and
 * confirmed; then the changed groups are written with their new `applied`.
 * PX_OK when all of it is durable, so the batch may be committed; on error
 * the whole batch is applied again from the stored state, yielding the same
 * records (ids derive from the commands), which the inbox dedupe absorbs. */
int apply_batch(fanout *f, fanout_rec *recs, size_t n, char *err, size_t errlen);

#endif
