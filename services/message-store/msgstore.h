/* Internal interfaces of message-store: the process state and the contracts
 * between its modules. Threads: the main thread runs the inbox and sync
 * consume loop and owns everything below; delivery reports arrive on it too
 * (from inside bus_poll/bus_flush, which only the main thread calls). The
 * ack thread (acker.c) runs the same batch code on a msgstore of its own
 * that shares svc.st, svc.cfg and the metrics. The sweep thread uses only
 * svc.st (thread-safe), svc.cfg and metrics. main.c holds what is
 * message-store's own in its life; service.c runs the rest. */
#ifndef PARLEY_MSGSTORE_H
#define PARLEY_MSGSTORE_H

#include "bus.h"
#include "metrics.h"
#include "recent.h"
#include "service.h"
#include "store.h"
#include "parley.pb-c.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MSGSTORE_GROUP "message-store"
#define MSGSTORE_BATCH 512          /* records per bus_consume */
/* The acker's store calls cost per user in the run, whatever the number of
 * its acks (one get, one delete per user on FerretDB), so it takes more at
 * once: with 512 it fell behind at 1,000/s on the stack (ack records ~3 s
 * old when consumed: `delivered` receipts that late). */
#define MSGSTORE_ACK_BATCH 4096
#define MSGSTORE_BATCH_MAX MSGSTORE_ACK_BATCH /* sizes what is per record of a batch */
#define MSGSTORE_CONSUME_WAIT_MS 50
#define MSGSTORE_RECENT_BITS 17     /* 1 MiB: the keys pushed lately (inbox.c) */
#define MSGSTORE_RECORD_VERSION 1   /* the only InboxRecord/AckRecord/SyncRequest version we know */

/* Delivery ceilings: a Delivery is one Kafka record, so it stays well below
 * the broker's default message.max.bytes (1 MB) and the gateway's per-record
 * work stays bounded. An event larger than the byte cap travels alone. */
#define DELIV_MAX_EVENTS 256
#define DELIV_MAX_BYTES (256 * 1024)

typedef struct route_cache route_cache;
typedef struct putgate putgate;
typedef struct ackwait ackwait;
typedef struct writer writer;
typedef struct contacts contacts;
typedef struct devcache devcache;
typedef struct stored_mem stored_mem;
typedef struct synckept synckept;

typedef struct msgstore_metrics {
    metric *stored, *duplicates, *deliveries, *produce_failures, *offline, *syncs,
        *sync_events, *acks, *acked_events, *acked_messages, *dead, *retries,
        *cache_hits, *cache_misses, *devcache_hits, *devcache_misses, *lookup_failures,
        *swept_inbox, *swept_seen, *swept_media, *ack_waits, *ack_waits_found,
        *ack_waits_expired, *ack_waits_full, *acks_late, *ack_commits_held, *push_records,
        *sync_pages_scan, *sync_pages_kept, *sync_kept_bytes, *settled, *contact_pairs,
        *acked_from_memory, *claims;
    metric *lat_seen_claim, *lat_put, *lat_scan, *lat_ack, *lat_lookup,
        *lat_sweep, *lat_gate;
} msgstore_metrics;

/* What batch.c made of one consumed record. */
enum msgstore_rec_kind { REC_INBOX, REC_ACK, REC_SYNC, REC_DEVCMD, REC_DEAD };

typedef struct msgstore_rec {
    enum msgstore_rec_kind kind;
    bus_msg *m;
    union {
        Parley__InboxRecord *inbox; /* REC_INBOX, REC_SYNC (its sync is set), REC_DEVCMD */
        Parley__AckRecord *ack;
    } u;
    char reason[160];               /* REC_DEAD: why */
} msgstore_rec;

/* The opaque of every produce: which batch record's commit it gates
 * (idx), or none (idx == BATCH_BEST_EFFORT: live deliveries). */
#define BATCH_BEST_EFFORT SIZE_MAX
typedef struct msgstore msgstore;
typedef struct batch_tag {
    msgstore *ms;
    size_t idx;
    size_t pending;     /* produces with this tag not reported yet */
    size_t failed;      /* of them, reported failed (writer.c's push records) */
} batch_tag;

