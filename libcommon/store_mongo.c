/* store.h over the MongoDB wire protocol (libmongoc 1.23): the real mongod in
 * production, FerretDB 1.24 on the local stack. FerretDB has no TTL indexes
 * and no transactions, so expiry is the callers' periodic sweep and every
 * operation here is a single-document-atomic write or a bulk of them.
 *
 * Collections (field names are fixed: FerretDB refuses keys with '.' or a
 * leading '$', and none of ours has either):
 *   inbox     {user, id, seq, ts, day, kind, sender?, json}
 *             unique {user:1, id:1} (the idempotence of put), {user:1, seq:1}
 *             (scan order), {day:1} (sweep), {ts:1} (daily full sweep)
 *   inbox_acks {_id: "user/id/dev", user, id, dev, seq, ts, day}: the
 *             devices that acked an event others still need; {user:1},
 *             {day:1}, {ts:1}
 *   devices   {_id: "user/dev", user, dev, first, last, since, unlinked},
 *             {user:1} (store_mongo_devices.c)
 *   seen      {_id: key, ts, day, tag}, {day:1}, {ts:1}
 *   connections {_id: "gateway/epoch/conn", user, gateway, epoch, conn}:
 *             the presence registry, one document per connection;
 *             {user:1, gateway:1, epoch:1}, {gateway:1, epoch:1}. (The
 *             "presence" collection of counts that came before is unused.)
 *   gateways  {_id: gateway, epoch, ts}, {ts:1}
 *   tracking  {_id: "reader/msg_id", reader, msg_id, sender, group?, ts,
 *             day}, {day:1}, {ts:1}; the composite _id is the unique (reader, msg_id)
 *             key, and exact pairs are looked up by _id, one find each
 *   media     {_id: media id, sha256, content_type, upload, size, ts},
 *             unique {sha256:1} (the dedupe: the first uploader's record,
 *             which holds the bytes), {ts:1}, {upload:1}
 *   media_alias {_id: media id, content: a media _id, content_type, ts},
 *             {ts:1}: each later uploader's own record of stored bytes
 *   chunks    {_id: "upload/n", upload, n, ts, data: binary}, {upload:1};
 *             plain documents, not GridFS: FerretDB 1.24 does not promise
 *             GridFS, and per-upload chunks before the hash is known do not
 *             fit GridFS's one-files-document model anyway
 *   media_access {_id: "media/user", media, user, ts}, {media:1}
 *   uploads   {_id: upload id, ts}, {ts:1}: uploads in progress (or
 *             abandoned), so the orphan sweep reads small documents only
 * Times are BSON dates, so a real mongod could use a TTL index later.
 *
 * Cost model on FerretDB 1.24 over PostgreSQL (the local stack): only a
 * filter's equalities reach PostgreSQL, as JSONB containment that the GIN
 * indexes deploy/local/ferretdb-pg.sql adds serve; ranges, $in and $or are
 * evaluated by FerretDB over what those equalities match. So every query
 * on a hot path keeps an equality on an indexed field (user, _id, gateway,
 * sha256, upload, media), and an $in or $or becomes one query per owner or
 * key (sm_each); tests/integration/test_store_mongo_index.c fails on a
 * sequential scan. Over SQLite, no query uses an index at all.
 *
 * This file: open, close, ping, the indexes, shared helpers and sm_each;
 * each concern of store.h has its own store_mongo_<concern>.c. Internal
 * names carry the sm_ (store_mongo) prefix (store_mongo_int.h). */
#include "store_mongo_int.h"
#include "log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static pthread_once_t sm_once = PTHREAD_ONCE_INIT;

/* libmongoc's own log lines join our JSON log instead of its plain-text
 * stderr format. FerretDB lacks endSessions, which libmongoc warns about at
 * every pool destroy; that expected line is demoted to debug. */
