/* The SQLite store of parleyd (store.h): the same contract as store_mongo.c
 * in tables of PARLEY_DATA_DIR/parley.db, but the dedupe claims in seen.db
 * and the receipt tracking in track.db (the in-process bus has bus.db), WAL
 * mode. Each call is one transaction (a batch is one commit), over one
 * connection guarded by a mutex: SQLite has one writer at a time anyway.
 * Idempotence comes from primary keys and INSERT OR IGNORE, as the unique
 * indexes give it in MongoDB. url and db of store_open are ignored: the
 * data folder names the database. */
#include "store.h"
#include "common.h"

#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>

#include "sqldb.h"
#include "utf8.h"

#define SS_MAX_BATCH STORE_MAX_BATCH
#define SS_MAX_GATEWAY 64

struct store {
    sqldb d;
    pthread_mutex_t mu;    /* d and its cached statements */
    /* The claims' and the tracking's own files, connections and locks
     * (their d is on seen.db, track.db): each claim or tracking put is a
     * write at a random leaf of a table that holds up to 30 days of ids,
     * and in parley.db those writes held its one write lock longer than
     * every other writer together. NULL inside them. */
    struct store *seen, *track;
};

static const char ss_schema[] =
    "CREATE TABLE IF NOT EXISTS inbox (user TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER,"
    " ts INTEGER, kind INTEGER, sender TEXT, json BLOB, PRIMARY KEY (user, id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS inbox_seq ON inbox (user, seq);"
    "CREATE INDEX IF NOT EXISTS inbox_ts ON inbox (ts);"
    /* Which devices acked an event still pending for others; ts is the
     * event's, so the retention sweep takes both together. A mark of an
     * event nobody holds (any more) is never read. */
    "CREATE TABLE IF NOT EXISTS inbox_acked (user TEXT NOT NULL, id TEXT NOT NULL,"
    " dev TEXT NOT NULL, ts INTEGER, PRIMARY KEY (user, id, dev)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS inbox_acked_ts ON inbox_acked (ts);"
    "CREATE TABLE IF NOT EXISTS devices (user TEXT NOT NULL, dev TEXT NOT NULL,"
    " first_ms INTEGER, last_ms INTEGER, since INTEGER, unlinked INTEGER,"
    " PRIMARY KEY (user, dev)) WITHOUT ROWID;"
    /* One record per connection; "presence" held counts per (user,
     * gateway, epoch) before, which redelivery doubled. Its rows are
     * connections of gateways that have restarted since: dropped. */
    "DROP TABLE IF EXISTS presence;"
    "CREATE TABLE IF NOT EXISTS connections (gateway TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " conn INTEGER NOT NULL, user TEXT NOT NULL, device TEXT, PRIMARY KEY (gateway, epoch, conn))"
    " WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS connections_user ON connections (user, gateway, epoch);"
    "CREATE TABLE IF NOT EXISTS gateways (gateway TEXT PRIMARY KEY, epoch INTEGER, ts INTEGER)"
    " WITHOUT ROWID;"
    /* Presence to contacts (issue 18): pairs stored with a < b. */
    "CREATE TABLE IF NOT EXISTS contacts (a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b))"
    " WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS presence_users (user TEXT PRIMARY KEY, last_seen INTEGER,"
    " hide INTEGER) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, name TEXT, creator TEXT,"
    " members TEXT, admins TEXT, applied INTEGER, ts INTEGER, invited TEXT) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS chunks (upload TEXT NOT NULL, n INTEGER NOT NULL, data BLOB,"
    " ts INTEGER, PRIMARY KEY (upload, n));"
    "CREATE TABLE IF NOT EXISTS media (id TEXT PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL,"
    " content_type TEXT, upload TEXT, size INTEGER, ts INTEGER);"
    "CREATE INDEX IF NOT EXISTS media_ts ON media (ts);"
    "CREATE INDEX IF NOT EXISTS media_upload ON media (upload);"
    /* A later uploader's own record of stored bytes (content: the media
     * row that holds them); its ts never passes its content's. */
    "CREATE TABLE IF NOT EXISTS media_alias (id TEXT PRIMARY KEY, content TEXT NOT NULL,"
    " content_type TEXT, ts INTEGER);"
    "CREATE INDEX IF NOT EXISTS media_alias_ts ON media_alias (ts);"
    "CREATE TABLE IF NOT EXISTS grants (id TEXT NOT NULL, user TEXT NOT NULL,"
    " PRIMARY KEY (id, user)) WITHOUT ROWID;"
    /* Per connection: the id sets of one ack or lookup. */
    "CREATE TEMP TABLE IF NOT EXISTS ss_ids (id TEXT PRIMARY KEY);"
    "CREATE TEMP TABLE IF NOT EXISTS ss_keys (reader TEXT, msg_id TEXT,"
    " PRIMARY KEY (reader, msg_id));";

static int ss_fail(store *st, const char *what, char *err, size_t errlen)
{
    return px_err(err, errlen, "sqlite store %s: %s", what, sqlite3_errmsg(st->d.db));
}

static int ss_check_n(size_t n, const char *what, char *err, size_t errlen)
{
    if (n > SS_MAX_BATCH)
        return px_err(err, errlen, "%s: batch of %zu exceeds the limit of %d; split it",
                      what, n, SS_MAX_BATCH);
    return PX_OK;
}

static int ss_str_ok(const char *s)
{
    return s != NULL && *s != '\0' && utf8_valid((const unsigned char *)s, strlen(s));
}

static int ss_has_column(store *st, const char *table, const char *column)
{
    char sql[128];
    sqlite3_stmt *probe = NULL;
    snprintf(sql, sizeof(sql), "SELECT %s FROM %s LIMIT 0", column, table);
    int rc = sqlite3_prepare_v2(st->d.db, sql, -1, &probe, NULL);
    sqlite3_finalize(probe);
    return rc == SQLITE_OK;
}

static int ss_add_column(store *st, const char *table, const char *column, const char *type,
                         char **msg)
{
    char sql[128];
    if (ss_has_column(st, table, column))
        return SQLITE_OK;
    snprintf(sql, sizeof(sql), "ALTER TABLE %s ADD COLUMN %s %s", table, column, type);
    int rc = sqlite3_exec(st->d.db, sql, NULL, NULL, msg);
    /* parleyd opens a store per service at once: another may have won. */
    if (rc != SQLITE_OK && ss_has_column(st, table, column)) {
        sqlite3_free(*msg);
        *msg = NULL;
        rc = SQLITE_OK;
    }
    return rc;
}

/* Data folders written before seen claims had no tag column (their old
 * keys read as held by another record, i.e. still duplicates), before
 * group invitations no invited column (NULL reads as none), before
 * devices no connection device (NULL: a connection of no known device),
 * and before push no device push_gone_ms (NULL reads as 0: never gone). */
static int ss_migrate(store *st, char **msg)
{
    int rc = ss_add_column(st, "groups", "invited", "TEXT", msg);
    if (rc == SQLITE_OK)
        rc = ss_add_column(st, "connections", "device", "TEXT", msg);
    return rc == SQLITE_OK ? ss_add_column(st, "devices", "push_gone_ms", "INTEGER", msg) : rc;
}

void store_where(const char *url, const char *db, char *out, size_t outlen)
{
    char path[PATH_MAX];
    sqldb_path(path, sizeof(path));
    snprintf(out, outlen, "sqlite %s", path);
}

static const char ss_seen_schema[] =
    "CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, ts INTEGER, tag TEXT) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts);";

static const char ss_track_schema[] =
    "CREATE TABLE IF NOT EXISTS track (reader TEXT NOT NULL, msg_id TEXT NOT NULL,"
    " sender TEXT, grp TEXT, ts INTEGER, PRIMARY KEY (reader, msg_id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS track_ts ON track (ts);"
    "CREATE TEMP TABLE IF NOT EXISTS ss_keys (reader TEXT, msg_id TEXT,"
    " PRIMARY KEY (reader, msg_id));";

static store *ss_open_file(enum sqldb_which w, const char *schema, char *err, size_t errlen)
{
    store *st = px_calloc(1, sizeof(*st));
    pthread_mutex_init(&st->mu, NULL);
    char *msg = NULL;
    if (sqldb_open_file(&st->d, w, err, errlen) != PX_OK)
        goto fail;
    if (sqlite3_exec(st->d.db, schema, NULL, NULL, &msg) != SQLITE_OK) {
        px_err(err, errlen, "sqlite store schema: %s", msg ? msg : "?");
        sqlite3_free(msg);
        goto fail;
    }
    return st;
fail:
    store_close(st);
    return NULL;
}

