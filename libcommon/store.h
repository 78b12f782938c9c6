/* The durable store the services are written against. Operations are named
 * after what Parley needs (inboxes, send dedupe, presence), not after a
 * database, so each implementation can use its best primitive: store_mongo.c
 * (MongoDB wire protocol via libmongoc: bulk writes, unique indexes) and, for
 * parleyd, an SQLite one. Every write is idempotent so a redelivered bus
 * record repeats it harmlessly. Thread-safe: each call takes a pooled client. */
#ifndef PARLEY_STORE_H
#define PARLEY_STORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct store store;

enum store_kind {
    STORE_MESSAGE = 1,
    STORE_RECEIPT = 2,
    STORE_GROUP_EVENT = 3,
    STORE_READ_STATE = 4,     /* issue 17: read on another device */
    STORE_KIND_MAX = STORE_READ_STATE
};

/* One pending inbox event for one user, stored once for all of the user's
 * devices. json is the event exactly as the client receives it. (user, id)
 * is unique: a second put is absorbed. Which devices have acked it is kept
 * with it (store_inbox_mark); the event is deleted once every device that
 * needs it has (message-store decides, from the device records). */
#define STORE_ACKED_MAX 16     /* acked devices read back per event */
#define STORE_MAX_BATCH 10000  /* items per call in every backend: callers chunk */

typedef struct store_event {
    const char *user;      /* recipient */
    const char *id;        /* event id: msg_id, receipt id or group event id */
    int64_t seq;           /* order within the user's inbox (bus offset) */
    int64_t ts_ms;         /* when it was accepted; retention counts from here */
    int kind;              /* enum store_kind */
    const char *sender;    /* for STORE_MESSAGE: who to tell on ack; else NULL */
    const char *json;
    size_t json_len;
    /* The device it came from, which does not get it (message-store's
     * routing; not stored: that device's ack mark stands for it). */
    const char *origin;
    /* Read back by scan and get (ignored by put): devices that acked it,
     * at most STORE_ACKED_MAX of them (an event acked by more reads as
     * acked by the first STORE_ACKED_MAX: it may be kept longer, never
     * dropped early). */
    const char *acked[STORE_ACKED_MAX];
    size_t nacked;
} store_event;

/* Opens the store named by url: "mongodb://..." (db is the database name).
 * Creates the collections and unique indexes it needs. */
store *store_open(const char *url, const char *db, char *err, size_t errlen);
void store_close(store *st);

/* For the start-up log: where this implementation keeps data, given
 * store_open's url and db (MongoDB: "<url> db <db>", the url's userinfo
 * replaced by "***"; parleyd: its database file, url and db ignored). */
void store_where(const char *url, const char *db, char *out, size_t outlen);

/* Pings the server; PX_OK when reachable (for /readyz). */
int store_ping(store *st, char *err, size_t errlen);

/* How many calls are worth running side by side: 1 when the store
 * serializes them anyway (parleyd's SQLite connection), more for a server
 * with a connection pool. Callers skip their threads at 1. */
size_t store_concurrency(const store *st);

/* Inserts n events in one round trip. Duplicates of (user, id) are absorbed,
 * not errors; if inserted is non-NULL, inserted[i] is 1 for a new record and
 * 0 for a duplicate. PX_OK only when every record is durable. */
int store_inbox_put(store *st, const store_event *ev, size_t n, int *inserted,
                    char *err, size_t errlen);

/* Called once per pending event of a user, in seq order. A non-PX_OK return
 * stops the scan and is returned by store_inbox_scan. The event and its
 * strings are valid only during the call. */
typedef int (*store_event_cb)(void *arg, const store_event *ev);

/* Visits up to limit events of user with seq > after_seq, in seq order;
 * with dev non-NULL only those dev has not acked (store_inbox_mark). */
int store_inbox_scan(store *st, const char *user, const char *dev, int64_t after_seq,
                     size_t limit, store_event_cb cb, void *arg, char *err, size_t errlen);

/* One inbox event, named by its owner: (user, event id). */
typedef struct store_key {
    const char *user;
    const char *id;
} store_key;

/* Visits the events named by keys (any mix of users; one query per user),
 * deleting nothing: the first half of an ack, whose effects (receipt facts)
 * must be durable before store_inbox_delete. Keys nobody holds are skipped;
 * the order is unspecified. */
int store_inbox_get(store *st, const store_key *keys, size_t n, store_event_cb cb, void *arg,
                    char *err, size_t errlen);