struct msgstore {
    service svc;
    const char *topic_inbox, *topic_acks, *topic_presence, *topic_receipts,
        *topic_groups, *topic_dead, *topic_push;
    route_cache *cache;
    recent *recent;                 /* inbox.c: keys pushed lately (main thread) */
    putgate *gate;                  /* putgate.c: shared with the acker */
    ackwait *waits;                 /* ackwait.c: the acker's acks that found nothing yet */
    contacts *contacts;             /* contacts.c: pairs recorded lately (store stage) */
    devcache *devcache;             /* devcache.c: device lists for acks, shared with the acker */
    stored_mem *stored;             /* stored.c: events stored lately, for the acker */
    synckept *kept;                 /* synckept.c: rests of sync scans (main msgstore) */

    /* Delivery-report bookkeeping for the batch in flight (batch.c). */
    batch_tag tags[MSGSTORE_BATCH_MAX];
    batch_tag best_effort;
    batch_tag *live_tag;            /* writer.c: its batch's tag while it pushes, or NULL */
    size_t first_durable;           /* lowest record index with a gating produce */
    size_t failed_at;               /* lowest record index whose gating produce failed */
    int64_t dr_log_ms;              /* rate limit for produce-failure logs */
    long dr_suppressed;

    uint8_t *pack;                  /* reusable protobuf encode buffer */
    size_t pack_cap;
    writer *writer;                 /* writer.c: the store stage's thread (main msgstore) */
    msgstore *acker;                /* acker.c: the ack consumer's own msgstore */
    pthread_t acker_th;
    msgstore *late;                 /* acker.c: the acker's late thread's msgstore */
    pthread_t late_th;
    pthread_t sweeper;              /* sweep.c */
    pthread_mutex_t sweep_mu;
    pthread_cond_t sweep_cv;
    int sweep_started, sweep_stop;
    msgstore_metrics m;
};

/* ---- batch.c: one consumed batch, in order, retried until durable ---- */

/* Processes n consumed records (decode, dispatch in order, commit, retry
 * with backoff on store errors) and releases them. Returns after every
 * record is committed, or early when ms->svc.stop is set (the rest is then
 * left uncommitted and is consumed again by whoever owns the partition
 * next). */
void batch_process(msgstore *ms, bus_msg *msgs, size_t n);

/* Prepares the delivery-report tags; call once before the first batch. */
void batch_init(msgstore *ms);

/* The bus delivery-report callback (bus_conf.dr_cb); opaque is always a
 * batch_tag from batch_tag_for / batch_tag_best_effort. */
void batch_on_delivery(void *opaque, int status, const char *err, int32_t partition,
                       int64_t offset);

/* The opaque for a produce whose durability gates the commit of batch record
 * idx (sync deliveries, dead letters): the batch commits nothing from idx on
 * until the record is acknowledged, and retries from idx if it fails. */
void *batch_tag_for(msgstore *ms, size_t idx);
/* The opaque for a produce nobody waits for (live deliveries); while
 * writer.c pushes a batch, that batch's tag, whose reports it counts. */
void *batch_tag_best_effort(msgstore *ms);

/* Releases n consumed records and frees their decoded forms (recs). */
void batch_release(msgstore *ms, bus_msg *msgs, msgstore_rec *recs, size_t n);

/* bus_produce that rides out a full local queue (PX_AGAIN) by polling for
 * up to a few seconds. */
int batch_produce(msgstore *ms, const char *topic, const char *key, size_t key_len,
                  const void *value, size_t len, void *opaque, char *err, size_t errlen);

/* ---- writer.c: the store stage behind the consume thread ---- */

/* Starts the writer thread (main msgstore only). */
int writer_start(msgstore *ms, char *err, size_t errlen);
/* Consume thread: pushes a batch of only InboxRecords (inbox_push) and
 * queues its store stage; it commits later, in order, from writer_reap.
 * Takes recs; copies msgs (their records are released at the commit).
 * Waits first while the pipeline is full. */
