/* Internal interfaces of the push service (issue 18): the process state and
 * the contracts between main.c (topics, metrics, settings; service.c runs
 * the rest), queue.c (consumed push records, bursts per user, commits in
 * offset order), target.c (which devices of a user to wake) and call.c
 * (the signed webhook calls, retries and their outcome). Everything runs
 * on the service's one consume thread: libcurl's multi interface drives
 * the calls from the loop's tick, so nothing here is shared. */
#ifndef PARLEY_PUSH_H
#define PARLEY_PUSH_H

#include "bus.h"
#include "metrics.h"
#include "service.h"
#include "store.h"
#include "parley.pb-c.h"

#include <curl/curl.h>
#include <stddef.h>
#include <stdint.h>

#define PUSH_GROUP "push"
#define PUSH_BATCH 512
#define PUSH_CONSUME_WAIT_MS 20     /* also how often calls make progress when idle */
#define PUSH_RECORD_VERSION 1       /* the only PushRecord version we know */
#define PUSH_MAX_HELD 100000        /* records held uncommitted; past it new ones drop */
#define PUSH_MAX_DEVICES 32         /* devices of one user called per burst */
#define PUSH_BACKOFF_MIN_MS 500     /* first retry of a failed call; doubles */
#define PUSH_BACKOFF_MAX_MS 60000
#define PUSH_USER_SLOTS 4096        /* hash buckets of the user table */

typedef struct push_metrics {
    metric *records, *sent, *failed, *retried, *dropped, *gone, *skipped_online,
        *skipped_gone, *dead, *pending, *lat_call;
} push_metrics;

typedef struct push_job push_job;
typedef struct push_user push_user;
typedef struct push_call push_call;

/* A consumed record held until its burst's calls are over. */
typedef struct push_held {
    int64_t offset;
    push_job *job;          /* NULL: nothing to wait for */
} push_held;

typedef struct push_part {
    push_held *v;
    size_t head, n, cap;    /* v[head..n) still held */
} push_part;

/* One burst to one user: records coalesced while collecting, then one call
 * per offline device. */
enum push_job_state { PUSH_COLLECTING, PUSH_SENDING, PUSH_DONE };

struct push_job {
    push_job *next;         /* in the collecting list */
    push_user *u;
    enum push_job_state state;
    int refs;               /* held records naming it, + 1 until done */
    long count;             /* events in the burst */
    int64_t first_ts_ms;    /* wall clock: the oldest event (bounds the retries) */
    int64_t due_ms;         /* monotonic: when collecting ends */
    Parley__PushRecord *last; /* the newest event (payload's kind, sender, id) */
    push_call *calls;
    size_t ncalls, open;
};

struct push_user {
    push_user *next;        /* in its hash bucket */
    char name[65];
    push_job *collecting, *sending;
};

struct push_call {
    push_job *job;
    char dev[65];
    char *body;             /* the payload, signed once */
    struct curl_slist *hdrs;
    CURL *h;                /* in flight; NULL otherwise */
    int attempts;
    int64_t next_ms;        /* monotonic: next attempt */
    int64_t t0_us;
    int done;
};

typedef struct push {
    service svc;
    const char *topic_push, *topic_dead;
    long dr_failures;       /* dead letters the bus refused since the last try */
    push_part *parts;       /* by partition */
    size_t nparts;
    size_t held;            /* records held, all partitions */
    push_user *users[PUSH_USER_SLOTS];
    push_job *collect_head, *collect_tail;
    push_call **waiting;    /* calls to (re)try, in no order */
    size_t nwaiting, waiting_cap;
    size_t inflight;
    CURLM *multi;
    push_metrics m;
} push;

/* ---- queue.c ---- */

/* Takes n consumed records (decoded, coalesced into bursts, held; one that
 * does not decode goes to the dead-letter topic first) and releases them;
 * commits happen later, in offset order, as bursts end. */
void queue_add(push *p, bus_msg *msgs, size_t n);
/* Starts the calls of the bursts due (queue -> target -> call) and
 * commits what is over. Once per loop turn. */
void queue_tick(push *p);
/* A burst's last call ended: the job is done; commit what is over. */
void queue_job_done(push *p, push_job *j);
/* bus_conf.dr_cb (only dead letters are produced); opaque is the push. */
void queue_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset);
/* Frees everything (uncommitted records are consumed again). */
void queue_free(push *p);

/* ---- target.c ---- */

/* The devices of user to wake now: linked, not connected, not answered
 * 410 since their last connection. PX_ERROR when the store failed. */
int target_devices(push *p, const char *user, char (*devs)[65], size_t max, size_t *n,
                   char *err, size_t errlen);
/* The webhook answered 410 for (user, dev): no pushes until it connects
 * again (recorded in the device's record). */
void target_gone(push *p, const char *user, const char *dev);

/* ---- call.c ---- */

int call_init(push *p, char *err, size_t errlen);
/* Queues one call per device for job j (payload built and signed now). */
void call_start_job(push *p, push_job *j, char (*devs)[65], size_t n);
/* Starts due calls up to the concurrency limit and finishes the ones that
 * ended (sent, gone, failed: retried or dropped). */
void call_run(push *p);
/* Aborts every call (a stop) and frees libcurl's state. */
void call_free(push *p);

/* The hex HMAC-SHA256 of body under secret, into hex[65]. */
void call_sign(const char *secret, const char *body, size_t len, char hex[65]);

#endif
