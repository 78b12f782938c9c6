/* Internal interfaces of the gateway: the process state shared by its
 * threads (MHD's HTTP thread, the epoll workers, the Kafka delivery and
 * poll threads) and the contracts between its modules. */
#ifndef PARLEY_GATEWAY_H
#define PARLEY_GATEWAY_H

#include "admin_http.h"
#include "auth.h"
#include "bus.h"
#include "config.h"
#include "metrics.h"
#include "protocol.h"
#include "store.h"

#include <microhttpd.h>

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct worker worker;
typedef struct conn conn;
typedef struct registry registry;
typedef struct media media;
typedef struct media_req media_req;
typedef struct http_guard http_guard;
typedef struct watch watch;
typedef struct dedupe dedupe;

/* Command kinds with a rate limit of their own (registry_take). */
enum gw_rate { GW_RATE_SEND, GW_RATE_ACK, GW_RATE_READ, GW_RATE_GROUP, GW_RATE_PING, GW_RATE_N };
/* "send", "ack", ...: the kind label of metrics and logs (commands.c). */
extern const char *const gw_rate_names[GW_RATE_N];

typedef struct gw_metrics {
    metric *conns, *accepted, *refused_auth, *closed, *frames_in, *sent_ok,
        *sent_fail, *delivered, *dropped, *slow_closed, *held_dropped, *errors, *send_latency,
        *parked, *unparked, *park_deferred;
    metric *dups_dropped;             /* inbox events a connection had already (dedupe.c) */
    metric *rate_limited[GW_RATE_N];  /* commands refused rate_limited, by kind */
    metric *user_conns_refused;       /* upgrades refused: PARLEY_USER_CONNS */
    metric *devices_refused;          /* upgrades refused: device limit or unlinked */
    metric *frag_closed;              /* closed 1009: PARLEY_MAX_FRAGMENTS */
    metric *max_conns;                /* the connection cap in force (RLIMIT_NOFILE) */
    metric *media_stored, *media_deduped, *media_uploads, *media_downloads,
        *media_bytes_out, *media_refused;
} gw_metrics;

typedef struct gw {
    config cfg;
    const char *secret;          /* HS256 key for dev tokens, or NULL */
    auth *auth;                  /* checks every client's token */
    int64_t epoch;               /* boot time in ms: orders our restarts */
    bus *b;
    char topic_inbox[96], topic_acks[96], topic_presence[96],
        topic_groups[96], topic_deliver[160];
    worker **workers;
    size_t nworkers;
    _Atomic size_t next_worker;
    registry *reg;
    watch *watch;                /* presence watchers (watch.c, issue 18) */
    store *st;                   /* media (media.c) and device registration (http.c) */
    media *md;
    struct MHD_Daemon *mhd;
    http_guard *guard;
    admin *metrics;              /* PARLEY_METRICS_LISTEN's server, if set */
    int listen_fd;               /* -1 until http_bind */
    _Atomic int64_t last_beat_ok; /* ms of the last heartbeat Kafka accepted */
    volatile sig_atomic_t stopping;
    volatile sig_atomic_t failed;   /* the bus failed for good (bus_failed): exit 1 */
    gw_metrics m;
} gw;

/* ---- worker.c: one epoll reactor thread per worker ---- */

/* Mail carries work to a worker thread: new sockets, deliveries and answers
 * to sends. Ownership of a mail passes to the worker with worker_post. */
/* MAIL_EVENT is part of a connection's sync (sent in order); MAIL_LIVE is a
 * live push, held until the connection's sync is done so a new event never
 * overtakes older pending ones; MAIL_SYNCED ends the sync; MAIL_SYNC_MORE
 * ends a page of it (the next starts at from_seq); MAIL_UNLINKED closes the
 * connection if it is of the device named by data (4001). */