static void sm_log(mongoc_log_level_t level, const char *domain, const char *message, void *arg)
{
    enum log_level lv = LOG_DEBUG;

    if (level <= MONGOC_LOG_LEVEL_CRITICAL)
        lv = LOG_ERROR;
    else if (level == MONGOC_LOG_LEVEL_WARNING)
        lv = LOG_WARN;
    else if (level <= MONGOC_LOG_LEVEL_INFO)
        lv = LOG_INFO;
    if (strstr(message, "endSessions") != NULL)
        lv = LOG_DEBUG;
    log_write(lv, "libmongoc", "{s:s, s:s}", "domain", domain, "detail", message);
}

/* mongoc_cleanup is never called: services may still hold stores while
 * exiting, and the process ends anyway. */
static void sm_init(void)
{
    mongoc_log_set_handler(sm_log, NULL);
    mongoc_init();
}

int sm_fail(char *err, size_t errlen, const char *what, const bson_error_t *e)
{
    return px_err(err, errlen, "%s: %s (mongo domain %u code %u)", what, e->message,
                  e->domain, e->code);
}

void sm_conn_get(store *st, const char *coll, sm_conn *sc)
{
    sc->c = mongoc_client_pool_pop(st->pool);
    sc->coll = mongoc_client_get_collection(sc->c, st->db, coll);
}

void sm_conn_put(store *st, sm_conn *sc)
{
    if (sc->coll != NULL)
        mongoc_collection_destroy(sc->coll);
    if (sc->c != NULL)
        mongoc_client_pool_push(st->pool, sc->c);
    sc->coll = NULL;
    sc->c = NULL;
}

static void sm_sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* Every string we store must be valid UTF-8 without NUL: libmongoc does not
 * check string values (even with its validate option in 1.23) and FerretDB
 * would store bytes that clients could not decode. */
int sm_text_ok(const char *s, size_t len)
{
    return s != NULL && bson_utf8_validate(s, len, false);
}

int sm_str_ok(const char *s)
{
    return s != NULL && s[0] != '\0' && sm_text_ok(s, strlen(s));
}

/* A batch bound shared by every call that takes n items: callers chunk, so
 * one call never builds an unbounded command. */
int sm_check_n(size_t n, const char *what, char *err, size_t errlen)
{
    if (n > SM_MAX_BATCH)
        return px_err(err, errlen, "%s: batch of %zu exceeds the limit of %d; split it",
                      what, n, SM_MAX_BATCH);
    return PX_OK;
}

int sm_check_strs(const char *const *v, size_t n, const char *what,
                  char *err, size_t errlen)
{
    if (n > 0 && v == NULL)
        return px_err(err, errlen, "%s: NULL array", what);
    for (size_t i = 0; i < n; i++)
        if (!sm_str_ok(v[i]))
            return px_err(err, errlen, "%s: item %zu is NULL, empty or not UTF-8", what, i);
    return PX_OK;
}

void sm_append_str_array(bson_t *parent, const char *key, const char *const *v, size_t n)
{
    bson_t arr;
    char buf[16];
    const char *k;

    bson_append_array_begin(parent, key, -1, &arr);
    for (size_t i = 0; i < n; i++) {
        bson_uint32_to_string((uint32_t)i, &k, buf, sizeof(buf));
        bson_append_utf8(&arr, k, -1, v[i], -1);
    }
    bson_append_array_end(parent, &arr);
}

/* Reads an integer field written as int64 but tolerates int32/date/double,
 * since other writers (a shell, a migration) may choose another type. */
int sm_iter_int64(const bson_iter_t *it, int64_t *out)
{
    if (BSON_ITER_HOLDS_DATE_TIME(it)) {
        *out = bson_iter_date_time(it);
        return PX_OK;
    }
    if (BSON_ITER_HOLDS_INT64(it) || BSON_ITER_HOLDS_INT32(it) || BSON_ITER_HOLDS_DOUBLE(it)) {
        *out = bson_iter_as_int64(it);
        return PX_OK;
    }
    return PX_ERROR;
}

/* A swept record's time: the BSON date and its day bucket, which the
 * retention sweep matches by equality (sm_sweep). */
void sm_append_ts(bson_t *doc, int64_t ts_ms)
{
    BSON_APPEND_DATE_TIME(doc, "ts", ts_ms);
    BSON_APPEND_INT64(doc, "day", sm_day(ts_ms));
}