/* Deletes the events named by keys (one delete per user); *removed (may
 * be NULL) gets the count. Each key names the event's owner, so an ack (whose
 * keys all name the acker) can never delete another user's events. */
int store_inbox_delete(store *st, const store_key *keys, size_t n, int64_t *removed, char *err,
                       size_t errlen);

/* Records that dev acked the n events named by ev[i].user, .id (with
 * their .seq and .ts_ms as stored; other fields ignored), which stay
 * stored for the user's other devices. Idempotent. A mark of an event
 * nobody holds is harmless: the retention sweep takes it. */
int store_inbox_mark(store *st, const store_event *ev, size_t n, const char *dev, char *err,
                     size_t errlen);

/* Drops every device's marks of the events named by keys (after their
 * store_inbox_delete; the caller knows which had marks). */
int store_inbox_unmark(store *st, const store_key *keys, size_t n, char *err, size_t errlen);

/* Deletes events accepted before cutoff_ms; *removed gets the count. */
int store_inbox_sweep(store *st, int64_t cutoff_ms, int64_t *removed,
                      char *err, size_t errlen);

/* Number of pending events of user (tests, metrics). */
int store_inbox_count(store *st, const char *user, int64_t *count, char *err, size_t errlen);

/* Dedupe of processed records, keyed by caller-chosen strings (e.g.
 * "bob/<msg_id>") and kept for the retention period, so a resend after the
 * inbox copy was acked and deleted is still recognised. A caller claims a
 * key for one record, named by tag (e.g. its bus position "partition/
 * offset"), before applying the record's effects, in one round trip.
 * fresh[i] is 1 when key i was free, or is held by the same tag: the same
 * record delivered again after a crash, whose effects may be unfinished and
 * are applied again (they must be idempotent). It is 0 when another record
 * holds the key: a resend, to be dropped. A claim keeps its first ts_ms. */
int store_seen_claim(store *st, const char *const *keys, const char *const *tags, size_t n,
                     int64_t ts_ms, int *fresh, char *err, size_t errlen);
int store_seen_sweep(store *st, int64_t cutoff_ms, int64_t *removed,
                     char *err, size_t errlen);

/* Receipt tracking: once a message is acked its body is gone, and only
 * what its read receipt needs is kept: (reader, msg_id) -> sender, group.
 * (reader, msg_id) is unique; reader is a user id (no '/'). Kept until the
 * read (store_track_delete) or the retention sweep. */
typedef struct store_track {
    const char *reader;    /* who received the message */
    const char *msg_id;
    const char *sender;    /* who gets the receipts; unused in keys */
    const char *group;     /* group id, or NULL for 1:1; unused in keys */
    int64_t ts_ms;         /* when tracking began; retention counts from here */
} store_track;

/* Inserts n records in one round trip; an existing (reader, msg_id) is kept
 * as it is (a repeat is absorbed, not an error). */
int store_track_put(store *st, const store_track *t, size_t n, char *err, size_t errlen);

/* Called once per record found; strings are valid only during the call. */
typedef int (*store_track_cb)(void *arg, const store_track *t);

/* Looks up the (reader, msg_id) pairs of keys (other fields ignored) in one
 * round trip; cb sees each record that exists, in no particular order. */
int store_track_get(store *st, const store_track *keys, size_t n, store_track_cb cb,
                    void *arg, char *err, size_t errlen);

/* Deletes the (reader, msg_id) pairs of keys; *removed (may be NULL) gets
 * the count. Absent pairs are ignored. */
int store_track_delete(store *st, const store_track *keys, size_t n, int64_t *removed,
                       char *err, size_t errlen);

/* Deletes records whose tracking began before cutoff_ms. */
int store_track_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen);

/* Presence registry: which gateways hold connections of which user, one
 * record per connection, so every operation is idempotent: a batch applied
 * twice (redelivery after a crash before the offset commit) leaves the same
 * records as once. A gateway's boot epoch (ms) orders its restarts: records
 * of an older epoch than the gateway's current one are dead connections. */
typedef struct store_presence {
    const char *user;
    const char *gateway;
    int64_t epoch;
    int delta;             /* +1 connect, -1 disconnect */
    uint64_t conn;         /* connection id, unique within (gateway, epoch) */
    const char *device;    /* connect: the connection's device, or NULL (issue 17) */
} store_presence;