static int ss_has_table(store *st, const char *table)
{
    char sql[96];
    sqlite3_stmt *probe = NULL;
    snprintf(sql, sizeof(sql), "SELECT 1 FROM %s LIMIT 0", table);
    int rc = sqlite3_prepare_v2(st->d.db, sql, -1, &probe, NULL);
    sqlite3_finalize(probe);
    return rc == SQLITE_OK;
}

/* Claims and tracking were kept in parley.db before their own files: they
 * move over once, claims with a tag column first if they predate tags
 * (453f65d). Another store opening at once may move and drop them at any
 * point here, which is no failure. */
static int ss_move_out(store *st, char *err, size_t errlen)
{
    static const char *const seen[] = { "seen" }, *const track[] = { "track" };
    char *msg = NULL;
    int rc = ss_has_table(st, "seen") ? ss_add_column(st, "seen", "tag", "TEXT", &msg) : SQLITE_OK;
    if (rc != SQLITE_OK && ss_has_table(st, "seen")) {
        px_err(err, errlen, "sqlite store: tagging old claims: %s", msg ? msg : "?");
        sqlite3_free(msg);
        return PX_ERROR;
    }
    sqlite3_free(msg);
    if (ss_has_table(st, "seen") &&
        sqldb_move_from_main(&st->seen->d, seen, 1, err, errlen) != PX_OK)
        return PX_ERROR;
    if (ss_has_table(st, "track") &&
        sqldb_move_from_main(&st->track->d, track, 1, err, errlen) != PX_OK)
        return PX_ERROR;
    return PX_OK;
}

store *store_open(const char *url, const char *db, char *err, size_t errlen)
{
    store *st = ss_open_file(SQLDB_MAIN, ss_schema, err, errlen);
    char *msg = NULL;
    if (st == NULL)
        return NULL;
    if (ss_migrate(st, &msg) != SQLITE_OK) {
        px_err(err, errlen, "sqlite store schema: %s", msg ? msg : "?");
        sqlite3_free(msg);
        goto fail;
    }
    st->seen = ss_open_file(SQLDB_SEEN, ss_seen_schema, err, errlen);
    if (st->seen != NULL)
        st->track = ss_open_file(SQLDB_TRACK, ss_track_schema, err, errlen);
    if (st->track == NULL || ss_move_out(st, err, errlen) != PX_OK)
        goto fail;
    return st;
fail:
    store_close(st);
    return NULL;
}

void store_close(store *st)
{
    if (st == NULL)
        return;
    store_close(st->seen);
    store_close(st->track);
    sqldb_close(&st->d);
    pthread_mutex_destroy(&st->mu);
    free(st);
}

size_t store_concurrency(const store *st)
{
    (void)st;
    return 1; /* one connection under st->mu */
}

int store_ping(store *st, char *err, size_t errlen)
{
    return st->d.db != NULL ? PX_OK : px_err(err, errlen, "sqlite store closed");
}

/* ---- transactions and statements ---- */

static int ss_begin(store *st, char *err, size_t errlen)
{
    pthread_mutex_lock(&st->mu);
    if (sqldb_begin(&st->d, err, errlen) == PX_OK)
        return PX_OK;
    pthread_mutex_unlock(&st->mu);
    return PX_ERROR;
}