void sm_append_lt_date(bson_t *filter, const char *field, int64_t cutoff_ms)
{
    bson_t cond;

    bson_append_document_begin(filter, field, -1, &cond);
    bson_append_date_time(&cond, "$lt", -1, cutoff_ms);
    bson_append_document_end(filter, &cond);
}

/* ---- open / close / ping ------------------------------------------------ */

static int sm_db_name_ok(const char *db)
{
    size_t len = strlen(db);

    return len > 0 && len <= SM_MAX_DB_NAME && strpbrk(db, "/\\. \"$*<>:|?") == NULL;
}

/* Fills in what the URI leaves open: a short server selection timeout (so an
 * unreachable server is a quick, clear error, not a 30 s hang) and a
 * majority + journaled write concern (PX_OK from a write means durable).
 * Explicit URI options win, so operators can tune either. */
static void sm_uri_defaults(mongoc_uri_t *uri)
{
    mongoc_write_concern_t *wc;

    if (!mongoc_uri_has_option(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS))
        mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, SM_SELECT_MS);
    if (!mongoc_uri_has_option(uri, MONGOC_URI_SOCKETTIMEOUTMS))
        mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SOCKETTIMEOUTMS, SM_SOCKET_MS);
    if (!mongoc_write_concern_is_default(mongoc_uri_get_write_concern(uri)))
        return;
    wc = mongoc_write_concern_new();
    mongoc_write_concern_set_wmajority(wc, SM_WTIMEOUT_MS);
    mongoc_write_concern_set_journal(wc, true);
    mongoc_uri_set_write_concern(uri, wc);
    mongoc_write_concern_destroy(wc);
}

/* The pool store_ping uses: a copy of uri whose every wait is at most
 * SM_PING_MS, and its own connections, so a ping neither waits SM_SOCKET_MS
 * on a hung server nor queues behind store calls that hold the main pool's
 * clients. */
static mongoc_client_pool_t *sm_ping_pool(const mongoc_uri_t *uri, bson_error_t *error)
{
    mongoc_uri_t *u = mongoc_uri_copy(uri);
    mongoc_client_pool_t *pool;
    int32_t select_ms = mongoc_uri_get_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS,
                                                       SM_SELECT_MS);

    mongoc_uri_set_option_as_int32(u, MONGOC_URI_SOCKETTIMEOUTMS, SM_PING_MS);
    mongoc_uri_set_option_as_int32(u, MONGOC_URI_CONNECTTIMEOUTMS, SM_PING_MS);
    mongoc_uri_set_option_as_int32(u, MONGOC_URI_SERVERSELECTIONTIMEOUTMS,
                                   PX_MIN(select_ms, SM_PING_MS));
    pool = mongoc_client_pool_new_with_error(u, error);
    mongoc_uri_destroy(u);
    if (pool != NULL) {
        mongoc_client_pool_set_error_api(pool, MONGOC_ERROR_API_VERSION_2);
        mongoc_client_pool_set_appname(pool, "parley-ping");
    }
    return pool;
}

/* A server that was just started may refuse connections or fail commands
 * for a moment; ping until budget_ms has passed. Each ping itself waits up
 * to SM_PING_MS. */
static int sm_wait_ready(store *st, int32_t budget_ms, char *err, size_t errlen)
{
    int64_t t0 = px_mono_ms();
    char last[PX_ERRLEN] = "";
    int attempts = 0;

    for (;;) {
        attempts++;
        if (store_ping(st, last, sizeof(last)) == PX_OK)
            return PX_OK;
        if (px_mono_ms() - t0 >= budget_ms)
            break;
        sm_sleep_ms(SM_RETRY_SLEEP_MS);
    }
    return px_err(err, errlen, "mongo unreachable (%d attempts in %lld ms): %s", attempts,
                  (long long)(px_mono_ms() - t0), last);
}

static int sm_command(store *st, const bson_t *cmd, const char *what, char *err, size_t errlen)
{
    mongoc_client_t *c = mongoc_client_pool_pop(st->pool);
    bson_error_t error;
    int rc = PX_OK;

    if (!mongoc_client_write_command_with_opts(c, st->db, cmd, NULL, NULL, &error))
        rc = sm_fail(err, errlen, what, &error);
    mongoc_client_pool_push(st->pool, c);
    return rc;
}