void writer_add(msgstore *ms, const bus_msg *msgs, msgstore_rec *recs, size_t n);
/* Consume thread: commits, in order, the batches that are stored and whose
 * pushes the bus has reported. Call often (after every consume). */
void writer_reap(msgstore *ms);
/* Consume thread: waits until every queued batch is committed. 1 when the
 * pipeline is empty, 0 when ms is told to stop first (nothing may commit
 * past what is still queued then). */
int writer_drain(msgstore *ms);
/* Stops the thread, commits what is done, releases the rest uncommitted
 * (consumed again). Before the bus is destroyed; writer_free after it. */
void writer_stop(msgstore *ms);
void writer_free(msgstore *ms);

/* ---- inbox.c: runs of InboxRecords ---- */

typedef struct inbox_run inbox_run;

/* Push stage (consume thread): pushes n consecutive InboxRecords to their
 * online recipients (all but the ones this process knows as resends or
 * already pushed) and numbers the run in the putgate. recs must outlive
 * the run; end it with inbox_push_end. */
inbox_run *inbox_push(msgstore *ms, msgstore_rec *recs, size_t n);
/* Store stage (any thread; the store is thread-safe): stores the runs'
 * records with crash-safe dedupe (one seen claim and one inbox put for
 * all of them) and marks the last run durable in the putgate. PX_OK when
 * every record's store effect is durable; a retry repeats the store steps
 * harmlessly. Runs must be given in push order. */
int inbox_store(msgstore *ms, inbox_run *const *runs, size_t nruns, char *err, size_t errlen);
/* Consume thread: ends the run's registry refresh (which may push to
 * gateways the registry adds, with the current best-effort tag) and frees
 * it, waiting for the refresh's lookups if they are still under way
 * (inbox_push_ready says whether they are). NULL is a no-op. */
void inbox_push_end(inbox_run *ir);
int inbox_push_ready(const inbox_run *ir);

/* Both stages in a row, then waits until the bus holds the pushes (the
 * batch path for batches that carry more than InboxRecords). PX_OK when
 * every record's store effect is durable; a retry pushes nothing again. */
int inbox_store_run(msgstore *ms, msgstore_rec *recs, size_t n, char *err, size_t errlen);

/* ---- contacts.c (issue 18) ---- */
contacts *contacts_new(void);
void contacts_free(contacts *c);
/* Records in the store the pairs of users the n stored events show in
 * contact (a message's recipient and sender; a group member and who
 * joined), but those recorded lately. Store stage only. */
int contacts_record(msgstore *ms, const store_event *ev, size_t n, char *err, size_t errlen);


/* ---- pushrec.c: push records for offline devices (issue 18) ---- */

/* With PARLEY_PUSH_URL set, produces a PushRecord to parley.push for each
 * stored message and group event among recs (not those from one of the
 * user's own devices), with tag as the produces' opaque; PX_OK at once
 * when push is off. PX_ERROR when the bus refused one (a repeat of the
 * whole call only repeats records, which the push service coalesces). */
int pushrec_emit(msgstore *ms, const msgstore_rec *recs, size_t n, void *tag, char *err,
                 size_t errlen);

/* ---- putgate.c: acks wait for the puts of what was pushed ---- */

putgate *putgate_new(void);
void putgate_free(putgate *g);
/* A run is about to be pushed: returns its number. */
uint64_t putgate_pushed(putgate *g);
/* Run number run (and every one before it) has its store effects durable. */
void putgate_durable(putgate *g, uint64_t run);
/* Waits until run (0: every run pushed so far) is durable: PX_OK, or
 * PX_AGAIN after timeout_ms (the inbox consumer is retrying a failing
 * store). With hurry, calls the hurry hook first when it has to wait: only
 * for an event still held (pending), whose round the hold would delay; a
 * round already under way needs no hurry, and a hurry ends the hold of
 * every event queued, whose acks may then find their events taken in
 * turn. */
int putgate_wait(putgate *g, uint64_t run, int hurry, int64_t timeout_ms);
/* hurry(arg) is called (under the gate's lock: it may only signal) when
 * an ack waits for runs not stored yet: the writer ends its hold. */
void putgate_on_wait(putgate *g, void (*hurry)(void *), void *arg);