/* Applies connects (afterwards the record of (gateway, epoch, conn) names
 * user; records of the user on that gateway with an older epoch are
 * dropped: dead connections of its previous life) and disconnects (the
 * record is gone). Each connection connects once and then disconnects
 * once, so the outcome depends neither on the order of ops nor on how
 * often each is applied; a connect applied again may keep the record it
 * made first (a connection's user and device never change). */
int store_presence_apply(store *st, const store_presence *ops, size_t n,
                         char *err, size_t errlen);

/* Records that gateway (of boot epoch) is alive at ts_ms. With reset set,
 * also drops every presence record of that gateway with an older epoch (it
 * restarted, those connections are gone). */
int store_gateway_beat(store *st, const char *gateway, int64_t epoch, int64_t ts_ms,
                       int reset, char *err, size_t errlen);

/* Gateways holding a connection of user whose last beat is at or after
 * alive_after_ms (<= 0: every gateway with a record, beats unchecked).
 * Writes up to max distinct ids (each < 65 chars) to gws. */
int store_presence_lookup(store *st, const char *user, int64_t alive_after_ms,
                          char (*gws)[65], size_t max, size_t *n, char *err, size_t errlen);

/* Removes presence records of gateways whose last beat is before cutoff_ms
 * (they died without saying so); *removed gets the count. */
int store_presence_expire(store *st, int64_t cutoff_ms, int64_t *removed,
                          char *err, size_t errlen);

/* The distinct devices of user's connection records (any gateway, beats
 * unchecked, as message-store's routing reads them): up to max ids (each
 * < 65 chars) into devs. Connections from a gateway older than devices
 * name none and are left out. */
int store_presence_devices(store *st, const char *user, char (*devs)[65], size_t max, size_t *n,
                           char *err, size_t errlen);

/* Number of presence records (connections) of user on any gateway and
 * epoch (tests, metrics). */
int store_presence_count(store *st, const char *user, int64_t *count, char *err, size_t errlen);

/* Presence to contacts (issue 18). Who may watch whom: one record per
 * unordered pair of users who shared a 1:1 conversation or a group, written
 * by message-store from the events it stores and kept for good (a pair is
 * never undone: "shared", not "shares"). */
typedef struct store_pair {
    const char *a, *b;     /* two distinct user ids, in any order */
} store_pair;

/* Records n pairs in one round trip; a pair already recorded (in either
 * order) is absorbed, so repeats are harmless. */
int store_contacts_put(store *st, const store_pair *p, size_t n, char *err, size_t errlen);

/* is_contact[i] = 1 when (user, others[i]) is a recorded pair or
 * others[i] is user itself, else 0. */
int store_contacts_check(store *st, const char *user, const char *const *others, size_t n,
                         int *is_contact, char *err, size_t errlen);

/* What presence tells about a user: online when any connection record of
 * the user is left (beats unchecked: a dead gateway's records go at
 * store_presence_expire), when the user was last seen (ms; 0: never), and
 * whether the user hides it (a setting). */
typedef struct store_user_presence {
    int online;
    int64_t last_seen;
    int hide_last_seen;
} store_user_presence;

/* Moves the last_seen of n users up to ts_ms (never down: a redelivered
 * older record changes nothing), creating their records as needed. */
int store_last_seen_put(store *st, const char *const *users, size_t n, int64_t ts_ms,
                        char *err, size_t errlen);

/* Sets user's hide_last_seen setting (idempotent). */
int store_presence_hide(store *st, const char *user, int hide, char *err, size_t errlen);

/* Reads the state of n users into out[i]. */
int store_presence_state(store *st, const char *const *users, size_t n,
                         store_user_presence *out, char *err, size_t errlen);

/* Gateways whose last beat is at or after alive_after_ms: up to max ids
 * (each < 65 chars) into gws. */
int store_gateway_list(store *st, int64_t alive_after_ms, char (*gws)[65], size_t max,
                       size_t *n, char *err, size_t errlen);

/* Devices (issue 17): one record per (user, device id), made by the
 * gateway at the device's first connection. since orders the device's
 * link into the user's inbox: the device needs the events with seq >
 * since. It is STORE_DEVICE_UNSYNCED until message-store serves the
 * device's first sync (store_device_link), so nothing consumed before that
 * waits for it. An unlinked device keeps its record (its tokens stay
 * refused) and needs nothing. Device ids have the user id charset. */
#define STORE_DEVICE_UNSYNCED INT64_MAX