/* The indexes the operations rely on; fixed field names, ascending. */
typedef struct sm_index {
    const char *coll;
    const char *name;
    const char *keys[3];
    bool unique;
} sm_index;

static const sm_index sm_indexes[] = {
    { "inbox", "user_id", { "user", "id" }, true },      /* idempotent put */
    { "inbox", "user_seq", { "user", "seq" }, false },   /* scan order */
    { "inbox", "ts", { "ts" }, false },                  /* daily full sweep */
    { "inbox", "day", { "day" }, false },                /* sweep by day (sm_sweep) */
    { "seen", "ts", { "ts" }, false },
    { "seen", "day", { "day" }, false },
    { "connections", "user_gateway_epoch", { "user", "gateway", "epoch" }, false },
    { "connections", "gateway_epoch", { "gateway", "epoch" }, false },
    { "gateways", "ts", { "ts" }, false },
    { "tracking", "ts", { "ts" }, false },
    { "tracking", "day", { "day" }, false },
    { "media", "sha256", { "sha256" }, true },           /* one record per content */
    { "media", "ts", { "ts" }, false },
    { "media", "upload", { "upload" }, false },
    { "chunks", "upload_n", { "upload", "n" }, true },
    { "media_access", "media", { "media" }, false },
    { "media_alias", "ts", { "ts" }, false },
    { "uploads", "ts", { "ts" }, false },
    { "devices", "user", { "user" }, false },
    { "inbox_acks", "user", { "user" }, false },
    { "inbox_acks", "ts", { "ts" }, false },
    { "inbox_acks", "day", { "day" }, false },
};

static void sm_index_cmd(bson_t *cmd, const sm_index *ix)
{
    bson_t arr, spec, key;

    bson_init(cmd);
    BSON_APPEND_UTF8(cmd, "createIndexes", ix->coll);
    BSON_APPEND_ARRAY_BEGIN(cmd, "indexes", &arr);
    BSON_APPEND_DOCUMENT_BEGIN(&arr, "0", &spec);
    BSON_APPEND_DOCUMENT_BEGIN(&spec, "key", &key);
    for (size_t k = 0; k < PX_ARRAY_LEN(ix->keys) && ix->keys[k] != NULL; k++)
        BSON_APPEND_INT32(&key, ix->keys[k], 1);
    bson_append_document_end(&spec, &key);
    BSON_APPEND_UTF8(&spec, "name", ix->name);
    if (ix->unique)
        BSON_APPEND_BOOL(&spec, "unique", true);
    bson_append_document_end(&arr, &spec);
    bson_append_array_end(cmd, &arr);
}

/* createIndexes creates the collection too and is a no-op when the same
 * index exists, so opening an existing store is harmless. One index per
 * command: FerretDB 1.24 panics (and drops the connection) on a
 * createIndexes naming two or more indexes that already exist (its
 * validateIndexesForCreation deletes from a slice by a stale position). */
static int sm_create_indexes(store *st, char *err, size_t errlen)
{
    bson_t cmd;
    int rc = PX_OK;

    for (size_t i = 0; i < PX_ARRAY_LEN(sm_indexes) && rc == PX_OK; i++) {
        sm_index_cmd(&cmd, &sm_indexes[i]);
        rc = sm_command(st, &cmd, "store open: createIndexes", err, errlen);
        bson_destroy(&cmd);
    }
    return rc;
}

/* The URI may carry credentials (user:password@): logged as "***". */
void store_where(const char *url, const char *db, char *out, size_t outlen)
{
    const char *scheme = strstr(url, "://");
    const char *at = scheme ? strchr(scheme + 3, '@') : NULL;
    const char *slash = scheme ? strchr(scheme + 3, '/') : NULL;
    if (at != NULL && (slash == NULL || at < slash))
        snprintf(out, outlen, "%.*s***%s db %s", (int)(scheme + 3 - url), url, at, db);
    else
        snprintf(out, outlen, "%s db %s", url, db);
}