enum mail_kind { MAIL_CONN, MAIL_EVENT, MAIL_LIVE, MAIL_SYNCED, MAIL_SYNC_MORE, MAIL_UNLINKED };
typedef struct mail {
    struct mail *next;
    enum mail_kind kind;
    uint64_t conn_id;
    conn *c;                     /* MAIL_CONN only */
    int64_t from_seq;            /* MAIL_SYNC_MORE only */
    int64_t seq;                 /* MAIL_EVENT, MAIL_LIVE: the inbox event's seq, or -1 */
    const char *skip;            /* MAIL_LIVE: a device whose connections drop it, or NULL */
    size_t len;
    char data[];                 /* MAIL_EVENT: one JSON text frame */
} mail;

worker *worker_new(gw *g, int idx, char *err, size_t errlen);
int worker_start(worker *w);
/* Asks the thread to close every connection (1001) and exit; joins it. */
void worker_stop(worker *w);
void worker_free(worker *w);
/* Takes ownership of m. Blocks while the worker's mailbox is over its byte
 * ceiling (backpressure onto the Kafka consumer), unless the worker stops. */
void worker_post(worker *w, mail *m);
/* The same for a chain of mails linked by next, in order. */
void worker_post_chain(worker *w, mail *head);
mail *mail_new(enum mail_kind kind, uint64_t conn_id, const void *data, size_t len);
/* The same with skip (copied; NULL or "": none): a connection of that
 * device does not get it (the event came from that device). */
mail *mail_new_skip(enum mail_kind kind, uint64_t conn_id, const void *data, size_t len,
                    const char *skip);

/* The worker's memory of what its connections were written (dedupe.c). */
dedupe *worker_dedupe(worker *w);

/* ---- dedupe.c: one inbox event once per connection ---- */

dedupe *dedupe_new(void);
void dedupe_free(dedupe *d);
/* 1 if conn_id was written the event of seq (>= 0) lately; else remembers
 * it and returns 0. */
int dedupe_seen(dedupe *d, uint64_t conn_id, int64_t seq);

/* conn ids: worker index (8 bits) | generation (32) | slot (24). Stale ids
 * (a closed connection's) never match a live connection. */
#define CONN_WORKER(id) ((size_t)((id) >> 56))

/* ---- ws_conn.c: one upgraded WebSocket connection ---- */

/* Creates a connection for an upgraded socket; copies extra_in. The worker
 * adopts it with ws_conn_attach. */
conn *ws_conn_new(gw *g, int fd, struct MHD_UpgradeResponseHandle *urh, const char *user,
                  const char *dev, const char *extra_in, size_t extra_len);
int ws_conn_attach(conn *c, worker *w, uint64_t id, int epfd, char *err, size_t errlen);
/* Socket readiness: runs wslay; may mark the connection dead. */
void ws_conn_on_io(conn *c, uint32_t events);
/* Queues a text message; closes with 1013 if the send queue passes its
 * ceiling (a client that stopped reading). */
void ws_conn_queue_text(conn *c, const char *s, size_t len);
/* Queues an event mail's text, unless it is an inbox event (seq >= 0)
 * this connection was written already: that copy is dropped and counted. */
void ws_conn_queue_event(conn *c, const mail *m);
void ws_conn_close(conn *c, uint16_t code, const char *reason);
/* The close code of a connection whose device was unlinked (PROTOCOL.md). */
#define WS_CLOSE_UNLINKED 4001
/* Keeps a live event (takes ownership of m) until ws_conn_synced. Past the
 * send-queue ceiling it drops them all, and those that follow, because the
 * sync itself delivers every one of them. */
void ws_conn_hold(conn *c, mail *m);
/* Ends the sync: queues {"type":"synced"} then the held events. Only the
 * first call counts (a replayed sync may end twice). */
void ws_conn_synced(conn *c);
/* A page of the sync is queued: ask for the next one (from_seq) once the
 * connection has written this page down to a quarter of its send queue. */
void ws_conn_sync_more(conn *c, int64_t from_seq);
int ws_conn_is_synced(const conn *c);
/* Sends what is queued, asks for the next sync page when there is room,
 * and updates the epoll mask; 0 while alive. */
int ws_conn_flush(conn *c);
/* Ping / idle timers; called about once a second. */
void ws_conn_tick(conn *c, int64_t now_ms);
/* Frees the wslay context (8.8 KiB) of a connection quiet for
 * PARLEY_WS_PARK_MS with nothing in flight either way; it is made again on
 * the next byte in or out. Returns 1 if it freed one. Call after a flush. */