/* Held events: pushed, not stored yet. An event's entry is borrowed (ev
 * must stay valid until putgate_release) and lives from before its push
 * to the end of its run. */
enum putgate_state {
    PUTGATE_NONE,       /* not held: stored, never pushed here, or long gone */
    PUTGATE_PENDING,    /* waiting for its store round */
    PUTGATE_STORING,    /* taken by a store round: the store will have it */
    PUTGATE_STORED,     /* durable in the store */
    PUTGATE_SETTLED,    /* acked by every device that needs it before its round:
                           its receipt fact is durable, it is never stored */
};
/* Push stage: the n events of run (putgate_pushed) about to be pushed are
 * held (PENDING). */
void putgate_hold(putgate *g, uint64_t run, const store_event *ev, size_t n);
/* Run end: the entries of these events (by address) leave. */
void putgate_release(putgate *g, const store_event *ev, size_t n);
/* Store stage, before the put: settled[i] = 1 for an event (by user, id)
 * that an ack settled (leave it out); the pending ones become STORING. */
void putgate_take(putgate *g, const store_event *ev, size_t n, int *settled);
/* Store stage, once durable: the STORING ones (by user, id) become STORED. */
void putgate_stored(putgate *g, const store_event *ev, size_t n);
/* The state of (user, id) and, when held, its run in *run; for a PENDING
 * one, cb(arg, ev) runs under the gate's lock first (copy what is needed:
 * ev is gone after the call). */
enum putgate_state putgate_find(putgate *g, const char *user, const char *id, uint64_t *run,
                                void (*cb)(void *, const store_event *), void *arg);
/* Acker, once the event's fact is durable: PENDING -> SETTLED. 1 if it was
 * still pending, 0 if a store round took it meanwhile (then it is stored,
 * and the ack goes the store's way). */
int putgate_settle(putgate *g, const char *user, const char *id);

/* ---- stored.c: events stored lately, for the acker ---- */

stored_mem *stored_new(void);
void stored_free(stored_mem *s);
/* Store stage, once the n events' put is durable: remembers them. */
void stored_add(stored_mem *s, const store_event *ev, size_t n);
/* What the acker needs of a remembered event (sender, group: owned copies,
 * NULL when it has none; stored_event_clear frees them). */
typedef struct stored_event {
    int64_t seq;
    int kind;
    char *sender, *group;
} stored_event;
/* 1 and *out filled if (user, id) is remembered, else 0. */
int stored_get(stored_mem *s, const char *user, const char *id, stored_event *out);
void stored_event_clear(stored_event *e);
/* The events named by keys were deleted: forgotten. */
void stored_forget(stored_mem *s, const store_key *keys, size_t n);
/* The group of a group message, read from its event text (the inbox keeps
 * no separate field); NULL for a 1:1 message. Caller frees. */
char *stored_group_of(const store_event *ev);

/* ---- route.c: presence cache and live pushes ---- */

route_cache *route_cache_new(void);
void route_cache_free(route_cache *rc);

/* Pushes freshly consumed events to their recipients' gateways, several
 * events of one user per Delivery. Best effort: an event that cannot be
 * pushed now is stored and goes out with the user's next sync. Users
 * pushed to from expired cache entries are looked up again meanwhile:
 * the returned refresh (NULL: none) must be ended with route_refresh_end
 * while ev is still valid, on the main thread; it may push ev again to
 * gateways the registry adds. */
typedef struct route_refresh route_refresh;
route_refresh *route_live(msgstore *ms, const store_event *ev, size_t n);
void route_refresh_end(route_refresh *r);
/* 1 when route_refresh_end would not wait: the lookups on a thread of
 * their own have ended, or there are none (NULL) or none on a thread. */
int route_refresh_ready(const route_refresh *r);

/* The sync path's hint: gateway now holds a connection of user, whatever
 * the registry says yet. alone: the user has no other synced device, so
 * no other gateway needs the user's events (a device gets live events
 * only once its own sync has noted its gateway here). */
void route_note_gateway(msgstore *ms, const char *user, const char *gateway, int alone);