store *store_open(const char *url, const char *db, char *err, size_t errlen)
{
    store *st = NULL;
    mongoc_uri_t *uri = NULL;
    bson_error_t error;
    int rc = PX_ERROR;

    pthread_once(&sm_once, sm_init);
    if (url == NULL || db == NULL) {
        px_err(err, errlen, "store open: url and db are required");
        goto out;
    }
    if (!sm_db_name_ok(db)) {
        px_err(err, errlen, "store open: invalid database name \"%s\"", db);
        goto out;
    }
    uri = mongoc_uri_new_with_error(url, &error);
    if (uri == NULL) {
        sm_fail(err, errlen, "store open: bad mongodb URL", &error);
        goto out;
    }
    sm_uri_defaults(uri);
    st = px_calloc(1, sizeof(*st));
    st->db = px_strdup(db);
    pthread_mutex_init(&st->sweep_mu, NULL);
    for (size_t i = 0; i < SM_SWEEP_COLLS; i++)
        st->full_due_ms[i] = px_now_ms() + SM_DAY_MS;
    st->pool = mongoc_client_pool_new_with_error(uri, &error);
    if (st->pool == NULL) {
        sm_fail(err, errlen, "store open: client pool", &error);
        goto out;
    }
    mongoc_client_pool_set_error_api(st->pool, MONGOC_ERROR_API_VERSION_2);
    mongoc_client_pool_set_appname(st->pool, "parley");
    st->ping = sm_ping_pool(uri, &error);
    if (st->ping == NULL) {
        sm_fail(err, errlen, "store open: ping pool", &error);
        goto out;
    }
    rc = sm_wait_ready(st, mongoc_uri_get_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS,
                                                          SM_SELECT_MS),
                       err, errlen);
    if (rc == PX_OK)
        rc = sm_create_indexes(st, err, errlen);
out:
    if (rc != PX_OK) {
        store_close(st);
        st = NULL;
    }
    if (uri != NULL)
        mongoc_uri_destroy(uri);
    return st;
}

void store_close(store *st)
{
    if (st == NULL)
        return;
    if (st->ping != NULL)
        mongoc_client_pool_destroy(st->ping);
    if (st->pool != NULL)
        mongoc_client_pool_destroy(st->pool);
    pthread_mutex_destroy(&st->sweep_mu);
    free(st->db);
    free(st);
}

size_t store_concurrency(const store *st)
{
    (void)st;
    return SM_CONCURRENCY;
}

/* Bounded by SM_PING_MS per wait (sm_ping_pool): /readyz calls it on an
 * HTTP thread. */
int store_ping(store *st, char *err, size_t errlen)
{
    mongoc_client_t *c = mongoc_client_pool_pop(st->ping);
    bson_t *cmd = BCON_NEW("ping", BCON_INT32(1));
    bson_error_t error;
    int rc = PX_OK;

    if (!mongoc_client_command_simple(c, "admin", cmd, NULL, NULL, &error))
        rc = sm_fail(err, errlen, "ping", &error);
    bson_destroy(cmd);
    mongoc_client_pool_push(st->ping, c);
    return rc;
}

/* ---- bulk inserts that absorb duplicates ------------------------------- */

mongoc_bulk_operation_t *sm_bulk_new(sm_conn *sc, bool ordered)
{
    bson_t opts = BSON_INITIALIZER;
    mongoc_bulk_operation_t *bulk;

    BSON_APPEND_BOOL(&opts, "ordered", ordered);
    bulk = mongoc_collection_create_bulk_operation_with_opts(sc->coll, &opts);
    bson_destroy(&opts);
    return bulk;
}

/* The errmsg of the array element at e (a writeErrors/writeConcernErrors
 * entry), or dflt. */
static const char *sm_errmsg(const bson_iter_t *elem, const char *dflt)
{
    bson_iter_t e;

    if (bson_iter_recurse(elem, &e) && bson_iter_find(&e, "errmsg") && BSON_ITER_HOLDS_UTF8(&e))
        return bson_iter_utf8(&e, NULL);
    return dflt;
}