typedef struct store_device {
    const char *user;
    const char *dev;
    int64_t first_ms;      /* registered (first connection) */
    int64_t last_ms;       /* latest connection */
    int64_t since;         /* needs events with seq > since */
    int unlinked;
    int64_t push_gone_ms;  /* the push gateway's last 410 for it, or 0 (issue 18) */
} store_device;

enum store_device_status { STORE_DEVICE_OK, STORE_DEVICE_FULL, STORE_DEVICE_UNLINKED };

/* A connection of (user, dev) at now_ms: registers the device when it is
 * new and the user has fewer than max linked (not unlinked) devices, and
 * moves last_ms up for a known one. *status: STORE_DEVICE_OK, _FULL (new,
 * and max are linked already: nothing written) or _UNLINKED (the device
 * was unlinked: nothing written). Two new devices registering at once may
 * both be refused when only one place was left, never both admitted. */
int store_device_touch(store *st, const char *user, const char *dev, int64_t now_ms, long max,
                       int *status, char *err, size_t errlen);

typedef int (*store_device_cb)(void *arg, const store_device *d);

/* Visits every device record of user (unlinked ones too), in no
 * particular order. Strings are valid only during the call. */
int store_device_list(store *st, const char *user, store_device_cb cb, void *arg, char *err,
                      size_t errlen);

/* Marks (user, dev) unlinked: its tokens are refused from then on
 * (store_device_touch), it needs no event and no longer counts towards
 * the limit. PX_DECLINED if the user has no such device; unlinking an
 * unlinked one again is harmless (a redelivered command). */
int store_device_unlink(store *st, const char *user, const char *dev, char *err, size_t errlen);

/* Push notifications (issue 18): the push gateway answered 410 (the
 * device is gone) for (user, dev) at at_ms; store_device_list reads the
 * latest such time back as push_gone_ms, and the push service calls no
 * more for the device until a connection moves its last_ms past it. Never
 * moves back; a device that does not exist is left alone (PX_OK). */
int store_device_push_gone(store *st, const char *user, const char *dev, int64_t at_ms,
                           char *err, size_t errlen);

/* Moves the since of (user, dev) down to since (never up): message-store
 * links a device once, while it is STORE_DEVICE_UNSYNCED, and a repeat of
 * that link is absorbed. */
int store_device_link(store *st, const char *user, const char *dev, int64_t since, char *err,
                      size_t errlen);

/* Groups (issue 5): one record per group, written only by the group-fanout
 * instance that owns the group's parley.groups partition. applied is the
 * bus offset of the last command whose effects (events, fan-out, answers)
 * are durable; a redelivered command at or below it is skipped, which is
 * what makes every group change idempotent. members are in join order
 * (longest-standing first); admins is a subset of members; invited are
 * users asked to join who have not answered (issue 22: nobody becomes a
 * member without saying so), never members, and members + invited <=
 * STORE_GROUP_MAX. A group whose
 * last member left stays as an inert record (no members, no admins) so a
 * redelivered create cannot bring it back. */
#define STORE_GROUP_MAX 256

typedef struct store_group {
    const char *id;        /* "g_..." */
    const char *name;
    const char *creator;
    const char *const *members;
    size_t nmembers;       /* <= STORE_GROUP_MAX */
    const char *const *admins;
    size_t nadmins;        /* <= nmembers */
    const char *const *invited;
    size_t ninvited;       /* <= STORE_GROUP_MAX - nmembers; absent in older records: 0 */
    int64_t applied;       /* bus offset of the last applied command */
    int64_t ts_ms;         /* created at */
} store_group;

/* Called once per group found; the group and its strings are valid only
 * during the call. */
typedef int (*store_group_cb)(void *arg, const store_group *g);

/* Looks up groups by id in one round trip; cb sees those that exist, in no
 * particular order. */
int store_group_get(store *st, const char *const *ids, size_t n, store_group_cb cb,
                    void *arg, char *err, size_t errlen);

/* Writes n groups (each replaces the record of its id, or creates it) in
 * one round trip. Repeating a put is harmless. */
int store_group_put(store *st, const store_group *g, size_t n, char *err, size_t errlen);