/* The registry's gateways of user with every gateway the cache holds for
 * the user (fresh or expired, notes of syncs consumed here included, which
 * a lagging registry does not name yet), at most max; main thread. PX_OK,
 * or PX_ERROR when the registry failed (then the cache's alone). */
int route_all_gateways(msgstore *ms, const char *user, char (*gws)[65], size_t max, size_t *n,
                       char *err, size_t errlen);

/* ---- deliv.c: building and producing Delivery records ---- */

/* A Delivery under construction: event texts borrowed or copied. */
typedef struct deliv {
    ProtobufCBinaryData ev[DELIV_MAX_EVENTS];
    uint8_t *owned[DELIV_MAX_EVENTS];   /* non-NULL: ev[i].data is ours to free */
    char *skip[DELIV_MAX_EVENTS];       /* the origin device of event i, or "" */
    size_t nskip;                       /* events with a skip */
    int64_t seq[DELIV_MAX_EVENTS];      /* event i's seq, or -1 (not an inbox event) */
    size_t nseq;                        /* events with a seq */
    size_t n, bytes;
    int synced;                /* the connection's sync ends with this one */
    const char *close_device;  /* set: close user's connections of this device */
    int64_t more_from_seq;     /* > 0: a sync page ends; more from this seq */
} deliv;

/* 1 if adding an event of len bytes would pass a ceiling (an empty deliv is
 * never full, so an oversized event travels alone). */
int deliv_full(const deliv *d, size_t len);
/* Adds an event; copy: keep a private copy (the text dies after the call).
 * skip (may be NULL; borrowed until the send) names the device whose
 * connections do not get it. seq: the inbox event's seq, which lets the
 * gateway drop a second copy on one connection (-1: none). */
void deliv_add(deliv *d, const void *json, size_t len, int copy, const char *skip, int64_t seq);
/* An empty deliv (a fresh one: no memset of its slots needed). */
void deliv_init(deliv *d);
/* Frees copies and clears events and the end marks. */
void deliv_reset(deliv *d);
/* Encodes d once as Delivery{user, conn, events, seqs, synced, more_from_seq} and
 * produces it to
 * <prefix>gw.<gateway> keyed by user, for each of the n gateways. Every
 * gateway is tried; PX_ERROR if any failed (err: the last failure). */
int deliv_send(msgstore *ms, const deliv *d, const char (*gws)[65], size_t ngws,
               const char *user, uint64_t conn, void *opaque, char *err, size_t errlen);

/* ---- sync.c: the backlog for a new connection ---- */

/* Serves the n SyncRequests recs[idx[0]], recs[idx[1]], ... (REC_SYNC, in
 * batch order). For each: notes the gateway in the presence cache, links
 * the connection's device on its first sync (devices_link) and pushes one
 * page of what the device still needs from r->from_seq in seq order (at
 * most SYNC_PAGE events and about SYNC_PAGE_BYTES), with events' seqs. The
 * page's last Delivery carries synced=true when the inbox is exhausted,
 * else more_from_seq for the gateway's next SyncRequest. Reads of several
 * requests run side by side when the store allows. Returns how many, from
 * the first, were served (n: all; else err says why the next was not). */
size_t sync_serve(msgstore *ms, const msgstore_rec *recs, const size_t *idx, size_t n, char *err,
                  size_t errlen);

/* ---- synckept.c: what a sync's scan read past its page ---- */

typedef struct sync_ev {
    uint8_t *json;
    size_t len;
    int64_t seq;
} sync_ev;

/* What a kept event of len bytes costs in memory: its bytes, its slot and
 * the allocator's header. Counting the bytes alone let 256 rests of 20,000
 * tiny events hold ~200 MB past the 64 MiB ceiling. */
#define SYNC_EV_COST(len) ((len) + sizeof(sync_ev) + 16)

/* The events a scan read past the page it served, in seq order, for the
 * connection's next page. */
typedef struct sync_rest {
    char *user, *dev;
    int64_t after;          /* the page it follows ended at this seq */
    sync_ev *ev;            /* events [head, n) are still to serve */
    size_t head, n, cap;
    size_t bytes;           /* their memory: SYNC_EV_COST of each */
    int complete;           /* the scan read to the inbox's end */
    uint32_t version;       /* the user's write version before the scan */
    unsigned gen;           /* bus_generation at the scan */
    int64_t used_ms;        /* monotonic: when it was last kept */
} sync_rest;