static int64_t sm_elem_int(const bson_iter_t *elem, const char *key, int64_t dflt)
{
    bson_iter_t e;

    if (bson_iter_recurse(elem, &e) && bson_iter_find(&e, key))
        return bson_iter_as_int64(&e);
    return dflt;
}

/* Reads writeErrors of an insert bulk reply: duplicate keys clear
 * inserted[index] and are counted; anything else is a real failure. */
int sm_bulk_write_errors(const bson_t *reply, size_t n, int *inserted, size_t *dups,
                         const char *what, char *err, size_t errlen)
{
    bson_iter_t it, arr;
    int64_t code, index;

    if (!bson_iter_init_find(&it, reply, "writeErrors") || !BSON_ITER_HOLDS_ARRAY(&it))
        return PX_OK;
    bson_iter_recurse(&it, &arr);
    while (bson_iter_next(&arr)) {
        code = sm_elem_int(&arr, "code", -1);
        index = sm_elem_int(&arr, "index", -1);
        if (code != SM_DUP_KEY)
            return px_err(err, errlen, "%s: write error at index %lld: %s (code %lld)", what,
                          (long long)index, sm_errmsg(&arr, "?"), (long long)code);
        if (index < 0 || (uint64_t)index >= n)
            return px_err(err, errlen, "%s: duplicate reported at bad index %lld", what,
                          (long long)index);
        if (inserted != NULL)
            inserted[index] = 0;
        (*dups)++;
    }
    return PX_OK;
}

int sm_bulk_wc_errors(const bson_t *reply, const char *what, char *err, size_t errlen)
{
    bson_iter_t it, arr;

    if (!bson_iter_init_find(&it, reply, "writeConcernErrors") || !BSON_ITER_HOLDS_ARRAY(&it))
        return PX_OK;
    bson_iter_recurse(&it, &arr);
    if (!bson_iter_next(&arr))
        return PX_OK;
    return px_err(err, errlen, "%s: write concern not satisfied: %s", what,
                  sm_errmsg(&arr, "?"));
}

/* Executes an unordered insert bulk of n documents. A duplicate key is the
 * idempotence we rely on (a redelivered record), so it sets inserted[i] = 0
 * rather than failing. Any other write error, a write-concern error, or a
 * transport error part way through fails the call: the caller retries the
 * whole batch, which is harmless because the retry's duplicates are absorbed. */
int sm_bulk_insert_run(mongoc_bulk_operation_t *bulk, size_t n, int *inserted,
                       const char *what, char *err, size_t errlen)
{
    bson_t reply;
    bson_error_t error;
    bson_iter_t it;
    size_t dups = 0;
    int64_t n_inserted = -1;
    bool ok;
    int rc;

    for (size_t i = 0; inserted != NULL && i < n; i++)
        inserted[i] = 1;
    ok = mongoc_bulk_operation_execute(bulk, &reply, &error) != 0;
    rc = sm_bulk_wc_errors(&reply, what, err, errlen);
    if (rc == PX_OK)
        rc = sm_bulk_write_errors(&reply, n, inserted, &dups, what, err, errlen);
    if (rc != PX_OK)
        goto out;
    if (bson_iter_init_find(&it, &reply, "nInserted"))
        n_inserted = bson_iter_as_int64(&it);
    /* Only duplicates may explain a failed execute, and every document must
     * be accounted for: a batch cut short by a network error is a failure
     * even though what did arrive was fine. */
    if (n_inserted < 0 || (size_t)n_inserted + dups != n) {
        if (!ok)
            rc = sm_fail(err, errlen, what, &error);
        else
            rc = px_err(err, errlen, "%s: %lld inserted + %zu duplicates != %zu sent", what,
                        (long long)n_inserted, dups, n);
    }
out:
    bson_destroy(&reply);
    return rc;
}