/* Media (issue 6): bytes stored once per sha256, in fixed-size chunks kept
 * under an upload id, plus access grants. An upload writes its chunks under
 * a fresh upload id while the hash is still unknown, then commits: the
 * first commit of a sha256 makes the media record, which holds the bytes;
 * a later one of the same bytes makes a record of its own over them (an
 * alias: its own id, content type, ts and grants) and the caller drops its
 * own chunks, so an uploader learns nothing of the other records (issue
 * 22). An alias is swept no later than the bytes it names. Chunks of an upload
 * that never committed (cut off, crashed) are orphans the sweep removes.
 * Ids (media and upload) are 1-64 characters of [A-Za-z0-9._-]. */
#define STORE_MEDIA_CHUNK (255 * 1024)  /* bytes per chunk; the last may be shorter */
#define STORE_MEDIA_ID_MAX 64
#define STORE_MEDIA_TYPE_MAX 127        /* content type, printable ASCII */
/* The longest an upload may take; its writer drops it after that, so the
 * sweep may treat uncommitted chunks older than twice this as orphans. */
#define STORE_MEDIA_UPLOAD_MAX_MS (3600 * 1000LL)

typedef struct store_media {
    char id[STORE_MEDIA_ID_MAX + 1];
    char sha256[65];                    /* lowercase hex */
    char content_type[STORE_MEDIA_TYPE_MAX + 1];
    char upload[STORE_MEDIA_ID_MAX + 1]; /* the upload id its chunks live under */
    int64_t size;
    int64_t ts_ms;                      /* last upload or grant; retention counts from here */
} store_media;

/* Writes chunk n (0-based) of upload; len <= STORE_MEDIA_CHUNK. Writing the
 * same (upload, n) again is absorbed. */
int store_chunk_put(store *st, const char *upload, int64_t n, const void *data, size_t len,
                    int64_t ts_ms, char *err, size_t errlen);

/* A reader of one upload's chunks in order from chunk from_n on: a
 * download holds one for its duration, so the whole file is one query, not
 * one per chunk. NULL with err on failure. Not thread-safe; one user. */
typedef struct store_chunk_reader store_chunk_reader;
store_chunk_reader *store_chunk_open(store *st, const char *upload, int64_t from_n,
                                     char *err, size_t errlen);

/* The next chunk: PX_OK with *n its number and its bytes copied to buf
 * (cap >= STORE_MEDIA_CHUNK), *len their count; PX_DECLINED past the last. */
int store_chunk_next(store_chunk_reader *rd, int64_t *n, void *buf, size_t cap, size_t *len,
                     char *err, size_t errlen);
void store_chunk_close(store_chunk_reader *rd);

/* Deletes every chunk of upload; *removed (may be NULL) gets the count. */
int store_chunk_drop(store *st, const char *upload, int64_t *removed, char *err, size_t errlen);

/* Number of chunks of upload, or of every upload when upload is NULL. */
int store_chunk_count(store *st, const char *upload, int64_t *count, char *err, size_t errlen);

/* Commits an upload whose chunks are written: m names id, sha256,
 * content_type, upload, size and ts_ms. If no media has m->sha256, m becomes
 * the record and *created = 1. Otherwise m becomes an alias of the stored
 * bytes: m->id and m->content_type stay, m->upload and m->size become the
 * stored copy's (whose ts moves up to m->ts_ms), *created = 0, and the
 * caller drops its own chunks. Either way uploader is granted access to
 * m->id. */
int store_media_commit(store *st, store_media *m, const char *uploader, int *created,
                       char *err, size_t errlen);

/* Reads the media record (or alias) of id into *m; PX_DECLINED when
 * unknown. */
int store_media_get(store *st, const char *id, store_media *m, char *err, size_t errlen);

/* PX_OK if user may read media id, PX_DECLINED if not. */
int store_media_access(store *st, const char *id, const char *user, char *err, size_t errlen);

/* Grants n users access to media id (idempotent) and moves the media's ts
 * up to ts_ms (an alias's and its bytes'), so media referenced by a recent
 * message is kept. */
int store_media_grant(store *st, const char *id, const char *const *users, size_t n,
                      int64_t ts_ms, char *err, size_t errlen);

/* Retention: deletes media (record, chunks, grants) whose ts is before
 * cutoff_ms, and the chunks of uploads that never committed and began
 * before orphan_cutoff_ms. *media and *orphans (may be NULL) get the counts
 * of media and of orphaned uploads removed. Safe against a concurrent
 * commit or grant: a record is deleted only while its ts is still old. */
int store_media_sweep(store *st, int64_t cutoff_ms, int64_t orphan_cutoff_ms, int64_t *media,
                      int64_t *orphans, char *err, size_t errlen);

#endif