/* bytes_gauge: set to the bytes kept (the rests' bytes). Thread-safe
 * throughout. */
synckept *synckept_new(metric *bytes_gauge);
void synckept_free(synckept *k);
void sync_rest_free(sync_rest *r);
/* The kept rest of user's device dev whose page ended at seq after, read
 * in bus generation gen, taken out (the caller owns it), or NULL. Any other
 * rest of that device is dropped. */
sync_rest *synckept_take(synckept *k, const char *user, const char *dev, int64_t after,
                         unsigned gen);
/* Keeps r (taken over) for the next page; an empty r is freed. */
void synckept_put(synckept *k, sync_rest *r);
/* An inbox write for user is under way: a rest read before it no longer
 * ends the backlog. Store stage. */
void synckept_wrote(synckept *k, const char *user);
uint32_t synckept_version(synckept *k, const char *user);
/* Drops every rest of user (a device command changed what they need). */
void synckept_forget(synckept *k, const char *user);

/* ---- devcmd.c: `devices` and `device_unlink` ---- */

/* Serves one DeviceCommand (batch record idx) and answers its connection:
 * the user's linked devices (online: named by a connection record), or an
 * unlink (the device is refused from then on, the events only it still
 * needed are deleted, its connections are closed with 4001). Idempotent:
 * a redelivered unlink repeats its steps and answers again. */
int devcmd_serve(msgstore *ms, size_t idx, const Parley__DeviceCommand *x, char *err,
                 size_t errlen);

/* ---- ack.c: acks delete inbox events and make receipt facts ---- */

/* Applies n consecutive AckRecords (recs[i].kind == REC_ACK, recs[0] being
 * batch record idx) of any users and devices together, as (user, id, device)
 * keys. For each chunk: the users' devices and the held events are read,
 * their ReceiptFacts (and a `read`'s READ_CLAIMs for ids no longer held)
 * are produced to parley.receipts keyed by the acker and confirmed by
 * Kafka, and only then are the events every device has acked deleted and
 * the others marked for the acking devices. PX_OK when every chunk got
 * that far. */
int ack_apply_run(msgstore *ms, size_t idx, msgstore_rec *recs, size_t n, char *err,
                  size_t errlen);

/* Tries the acks waiting in ms->waits whose time has come (ackwait.c), on
 * the acker's late thread: those whose event is stored now are applied as
 * ack_apply_run applies them (facts durable, then delete or mark); the
 * others wait longer or expire. ms is the late thread's own msgstore (its
 * own producer and batch bookkeeping). */
void ack_retry_due(msgstore *ms);

/* ---- ackwait.c: acks whose event is not stored yet ---- */

/* Entries: at most ~480 bytes each with their strings, about 8 MiB; late
 * acks fill it in 0.8 s at 20,000/s. */
#define ACKWAIT_MAX 16384
#define ACKWAIT_MS 30000              /* covers a takeover: 6 s session timeout, rebalance, re-store */
#define ACKWAIT_FIRST_MS 250          /* first retry; doubles up to the next */
#define ACKWAIT_MAX_BACKOFF_MS 4000
#define ACKWAIT_REPORT_MS 10000        /* at most one log line of dropped acks per */
#define ACKWAIT_APPLIED_BITS 16 /* 512 KiB: the acks applied lately (recent.h) */
#define ACKWAIT_PARTS_MAX 1024         /* acks partitions whose commit is held */

/* One waiting ack of one device; user, id and dev share one allocation. */
typedef struct ackwait_entry {
    char *user, *id, *dev;
    int read;                  /* a `read` (or an ack later read) */
    int64_t ts_ms;             /* the receipts' time */
    int64_t until_ms, next_ms, backoff_ms; /* monotonic */
    int32_t part;              /* the AckRecord's partition and offset in topic */
    int64_t off;               /* (the oldest, if consumed more than once) */
} ackwait_entry;