/* Commits on PX_OK, else rolls back; returns rc (or the commit failure). */
static int ss_end(store *st, int rc, char *err, size_t errlen)
{
    rc = sqldb_end(&st->d, rc, err, errlen);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

/* A lookup that joins against a TEMP key table: writes nothing shared, so
 * it stays out of the process write lock (see sqldb_begin_read). */
static int ss_begin_read(store *st, char *err, size_t errlen)
{
    pthread_mutex_lock(&st->mu);
    if (sqldb_begin_read(&st->d, err, errlen) == PX_OK)
        return PX_OK;
    pthread_mutex_unlock(&st->mu);
    return PX_ERROR;
}

static int ss_end_read(store *st, int rc, char *err, size_t errlen)
{
    rc = sqldb_end_read(&st->d, rc, err, errlen);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

/* sql must be a string literal: see sqldb_stmt. */
static sqlite3_stmt *ss_prep(store *st, const char *sql, char *err, size_t errlen)
{
    return sqldb_stmt(&st->d, sql, err, errlen);
}

static void ss_text(sqlite3_stmt *s, int i, const char *v)
{
    if (v != NULL)
        sqlite3_bind_text(s, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(s, i);
}

/* Steps a bound statement to its end and resets it. */
static int ss_run(store *st, sqlite3_stmt *s, const char *what, char *err, size_t errlen)
{
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc == SQLITE_DONE ? PX_OK : ss_fail(st, what, err, errlen);
}

/* Runs one statement with one int64 bound inside the caller's transaction;
 * *changed (may be NULL) gets the rows it touched. */
static int ss_sweep_step(store *st, const char *sql, int64_t v, int64_t *changed, char *err,
                         size_t errlen)
{
    sqlite3_stmt *s = ss_prep(st, sql, err, errlen);
    if (s == NULL)
        return PX_ERROR;
    sqlite3_bind_int64(s, 1, v);
    int rc = ss_run(st, s, "sweep", err, errlen);
    sqldb_done(s);
    if (changed != NULL)
        *changed = rc == PX_OK ? sqlite3_changes(st->d.db) : 0;
    return rc;
}

/* One statement with one int64 bound, in a transaction of its own;
 * *removed (may be NULL) gets the rows changed. For the sweeps. */
static int ss_sweep(store *st, const char *sql, int64_t v, int64_t *removed, char *err,
                    size_t errlen)
{
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    int rc = ss_sweep_step(st, sql, v, removed, err, errlen);
    return ss_end(st, rc, err, errlen);
}

/* ---- inbox ---- */

static int ss_check_event(const store_event *ev, size_t i, char *err, size_t errlen)
{
    if (!ss_str_ok(ev->user) || !ss_str_ok(ev->id))
        return px_err(err, errlen, "inbox put: event %zu: user or id empty or not UTF-8", i);
    if (ev->kind < STORE_MESSAGE || ev->kind > STORE_KIND_MAX)
        return px_err(err, errlen, "inbox put: event %zu: bad kind %d", i, ev->kind);
    if (ev->json == NULL || !utf8_valid((const unsigned char *)ev->json, ev->json_len))
        return px_err(err, errlen, "inbox put: event %zu: json missing or not UTF-8", i);
    if (ev->sender != NULL && !ss_str_ok(ev->sender))
        return px_err(err, errlen, "inbox put: event %zu: sender not UTF-8", i);
    return PX_OK;
}

int store_inbox_put(store *st, const store_event *ev, size_t n, int *inserted,
                    char *err, size_t errlen)
{
    int rc = ss_check_n(n, "inbox put", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        rc = ss_check_event(&ev[i], i, err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT OR IGNORE INTO inbox VALUES (?,?,?,?,?,?,?)", err,
                              errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, ev[i].user);
        ss_text(s, 2, ev[i].id);
        sqlite3_bind_int64(s, 3, ev[i].seq);
        sqlite3_bind_int64(s, 4, ev[i].ts_ms);
        sqlite3_bind_int(s, 5, ev[i].kind);
        ss_text(s, 6, ev[i].sender);
        sqlite3_bind_text(s, 7, ev[i].json, (int)ev[i].json_len, SQLITE_STATIC);
        rc = ss_run(st, s, "inbox put", err, errlen);
        if (inserted != NULL)
            inserted[i] = sqlite3_changes(st->d.db) > 0;
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

/* The acked devices of an event as one column: ids joined by spaces
 * (device ids have none). */
#define SS_ACKED_COL "(SELECT group_concat(a.dev, ' ') FROM inbox_acked a" \
                     " WHERE a.user = i.user AND a.id = i.id)"
#define SS_ACKED_BUF (STORE_ACKED_MAX * 65)

/* Columns user, id, seq, ts, kind, sender, json, acked of a row into ev;
 * the acked ids are copied into buf, which ev points into. */
static void ss_row_event(sqlite3_stmt *s, store_event *ev, char buf[SS_ACKED_BUF])
{
    *ev = (store_event){ .user = (const char *)sqlite3_column_text(s, 0),
                         .id = (const char *)sqlite3_column_text(s, 1),
                         .seq = sqlite3_column_int64(s, 2),
                         .ts_ms = sqlite3_column_int64(s, 3),
                         .kind = sqlite3_column_int(s, 4),
                         .sender = (const char *)sqlite3_column_text(s, 5),
                         .json = (const char *)sqlite3_column_text(s, 6),
                         .json_len = (size_t)sqlite3_column_bytes(s, 6) };
    const char *acked = (const char *)sqlite3_column_text(s, 7);
    snprintf(buf, SS_ACKED_BUF, "%s", acked != NULL ? acked : "");
    for (char *save = NULL, *d = strtok_r(buf, " ", &save);
         d != NULL && ev->nacked < STORE_ACKED_MAX; d = strtok_r(NULL, " ", &save))
        ev->acked[ev->nacked++] = d;
}

/* Visits the rows of a prepared, bound query; stops at a callback's
 * non-PX_OK, which is returned. cb may be NULL (an ack nobody watches). */
static int ss_visit(store *st, sqlite3_stmt *s, store_event_cb cb, void *arg, char *err,
                    size_t errlen)
{
    int step;
    char buf[SS_ACKED_BUF];
    while ((step = sqlite3_step(s)) == SQLITE_ROW) {
        store_event ev;
        ss_row_event(s, &ev, buf);
        int rc = cb != NULL ? cb(arg, &ev) : PX_OK;
        if (rc != PX_OK)
            return rc;
    }
    return step == SQLITE_DONE ? PX_OK : ss_fail(st, "read", err, errlen);
}

#define SS_EVENT_COLS "i.user, i.id, i.seq, i.ts, i.kind, i.sender, i.json, " SS_ACKED_COL

int store_inbox_scan(store *st, const char *user, const char *dev, int64_t after_seq,
                     size_t limit, store_event_cb cb, void *arg, char *err, size_t errlen)
{
    if (user == NULL)
        return px_err(err, errlen, "inbox scan: user is required");
    pthread_mutex_lock(&st->mu);
    /* dev NULL matches no acked row, so every event is visited. */
    sqlite3_stmt *s = ss_prep(st, "SELECT " SS_EVENT_COLS " FROM inbox i WHERE i.user=?"
                              " AND i.seq>? AND NOT EXISTS (SELECT 1 FROM inbox_acked a"
                              " WHERE a.user = i.user AND a.id = i.id AND a.dev = ?)"
                              " ORDER BY i.seq LIMIT ?", err, errlen);
    int rc = PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, user);
        sqlite3_bind_int64(s, 2, after_seq);
        ss_text(s, 3, dev);
        sqlite3_bind_int64(s, 4, (sqlite3_int64)PX_MIN(limit, (size_t)INT64_MAX));
        rc = ss_visit(st, s, cb, arg, err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static int ss_check_ids(const char *const *ids, size_t n, const char *what, char *err,
                        size_t errlen)
{
    int rc = ss_check_n(n, what, err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(ids[i]))
            rc = px_err(err, errlen, "%s: id %zu empty or not UTF-8", what, i);
    return rc;
}

static int ss_check_keys(const store_key *keys, size_t n, const char *what, char *err,
                         size_t errlen)
{
    int rc = ss_check_n(n, what, err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(keys[i].user) || !ss_str_ok(keys[i].id))
            rc = px_err(err, errlen, "%s: key %zu: user or id empty or not UTF-8", what, i);
    return rc;
}

/* The joins against ss_keys are CROSS JOINs, which SQLite never reorders:
 * with a plain JOIN and no statistics the planner walked the whole inbox
 * (or track) table by an index and probed the key set for each row, so
 * every ack cost a scan of every stored message (found by profiling
 * parleyd: 14% of its samples, growing with the inbox). */

/* In a transaction: n records of stride bytes, each beginning with two
 * strings (store_key's user and id, store_track's reader and msg_id), into
 * the temporary table ss_keys (a pair named twice counts once, as in a
 * query on a set). */
static int ss_load_pairs(store *st, const void *recs, size_t stride, size_t n,
                         const char *what, char *err, size_t errlen)
{
    sqlite3_exec(st->d.db, "DELETE FROM ss_keys", NULL, NULL, NULL);
    sqlite3_stmt *ins = ss_prep(st, "INSERT OR IGNORE INTO ss_keys VALUES (?,?)", err, errlen);
    int rc = ins != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        const char *const *pair = (const char *const *)((const char *)recs + i * stride);
        ss_text(ins, 1, pair[0]);
        ss_text(ins, 2, pair[1]);
        rc = ss_run(st, ins, what, err, errlen);
    }
    sqldb_done(ins);
    return rc;
}

_Static_assert(offsetof(store_key, id) == sizeof(const char *) &&
               offsetof(store_track, msg_id) == sizeof(const char *),
               "ss_load_pairs reads the first two fields as strings");

int store_inbox_get(store *st, const store_key *keys, size_t n, store_event_cb cb, void *arg,
                    char *err, size_t errlen)
{
    int rc = ss_check_keys(keys, n, "inbox get", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin_read(st, err, errlen) != PX_OK)
        return PX_ERROR;
    rc = ss_load_pairs(st, keys, sizeof(*keys), n, "inbox get", err, errlen);
    sqlite3_stmt *sel = rc == PX_OK ? ss_prep(st, "SELECT " SS_EVENT_COLS " FROM ss_keys k"
                                              " CROSS JOIN inbox i ON i.user = k.reader"
                                              " AND i.id = k.msg_id ORDER BY i.user, i.seq",
                                              err, errlen) : NULL;
    rc = sel != NULL ? ss_visit(st, sel, cb, arg, err, errlen) : PX_ERROR;
    sqldb_done(sel);
    return ss_end_read(st, rc, err, errlen);
}

int store_inbox_delete(store *st, const store_key *keys, size_t n, int64_t *removed, char *err,
                       size_t errlen)
{
    if (removed != NULL)
        *removed = 0;
    int rc = ss_check_keys(keys, n, "inbox delete", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "DELETE FROM inbox WHERE user=? AND id=?", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    int64_t total = 0;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, keys[i].user);
        ss_text(s, 2, keys[i].id);
        rc = ss_run(st, s, "inbox delete", err, errlen);
        total += sqlite3_changes(st->d.db);
    }
    sqldb_done(s);
    rc = ss_end(st, rc, err, errlen);
    if (rc == PX_OK && removed != NULL)
        *removed = total;
    return rc;
}

int store_inbox_mark(store *st, const store_event *ev, size_t n, const char *dev, char *err,
                     size_t errlen)
{
    int rc = ss_check_n(n, "inbox mark", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(ev[i].user) || !ss_str_ok(ev[i].id))
            rc = px_err(err, errlen, "inbox mark: event %zu: user or id empty or not UTF-8", i);
    if (rc == PX_OK && !ss_str_ok(dev))
        rc = px_err(err, errlen, "inbox mark: dev empty or not UTF-8");
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT OR IGNORE INTO inbox_acked VALUES (?,?,?,?)", err,
                              errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, ev[i].user);
        ss_text(s, 2, ev[i].id);
        ss_text(s, 3, dev);
        sqlite3_bind_int64(s, 4, ev[i].ts_ms);
        rc = ss_run(st, s, "inbox mark", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_inbox_unmark(store *st, const store_key *keys, size_t n, char *err, size_t errlen)
{
    int rc = ss_check_keys(keys, n, "inbox unmark", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "DELETE FROM inbox_acked WHERE user=? AND id=?", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, keys[i].user);
        ss_text(s, 2, keys[i].id);
        rc = ss_run(st, s, "inbox unmark", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_inbox_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    int rc = ss_sweep_step(st, "DELETE FROM inbox WHERE ts < ?", cutoff_ms, removed, err, errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "DELETE FROM inbox_acked WHERE ts < ?", cutoff_ms, NULL, err,
                           errlen);
    return ss_end(st, rc, err, errlen);
}

/* Runs sql, a COUNT(*) with user as its one parameter. */
static int ss_count_user(store *st, const char *sql, const char *user, int64_t *count,
                         const char *what, char *err, size_t errlen)
{
    if (user == NULL || count == NULL)
        return px_err(err, errlen, "%s: user and count are required", what);
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, sql, err, errlen);
    int rc = PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, user);
        if (sqlite3_step(s) == SQLITE_ROW) {
            *count = sqlite3_column_int64(s, 0);
            rc = PX_OK;
        } else {
            rc = ss_fail(st, what, err, errlen);
        }
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_inbox_count(store *st, const char *user, int64_t *count, char *err, size_t errlen)
{
    return ss_count_user(st, "SELECT COUNT(*) FROM inbox WHERE user=?", user, count,
                         "inbox count", err, errlen);
}

/* ---- seen ---- */

int store_seen_claim(store *st, const char *const *keys, const char *const *tags, size_t n,
                     int64_t ts_ms, int *fresh, char *err, size_t errlen)
{
    st = st->seen;
    int rc = ss_check_ids(keys, n, "seen claim", err, errlen);
    if (rc == PX_OK)
        rc = ss_check_ids(tags, n, "seen claim", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (fresh == NULL)
        return px_err(err, errlen, "seen claim: fresh is required");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *ins = ss_prep(st, "INSERT OR IGNORE INTO seen (key, ts, tag) VALUES (?,?,?)",
                                err, errlen);
    sqlite3_stmt *sel = ins != NULL ? ss_prep(st, "SELECT tag FROM seen WHERE key=?", err,
                                              errlen) : NULL;
    rc = sel != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(ins, 1, keys[i]);
        sqlite3_bind_int64(ins, 2, ts_ms);
        ss_text(ins, 3, tags[i]);
        rc = ss_run(st, ins, "seen claim", err, errlen);
        fresh[i] = sqlite3_changes(st->d.db) > 0;
        if (rc != PX_OK || fresh[i])
            continue;
        ss_text(sel, 1, keys[i]);
        int step = sqlite3_step(sel);
        const char *held = step == SQLITE_ROW ? (const char *)sqlite3_column_text(sel, 0) : NULL;
        fresh[i] = held != NULL && strcmp(held, tags[i]) == 0;
        if (step != SQLITE_ROW && step != SQLITE_DONE)
            rc = ss_fail(st, "seen claim", err, errlen);
        sqlite3_reset(sel);
    }
    sqldb_done(ins);
    sqldb_done(sel);
    return ss_end(st, rc, err, errlen);
}

int store_seen_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    return ss_sweep(st->seen, "DELETE FROM seen WHERE ts < ?", cutoff_ms, removed, err, errlen);
}

/* ---- receipt tracking ---- */

static int ss_check_track(const store_track *t, size_t n, int full, const char *what,
                          char *err, size_t errlen)
{
    int rc = ss_check_n(n, what, err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        if (!ss_str_ok(t[i].reader) || strchr(t[i].reader, '/') != NULL || !ss_str_ok(t[i].msg_id))
            rc = px_err(err, errlen, "%s: record %zu: reader or msg_id bad", what, i);
        else if (full && (!ss_str_ok(t[i].sender) ||
                          (t[i].group != NULL && !ss_str_ok(t[i].group))))
            rc = px_err(err, errlen, "%s: record %zu: sender or group bad", what, i);
    }
    return rc;
}

int store_track_put(store *st, const store_track *t, size_t n, char *err, size_t errlen)
{
    st = st->track;
    int rc = ss_check_track(t, n, 1, "track put", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT OR IGNORE INTO track VALUES (?,?,?,?,?)", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, t[i].reader);
        ss_text(s, 2, t[i].msg_id);
        ss_text(s, 3, t[i].sender);
        ss_text(s, 4, t[i].group);
        sqlite3_bind_int64(s, 5, t[i].ts_ms);
        rc = ss_run(st, s, "track put", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

/* The keys go through a temporary table so a pair named twice is visited
 * once, as a query on a set does in MongoDB. */
int store_track_get(store *st, const store_track *keys, size_t n, store_track_cb cb,
                    void *arg, char *err, size_t errlen)
{
    st = st->track;
    int rc = ss_check_track(keys, n, 0, "track get", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin_read(st, err, errlen) != PX_OK)
        return PX_ERROR;
    rc = ss_load_pairs(st, keys, sizeof(*keys), n, "track get", err, errlen);
    sqlite3_stmt *s = rc == PX_OK ? ss_prep(st, "SELECT t.reader, t.msg_id, t.sender, t.grp,"
                                            " t.ts FROM ss_keys k CROSS JOIN track t ON"
                                            " t.reader = k.reader AND t.msg_id = k.msg_id",
                                            err, errlen) : NULL;
    rc = s != NULL ? PX_OK : PX_ERROR;
    int step = SQLITE_DONE;
    while (rc == PX_OK && (step = sqlite3_step(s)) == SQLITE_ROW) {
        store_track t = { (const char *)sqlite3_column_text(s, 0),
                          (const char *)sqlite3_column_text(s, 1),
                          (const char *)sqlite3_column_text(s, 2),
                          (const char *)sqlite3_column_text(s, 3), sqlite3_column_int64(s, 4) };
        rc = cb != NULL ? cb(arg, &t) : PX_OK;
    }
    if (rc == PX_OK && step != SQLITE_DONE)
        rc = ss_fail(st, "track get", err, errlen);
    sqldb_done(s);
    return ss_end_read(st, rc, err, errlen);
}

int store_track_delete(store *st, const store_track *keys, size_t n, int64_t *removed,
                       char *err, size_t errlen)
{
    st = st->track;
    int rc = ss_check_track(keys, n, 0, "track delete", err, errlen);
    if (removed != NULL)
        *removed = 0;
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "DELETE FROM track WHERE reader=? AND msg_id=?", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    int64_t total = 0;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, keys[i].reader);
        ss_text(s, 2, keys[i].msg_id);
        rc = ss_run(st, s, "track delete", err, errlen);
        total += sqlite3_changes(st->d.db);
    }
    sqldb_done(s);
    rc = ss_end(st, rc, err, errlen);
    if (rc == PX_OK && removed != NULL)
        *removed = total;
    return rc;
}

int store_track_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    return ss_sweep(st->track, "DELETE FROM track WHERE ts < ?", cutoff_ms, removed, err,
                    errlen);
}

/* ---- presence ---- */

static int ss_gateway_ok(const char *gw)
{
    return ss_str_ok(gw) && strlen(gw) <= SS_MAX_GATEWAY;
}

/* Connects first, then deletes (store.h: the order of ops does not
 * matter), in one transaction. */
int store_presence_apply(store *st, const store_presence *ops, size_t n,
                         char *err, size_t errlen)
{
    int rc = ss_check_n(n, "presence apply", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(ops[i].user) || !ss_gateway_ok(ops[i].gateway) ||
            (ops[i].delta != 1 && ops[i].delta != -1))
            rc = px_err(err, errlen, "presence apply: op %zu: bad user, gateway or delta", i);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *up = ss_prep(st, "INSERT INTO connections (gateway, epoch, conn, user, device)"
                               " VALUES (?2,?3,?4,?1,?5) ON CONFLICT DO UPDATE SET"
                               " user=excluded.user, device=excluded.device", err, errlen);
    sqlite3_stmt *old = ss_prep(st, "DELETE FROM connections WHERE user=?1 AND gateway=?2 AND"
                                " epoch<?3", err, errlen);
    sqlite3_stmt *down = ss_prep(st, "DELETE FROM connections WHERE gateway=?2 AND epoch=?3"
                                 " AND conn=?4 AND user=?1", err, errlen);
    rc = up && old && down ? PX_OK : PX_ERROR;
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < n && rc == PX_OK; i++) {
            sqlite3_stmt *s = pass == 0 ? (ops[i].delta > 0 ? up : NULL)
                                        : (ops[i].delta > 0 ? old : down);
            if (s == NULL)
                continue;
            ss_text(s, 1, ops[i].user);
            ss_text(s, 2, ops[i].gateway);
            sqlite3_bind_int64(s, 3, ops[i].epoch);
            if (s != old)
                sqlite3_bind_int64(s, 4, (sqlite3_int64)ops[i].conn);
            if (s == up)
                ss_text(s, 5, ops[i].device);
            rc = ss_run(st, s, "presence apply", err, errlen);
        }
    }
    sqldb_done(up);
    sqldb_done(old);
    sqldb_done(down);
    return ss_end(st, rc, err, errlen);
}

/* The beat only moves a gateway's record forward: an older epoch's beat
 * (a zombie of a restarted gateway) leaves the newer record as it is. */
int store_gateway_beat(store *st, const char *gateway, int64_t epoch, int64_t ts_ms,
                       int reset, char *err, size_t errlen)
{
    if (!ss_gateway_ok(gateway))
        return px_err(err, errlen, "gateway beat: bad gateway id");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT INTO gateways VALUES (?1,?2,?3) ON CONFLICT DO UPDATE"
                              " SET epoch=excluded.epoch, ts=excluded.ts"
                              " WHERE excluded.epoch >= epoch", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, gateway);
        sqlite3_bind_int64(s, 2, epoch);
        sqlite3_bind_int64(s, 3, ts_ms);
        rc = ss_run(st, s, "gateway beat", err, errlen);
    }
    sqldb_done(s);
    s = NULL;
    if (rc == PX_OK && reset) {
        s = ss_prep(st, "DELETE FROM connections WHERE gateway=? AND epoch<?", err, errlen);
        rc = s != NULL ? PX_OK : PX_ERROR;
        if (s != NULL) {
            ss_text(s, 1, gateway);
            sqlite3_bind_int64(s, 2, epoch);
            rc = ss_run(st, s, "gateway beat reset", err, errlen);
        }
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_presence_lookup(store *st, const char *user, int64_t alive_after_ms,
                          char (*gws)[65], size_t max, size_t *n, char *err, size_t errlen)
{
    if (user == NULL || n == NULL || (gws == NULL && max > 0))
        return px_err(err, errlen, "presence lookup: user, gws and n are required");
    *n = 0;
    if (max == 0)
        return PX_OK;
    pthread_mutex_lock(&st->mu);
    /* alive_after_ms <= 0: every gateway with a record, beats unchecked. */
    sqlite3_stmt *s = ss_prep(st, "SELECT DISTINCT c.gateway FROM connections c LEFT JOIN"
                              " gateways g ON g.gateway = c.gateway WHERE c.user=?1 AND"
                              " (?2 <= 0 OR (g.ts >= ?2 AND c.epoch >= g.epoch)) LIMIT ?3",
                              err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, user);
        sqlite3_bind_int64(s, 2, alive_after_ms);
        sqlite3_bind_int64(s, 3, (sqlite3_int64)max);
        int step;
        while ((step = sqlite3_step(s)) == SQLITE_ROW && *n < max)
            snprintf(gws[(*n)++], 65, "%s", (const char *)sqlite3_column_text(s, 0));
        if (step != SQLITE_ROW && step != SQLITE_DONE)
            rc = ss_fail(st, "presence lookup", err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_presence_expire(store *st, int64_t cutoff_ms, int64_t *removed,
                          char *err, size_t errlen)
{
    return ss_sweep(st, "DELETE FROM connections WHERE EXISTS (SELECT 1 FROM gateways g WHERE"
                    " g.gateway = connections.gateway AND g.ts < ?1 AND"
                    " connections.epoch <= g.epoch)", cutoff_ms, removed, err, errlen);
}

int store_presence_devices(store *st, const char *user, char (*devs)[65], size_t max, size_t *n,
                           char *err, size_t errlen)
{
    if (user == NULL || n == NULL || (devs == NULL && max > 0))
        return px_err(err, errlen, "presence devices: user, devs and n are required");
    *n = 0;
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT DISTINCT device FROM connections WHERE user=?1 AND"
                              " device IS NOT NULL LIMIT ?2", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, user);
        sqlite3_bind_int64(s, 2, (sqlite3_int64)max);
        int step;
        while ((step = sqlite3_step(s)) == SQLITE_ROW && *n < max)
            snprintf(devs[(*n)++], 65, "%s", (const char *)sqlite3_column_text(s, 0));
        if (step != SQLITE_ROW && step != SQLITE_DONE)
            rc = ss_fail(st, "presence devices", err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_presence_count(store *st, const char *user, int64_t *count, char *err, size_t errlen)
{
    return ss_count_user(st, "SELECT COUNT(*) FROM connections WHERE user=?", user, count,
                         "presence count", err, errlen);
}

/* ---- presence to contacts (issue 18) ---- */

/* The pair's two ids in order: one row per unordered pair. */
static void ss_pair_order(const char *x, const char *y, const char **lo, const char **hi)
{
    int lt = strcmp(x, y) < 0;
    *lo = lt ? x : y;
    *hi = lt ? y : x;
}

int store_contacts_put(store *st, const store_pair *p, size_t n, char *err, size_t errlen)
{
    int rc = ss_check_n(n, "contacts put", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(p[i].a) || !ss_str_ok(p[i].b) || strcmp(p[i].a, p[i].b) == 0)
            rc = px_err(err, errlen, "contacts put: pair %zu: two distinct user ids needed", i);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT OR IGNORE INTO contacts VALUES (?1, ?2)", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        const char *lo, *hi;
        ss_pair_order(p[i].a, p[i].b, &lo, &hi);
        ss_text(s, 1, lo);
        ss_text(s, 2, hi);
        rc = ss_run(st, s, "contacts put", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_contacts_check(store *st, const char *user, const char *const *others, size_t n,
                         int *is_contact, char *err, size_t errlen)
{
    int rc = ss_check_n(n, "contacts check", err, errlen);
    if (rc == PX_OK && (!ss_str_ok(user) || (n > 0 && (others == NULL || is_contact == NULL))))
        rc = px_err(err, errlen, "contacts check: user, others and is_contact are required");
    if (rc != PX_OK || n == 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT 1 FROM contacts WHERE a=?1 AND b=?2", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        is_contact[i] = others[i] != NULL && strcmp(others[i], user) == 0;
        if (is_contact[i] || others[i] == NULL)
            continue;
        const char *lo, *hi;
        ss_pair_order(user, others[i], &lo, &hi);
        ss_text(s, 1, lo);
        ss_text(s, 2, hi);
        int step = sqlite3_step(s);
        is_contact[i] = step == SQLITE_ROW;
        if (step != SQLITE_ROW && step != SQLITE_DONE)
            rc = ss_fail(st, "contacts check", err, errlen);
        sqlite3_reset(s);
        sqlite3_clear_bindings(s);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_last_seen_put(store *st, const char *const *users, size_t n, int64_t ts_ms,
                        char *err, size_t errlen)
{
    int rc = ss_check_n(n, "last seen put", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(users[i]))
            rc = px_err(err, errlen, "last seen put: user %zu missing or not UTF-8", i);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT INTO presence_users VALUES (?1, ?2, 0) ON CONFLICT"
                              " DO UPDATE SET last_seen = MAX(COALESCE(last_seen, 0),"
                              " excluded.last_seen)", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, users[i]);
        sqlite3_bind_int64(s, 2, ts_ms);
        rc = ss_run(st, s, "last seen put", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_presence_hide(store *st, const char *user, int hide, char *err, size_t errlen)
{
    if (!ss_str_ok(user))
        return px_err(err, errlen, "presence hide: user missing or not UTF-8");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT INTO presence_users VALUES (?1, 0, ?2) ON CONFLICT"
                              " DO UPDATE SET hide = excluded.hide", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, user);
        sqlite3_bind_int(s, 2, hide != 0);
        rc = ss_run(st, s, "presence hide", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_presence_state(store *st, const char *const *users, size_t n,
                         store_user_presence *out, char *err, size_t errlen)
{
    int rc = ss_check_n(n, "presence state", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!ss_str_ok(users[i]))
            rc = px_err(err, errlen, "presence state: user %zu missing or not UTF-8", i);
    if (rc != PX_OK || n == 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT EXISTS (SELECT 1 FROM connections WHERE user=?1),"
                              " (SELECT last_seen FROM presence_users WHERE user=?1),"
                              " (SELECT hide FROM presence_users WHERE user=?1)", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, users[i]);
        if (sqlite3_step(s) == SQLITE_ROW)
            out[i] = (store_user_presence){ .online = sqlite3_column_int(s, 0) != 0,
                                             .last_seen = sqlite3_column_int64(s, 1),
                                             .hide_last_seen = sqlite3_column_int(s, 2) != 0 };
        else
            rc = ss_fail(st, "presence state", err, errlen);
        sqlite3_reset(s);
        sqlite3_clear_bindings(s);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_gateway_list(store *st, int64_t alive_after_ms, char (*gws)[65], size_t max,
                       size_t *n, char *err, size_t errlen)
{
    if (n == NULL || (gws == NULL && max > 0))
        return px_err(err, errlen, "gateway list: gws and n are required");
    *n = 0;
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT gateway FROM gateways WHERE ts >= ?1 LIMIT ?2", err,
                              errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        sqlite3_bind_int64(s, 1, alive_after_ms);
        sqlite3_bind_int64(s, 2, (sqlite3_int64)max);
        int step;
        while ((step = sqlite3_step(s)) == SQLITE_ROW && *n < max)
            snprintf(gws[(*n)++], 65, "%s", (const char *)sqlite3_column_text(s, 0));
        if (step != SQLITE_ROW && step != SQLITE_DONE)
            rc = ss_fail(st, "gateway list", err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

/* ---- devices ---- */

/* Runs a bound statement expected to give one int64 (COUNT, a column):
 * PX_OK with *v, PX_DECLINED when it gives no row. Resets it. */
static int ss_one_int(store *st, sqlite3_stmt *s, int64_t *v, const char *what, char *err,
                      size_t errlen)
{
    int step = sqlite3_step(s);
    int rc = step == SQLITE_ROW ? PX_OK : step == SQLITE_DONE ? PX_DECLINED
                                                              : ss_fail(st, what, err, errlen);
    if (rc == PX_OK)
        *v = sqlite3_column_int64(s, 0);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

/* In the caller's transaction: the touch of a device, as store.h says. */
static int ss_device_touch(store *st, const char *user, const char *dev, int64_t now_ms,
                           long max, int *status, char *err, size_t errlen)
{
    static const char what[] = "device touch";
    sqlite3_stmt *get = ss_prep(st, "SELECT unlinked FROM devices WHERE user=? AND dev=?", err,
                                errlen);
    sqlite3_stmt *count = ss_prep(st, "SELECT COUNT(*) FROM devices WHERE user=? AND unlinked=0",
                                  err, errlen);
    sqlite3_stmt *put = ss_prep(st, "INSERT INTO devices (user, dev, first_ms, last_ms, since,"
                                " unlinked) VALUES (?,?,?,?,?,0) ON CONFLICT"
                                " (user, dev) DO UPDATE SET last_ms = MAX(last_ms, excluded.last_ms)",
                                err, errlen);
    int rc = get != NULL && count != NULL && put != NULL ? PX_OK : PX_ERROR;
    int64_t unlinked = 0, linked = 0;
    if (rc == PX_OK) {
        ss_text(get, 1, user);
        ss_text(get, 2, dev);
        rc = ss_one_int(st, get, &unlinked, what, err, errlen);
    }
    if (rc == PX_DECLINED) { /* a new device: is there room? */
        ss_text(count, 1, user);
        rc = ss_one_int(st, count, &linked, what, err, errlen);
        if (rc == PX_OK && linked >= max)
            *status = STORE_DEVICE_FULL;
    } else if (rc == PX_OK && unlinked) {
        *status = STORE_DEVICE_UNLINKED;
    }
    if (rc == PX_OK && *status == STORE_DEVICE_OK) {
        ss_text(put, 1, user);
        ss_text(put, 2, dev);
        sqlite3_bind_int64(put, 3, now_ms);
        sqlite3_bind_int64(put, 4, now_ms);
        sqlite3_bind_int64(put, 5, STORE_DEVICE_UNSYNCED);
        rc = ss_run(st, put, what, err, errlen);
    }
    sqldb_done(get);
    sqldb_done(count);
    sqldb_done(put);
    return rc;
}

int store_device_touch(store *st, const char *user, const char *dev, int64_t now_ms, long max,
                       int *status, char *err, size_t errlen)
{
    *status = STORE_DEVICE_OK;
    if (!ss_str_ok(user) || !ss_str_ok(dev))
        return px_err(err, errlen, "device touch: user or dev empty or not UTF-8");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    int rc = ss_device_touch(st, user, dev, now_ms, max, status, err, errlen);
    return ss_end(st, rc, err, errlen);
}

int store_device_list(store *st, const char *user, store_device_cb cb, void *arg, char *err,
                      size_t errlen)
{
    if (user == NULL || cb == NULL)
        return px_err(err, errlen, "device list: user and cb are required");
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT user, dev, first_ms, last_ms, since, unlinked,"
                              " push_gone_ms FROM devices WHERE user=?", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR, step = SQLITE_DONE;
    if (s != NULL) {
        ss_text(s, 1, user);
        while (rc == PX_OK && (step = sqlite3_step(s)) == SQLITE_ROW) {
            store_device d = { .user = (const char *)sqlite3_column_text(s, 0),
                               .dev = (const char *)sqlite3_column_text(s, 1),
                               .first_ms = sqlite3_column_int64(s, 2),
                               .last_ms = sqlite3_column_int64(s, 3),
                               .since = sqlite3_column_int64(s, 4),
                               .unlinked = sqlite3_column_int(s, 5) != 0,
                               .push_gone_ms = sqlite3_column_int64(s, 6) };
            rc = cb(arg, &d);
        }
        if (rc == PX_OK && step != SQLITE_DONE)
            rc = ss_fail(st, "device list", err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_device_unlink(store *st, const char *user, const char *dev, char *err, size_t errlen)
{
    if (!ss_str_ok(user) || !ss_str_ok(dev))
        return px_err(err, errlen, "device unlink: user or dev empty or not UTF-8");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "UPDATE devices SET unlinked=1 WHERE user=? AND dev=?", err,
                              errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR, none = 0;
    if (s != NULL) {
        ss_text(s, 1, user);
        ss_text(s, 2, dev);
        rc = ss_run(st, s, "device unlink", err, errlen);
        none = rc == PX_OK && sqlite3_changes(st->d.db) == 0;
    }
    sqldb_done(s);
    rc = ss_end(st, rc, err, errlen);
    return rc == PX_OK && none ? PX_DECLINED : rc;
}

int store_device_push_gone(store *st, const char *user, const char *dev, int64_t at_ms,
                           char *err, size_t errlen)
{
    if (!ss_str_ok(user) || !ss_str_ok(dev))
        return px_err(err, errlen, "device push gone: user or dev empty or not UTF-8");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "UPDATE devices SET push_gone_ms=MAX(IFNULL(push_gone_ms, 0),"
                              " ?) WHERE user=? AND dev=?", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        sqlite3_bind_int64(s, 1, at_ms);
        ss_text(s, 2, user);
        ss_text(s, 3, dev);
        rc = ss_run(st, s, "device push gone", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

int store_device_link(store *st, const char *user, const char *dev, int64_t since, char *err,
                      size_t errlen)
{
    if (!ss_str_ok(user) || !ss_str_ok(dev))
        return px_err(err, errlen, "device link: user or dev empty or not UTF-8");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "UPDATE devices SET since=MIN(since, ?) WHERE user=?"
                              " AND dev=?", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        sqlite3_bind_int64(s, 1, since);
        ss_text(s, 2, user);
        ss_text(s, 3, dev);
        rc = ss_run(st, s, "device link", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

/* ---- groups: members and admins as JSON arrays of strings ---- */

static char *ss_list_json(const char *const *v, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_string(v[i]));
    char *s = json_dumps(a, JSON_COMPACT);
    json_decref(a);
    return s;
}

/* Parses a JSON array of strings into v (pointers into a; ceiling max). */
static size_t ss_list_parse(json_t *a, const char **v, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < json_array_size(a) && n < max; i++)
        if (json_is_string(json_array_get(a, i)))
            v[n++] = json_string_value(json_array_get(a, i));
    return n;
}

static int ss_group_row(sqlite3_stmt *s, store_group_cb cb, void *arg)
{
    static __thread const char *members[STORE_GROUP_MAX], *admins[STORE_GROUP_MAX],
        *invited[STORE_GROUP_MAX];
    const char *inv = (const char *)sqlite3_column_text(s, 7);
    json_t *m = json_loads((const char *)sqlite3_column_text(s, 3), 0, NULL);
    json_t *a = json_loads((const char *)sqlite3_column_text(s, 4), 0, NULL);
    json_t *iv = inv != NULL ? json_loads(inv, 0, NULL) : NULL;
    store_group g = { .id = (const char *)sqlite3_column_text(s, 0),
                      .name = (const char *)sqlite3_column_text(s, 1),
                      .creator = (const char *)sqlite3_column_text(s, 2),
                      .members = members, .nmembers = ss_list_parse(m, members, STORE_GROUP_MAX),
                      .admins = admins, .nadmins = ss_list_parse(a, admins, STORE_GROUP_MAX),
                      .invited = invited,
                      .ninvited = ss_list_parse(iv, invited, STORE_GROUP_MAX),
                      .applied = sqlite3_column_int64(s, 5),
                      .ts_ms = sqlite3_column_int64(s, 6) };
    int rc = cb != NULL ? cb(arg, &g) : PX_OK;
    json_decref(m);
    json_decref(a);
    json_decref(iv);
    return rc;
}

int store_group_get(store *st, const char *const *ids, size_t n, store_group_cb cb,
                    void *arg, char *err, size_t errlen)
{
    int rc = ss_check_ids(ids, n, "group get", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT id, name, creator, members, admins, applied, ts, invited"
                              " FROM groups WHERE id=?", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(s, 1, ids[i]);
        int step = sqlite3_step(s);
        if (step == SQLITE_ROW)
            rc = ss_group_row(s, cb, arg);
        else if (step != SQLITE_DONE)
            rc = ss_fail(st, "group get", err, errlen);
        sqlite3_reset(s);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static int ss_check_group(const store_group *g, char *err, size_t errlen)
{
    if (!ss_str_ok(g->id) || !ss_str_ok(g->name) || !ss_str_ok(g->creator))
        return px_err(err, errlen, "group put: id, name or creator empty or not UTF-8");
    if (g->nmembers + g->ninvited > STORE_GROUP_MAX || g->nadmins > g->nmembers)
        return px_err(err, errlen, "group put: %zu members / %zu admins / %zu invited out of bounds",
                      g->nmembers, g->nadmins, g->ninvited);
    for (size_t i = 0; i < g->nmembers; i++)
        if (!ss_str_ok(g->members[i]))
            return px_err(err, errlen, "group put: member %zu empty or not UTF-8", i);
    for (size_t i = 0; i < g->nadmins; i++)
        if (!ss_str_ok(g->admins[i]))
            return px_err(err, errlen, "group put: admin %zu empty or not UTF-8", i);
    for (size_t i = 0; i < g->ninvited; i++)
        if (!ss_str_ok(g->invited[i]))
            return px_err(err, errlen, "group put: invited %zu empty or not UTF-8", i);
    return PX_OK;
}

int store_group_put(store *st, const store_group *g, size_t n, char *err, size_t errlen)
{
    int rc = ss_check_n(n, "group put", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        rc = ss_check_group(&g[i], err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT OR REPLACE INTO groups (id, name, creator, members, admins,"
                              " applied, ts, invited) VALUES (?,?,?,?,?,?,?,?)", err,
                              errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        char *m = ss_list_json(g[i].members, g[i].nmembers);
        char *a = ss_list_json(g[i].admins, g[i].nadmins);
        char *iv = ss_list_json(g[i].invited, g[i].ninvited);
        ss_text(s, 1, g[i].id);
        ss_text(s, 2, g[i].name);
        ss_text(s, 3, g[i].creator);
        ss_text(s, 4, m);
        ss_text(s, 5, a);
        sqlite3_bind_int64(s, 6, g[i].applied);
        sqlite3_bind_int64(s, 7, g[i].ts_ms);
        ss_text(s, 8, iv);
        rc = ss_run(st, s, "group put", err, errlen);
        free(m);
        free(a);
        free(iv);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

/* ---- media: chunks under an upload id, one record per sha256, grants ---- */

static int ss_media_id_ok(const char *id)
{
    size_t n = id != NULL ? strlen(id) : 0;
    return n >= 1 && n <= STORE_MEDIA_ID_MAX &&
           strspn(id, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

int store_chunk_put(store *st, const char *upload, int64_t n, const void *data, size_t len,
                    int64_t ts_ms, char *err, size_t errlen)
{
    if (!ss_media_id_ok(upload) || n < 0 || len > STORE_MEDIA_CHUNK || (data == NULL && len > 0))
        return px_err(err, errlen, "chunk put: bad upload id, chunk number or length %zu", len);
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "INSERT OR IGNORE INTO chunks VALUES (?,?,?,?)", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, upload);
        sqlite3_bind_int64(s, 2, n);
        sqlite3_bind_blob(s, 3, data, (int)len, SQLITE_STATIC);
        sqlite3_bind_int64(s, 4, ts_ms);
        rc = ss_run(st, s, "chunk put", err, errlen);
    }
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

/* A reader asks for one chunk per call (a primary-key lookup on a cached
 * statement): holding a statement open across calls would pin a read
 * transaction and the connection's lock for a whole download. */
struct store_chunk_reader {
    store *st;
    char upload[STORE_MEDIA_ID_MAX + 1];
    int64_t next;
};

store_chunk_reader *store_chunk_open(store *st, const char *upload, int64_t from_n,
                                     char *err, size_t errlen)
{
    if (!ss_media_id_ok(upload) || from_n < 0) {
        px_err(err, errlen, "chunk open: bad upload id or chunk number");
        return NULL;
    }
    store_chunk_reader *rd = px_calloc(1, sizeof(*rd));
    rd->st = st;
    snprintf(rd->upload, sizeof(rd->upload), "%s", upload);
    rd->next = from_n;
    return rd;
}

int store_chunk_next(store_chunk_reader *rd, int64_t *n, void *buf, size_t cap, size_t *len,
                     char *err, size_t errlen)
{
    store *st = rd->st;
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT n, data FROM chunks WHERE upload=? AND n>=?"
                              " ORDER BY n LIMIT 1", err, errlen);
    int rc = s != NULL ? PX_DECLINED : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, rd->upload);
        sqlite3_bind_int64(s, 2, rd->next);
        int step = sqlite3_step(s);
        size_t got = step == SQLITE_ROW ? (size_t)sqlite3_column_bytes(s, 1) : 0;
        if (step == SQLITE_ROW && got > cap) {
            rc = px_err(err, errlen, "chunk next: chunk of %zu bytes exceeds %zu", got, cap);
        } else if (step == SQLITE_ROW) {
            *n = sqlite3_column_int64(s, 0);
            if (got > 0)
                memcpy(buf, sqlite3_column_blob(s, 1), got);
            *len = got;
            rd->next = *n + 1;
            rc = PX_OK;
        } else if (step != SQLITE_DONE) {
            rc = ss_fail(st, "chunk next", err, errlen);
        }
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

void store_chunk_close(store_chunk_reader *rd)
{
    free(rd);
}

int store_chunk_drop(store *st, const char *upload, int64_t *removed, char *err, size_t errlen)
{
    if (!ss_media_id_ok(upload))
        return px_err(err, errlen, "chunk drop: bad upload id");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "DELETE FROM chunks WHERE upload=?", err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, upload);
        rc = ss_run(st, s, "chunk drop", err, errlen);
    }
    if (rc == PX_OK && removed != NULL)
        *removed = sqlite3_changes(st->d.db);
    sqldb_done(s);
    return ss_end(st, rc, err, errlen);
}

/* One int64 from a query with up to one text parameter (NULL: unbound). */
static int ss_scalar(store *st, const char *sql, const char *arg, int64_t *out, char *err,
                     size_t errlen)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, sql, err, errlen);
    int rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        if (arg != NULL)
            ss_text(s, 1, arg);
        if (sqlite3_step(s) == SQLITE_ROW)
            *out = sqlite3_column_int64(s, 0);
        else
            rc = ss_fail(st, "count", err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_chunk_count(store *st, const char *upload, int64_t *count, char *err, size_t errlen)
{
    if (upload == NULL)
        return ss_scalar(st, "SELECT COUNT(*) FROM chunks", NULL, count, err, errlen);
    return ss_scalar(st, "SELECT COUNT(*) FROM chunks WHERE upload=?", upload, count, err,
                     errlen);
}

#define SS_MEDIA_COLS "id, sha256, content_type, upload, size, ts"

static void ss_row_media(sqlite3_stmt *s, store_media *m)
{
    memset(m, 0, sizeof(*m));
    snprintf(m->id, sizeof(m->id), "%s", (const char *)sqlite3_column_text(s, 0));
    snprintf(m->sha256, sizeof(m->sha256), "%s", (const char *)sqlite3_column_text(s, 1));
    snprintf(m->content_type, sizeof(m->content_type), "%s",
             sqlite3_column_text(s, 2) ? (const char *)sqlite3_column_text(s, 2) : "");
    snprintf(m->upload, sizeof(m->upload), "%s", (const char *)sqlite3_column_text(s, 3));
    m->size = sqlite3_column_int64(s, 4);
    m->ts_ms = sqlite3_column_int64(s, 5);
}

/* In a transaction: the record with sha256 into *m; PX_DECLINED if none. */
static int ss_media_by_sha(store *st, const char *sha256, store_media *m, char *err,
                           size_t errlen)
{
    sqlite3_stmt *s = ss_prep(st, "SELECT " SS_MEDIA_COLS " FROM media WHERE sha256=?", err,
                              errlen);
    if (s == NULL)
        return PX_ERROR;
    ss_text(s, 1, sha256);
    int step = sqlite3_step(s), rc = PX_DECLINED;
    if (step == SQLITE_ROW) {
        ss_row_media(s, m);
        rc = PX_OK;
    } else if (step != SQLITE_DONE) {
        rc = ss_fail(st, "media", err, errlen);
    }
    sqldb_done(s);
    return rc;
}

/* In a transaction: grants users access to id (a media or an alias) and
 * moves its ts up, and its content's for an alias. */
static int ss_media_touch(store *st, const char *id, const char *const *users, size_t n,
                          int64_t ts_ms, char *err, size_t errlen)
{
    sqlite3_stmt *g = ss_prep(st, "INSERT OR IGNORE INTO grants VALUES (?,?)", err, errlen);
    int rc = g != NULL ? PX_OK : PX_ERROR;
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        ss_text(g, 1, id);
        ss_text(g, 2, users[i]);
        rc = ss_run(st, g, "media grant", err, errlen);
    }
    sqldb_done(g);
    static const char *const touch[] = {
        "UPDATE media SET ts = MAX(ts, ?1) WHERE id = ?2"
        " OR id = (SELECT content FROM media_alias WHERE id = ?2)",
        "UPDATE media_alias SET ts = MAX(ts, ?1) WHERE id = ?2",
    };
    for (size_t i = 0; i < PX_ARRAY_LEN(touch) && rc == PX_OK; i++) {
        sqlite3_stmt *t = ss_prep(st, touch[i], err, errlen);
        rc = t != NULL ? PX_OK : PX_ERROR;
        if (t != NULL) {
            sqlite3_bind_int64(t, 1, ts_ms);
            ss_text(t, 2, id);
            rc = ss_run(st, t, "media touch", err, errlen);
        }
        sqldb_done(t);
    }
    return rc;
}

int store_media_commit(store *st, store_media *m, const char *uploader, int *created,
                       char *err, size_t errlen)
{
    if (!ss_media_id_ok(m->id) || !ss_media_id_ok(m->upload) || strlen(m->sha256) != 64 ||
        !ss_str_ok(uploader) || m->size < 0)
        return px_err(err, errlen, "media commit: bad id, upload, sha256, size or uploader");
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    int64_t ts = m->ts_ms;
    store_media c;
    int rc = ss_media_by_sha(st, m->sha256, &c, err, errlen);
    *created = rc == PX_DECLINED;
    if (rc == PX_OK) {
        /* Stored already: m is this uploader's own record of those bytes
         * (its id, its type); nothing of the first record is handed back. */
        sqlite3_stmt *s = ss_prep(st, "INSERT INTO media_alias VALUES (?,?,?,?)", err, errlen);
        rc = s != NULL ? PX_OK : PX_ERROR;
        if (s != NULL) {
            ss_text(s, 1, m->id);
            ss_text(s, 2, c.id);
            ss_text(s, 3, m->content_type);
            sqlite3_bind_int64(s, 4, ts);
            rc = ss_run(st, s, "media commit", err, errlen);
        }
        sqldb_done(s);
        memcpy(m->upload, c.upload, sizeof(m->upload));
        m->size = c.size;
    } else if (rc == PX_DECLINED) {
        sqlite3_stmt *s = ss_prep(st, "INSERT INTO media VALUES (?,?,?,?,?,?)", err, errlen);
        rc = s != NULL ? PX_OK : PX_ERROR;
        if (s != NULL) {
            ss_text(s, 1, m->id);
            ss_text(s, 2, m->sha256);
            ss_text(s, 3, m->content_type);
            ss_text(s, 4, m->upload);
            sqlite3_bind_int64(s, 5, m->size);
            sqlite3_bind_int64(s, 6, m->ts_ms);
            rc = ss_run(st, s, "media commit", err, errlen);
        }
        sqldb_done(s);
    }
    if (rc == PX_OK)
        rc = ss_media_touch(st, m->id, &uploader, 1, ts, err, errlen);
    return ss_end(st, rc, err, errlen);
}

int store_media_get(store *st, const char *id, store_media *m, char *err, size_t errlen)
{
    if (!ss_media_id_ok(id))
        return px_err(err, errlen, "media get: bad id");
    pthread_mutex_lock(&st->mu);
    /* A media row, or an alias with its own id, type and ts over its
     * content's bytes. */
    sqlite3_stmt *s = ss_prep(st, "SELECT " SS_MEDIA_COLS " FROM media WHERE id = ?1"
                              " UNION ALL SELECT a.id, m.sha256, a.content_type, m.upload, m.size,"
                              " a.ts FROM media_alias a JOIN media m ON m.id = a.content"
                              " WHERE a.id = ?1", err, errlen);
    int rc = s != NULL ? PX_DECLINED : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, id);
        int step = sqlite3_step(s);
        if (step == SQLITE_ROW) {
            ss_row_media(s, m);
            rc = PX_OK;
        } else if (step != SQLITE_DONE) {
            rc = ss_fail(st, "media get", err, errlen);
        }
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_media_access(store *st, const char *id, const char *user, char *err, size_t errlen)
{
    if (!ss_media_id_ok(id) || !ss_str_ok(user))
        return px_err(err, errlen, "media access: bad id or user");
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = ss_prep(st, "SELECT 1 FROM grants WHERE id = ?1 AND user = ?2 AND"
                              " (EXISTS (SELECT 1 FROM media WHERE id = ?1) OR"
                              " EXISTS (SELECT 1 FROM media_alias WHERE id = ?1))", err, errlen);
    int rc = s != NULL ? PX_DECLINED : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, id);
        ss_text(s, 2, user);
        int step = sqlite3_step(s);
        if (step == SQLITE_ROW)
            rc = PX_OK;
        else if (step != SQLITE_DONE)
            rc = ss_fail(st, "media access", err, errlen);
    }
    sqldb_done(s);
    pthread_mutex_unlock(&st->mu);
    return rc;
}

int store_media_grant(store *st, const char *id, const char *const *users, size_t n,
                      int64_t ts_ms, char *err, size_t errlen)
{
    int rc = ss_media_id_ok(id) ? ss_check_ids(users, n, "media grant", err, errlen)
                                : px_err(err, errlen, "media grant: bad id");
    if (rc != PX_OK)
        return rc;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_stmt *s = ss_prep(st, "SELECT 1 FROM media WHERE id = ?1"
                              " UNION ALL SELECT 1 FROM media_alias WHERE id = ?1", err, errlen);
    rc = s != NULL ? PX_OK : PX_ERROR;
    if (s != NULL) {
        ss_text(s, 1, id);
        rc = sqlite3_step(s) == SQLITE_ROW ? PX_OK : PX_DECLINED;
    }
    sqldb_done(s);
    if (rc == PX_OK)
        rc = ss_media_touch(st, id, users, n, ts_ms, err, errlen);
    if (rc == PX_DECLINED) {
        ss_end(st, PX_ERROR, NULL, 0); /* nothing written: roll back */
        return PX_DECLINED;
    }
    return ss_end(st, rc, err, errlen);
}

/* One transaction: old aliases (grants, record; an alias is never newer
 * than its content), old media (chunks, grants, record), then the chunks of
 * uploads no media names that began before the orphan cutoff (collected in
 * ss_ids first, to count uploads rather than chunks). */
int store_media_sweep(store *st, int64_t cutoff_ms, int64_t orphan_cutoff_ms, int64_t *media,
                      int64_t *orphans, char *err, size_t errlen)
{
    int64_t nm = 0, no = 0;
    if (ss_begin(st, err, errlen) != PX_OK)
        return PX_ERROR;
    sqlite3_exec(st->d.db, "DELETE FROM ss_ids", NULL, NULL, NULL);
    int64_t na = 0;
    int rc = ss_sweep_step(st, "DELETE FROM grants WHERE id IN (SELECT id FROM media_alias"
                           " WHERE ts < ?1)", cutoff_ms, NULL, err, errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "DELETE FROM media_alias WHERE ts < ?1", cutoff_ms, &na, err,
                           errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "DELETE FROM chunks WHERE upload IN (SELECT upload FROM media"
                           " WHERE ts < ?1)", cutoff_ms, NULL, err, errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "DELETE FROM grants WHERE id IN (SELECT id FROM media"
                           " WHERE ts < ?1)", cutoff_ms, NULL, err, errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "DELETE FROM media WHERE ts < ?1", cutoff_ms, &nm, err, errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "INSERT INTO ss_ids SELECT upload FROM chunks WHERE upload NOT IN"
                           " (SELECT upload FROM media) GROUP BY upload HAVING MIN(ts) < ?1",
                           orphan_cutoff_ms, &no, err, errlen);
    if (rc == PX_OK)
        rc = ss_sweep_step(st, "DELETE FROM chunks WHERE upload IN (SELECT id FROM ss_ids)", 0,
                           NULL, err, errlen); /* no parameter: the bind is a no-op */
    rc = ss_end(st, rc, err, errlen);
    if (media != NULL)
        *media = rc == PX_OK ? nm + na : 0;
    if (orphans != NULL)
        *orphans = rc == PX_OK ? no : 0;
    return rc;
}