int sm_delete_many(sm_conn *sc, const bson_t *filter, int64_t *removed, const char *what,
                   char *err, size_t errlen)
{
    bson_t reply;
    bson_error_t error;
    bson_iter_t it;
    int rc = PX_OK;

    if (!mongoc_collection_delete_many(sc->coll, filter, NULL, &reply, &error))
        rc = sm_fail(err, errlen, what, &error);
    else if (removed != NULL)
        *removed = bson_iter_init_find(&it, &reply, "deletedCount") ? bson_iter_as_int64(&it) : 0;
    bson_destroy(&reply);
    return rc;
}

/* Query shapes FerretDB cannot push down become one query per owner or
 * per key. FerretDB 1.24 hands PostgreSQL only a filter's equalities (JSONB
 * containment, which the local stack's GIN indexes serve:
 * deploy/local/ferretdb-pg.sql) and evaluates the rest itself over every
 * document they match; an $in or $or alone matches the whole collection,
 * all of it read into FerretDB (~400 ms per call at 5,000 documents, where
 * a find by _id takes ~2 ms). The queries run side by side,
 * SM_CONCURRENCY at a time, each on a client of the pool; their answers
 * are kept per query and handed to the caller in query order on its own
 * thread. MongoDB serves either shape from its indexes. */

typedef struct sm_each_job {
    store *st;
    const char *coll, *what;
    sm_op *ops;
    int del;                /* delete_many, else find */
} sm_each_job;

static void sm_op_find(sm_conn *sc, sm_op *op, const char *what)
{
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(sc->coll, &op->filter, NULL, NULL);
    const bson_t *doc;
    bson_error_t error;

    while (mongoc_cursor_next(cur, &doc)) {
        if (op->ndocs == op->cap) {
            op->cap = op->cap ? 2 * op->cap : 4;
            op->docs = px_realloc(op->docs, op->cap * sizeof(*op->docs));
        }
        op->docs[op->ndocs++] = bson_copy(doc);
    }
    if (mongoc_cursor_error(cur, &error))
        op->rc = sm_fail(op->err, sizeof(op->err), what, &error);
    mongoc_cursor_destroy(cur);
}

static void sm_each_run(void *arg, size_t i)
{
    sm_each_job *job = arg;
    sm_op *op = &job->ops[i];
    sm_conn sc = { 0 };

    sm_conn_get(job->st, job->coll, &sc);
    if (job->del)
        op->rc = sm_delete_many(&sc, &op->filter, &op->removed, job->what, op->err,
                                sizeof(op->err));
    else
        sm_op_find(&sc, op, job->what);
    sm_conn_put(job->st, &sc);
}

/* Runs the n finds (or deletes) of ops on coll; the caller reads the
 * answers and calls sm_ops_free. */
int sm_each(store *st, const char *coll, sm_op *ops, size_t n, int del,
            const char *what, char *err, size_t errlen)
{
    sm_each_job job = { .st = st, .coll = coll, .what = what, .ops = ops, .del = del };

    px_parallel(n, SM_CONCURRENCY, sm_each_run, &job);
    for (size_t i = 0; i < n; i++)
        if (ops[i].rc != PX_OK)
            return px_err(err, errlen, "%s", ops[i].err);
    return PX_OK;
}

void sm_ops_free(sm_op *ops, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bson_destroy(&ops[i].filter);
        for (size_t d = 0; d < ops[i].ndocs; d++)
            bson_destroy(ops[i].docs[d]);
        free(ops[i].docs);
    }
    free(ops);
}

static int sm_strp_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* One {key: v[i]} op per distinct string of v, in sorted order. */
sm_op *sm_ops_by(const char *key, const char *const *v, size_t n, size_t *nops)
{
    const char **sorted = px_malloc(n * sizeof(*sorted));
    sm_op *ops = px_calloc(n, sizeof(*ops));

    memcpy(sorted, v, n * sizeof(*sorted));
    qsort(sorted, n, sizeof(*sorted), sm_strp_cmp);
    *nops = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(sorted[i], sorted[i - 1]) == 0)
            continue;
        bson_init(&ops[*nops].filter);
        BSON_APPEND_UTF8(&ops[*nops].filter, key, sorted[i]);
        (*nops)++;
    }
    free(sorted);
    return ops;
}

sm_op *sm_ops_by_id(const char *const *v, size_t n, size_t *nops)
{
    return sm_ops_by("_id", v, n, nops);
}