int ws_conn_park(conn *c, int64_t now_ms);
int ws_conn_dead(const conn *c);
/* The worker's "touched this iteration" mark; returns the previous value. */
int ws_conn_set_dirty(conn *c, int on);
uint64_t ws_conn_id(const conn *c);
const char *ws_conn_user(const conn *c);
const char *ws_conn_device(const conn *c);
/* Releases everything; the worker calls it outside wslay callbacks. */
void ws_conn_free(conn *c);

/* ---- commands.c: client commands to bus records ---- */
void commands_handle(gw *g, conn *c, const char *text, size_t len);
/* Connection lifecycle facts for presence and sync. */
void commands_connected(gw *g, conn *c);
/* Asks message-store for the page of c's sync that starts at from_seq (0:
 * the first); closes c with 1013 if the bus refuses the request. */
void commands_sync(gw *g, conn *c, int64_t from_seq);
void commands_disconnected(gw *g, conn *c);
/* Gateway liveness for presence; reset on start-up. Call before any
 * connection is accepted (it also initialises the report tags). */
int commands_heartbeat(gw *g, int reset);
/* Produces a send (1:1 or group) for user's connection conn_id, with the
 * rendered media object or NULL; any thread. PX_OK once queued for Kafka,
 * which then answers `sent` (or group-fanout does); else the caller answers. */
int commands_produce_send(gw *g, const char *user, const char *dev, uint64_t conn_id,
                          const proto_cmd *cmd,
                          const char *media_json);
/* Answers an error to connection conn_id from a thread other than its
 * worker's (through the worker's mailbox). */
void commands_post_error(gw *g, uint64_t conn_id, const char *ref, enum proto_code code,
                         const char *msg);
/* Delivery report for a send; called on the bus poll thread. */
void commands_on_delivery(void *opaque, int status, const char *err,
                          int32_t partition, int64_t offset);

/* ---- registry.c: user -> connection ids and rate limits on this gateway ---- */
/* rate[k] per second and burst[k] above it, for each kind of gw_rate. */
registry *registry_new(const double rate[GW_RATE_N], const double burst[GW_RATE_N]);
void registry_free(registry *r);
void registry_add(registry *r, const char *user, uint64_t conn_id);
void registry_remove(registry *r, const char *user, uint64_t conn_id);
/* Copies up to max ids of user's connections; returns how many. */
size_t registry_get(registry *r, const char *user, uint64_t *ids, size_t max);
/* How many connections user holds here. */
size_t registry_count(registry *r, const char *user);
/* Token bucket of user's kind of command, shared by all of the user's
 * connections on this gateway (a new connection brings no fresh burst):
 * 1 if this command may go, 0 if the user is over its rate. A user with no
 * connection here (a race with its last close) is let through. */
int registry_take(registry *r, const char *user, enum gw_rate kind);

/* ---- watch.c: which connections watch whose presence (issue 18) ---- */
/* Passes a presence event (json, len) to connection conn_id. */
typedef void (*watch_emit_cb)(void *arg, uint64_t conn_id, const char *json, size_t len);
watch *watch_new(void);
void watch_free(watch *w);
/* Replaces conn_id's watch list by users (duplicates ignored), every entry
 * pending until watch_answer. */
void watch_set(watch *w, uint64_t conn_id, const char *const *users, size_t n);
/* the connection closed: forgets its list. */
void watch_drop(watch *w, uint64_t conn_id);
/* Presence answered conn_id's presence_sub (its events, read at ts, go out
 * before this call): the users of ok become ready, those of no are
 * dropped; a change held meanwhile that is newer than ts is emitted. */
void watch_answer(watch *w, uint64_t conn_id, char *const *ok, size_t nok, char *const *no,
                  size_t nno, int64_t ts, watch_emit_cb emit, void *arg);
/* A change of user (json, read at ts): emitted to each ready watcher that
 * was told something older, held for the pending ones. */
void watch_change(watch *w, const char *user, int64_t ts, const char *json, size_t len,
                  watch_emit_cb emit, void *arg);