/* topic: the acks topic, whose commits ackwait_commit holds. */
ackwait *ackwait_new(const msgstore_metrics *m, const char *topic);
void ackwait_free(ackwait *w);
/* Keeps an ack that found nothing, consumed from (part, off) of the acks
 * topic, first tried ACKWAIT_FIRST_MS later; or, late, one not tried yet
 * whose event is stored or being stored (ack.c: ack_late), due at once:
 * PX_OK, or PX_AGAIN when full (a wait counted; a late ack is applied at
 * once instead). */
int ackwait_add(ackwait *w, const char *user, const char *id, const char *dev, int read,
                int64_t ts_ms, int32_t part, int64_t off, int late);
/* The acker's bus_commit: records m[0..n) are applied; each partition's
 * committed offset moves up to them, but never past the oldest record
 * whose ack still waits here, so a crash consumes that record again. */
void ackwait_commit(ackwait *w, bus *b, const bus_msg *m, size_t n);
/* Stores the commit points again if waits left (found, expired or
 * forgotten) since the last time: the acker's thread, which owns b. */
void ackwait_recommit(ackwait *w, bus *b);
/* Drops every waiting entry (handed over elsewhere: acker.c). */
void ackwait_forget(ackwait *w);
/* (user, id) was found and applied by an ack or read of this acker. */
void ackwait_applied(ackwait *w, const char *user, const char *id);
/* 1 if it was lately (a read of it that finds nothing need not wait). */
int ackwait_was_applied(ackwait *w, const char *user, const char *id);
/* A `read` of (user, id) that found nothing: marks its waiting acks read;
 * 1 if there were any. */
int ackwait_note_read(ackwait *w, const char *user, const char *id, int64_t ts_ms);
/* Copies of at most max of the entries due at now_ms, sorted by (user, id,
 * dev), unique, taken from where the last slice stopped (so a long list
 * is tried all round). The caller owns them: ackwait_settle or
 * ackwait_taken_free. The entries themselves stay until settled. */
ackwait_entry *ackwait_take(ackwait *w, int64_t now_ms, size_t max, size_t *n);
void ackwait_taken_free(ackwait_entry *t, size_t n);
/* After a try of the taken entries t[0..n) (found[i] for the i-th), which
 * it frees: found ones (remembered as applied) and those past their time
 * leave, the others are tried again later, with a doubled backoff. An
 * entry added again meanwhile was merged with its original and settles
 * with it. */
void ackwait_settle(ackwait *w, ackwait_entry *t, size_t n, const int *found, int64_t now_ms);
/* Waits until an entry may be due, a late one is added, ackwait_wake, or
 * max_ms pass. */
void ackwait_wait_due(ackwait *w, int64_t max_ms);
void ackwait_wake(ackwait *w);
/* Logs the acks dropped (expired, or refused when full) since the last
 * report, at most once per ACKWAIT_REPORT_MS: no receipt is made of them
 * until their events are delivered and acked again. */
void ackwait_report(ackwait *w, int64_t now_ms);

/* ---- devices.c: which of a user's devices need which events ---- */

#define DEVICES_MAX 32   /* linked devices of one user read (PARLEY_MAX_DEVICES <= 16) */

/* One linked device of a user. */
typedef struct devices_dev {
    char dev[65];
    int64_t since;             /* needs events with seq > since */
} devices_dev;

/* A user's linked devices, as devices_load reads them. */
typedef struct devices_list {
    const char *user;          /* set by the caller */
    devices_dev d[DEVICES_MAX];
    size_t n;
    int overflow;              /* more than DEVICES_MAX: no event counts as covered */
    msgstore *ms;
    int rc;
    char err[PX_ERRLEN];
} devices_list;

/* The list of user among n lists sorted by user, or NULL. */
const devices_list *devices_find(const devices_list *l, size_t n, const char *user);
/* dev, or the default device for an empty one (an older gateway's record). */
const char *devices_name(const char *dev);
/* Reads the linked devices of each lists[i].user, side by side when the
 * store serves calls in parallel. */