/* The collections sm_sweep knows, each with its slot in full_due_ms. */
static const char *const sm_swept[SM_SWEEP_COLLS] = { "inbox", "inbox_acks", "seen",
                                                      "tracking" };

/* Whether coll's whole-collection sweep is due now (and, if so, the next
 * one a day later). */
static int sm_full_sweep_due(store *st, const char *coll)
{
    int due = 0;
    pthread_mutex_lock(&st->sweep_mu);
    for (size_t i = 0; i < SM_SWEEP_COLLS; i++)
        if (strcmp(sm_swept[i], coll) == 0 && px_now_ms() >= st->full_due_ms[i]) {
            st->full_due_ms[i] = px_now_ms() + SM_DAY_MS;
            due = 1;
        }
    pthread_mutex_unlock(&st->sweep_mu);
    return due;
}

/* Deletes coll's records stamped before cutoff_ms by day bucket: each
 * whole day of the SM_SWEEP_DAYS_BACK before the cutoff's day by equality,
 * then the cutoff's own day with the time as well. FerretDB hands
 * PostgreSQL only equalities, so a plain `ts < cutoff` reads every record
 * of the collection into FerretDB on every sweep: with a busy day's dedupe
 * marks (143,000 in one fault run) two replicas' sweeps a minute held
 * FerretDB for tens of seconds each, and every store call behind them timed
 * out. A bucket that matches nothing costs an index probe. Once a day (the
 * first a day after open) the plain range runs as well, for records older
 * than the buckets reach and those written before records had a day. */
int sm_sweep(store *st, const char *coll, int64_t cutoff_ms, int64_t *removed,
             const char *what, char *err, size_t errlen)
{
    const size_t n = SM_SWEEP_DAYS_BACK + 1;
    int64_t cut_day = sm_day(cutoff_ms), total = 0;
    sm_op *ops = px_calloc(n, sizeof(*ops));
    sm_conn sc = { 0 };
    int rc;

    for (size_t i = 0; i < n; i++) {
        bson_init(&ops[i].filter);
        BSON_APPEND_INT64(&ops[i].filter, "day", cut_day - SM_SWEEP_DAYS_BACK + (int64_t)i);
    }
    sm_append_lt_date(&ops[n - 1].filter, "ts", cutoff_ms);
    rc = sm_each(st, coll, ops, n, 1, what, err, errlen);
    for (size_t i = 0; i < n; i++)
        total += ops[i].removed;
    sm_ops_free(ops, n);
    if (rc == PX_OK && sm_full_sweep_due(st, coll)) {
        bson_t filter = BSON_INITIALIZER;
        int64_t more = 0;
        sm_append_lt_date(&filter, "ts", cutoff_ms);
        sm_conn_get(st, coll, &sc);
        rc = sm_delete_many(&sc, &filter, &more, what, err, errlen);
        sm_conn_put(st, &sc);
        bson_destroy(&filter);
        total += more;
    }
    if (removed != NULL)
        *removed = total;
    return rc;
}

/* count_documents of filter in coll into *count. */
int sm_count(store *st, const char *coll, const bson_t *filter, int64_t *count,
             const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_error_t error;
    int64_t c;
    int rc = PX_OK;

    sm_conn_get(st, coll, &sc);
    c = mongoc_collection_count_documents(sc.coll, filter, NULL, NULL, NULL, &error);
    if (c < 0)
        rc = sm_fail(err, errlen, what, &error);
    else
        *count = c;
    sm_conn_put(st, &sc);
    return rc;
}

/* Counts the documents of coll whose user field is user. */
int sm_count_user(store *st, const char *coll, const char *user, int64_t *count,
                  const char *what, char *err, size_t errlen)
{
    bson_t filter = BSON_INITIALIZER;
    int rc;

    if (user == NULL || count == NULL)
        return px_err(err, errlen, "%s: user and count are required", what);
    BSON_APPEND_UTF8(&filter, "user", user);
    rc = sm_count(st, coll, &filter, count, what, err, errlen);
    bson_destroy(&filter);
    return rc;
}