/* ---- deliver.c: Kafka-facing threads ---- */
int deliver_start(gw *g, char *err, size_t errlen);
void deliver_stop(gw *g);

/* ---- media.c: POST/GET /v1/media and the media check of a send ---- */
/* Opens the gateway's store (media only) and starts the send checker. */
int media_start(gw *g, char *err, size_t errlen);
/* Stops the checker (pending checks are dropped: their connections are
 * closing) and closes the store. */
void media_stop(gw *g);
/* 1 if url belongs to media.c. */
int media_route(const char *url);
/* The MHD access handler for media urls; *mr is NULL on the request's
 * first call and owned by the request afterwards. */
enum MHD_Result media_access(gw *g, struct MHD_Connection *mc, const char *url,
                             const char *method, const char *upload_data,
                             size_t *upload_data_size, media_req **mr);
/* The request ended (toe: MHD's termination code): an upload that did not
 * commit deletes its chunks. Frees mr. */
void media_req_done(gw *g, media_req *mr, enum MHD_RequestTerminationCode toe);
/* Queues a send naming media for the checker thread, which checks it
 * (exists, the sender may read it), grants the 1:1 recipient, produces it,
 * and answers errors itself. PX_OK: queued, and cmd's strings now belong to
 * the job (cmd->root is NULL). PX_AGAIN: the queue is full, cmd untouched,
 * the caller answers. Worker threads call it. */
int media_send(gw *g, const char *user, const char *dev, uint64_t conn_id, proto_cmd *cmd);

/* ---- http_guard.c: connections still sending their request head ---- */
/* Starts the sweeper thread that drops heads older than
 * PARLEY_HTTP_HEAD_TIMEOUT_S. */
http_guard *http_guard_new(gw *g, char *err, size_t errlen);
/* Stops the sweeper; call after MHD stopped. */
void http_guard_free(http_guard *hg);
/* MHD_OPTION_NOTIFY_CONNECTION callback (cls: the guard): lists a new
 * connection, shutting it at once if its address is over
 * PARLEY_HTTP_PER_ADDRESS; forgets a closed one. */
void http_guard_notify(void *cls, struct MHD_Connection *mc, void **socket_context,
                       enum MHD_ConnectionNotificationCode code);
/* mc's request head is complete (the access handler's first call). */
void http_guard_head_done(http_guard *hg, struct MHD_Connection *mc);
/* A request ended on mc, which stays open for the next (keep-alive): the
 * next head has a deadline too. Not for an upgraded connection. */
void http_guard_rearm(http_guard *hg, struct MHD_Connection *mc);

/* ---- http.c: HTTP endpoints and the WebSocket upgrade ---- */
/* The bearer token of a request (header, else access_token), or NULL. */
const char *http_token(struct MHD_Connection *mc);
enum MHD_Result http_text(struct MHD_Connection *mc, unsigned status, const char *type,
                          const char *body, size_t len);
/* {"code","message"} with status. */
enum MHD_Result http_json_error(struct MHD_Connection *mc, unsigned status, const char *code,
                                const char *msg);
/* Answers status (reason its phrase) with {code, message} written straight
 * to the socket and returns MHD_NO so MHD drops the connection: for a
 * refusal in mid-body, where MHD cannot queue a response. */
enum MHD_Result http_json_refuse_now(struct MHD_Connection *mc, unsigned status,
                                     const char *reason, const char *code, const char *msg);
/* Binds and listens on PARLEY_LISTEN first thing at start, so a port in
 * use stops the gateway before it touches the bus; connections wait in the
 * backlog until http_start. */
int http_bind(gw *g, char *err, size_t errlen);
/* The gateway's readiness (heartbeats acknowledged, store reachable), an
 * admin_ready_cb (arg: the gw) for PARLEY_METRICS_LISTEN's server too. */
int http_readiness(void *arg, char *err, size_t errlen);
int http_start(gw *g, char *err, size_t errlen);
/* Stops accepting connections; those open stay until the workers close
 * them, which must happen before http_stop. */
void http_quiesce(gw *g);
void http_stop(gw *g);

#endif
