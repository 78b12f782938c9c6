/* Internal interfaces of presence: the process state and the contract
 * between main.c (topics, metrics, expiry timer; service.c runs the rest)
 * and batch.c (applying one consumed batch). The main thread owns
 * everything; delivery reports arrive on it (inside bus_poll/bus_flush). */
#ifndef PARLEY_PRESENCE_H
#define PARLEY_PRESENCE_H

#include "bus.h"
#include "metrics.h"
#include "service.h"
#include "store.h"
#include "parley.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#define PRESENCE_EXPIRE_BEATS 10  /* beats of silence before a gateway is dead */
#define PRESENCE_CATCHUP_BEATS 3  /* a partition read this recently counts as caught up */
#define PRESENCE_GROUP "presence"
#define PRESENCE_BATCH 512
#define PRESENCE_CONSUME_WAIT_MS 50
#define PRESENCE_RECORD_VERSION 1
#define PRESENCE_SUB_MAX 1000  /* users in one SUBSCRIBE (PROTO_MAX_IDS, the gateway's cap) */
#define PRESENCE_MAX_PARTS 1024 /* partitions of parley.presence that main.c tracks */
#define PRESENCE_LAG_WAIT_MS 2000 /* a lag check's wait for a broker, per call */

typedef struct presence presence;
typedef struct notify notify;

/* The opaque of a dead-letter produce: the batch record whose commit waits
 * for it. */
typedef struct presence_tag {
    presence *p;
    size_t idx;
} presence_tag;

typedef struct presence_metrics {
    metric *connects, *disconnects, *beats, *resets, *expired, *dead, *retries,
        *produce_failures;
    metric *notify_changes, *notify_subs, *notify_dropped;   /* notify.c (issue 18) */
    metric *lat_apply, *lat_beat, *lat_expire;
} presence_metrics;

struct presence {
    service svc;
    const char *topic_presence, *topic_dead;
    presence_tag tags[PRESENCE_BATCH];
    size_t first_durable;           /* lowest record index with a gating produce */
    size_t failed_at;               /* lowest record index whose gating produce failed */
    int64_t next_expire_ms;         /* monotonic */
    int64_t read_ts[PRESENCE_MAX_PARTS]; /* per partition: producer time of the last record read */
    notify *nt;                     /* notify.c: presence to contacts */
    size_t last_batch;              /* records of the last consume, until the tick */
    presence_metrics m;
};

/* ---- batch.c ---- */

void batch_init(presence *p);

/* Applies n consumed PresenceRecords in record order (consecutive
 * connect/disconnects in one store_presence_apply, beats one by one),
 * commits each prefix once its store calls succeeded, retries the rest with
 * backoff without consuming anything new, and releases the records. Returns
 * early, uncommitted, when p->svc.stop is set during a retry. */
void batch_process(presence *p, bus_msg *msgs, size_t n);

/* bus_conf.dr_cb: opaque is a presence_tag. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset);

/* ---- notify.c: presence to contacts (issue 18) ---- */

notify *notify_new(void);
void notify_free(notify *nt);
/* user's connections changed (or, force, its hide setting): its watchers
 * are told at the next tick if its state moved (forced: in any case),
 * damped to one event a second per user. */
void notify_touch(presence *p, const char *user, int force);
/* Tells what is due; re-reads the users told online every heartbeat. */
void notify_tick(presence *p);
/* Answers a SUBSCRIBE record on its connection; PX_OK or a store error. */
int notify_subscribe(presence *p, const Parley__PresenceRecord *x, char *err, size_t errlen);
/* Applies a SETTINGS record and answers it; PX_OK or a store error. */
int notify_settings(presence *p, const Parley__PresenceRecord *x, char *err, size_t errlen);

#endif