int devices_load(msgstore *ms, devices_list *lists, size_t n, char *err, size_t errlen);
/* 1 when every device of l that needs an event of seq is among acked (the
 * stored acks) or now (this ack's devices): the event can go. */
int devices_covered(const devices_list *l, int64_t seq, const char *const *acked, size_t nacked,
                    const char *const *now, size_t nnow);
/* The same over n devices known in full (no overflow). */
int devices_covered_by(const devices_dev *d, size_t n, int64_t seq, const char *const *acked,
                       size_t nacked, const char *const *now, size_t nnow);
/* Sets skip[i] for the InboxRecords among recs[0..n) that come from a
 * device (origin_device: an own message, a read state) and that no other
 * device of their user needs: they are neither pushed nor stored. */
int devices_unneeded(msgstore *ms, const msgstore_rec *recs, size_t n, int *skip, char *err,
                     size_t errlen);
/* Marks each of the n stored events that has an origin as acked by it. */
int devices_mark_origins(msgstore *ms, const store_event *ev, size_t n, char *err,
                         size_t errlen);
/* The sync of (user, dev), whose SyncRequest is at offset: links the device
 * on its first sync (since -1 for the user's first device, else offset)
 * and gives its since. An unknown device reads STORE_DEVICE_UNSYNCED.
 * *alone: the user has no other synced device. */
int devices_link(msgstore *ms, const char *user, const char *dev, int64_t offset,
                 int64_t *since, int *alone, char *err, size_t errlen);

/* ---- devcache.c: the device lists acks decide with ---- */

devcache *devcache_new(const msgstore_metrics *m);
void devcache_free(devcache *dc);
/* Decides, from user's kept list, whether an event of seq acked by acked
 * (stored) and now (this ack) is covered (devices_covered): 1 with *gone
 * set, or 0 when no kept list may decide for seq (none, expired, or kept
 * before an event of seq was seen stored). Any thread. */
int devcache_covered(devcache *dc, const char *user, int64_t seq, const char *const *acked,
                     size_t nacked, const char *const *now, size_t nnow, int *gone);
/* The same, uncounted (parley_msgstore_devices_cache_total): for a caller
 * that counts what it decided itself. */
int devcache_lookup(devcache *dc, const char *user, int64_t seq, const char *const *acked,
                    size_t nacked, const char *const *now, size_t nnow, int *gone);
/* The token a read of user's devices passes to devcache_put: take it
 * before the read begins. */
uint64_t devcache_epoch(devcache *dc, const char *user);
/* Keeps l, a list read from the store after an event of its user with seq
 * upto was seen there (by a store call that ended before the read began):
 * it may decide for events up to that seq. A list that is not exact
 * (overflow), names no synced device, or whose user was forgotten since
 * epoch (devcache_epoch) is not kept. */
void devcache_put(devcache *dc, const devices_list *l, int64_t upto, uint64_t epoch);
/* user's devices changed in this process (a link, an unlink), or a
 * SyncRequest of the user was served. */
void devcache_forget(devcache *dc, const char *user);
/* The consume thread pushed ev[0..n) under its assignment gen
 * (bus_generation): each kept list of their users now decides for them.
 * A new gen drops every list first. */
void devcache_consumed(devcache *dc, unsigned gen, const store_event *ev, size_t n);

/* ---- acker.c: acks on their own consumer ---- */

/* Starts a thread consuming parley.acks in group "<prefix>message-store-acks"
 * with a bus and a stop flag of its own, sharing ms's store, configuration
 * and metrics; the main consumer takes only inbox and sync. acker_stop
 * stops it (handing the acks still waiting over on parley.acks), joins
 * it and leaves its group. */
int acker_start(msgstore *ms, char *err, size_t errlen);
void acker_stop(msgstore *ms);
/* 1 once the ack consumer ended on a bus that failed for good (bus_failed):
 * the process must stop and be restarted. */
int acker_failed(const msgstore *ms);

/* ---- sweep.c: retention ---- */

/* A thread that runs the retention sweep every cfg.sweep_ms, off the
 * consume loop so a long delete never stalls deliveries. */
int sweep_start(msgstore *ms, char *err, size_t errlen);
void sweep_stop(msgstore *ms);

#endif
