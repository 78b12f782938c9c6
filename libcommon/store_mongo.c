/* store.h over the MongoDB wire protocol (libmongoc 1.23): the real mongod in
 * production, FerretDB 1.24 on the local stack. FerretDB has no TTL indexes
 * and no transactions, so expiry is the callers' periodic sweep and every
 * operation here is a single-document-atomic write or a bulk of them.
 *
 * Collections (field names are fixed: FerretDB refuses keys with '.' or a
 * leading '$', and none of ours has either):
 *   inbox     {user, id, seq, ts, kind, sender?, json}
 *             unique {user:1, id:1} (the idempotence of put), {user:1, seq:1}
 *             (scan order), {ts:1} (sweep)
 *   seen      {_id: key, ts}, {ts:1}
 *   presence  {user, gateway, epoch, count}, unique {user:1, gateway:1,
 *             epoch:1}, {gateway:1, epoch:1}
 *   gateways  {_id: gateway, epoch, ts}, {ts:1}
 *   tracking  {_id: "reader/msg_id", reader, msg_id, sender, group?, ts},
 *             {ts:1}; the composite _id is the unique (reader, msg_id)
 *             key, and exact pairs are looked up by _id, one find each
 *   media     {_id: media id, sha256, content_type, upload, size, ts},
 *             unique {sha256:1} (the dedupe), {ts:1}, {upload:1}
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
 * Internal names carry the sm_ (store_mongo) prefix. */
#include "store.h"
#include "common.h"
#include "log.h"

#include <mongoc/mongoc.h>

#include <ctype.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SM_MAX_BATCH 10000      /* per call; callers chunk bigger work */
#define SM_SELECT_MS 3000       /* serverSelectionTimeoutMS unless the URI says */
#define SM_WTIMEOUT_MS 10000    /* majority write concern wait */
#define SM_RETRY_SLEEP_MS 200   /* between readiness pings in store_open */
#define SM_SCAN_BATCH 1000      /* cursor batch size: few round trips per sync */
#define SM_DUP_KEY 11000        /* server code for a unique index violation */
#define SM_MAX_GATEWAY 64       /* store_presence_lookup writes char[65] */
#define SM_CONCURRENCY 4        /* calls worth running side by side (pool clients) */
#define SM_MAX_PRESENCE 4096    /* ceiling on one user's presence records read */
#define SM_MAX_DB_NAME 63

struct store {
    mongoc_client_pool_t *pool;
    char *db;
};

/* A pooled client and one of its collections, for the length of one call. */
typedef struct sm_conn {
    mongoc_client_t *c;
    mongoc_collection_t *coll;
} sm_conn;

/* A (gateway, epoch) pair read back from presence or gateways. */
typedef struct sm_gw {
    char name[SM_MAX_GATEWAY + 1];
    int64_t epoch;
} sm_gw;

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

static int sm_fail(char *err, size_t errlen, const char *what, const bson_error_t *e)
{
    return px_err(err, errlen, "%s: %s (mongo domain %u code %u)", what, e->message,
                  e->domain, e->code);
}

static void sm_conn_get(store *st, const char *coll, sm_conn *sc)
{
    sc->c = mongoc_client_pool_pop(st->pool);
    sc->coll = mongoc_client_get_collection(sc->c, st->db, coll);
}

static void sm_conn_put(store *st, sm_conn *sc)
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
static int sm_text_ok(const char *s, size_t len)
{
    return s != NULL && bson_utf8_validate(s, len, false);
}

static int sm_str_ok(const char *s)
{
    return s != NULL && s[0] != '\0' && sm_text_ok(s, strlen(s));
}

/* A batch bound shared by every call that takes n items: callers chunk, so
 * one call never builds an unbounded command. */
static int sm_check_n(size_t n, const char *what, char *err, size_t errlen)
{
    if (n > SM_MAX_BATCH)
        return px_err(err, errlen, "%s: batch of %zu exceeds the limit of %d; split it",
                      what, n, SM_MAX_BATCH);
    return PX_OK;
}

static int sm_check_strs(const char *const *v, size_t n, const char *what,
                         char *err, size_t errlen)
{
    if (n > 0 && v == NULL)
        return px_err(err, errlen, "%s: NULL array", what);
    for (size_t i = 0; i < n; i++)
        if (!sm_str_ok(v[i]))
            return px_err(err, errlen, "%s: item %zu is NULL, empty or not UTF-8", what, i);
    return PX_OK;
}

static void sm_append_str_array(bson_t *parent, const char *key, const char *const *v, size_t n)
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
static int sm_iter_int64(const bson_iter_t *it, int64_t *out)
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

static void sm_append_lt_date(bson_t *filter, const char *field, int64_t cutoff_ms)
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
    if (!mongoc_write_concern_is_default(mongoc_uri_get_write_concern(uri)))
        return;
    wc = mongoc_write_concern_new();
    mongoc_write_concern_set_wmajority(wc, SM_WTIMEOUT_MS);
    mongoc_write_concern_set_journal(wc, true);
    mongoc_uri_set_write_concern(uri, wc);
    mongoc_write_concern_destroy(wc);
}

/* A server that was just started may refuse connections or fail commands
 * for a moment; ping until budget_ms has passed. Each ping itself waits up
 * to serverSelectionTimeoutMS for a reachable server. */
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
    { "inbox", "ts", { "ts" }, false },                  /* sweep */
    { "seen", "ts", { "ts" }, false },
    { "presence", "user_gateway_epoch", { "user", "gateway", "epoch" }, true },
    { "presence", "gateway_epoch", { "gateway", "epoch" }, false },
    { "gateways", "ts", { "ts" }, false },
    { "tracking", "ts", { "ts" }, false },
    { "media", "sha256", { "sha256" }, true },           /* one record per content */
    { "media", "ts", { "ts" }, false },
    { "media", "upload", { "upload" }, false },
    { "chunks", "upload_n", { "upload", "n" }, true },
    { "media_access", "media", { "media" }, false },
    { "uploads", "ts", { "ts" }, false },
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
    st->pool = mongoc_client_pool_new_with_error(uri, &error);
    if (st->pool == NULL) {
        sm_fail(err, errlen, "store open: client pool", &error);
        goto out;
    }
    mongoc_client_pool_set_error_api(st->pool, MONGOC_ERROR_API_VERSION_2);
    mongoc_client_pool_set_appname(st->pool, "parley");
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
    if (st->pool != NULL)
        mongoc_client_pool_destroy(st->pool);
    free(st->db);
    free(st);
}

size_t store_concurrency(const store *st)
{
    (void)st;
    return SM_CONCURRENCY;
}

int store_ping(store *st, char *err, size_t errlen)
{
    mongoc_client_t *c = mongoc_client_pool_pop(st->pool);
    bson_t *cmd = BCON_NEW("ping", BCON_INT32(1));
    bson_error_t error;
    int rc = PX_OK;

    if (!mongoc_client_command_simple(c, "admin", cmd, NULL, NULL, &error))
        rc = sm_fail(err, errlen, "ping", &error);
    bson_destroy(cmd);
    mongoc_client_pool_push(st->pool, c);
    return rc;
}

/* ---- bulk inserts that absorb duplicates ------------------------------- */

static mongoc_bulk_operation_t *sm_bulk_new(sm_conn *sc, bool ordered)
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
static int sm_bulk_write_errors(const bson_t *reply, size_t n, int *inserted, size_t *dups,
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

static int sm_bulk_wc_errors(const bson_t *reply, const char *what, char *err, size_t errlen)
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
static int sm_bulk_insert_run(mongoc_bulk_operation_t *bulk, size_t n, int *inserted,
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

static int sm_inbox_doc(bson_t *doc, const store_event *ev, size_t i, char *err, size_t errlen)
{
    if (!sm_str_ok(ev->user) || !sm_str_ok(ev->id))
        return px_err(err, errlen, "inbox put: event %zu: user or id missing or not UTF-8", i);
    if (ev->kind < STORE_MESSAGE || ev->kind > STORE_GROUP_EVENT)
        return px_err(err, errlen, "inbox put: event %zu has bad kind %d", i, ev->kind);
    if (ev->sender != NULL && !sm_text_ok(ev->sender, strlen(ev->sender)))
        return px_err(err, errlen, "inbox put: event %zu: sender is not UTF-8", i);
    if (ev->json_len > INT_MAX || !sm_text_ok(ev->json, ev->json_len))
        return px_err(err, errlen, "inbox put: event %zu: json missing or not UTF-8", i);
    bson_init(doc);
    BSON_APPEND_UTF8(doc, "user", ev->user);
    BSON_APPEND_UTF8(doc, "id", ev->id);
    BSON_APPEND_INT64(doc, "seq", ev->seq);
    BSON_APPEND_DATE_TIME(doc, "ts", ev->ts_ms);
    BSON_APPEND_INT32(doc, "kind", ev->kind);
    if (ev->sender != NULL)
        BSON_APPEND_UTF8(doc, "sender", ev->sender);
    bson_append_utf8(doc, "json", -1, ev->json, (int)ev->json_len);
    return PX_OK;
}

int store_inbox_put(store *st, const store_event *ev, size_t n, int *inserted,
                    char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_error_t error;
    bson_t doc;
    int rc;

    rc = sm_check_n(n, "inbox put", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (ev == NULL)
        return px_err(err, errlen, "inbox put: NULL events");
    sm_conn_get(st, "inbox", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n; i++) {
        rc = sm_inbox_doc(&doc, &ev[i], i, err, errlen);
        if (rc != PX_OK)
            goto out;
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "inbox put", &error);
        bson_destroy(&doc);
        if (rc != PX_OK)
            goto out;
    }
    rc = sm_bulk_insert_run(bulk, n, inserted, "inbox put", err, errlen);
out:
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

/* ---- inbox reads and deletes ------------------------------------------- */

/* Points ev's strings into doc: valid while doc is (one cursor step). */
static int sm_event_parse(const bson_t *doc, store_event *ev)
{
    bson_iter_t it;
    uint32_t len;
    int have_seq = 0, have_ts = 0;

    memset(ev, 0, sizeof(*ev));
    if (!bson_iter_init(&it, doc))
        return PX_ERROR;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "user") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            ev->user = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "id") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            ev->id = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "sender") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            ev->sender = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "seq") == 0)
            have_seq = sm_iter_int64(&it, &ev->seq) == PX_OK;
        else if (strcmp(k, "ts") == 0)
            have_ts = sm_iter_int64(&it, &ev->ts_ms) == PX_OK;
        else if (strcmp(k, "kind") == 0 && (BSON_ITER_HOLDS_INT32(&it) || BSON_ITER_HOLDS_INT64(&it)))
            ev->kind = (int)bson_iter_as_int64(&it);
        else if (strcmp(k, "json") == 0 && BSON_ITER_HOLDS_UTF8(&it)) {
            ev->json = bson_iter_utf8(&it, &len);
            ev->json_len = len;
        }
    }
    if (ev->user == NULL || ev->id == NULL || ev->json == NULL || !have_seq || !have_ts ||
        ev->kind < STORE_MESSAGE || ev->kind > STORE_GROUP_EVENT)
        return PX_ERROR;
    return PX_OK;
}

/* Calls cb per document of cur; stops at the first non-PX_OK. */
static int sm_visit(mongoc_cursor_t *cur, store_event_cb cb, void *arg, const char *what,
                    char *err, size_t errlen)
{
    const bson_t *doc;
    bson_error_t error;
    store_event ev;
    int rc;

    while (mongoc_cursor_next(cur, &doc)) {
        if (sm_event_parse(doc, &ev) != PX_OK)
            return px_err(err, errlen, "%s: malformed inbox document", what);
        rc = cb(arg, &ev);
        if (rc != PX_OK)
            return rc;
    }
    if (mongoc_cursor_error(cur, &error))
        return sm_fail(err, errlen, what, &error);
    return PX_OK;
}

int store_inbox_scan(store *st, const char *user, int64_t after_seq, size_t limit,
                     store_event_cb cb, void *arg, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_cursor_t *cur = NULL;
    bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER, gt, sort;
    int rc;

    if (user == NULL || cb == NULL)
        return px_err(err, errlen, "inbox scan: user and cb are required");
    if (limit == 0)
        return PX_OK;
    BSON_APPEND_UTF8(&filter, "user", user);
    BSON_APPEND_DOCUMENT_BEGIN(&filter, "seq", &gt);
    BSON_APPEND_INT64(&gt, "$gt", after_seq);
    bson_append_document_end(&filter, &gt);
    BSON_APPEND_DOCUMENT_BEGIN(&opts, "sort", &sort);
    BSON_APPEND_INT32(&sort, "seq", 1);
    bson_append_document_end(&opts, &sort);
    BSON_APPEND_INT64(&opts, "limit", (int64_t)PX_MIN(limit, (size_t)INT64_MAX));
    BSON_APPEND_INT32(&opts, "batchSize", (int32_t)PX_MIN(limit, (size_t)SM_SCAN_BATCH));

    sm_conn_get(st, "inbox", &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, &filter, &opts, NULL);
    rc = sm_visit(cur, cb, arg, "inbox scan", err, errlen);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(&filter);
    bson_destroy(&opts);
    return rc;
}

/* Orders keys by user, so each user's ids are one run. */
static int sm_inbox_key_cmp(const void *a, const void *b)
{
    const store_key *x = a, *y = b;
    return strcmp(x->user, y->user);
}

static int sm_check_keys(const store_key *keys, size_t n, const char *what, char *err,
                         size_t errlen)
{
    if (keys == NULL && n > 0)
        return px_err(err, errlen, "%s: keys are required", what);
    if (sm_check_n(n, what, err, errlen) != PX_OK)
        return PX_ERROR;
    for (size_t i = 0; i < n; i++)
        if (!sm_str_ok(keys[i].user) || !sm_str_ok(keys[i].id))
            return px_err(err, errlen, "%s: key %zu: user or id missing or not UTF-8", what, i);
    return PX_OK;
}

/* {user: u, id: {$in: [...]}}: the filter names the owner, so an id
 * matches only that user's event. */
static void sm_user_ids_filter(bson_t *filter, const char *user, const char *const *ids,
                               size_t n)
{
    bson_t in;

    bson_init(filter);
    BSON_APPEND_UTF8(filter, "user", user);
    BSON_APPEND_DOCUMENT_BEGIN(filter, "id", &in);
    sm_append_str_array(&in, "$in", ids, n);
    bson_append_document_end(filter, &in);
}

static int sm_delete_many(sm_conn *sc, const bson_t *filter, int64_t *removed, const char *what,
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

typedef struct sm_op {
    bson_t filter;
    bson_t **docs;          /* find: copies of the documents found */
    size_t ndocs, cap;
    int64_t removed;        /* delete: documents removed */
    int rc;
    char err[PX_ERRLEN];
} sm_op;

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
static int sm_each(store *st, const char *coll, sm_op *ops, size_t n, int del,
                   const char *what, char *err, size_t errlen)
{
    sm_each_job job = { .st = st, .coll = coll, .what = what, .ops = ops, .del = del };

    px_parallel(n, SM_CONCURRENCY, sm_each_run, &job);
    for (size_t i = 0; i < n; i++)
        if (ops[i].rc != PX_OK)
            return px_err(err, errlen, "%s", ops[i].err);
    return PX_OK;
}

static void sm_ops_free(sm_op *ops, size_t n)
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

/* One {_id: v[i]} op per distinct string of v, in sorted order. */
static sm_op *sm_ops_by_id(const char *const *v, size_t n, size_t *nops)
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
        BSON_APPEND_UTF8(&ops[*nops].filter, "_id", sorted[i]);
        (*nops)++;
    }
    free(sorted);
    return ops;
}

/* Fills *ops (one per user, in user order: the inbox's (user, id) index
 * serves each) and runs them. */
static int sm_by_user(store *st, const store_key *keys, size_t n, int del, sm_op **ops_out,
                      size_t *nops_out, char *err, size_t errlen)
{
    store_key *sorted = px_malloc(n * sizeof(*sorted));
    const char **ids = px_malloc(n * sizeof(*ids));
    sm_op *ops = px_calloc(n, sizeof(*ops));
    size_t nops = 0;

    memcpy(sorted, keys, n * sizeof(*sorted));
    qsort(sorted, n, sizeof(*sorted), sm_inbox_key_cmp);
    for (size_t i = 0; i < n;) {
        size_t j = i, m = 0;
        while (j < n && strcmp(sorted[j].user, sorted[i].user) == 0)
            ids[m++] = sorted[j++].id;
        sm_user_ids_filter(&ops[nops++].filter, sorted[i].user, ids, m);
        i = j;
    }
    free(ids);
    free(sorted);
    *ops_out = ops;
    *nops_out = nops;
    return sm_each(st, "inbox", ops, nops, del, del ? "inbox delete" : "inbox get", err, errlen);
}

int store_inbox_get(store *st, const store_key *keys, size_t n, store_event_cb cb, void *arg,
                    char *err, size_t errlen)
{
    sm_op *ops = NULL;
    size_t nops = 0;
    store_event ev;

    if (cb == NULL)
        return px_err(err, errlen, "inbox get: cb is required");
    if (sm_check_keys(keys, n, "inbox get", err, errlen) != PX_OK)
        return PX_ERROR;
    if (n == 0)
        return PX_OK;
    int rc = sm_by_user(st, keys, n, 0, &ops, &nops, err, errlen);
    for (size_t i = 0; i < nops && rc == PX_OK; i++)
        for (size_t d = 0; d < ops[i].ndocs && rc == PX_OK; d++) {
            if (sm_event_parse(ops[i].docs[d], &ev) != PX_OK)
                rc = px_err(err, errlen, "inbox get: malformed inbox document");
            else
                rc = cb(arg, &ev);
        }
    sm_ops_free(ops, nops);
    return rc;
}

int store_inbox_delete(store *st, const store_key *keys, size_t n, int64_t *removed, char *err,
                       size_t errlen)
{
    sm_op *ops = NULL;
    size_t nops = 0;
    int64_t total = 0;

    if (removed != NULL)
        *removed = 0;
    if (sm_check_keys(keys, n, "inbox delete", err, errlen) != PX_OK)
        return PX_ERROR;
    if (n == 0)
        return PX_OK;
    int rc = sm_by_user(st, keys, n, 1, &ops, &nops, err, errlen);
    for (size_t i = 0; i < nops; i++)
        total += ops[i].removed;
    sm_ops_free(ops, nops);
    if (removed != NULL)
        *removed = total;
    return rc;
}

static int sm_sweep(store *st, const char *coll, int64_t cutoff_ms, int64_t *removed,
                    const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t filter = BSON_INITIALIZER;
    int64_t dummy;
    int rc;

    sm_append_lt_date(&filter, "ts", cutoff_ms);
    sm_conn_get(st, coll, &sc);
    rc = sm_delete_many(&sc, &filter, removed != NULL ? removed : &dummy, what, err, errlen);
    sm_conn_put(st, &sc);
    bson_destroy(&filter);
    return rc;
}

int store_inbox_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    return sm_sweep(st, "inbox", cutoff_ms, removed, "inbox sweep", err, errlen);
}

/* count_documents of filter in coll into *count. */
static int sm_count(store *st, const char *coll, const bson_t *filter, int64_t *count,
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

int store_inbox_count(store *st, const char *user, int64_t *count, char *err, size_t errlen)
{
    bson_t filter = BSON_INITIALIZER;
    int rc;

    if (user == NULL || count == NULL)
        return px_err(err, errlen, "inbox count: user and count are required");
    BSON_APPEND_UTF8(&filter, "user", user);
    rc = sm_count(st, "inbox", &filter, count, "inbox count", err, errlen);
    bson_destroy(&filter);
    return rc;
}

/* ---- seen (dedupe) ------------------------------------------------------ */

/* Whether the claim on key is held by tag: one find by _id alone, which
 * FerretDB hands to PostgreSQL's primary key (an `_id $in` scans the whole
 * collection: every key of the retention period). */
static int sm_seen_held_by(sm_conn *sc, const char *key, const char *tag, int *same,
                           char *err, size_t errlen)
{
    bson_t *filter = BCON_NEW("_id", BCON_UTF8(key));
    bson_t *opts = BCON_NEW("projection", "{", "tag", BCON_INT32(1), "}", "limit",
                            BCON_INT64(1), "singleBatch", BCON_BOOL(true));
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(sc->coll, filter, opts, NULL);
    const bson_t *doc;
    bson_error_t error;
    bson_iter_t it;
    int rc = PX_OK;

    *same = 0;
    if (mongoc_cursor_next(cur, &doc) && bson_iter_init_find(&it, doc, "tag") &&
        BSON_ITER_HOLDS_UTF8(&it))
        *same = strcmp(bson_iter_utf8(&it, NULL), tag) == 0;
    if (mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, "seen claim", &error);
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    bson_destroy(filter);
    return rc;
}

/* One unordered insert of every claim; only keys already held (resends and
 * redeliveries: rare) cost a lookup each. */
int store_seen_claim(store *st, const char *const *keys, const char *const *tags, size_t n,
                     int64_t ts_ms, int *fresh, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_error_t error;
    bson_t doc;
    int rc;

    rc = sm_check_n(n, "seen claim", err, errlen);
    if (rc == PX_OK)
        rc = sm_check_strs(keys, n, "seen claim", err, errlen);
    if (rc == PX_OK)
        rc = sm_check_strs(tags, n, "seen claim", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    if (fresh == NULL)
        return px_err(err, errlen, "seen claim: fresh is required");
    sm_conn_get(st, "seen", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        bson_init(&doc);
        BSON_APPEND_UTF8(&doc, "_id", keys[i]);
        BSON_APPEND_DATE_TIME(&doc, "ts", ts_ms);
        BSON_APPEND_UTF8(&doc, "tag", tags[i]);
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "seen claim", &error);
        bson_destroy(&doc);
    }
    if (rc == PX_OK)
        rc = sm_bulk_insert_run(bulk, n, fresh, "seen claim", err, errlen);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!fresh[i])
            rc = sm_seen_held_by(&sc, keys[i], tags[i], &fresh[i], err, errlen);
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

int store_seen_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    return sm_sweep(st, "seen", cutoff_ms, removed, "seen sweep", err, errlen);
}

/* ---- receipt tracking --------------------------------------------------- */

/* "reader/msg_id": unambiguous because a reader never contains '/'. */
static char *sm_track_id(const store_track *t)
{
    size_t nr = strlen(t->reader), nm = strlen(t->msg_id);
    char *id = px_malloc(nr + 1 + nm + 1);

    memcpy(id, t->reader, nr);
    id[nr] = '/';
    memcpy(id + nr + 1, t->msg_id, nm + 1);
    return id;
}

static int sm_check_track(const store_track *t, size_t n, int full, const char *what,
                          char *err, size_t errlen)
{
    int rc = sm_check_n(n, what, err, errlen);

    if (rc == PX_OK && n > 0 && t == NULL)
        rc = px_err(err, errlen, "%s: NULL records", what);
    for (size_t i = 0; rc == PX_OK && i < n; i++) {
        if (!sm_str_ok(t[i].reader) || strchr(t[i].reader, '/') != NULL || !sm_str_ok(t[i].msg_id))
            rc = px_err(err, errlen, "%s: record %zu: reader or msg_id missing, not UTF-8, "
                        "or reader holds '/'", what, i);
        else if (full && !sm_str_ok(t[i].sender))
            rc = px_err(err, errlen, "%s: record %zu: sender missing or not UTF-8", what, i);
        else if (full && t[i].group != NULL && !sm_text_ok(t[i].group, strlen(t[i].group)))
            rc = px_err(err, errlen, "%s: record %zu: group is not UTF-8", what, i);
    }
    return rc;
}

/* One {_id: "reader/msg_id"} op per distinct pair of keys. */
static sm_op *sm_track_ops(const store_track *keys, size_t n, size_t *nops)
{
    char **ids = px_malloc(n * sizeof(*ids));
    sm_op *ops;

    for (size_t i = 0; i < n; i++)
        ids[i] = sm_track_id(&keys[i]);
    ops = sm_ops_by_id((const char *const *)ids, n, nops);
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
    return ops;
}

int store_track_put(store *st, const store_track *t, size_t n, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_error_t error;
    bson_t doc;
    char *id;
    int rc;

    rc = sm_check_track(t, n, 1, "track put", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    sm_conn_get(st, "tracking", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        id = sm_track_id(&t[i]);
        bson_init(&doc);
        BSON_APPEND_UTF8(&doc, "_id", id);
        BSON_APPEND_UTF8(&doc, "reader", t[i].reader);
        BSON_APPEND_UTF8(&doc, "msg_id", t[i].msg_id);
        BSON_APPEND_UTF8(&doc, "sender", t[i].sender);
        if (t[i].group != NULL && t[i].group[0] != '\0')
            BSON_APPEND_UTF8(&doc, "group", t[i].group);
        BSON_APPEND_DATE_TIME(&doc, "ts", t[i].ts_ms);
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "track put", &error);
        bson_destroy(&doc);
        free(id);
    }
    if (rc == PX_OK)
        rc = sm_bulk_insert_run(bulk, n, NULL, "track put", err, errlen);
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

/* Points t's strings into doc: valid while doc is. */
static int sm_track_parse(const bson_t *doc, store_track *t)
{
    bson_iter_t it;

    memset(t, 0, sizeof(*t));
    if (!bson_iter_init(&it, doc))
        return PX_ERROR;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (!BSON_ITER_HOLDS_UTF8(&it)) {
            if (strcmp(k, "ts") == 0)
                sm_iter_int64(&it, &t->ts_ms);
            continue;
        }
        if (strcmp(k, "reader") == 0)
            t->reader = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "msg_id") == 0)
            t->msg_id = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "sender") == 0)
            t->sender = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "group") == 0)
            t->group = bson_iter_utf8(&it, NULL);
    }
    return t->reader != NULL && t->msg_id != NULL && t->sender != NULL ? PX_OK : PX_ERROR;
}

int store_track_get(store *st, const store_track *keys, size_t n, store_track_cb cb,
                    void *arg, char *err, size_t errlen)
{
    sm_op *ops;
    size_t nops = 0;
    store_track t;
    int rc;

    if (cb == NULL)
        return px_err(err, errlen, "track get: cb is required");
    rc = sm_check_track(keys, n, 0, "track get", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    ops = sm_track_ops(keys, n, &nops);
    rc = sm_each(st, "tracking", ops, nops, 0, "track get", err, errlen);
    for (size_t i = 0; i < nops && rc == PX_OK; i++)
        for (size_t d = 0; d < ops[i].ndocs && rc == PX_OK; d++) {
            if (sm_track_parse(ops[i].docs[d], &t) != PX_OK)
                rc = px_err(err, errlen, "track get: malformed tracking document");
            else
                rc = cb(arg, &t);
        }
    sm_ops_free(ops, nops);
    return rc;
}

int store_track_delete(store *st, const store_track *keys, size_t n, int64_t *removed,
                       char *err, size_t errlen)
{
    sm_op *ops;
    size_t nops = 0;
    int64_t count = 0;
    int rc;

    rc = sm_check_track(keys, n, 0, "track delete", err, errlen);
    if (rc != PX_OK || n == 0) {
        if (rc == PX_OK && removed != NULL)
            *removed = 0;
        return rc;
    }
    ops = sm_track_ops(keys, n, &nops);
    rc = sm_each(st, "tracking", ops, nops, 1, "track delete", err, errlen);
    for (size_t i = 0; i < nops; i++)
        count += ops[i].removed;
    sm_ops_free(ops, nops);
    if (rc == PX_OK && removed != NULL)
        *removed = count;
    return rc;
}

int store_track_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    return sm_sweep(st, "tracking", cutoff_ms, removed, "track sweep", err, errlen);
}

/* ---- presence ----------------------------------------------------------- */

/* One record per (user, gateway, epoch) holding a connection count. Counts
 * move by $inc, the only atomic read-modify-write FerretDB offers without
 * transactions. Deltas are not idempotent: a redelivered batch counts twice
 * (a stale extra count only routes a delivery to a gateway that no longer
 * holds the user, which the inbox survives; gateway expiry clears it). */

static int sm_check_gateway(const char *g, const char *what, char *err, size_t errlen)
{
    if (!sm_str_ok(g) || strlen(g) > SM_MAX_GATEWAY)
        return px_err(err, errlen, "%s: gateway id must be 1-%d UTF-8 bytes", what, SM_MAX_GATEWAY);
    return PX_OK;
}

static int sm_check_presence(const store_presence *ops, size_t n, char *err, size_t errlen)
{
    int rc = sm_check_n(n, "presence apply", err, errlen);

    for (size_t i = 0; rc == PX_OK && i < n; i++) {
        if (!sm_str_ok(ops[i].user))
            rc = px_err(err, errlen, "presence apply: op %zu: user missing or not UTF-8", i);
        else if (ops[i].delta != 1 && ops[i].delta != -1)
            rc = px_err(err, errlen, "presence apply: op %zu has delta %d", i, ops[i].delta);
        else
            rc = sm_check_gateway(ops[i].gateway, "presence apply", err, errlen);
    }
    return rc;
}

static void sm_presence_key(bson_t *b, const store_presence *op)
{
    bson_init(b);
    BSON_APPEND_UTF8(b, "user", op->user);
    BSON_APPEND_UTF8(b, "gateway", op->gateway);
}

/* The counting half: a connect upserts and increments the record of its
 * epoch; a disconnect decrements only a positive count of its own epoch, so
 * one for an older (replaced) epoch matches nothing and is ignored. */
static int sm_presence_count_op(mongoc_bulk_operation_t *bulk, const store_presence *op,
                                bson_error_t *error)
{
    bson_t sel, upd, inc, cond, opts = BSON_INITIALIZER;
    bool ok;

    sm_presence_key(&sel, op);
    BSON_APPEND_INT64(&sel, "epoch", op->epoch);
    if (op->delta < 0) {
        BSON_APPEND_DOCUMENT_BEGIN(&sel, "count", &cond);
        BSON_APPEND_INT32(&cond, "$gt", 0);
        bson_append_document_end(&sel, &cond);
    }
    bson_init(&upd);
    BSON_APPEND_DOCUMENT_BEGIN(&upd, "$inc", &inc);
    BSON_APPEND_INT32(&inc, "count", op->delta);
    bson_append_document_end(&upd, &inc);
    BSON_APPEND_BOOL(&opts, "upsert", op->delta > 0);
    /* update_many on a key that is unique anyway: FerretDB 1.24 over
     * PostgreSQL never releases the pool connection of an update_one that
     * filters on other fields than _id, and 50 of them hung every client. */
    ok = mongoc_bulk_operation_update_many_with_opts(bulk, &sel, &upd, &opts, error);
    bson_destroy(&sel);
    bson_destroy(&upd);
    bson_destroy(&opts);
    return ok ? PX_OK : PX_ERROR;
}

/* The cleanup half, queued after all counts: a connect drops the records of
 * older epochs (dead connections of a restarted gateway); a disconnect drops
 * its record once the count reached zero. Running cleanups after the counts
 * gives the same result as interleaving them (a zero-count record behaves
 * like an absent one) in two round trips instead of 2n. */
static int sm_presence_cleanup_op(mongoc_bulk_operation_t *bulk, const store_presence *op,
                                  bson_error_t *error)
{
    bson_t sel, cond;
    bool ok;

    sm_presence_key(&sel, op);
    if (op->delta > 0) {
        BSON_APPEND_DOCUMENT_BEGIN(&sel, "epoch", &cond);
        BSON_APPEND_INT64(&cond, "$lt", op->epoch);
        bson_append_document_end(&sel, &cond);
    } else {
        BSON_APPEND_INT64(&sel, "epoch", op->epoch);
        BSON_APPEND_DOCUMENT_BEGIN(&sel, "count", &cond);
        BSON_APPEND_INT32(&cond, "$lte", 0);
        bson_append_document_end(&sel, &cond);
    }
    ok = mongoc_bulk_operation_remove_many_with_opts(bulk, &sel, NULL, error);
    bson_destroy(&sel);
    return ok ? PX_OK : PX_ERROR;
}

int store_presence_apply(store *st, const store_presence *ops, size_t n,
                         char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_error_t error;
    bson_t reply;
    int rc;

    rc = sm_check_presence(ops, n, err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    sm_conn_get(st, "presence", &sc);
    bulk = sm_bulk_new(&sc, true);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        rc = sm_presence_count_op(bulk, &ops[i], &error);
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        rc = sm_presence_cleanup_op(bulk, &ops[i], &error);
    if (rc != PX_OK) {
        sm_fail(err, errlen, "presence apply", &error);
        goto out;
    }
    if (!mongoc_bulk_operation_execute(bulk, &reply, &error))
        rc = sm_fail(err, errlen, "presence apply", &error);
    bson_destroy(&reply);
out:
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

/* The beat only moves a gateway's record forward: a beat from an older
 * epoch (a zombie of a restarted gateway) finds no record to update, its
 * upsert collides with the newer record's _id, and that duplicate is
 * absorbed, so the newer epoch stands. */
static int sm_beat_upsert(store *st, const char *gateway, int64_t epoch, int64_t ts_ms,
                          char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t *sel, *upd, *opts;
    bson_error_t error;
    int rc = PX_OK;

    sel = BCON_NEW("_id", BCON_UTF8(gateway), "epoch", "{", "$lte", BCON_INT64(epoch), "}");
    upd = BCON_NEW("$set", "{", "epoch", BCON_INT64(epoch), "ts", BCON_DATE_TIME(ts_ms), "}");
    opts = BCON_NEW("upsert", BCON_BOOL(true));
    sm_conn_get(st, "gateways", &sc);
    if (!mongoc_collection_update_one(sc.coll, sel, upd, opts, NULL, &error) &&
        error.code != SM_DUP_KEY)
        rc = sm_fail(err, errlen, "gateway beat", &error);
    sm_conn_put(st, &sc);
    bson_destroy(sel);
    bson_destroy(upd);
    bson_destroy(opts);
    return rc;
}

int store_gateway_beat(store *st, const char *gateway, int64_t epoch, int64_t ts_ms,
                       int reset, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t *filter;
    int rc;

    rc = sm_check_gateway(gateway, "gateway beat", err, errlen);
    if (rc == PX_OK)
        rc = sm_beat_upsert(st, gateway, epoch, ts_ms, err, errlen);
    if (rc != PX_OK || !reset)
        return rc;
    filter = BCON_NEW("gateway", BCON_UTF8(gateway), "epoch", "{", "$lt", BCON_INT64(epoch), "}");
    sm_conn_get(st, "presence", &sc);
    rc = sm_delete_many(&sc, filter, NULL, "gateway beat reset", err, errlen);
    sm_conn_put(st, &sc);
    bson_destroy(filter);
    return rc;
}

/* Appends (name, epoch) of each document of cur, reading the gateway name
 * from name_key; stops at max entries (the caller's ceiling). */
static int sm_read_gws(mongoc_cursor_t *cur, const char *name_key, sm_gw *gw, size_t max,
                       size_t *n, const char *what, char *err, size_t errlen)
{
    const bson_t *doc;
    bson_error_t error;
    bson_iter_t it;
    uint32_t len;
    const char *name;

    *n = 0;
    while (*n < max && mongoc_cursor_next(cur, &doc)) {
        if (!bson_iter_init_find(&it, doc, name_key) || !BSON_ITER_HOLDS_UTF8(&it))
            continue;
        name = bson_iter_utf8(&it, &len);
        if (len > SM_MAX_GATEWAY)
            continue;
        memcpy(gw[*n].name, name, len + 1);
        if (!bson_iter_init_find(&it, doc, "epoch") || sm_iter_int64(&it, &gw[*n].epoch) != PX_OK)
            continue;
        (*n)++;
    }
    if (mongoc_cursor_error(cur, &error))
        return sm_fail(err, errlen, what, &error);
    return PX_OK;
}

static int sm_find_gws(store *st, const char *coll, const bson_t *filter, const char *name_key,
                       sm_gw *gw, size_t max, size_t *n, const char *what,
                       char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_cursor_t *cur;
    /* singleBatch: the reader may stop at max, and a cursor FerretDB over
     * PostgreSQL keeps open holds one of its pool's connections (leaked
     * ones starved the pool and hung every client). */
    bson_t *opts = BCON_NEW("projection", "{", name_key, BCON_INT32(1), "epoch", BCON_INT32(1), "}",
                            "limit", BCON_INT64((int64_t)max), "singleBatch", BCON_BOOL(true));
    int rc;

    sm_conn_get(st, coll, &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, filter, opts, NULL);
    rc = sm_read_gws(cur, name_key, gw, max, n, what, err, errlen);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(opts);
    return rc;
}

static void sm_filter_names(bson_t *filter, const char *key, const sm_gw *gw, size_t n)
{
    bson_t in, arr;
    char buf[16];
    const char *k;

    BSON_APPEND_DOCUMENT_BEGIN(filter, key, &in);
    BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
    for (size_t i = 0; i < n; i++) {
        bson_uint32_to_string((uint32_t)i, &k, buf, sizeof(buf));
        bson_append_utf8(&arr, k, -1, gw[i].name, -1);
    }
    bson_append_array_end(&in, &arr);
    bson_append_document_end(filter, &in);
}

/* Adds name to gws unless present or full. */
static void sm_add_unique(char (*gws)[65], size_t max, size_t *n, const char *name)
{
    for (size_t i = 0; i < *n; i++)
        if (strcmp(gws[i], name) == 0)
            return;
    if (*n < max)
        memcpy(gws[(*n)++], name, strlen(name) + 1);
}

/* Two reads: the user's records, then which of those gateways beat recently.
 * A record counts when its epoch is the gateway's current one or newer (a
 * restarted gateway that has not beaten yet); older epochs are dead. */
int store_presence_lookup(store *st, const char *user, int64_t alive_after_ms,
                          char (*gws)[65], size_t max, size_t *n, char *err, size_t errlen)
{
    sm_gw *rec = NULL, *live = NULL;
    size_t nrec = 0, nlive = 0;
    bson_t *filter = NULL;
    int rc;

    if (user == NULL || n == NULL || (gws == NULL && max > 0))
        return px_err(err, errlen, "presence lookup: user, gws and n are required");
    *n = 0;
    rec = px_malloc(SM_MAX_PRESENCE * sizeof(*rec));
    filter = BCON_NEW("user", BCON_UTF8(user), "count", "{", "$gt", BCON_INT32(0), "}");
    rc = sm_find_gws(st, "presence", filter, "gateway", rec, SM_MAX_PRESENCE, &nrec,
                     "presence lookup", err, errlen);
    bson_destroy(filter);
    filter = NULL;
    if (rc != PX_OK || nrec == 0 || max == 0)
        goto out;
    if (alive_after_ms <= 0) {
        for (size_t i = 0; i < nrec; i++)
            sm_add_unique(gws, max, n, rec[i].name);
        goto out;
    }
    live = px_malloc(nrec * sizeof(*live));
    filter = bson_new();
    sm_filter_names(filter, "_id", rec, nrec);
    BCON_APPEND(filter, "ts", "{", "$gte", BCON_DATE_TIME(alive_after_ms), "}");
    rc = sm_find_gws(st, "gateways", filter, "_id", live, nrec, &nlive, "presence lookup",
                     err, errlen);
    for (size_t i = 0; rc == PX_OK && i < nrec; i++)
        for (size_t j = 0; j < nlive; j++)
            if (strcmp(rec[i].name, live[j].name) == 0 && rec[i].epoch >= live[j].epoch)
                sm_add_unique(gws, max, n, rec[i].name);
out:
    if (filter != NULL)
        bson_destroy(filter);
    free(rec);
    free(live);
    return rc;
}

/* Deletes the presence records of the dead gateways up to each one's last
 * known epoch (one delete per gateway, not an $or: see sm_each), so a
 * gateway that restarted meanwhile keeps its new records, then the gateway
 * records themselves unless a beat arrived in between. */
static int sm_expire_dead(store *st, const sm_gw *dead, size_t n, int64_t cutoff_ms,
                          int64_t *removed, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    sm_op *ops = px_calloc(n, sizeof(*ops));
    bson_t filter = BSON_INITIALIZER;
    int rc;

    *removed = 0;
    for (size_t i = 0; i < n; i++) {
        bson_init(&ops[i].filter);
        BCON_APPEND(&ops[i].filter, "gateway", BCON_UTF8(dead[i].name),
                    "epoch", "{", "$lte", BCON_INT64(dead[i].epoch), "}");
    }
    rc = sm_each(st, "presence", ops, n, 1, "presence expire", err, errlen);
    for (size_t i = 0; i < n; i++)
        *removed += ops[i].removed;
    sm_ops_free(ops, n);
    if (rc != PX_OK)
        goto out;
    sm_filter_names(&filter, "_id", dead, n);
    sm_append_lt_date(&filter, "ts", cutoff_ms);
    sm_conn_get(st, "gateways", &sc);
    rc = sm_delete_many(&sc, &filter, NULL, "presence expire", err, errlen);
    sm_conn_put(st, &sc);
out:
    bson_destroy(&filter);
    return rc;
}

int store_presence_expire(store *st, int64_t cutoff_ms, int64_t *removed,
                          char *err, size_t errlen)
{
    sm_gw *dead = px_malloc(SM_MAX_BATCH * sizeof(*dead));
    bson_t filter = BSON_INITIALIZER;
    size_t n = 0;
    int64_t count = 0;
    int rc;

    sm_append_lt_date(&filter, "ts", cutoff_ms);
    rc = sm_find_gws(st, "gateways", &filter, "_id", dead, SM_MAX_BATCH, &n, "presence expire",
                     err, errlen);
    if (rc == PX_OK && n > 0)
        rc = sm_expire_dead(st, dead, n, cutoff_ms, &count, err, errlen);
    if (rc == PX_OK && removed != NULL)
        *removed = count;
    bson_destroy(&filter);
    free(dead);
    return rc;
}

/* ---- groups ------------------------------------------------------------- */

/* groups {_id: group id, name, creator, members: [join order], admins,
 * applied, ts}. Looked up by _id only; one document per group, replaced
 * whole, so each change is single-document atomic. */

static int sm_check_group(const store_group *g, char *err, size_t errlen)
{
    if (!sm_str_ok(g->id) || !sm_str_ok(g->name) || !sm_str_ok(g->creator))
        return px_err(err, errlen, "group put: id, name or creator empty or not UTF-8");
    if (g->nmembers > STORE_GROUP_MAX || g->nadmins > g->nmembers)
        return px_err(err, errlen, "group put: %zu members, %zu admins", g->nmembers,
                      g->nadmins);
    if (sm_check_strs(g->members, g->nmembers, "group put: members", err, errlen) != PX_OK)
        return PX_ERROR;
    return sm_check_strs(g->admins, g->nadmins, "group put: admins", err, errlen);
}

static void sm_group_doc(bson_t *doc, const store_group *g)
{
    bson_init(doc);
    BSON_APPEND_UTF8(doc, "_id", g->id);
    BSON_APPEND_UTF8(doc, "name", g->name);
    BSON_APPEND_UTF8(doc, "creator", g->creator);
    sm_append_str_array(doc, "members", g->members, g->nmembers);
    sm_append_str_array(doc, "admins", g->admins, g->nadmins);
    BSON_APPEND_INT64(doc, "applied", g->applied);
    BSON_APPEND_DATE_TIME(doc, "ts", g->ts_ms);
}

int store_group_put(store *st, const store_group *g, size_t n, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_t opts = BSON_INITIALIZER, reply;
    bson_error_t error;
    int rc = PX_ERROR;

    if (n == 0)
        return PX_OK;
    if (sm_check_n(n, "group put", err, errlen) != PX_OK)
        return PX_ERROR;
    for (size_t i = 0; i < n; i++)
        if (sm_check_group(&g[i], err, errlen) != PX_OK)
            return PX_ERROR;
    BSON_APPEND_BOOL(&opts, "upsert", true);
    sm_conn_get(st, "groups", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n; i++) {
        bson_t sel = BSON_INITIALIZER, doc;
        BSON_APPEND_UTF8(&sel, "_id", g[i].id);
        sm_group_doc(&doc, &g[i]);
        bool ok = mongoc_bulk_operation_replace_one_with_opts(bulk, &sel, &doc, &opts, &error);
        bson_destroy(&sel);
        bson_destroy(&doc);
        if (!ok) {
            sm_fail(err, errlen, "group put", &error);
            goto out;
        }
    }
    bool ok = mongoc_bulk_operation_execute(bulk, &reply, &error) != 0;
    rc = sm_bulk_wc_errors(&reply, "group put", err, errlen);
    if (rc == PX_OK) {
        size_t dups = 0;
        rc = sm_bulk_write_errors(&reply, n, NULL, &dups, "group put", err, errlen);
    }
    if (rc == PX_OK && !ok)
        rc = sm_fail(err, errlen, "group put", &error);
    bson_destroy(&reply);
out:
    if (bulk != NULL)
        mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    bson_destroy(&opts);
    return rc;
}

/* Collects a string array field into v (at most max); PX_ERROR if the field
 * is not an array of at most max strings. */
static int sm_iter_strs(const bson_iter_t *it, const char **v, size_t max, size_t *n)
{
    bson_iter_t a;

    *n = 0;
    if (!BSON_ITER_HOLDS_ARRAY(it) || !bson_iter_recurse(it, &a))
        return PX_ERROR;
    while (bson_iter_next(&a)) {
        if (!BSON_ITER_HOLDS_UTF8(&a) || *n >= max)
            return PX_ERROR;
        v[(*n)++] = bson_iter_utf8(&a, NULL);
    }
    return PX_OK;
}

/* Scratch for one parsed group document: the arrays point into it. */
typedef struct sm_group_buf {
    const char *members[STORE_GROUP_MAX];
    const char *admins[STORE_GROUP_MAX];
} sm_group_buf;

static int sm_group_parse(const bson_t *doc, store_group *g, sm_group_buf *b)
{
    bson_iter_t it;
    size_t nm = 0, na = 0;
    int rc = PX_OK;

    memset(g, 0, sizeof(*g));
    if (!bson_iter_init(&it, doc))
        return PX_ERROR;
    while (bson_iter_next(&it) && rc == PX_OK) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "_id") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            g->id = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "name") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            g->name = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "creator") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            g->creator = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "members") == 0)
            rc = sm_iter_strs(&it, b->members, STORE_GROUP_MAX, &nm);
        else if (strcmp(k, "admins") == 0)
            rc = sm_iter_strs(&it, b->admins, STORE_GROUP_MAX, &na);
        else if (strcmp(k, "applied") == 0)
            rc = sm_iter_int64(&it, &g->applied);
        else if (strcmp(k, "ts") == 0)
            rc = sm_iter_int64(&it, &g->ts_ms);
    }
    g->members = b->members;
    g->nmembers = nm;
    g->admins = b->admins;
    g->nadmins = na;
    if (g->id == NULL || g->name == NULL || g->creator == NULL)
        rc = PX_ERROR;
    return rc;
}

int store_group_get(store *st, const char *const *ids, size_t n, store_group_cb cb,
                    void *arg, char *err, size_t errlen)
{
    sm_op *ops;
    size_t nops = 0;
    sm_group_buf *b;
    int rc;

    if (n == 0)
        return PX_OK;
    if (sm_check_n(n, "group get", err, errlen) != PX_OK ||
        sm_check_strs(ids, n, "group get", err, errlen) != PX_OK)
        return PX_ERROR;
    ops = sm_ops_by_id(ids, n, &nops);
    rc = sm_each(st, "groups", ops, nops, 0, "group get", err, errlen);
    b = px_malloc(sizeof(*b));
    for (size_t i = 0; i < nops && rc == PX_OK; i++)
        for (size_t d = 0; d < ops[i].ndocs && rc == PX_OK; d++) {
            store_group g;
            if (sm_group_parse(ops[i].docs[d], &g, b) != PX_OK)
                rc = px_err(err, errlen, "group get: malformed group document");
            else
                rc = cb(arg, &g);
        }
    free(b);
    sm_ops_free(ops, nops);
    return rc;
}

/* ---- media -------------------------------------------------------------- */

/* Ids are user-id shaped ([A-Za-z0-9._-], no '/'), so "a/b" keys are
 * unambiguous. */
static int sm_media_id_ok(const char *s)
{
    size_t len = s != NULL ? strlen(s) : 0;

    if (len == 0 || len > STORE_MEDIA_ID_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '.' || s[i] == '_' || s[i] == '-'))
            return 0;
    return 1;
}

static int sm_check_media_id(const char *id, const char *what, char *err, size_t errlen)
{
    if (!sm_media_id_ok(id))
        return px_err(err, errlen, "%s: id \"%s\" is not 1-%d characters of [A-Za-z0-9._-]",
                      what, id != NULL ? id : "(null)", STORE_MEDIA_ID_MAX);
    return PX_OK;
}

static void sm_pair_id(char *out, size_t cap, const char *a, const char *b)
{
    snprintf(out, cap, "%s/%s", a, b);
}

/* Inserts doc into coll; a duplicate _id is the repeat we absorb. */
static int sm_insert_absorb(store *st, const char *coll, const bson_t *doc, const char *what,
                            char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_error_t error;
    int rc = PX_OK;

    sm_conn_get(st, coll, &sc);
    if (!mongoc_collection_insert_one(sc.coll, doc, NULL, NULL, &error) &&
        error.code != SM_DUP_KEY)
        rc = sm_fail(err, errlen, what, &error);
    sm_conn_put(st, &sc);
    return rc;
}

/* Chunk 0 first records the upload ({_id: upload, ts} in uploads), so no
 * chunk ever exists without a small record the orphan sweep can find
 * without reading chunk documents (FerretDB would decode every chunk). */
int store_chunk_put(store *st, const char *upload, int64_t n, const void *data, size_t len,
                    int64_t ts_ms, char *err, size_t errlen)
{
    bson_t doc = BSON_INITIALIZER;
    char id[2 * STORE_MEDIA_ID_MAX + 24];
    int rc = sm_check_media_id(upload, "chunk put", err, errlen);

    if (rc != PX_OK)
        return rc;
    if (n < 0 || len > STORE_MEDIA_CHUNK || (len > 0 && data == NULL))
        return px_err(err, errlen, "chunk put: chunk %lld of %zu bytes", (long long)n, len);
    if (n == 0) {
        BSON_APPEND_UTF8(&doc, "_id", upload);
        BSON_APPEND_DATE_TIME(&doc, "ts", ts_ms);
        rc = sm_insert_absorb(st, "uploads", &doc, "chunk put", err, errlen);
        bson_reinit(&doc);
    }
    snprintf(id, sizeof(id), "%s/%lld", upload, (long long)n);
    BSON_APPEND_UTF8(&doc, "_id", id);
    BSON_APPEND_UTF8(&doc, "upload", upload);
    BSON_APPEND_INT64(&doc, "n", n);
    BSON_APPEND_DATE_TIME(&doc, "ts", ts_ms);
    bson_append_binary(&doc, "data", -1, BSON_SUBTYPE_BINARY, data, (uint32_t)len);
    if (rc == PX_OK)
        rc = sm_insert_absorb(st, "chunks", &doc, "chunk put", err, errlen);
    bson_destroy(&doc);
    return rc;
}

static int sm_chunk_copy(const bson_t *doc, void *buf, size_t cap, size_t *len)
{
    bson_iter_t it;
    bson_subtype_t sub;
    const uint8_t *data;
    uint32_t n;

    if (!bson_iter_init_find(&it, doc, "data") || !BSON_ITER_HOLDS_BINARY(&it))
        return PX_ERROR;
    bson_iter_binary(&it, &sub, &n, &data);
    if (n > cap)
        return PX_ERROR;
    memcpy(buf, data, n);
    *len = n;
    return PX_OK;
}

struct store_chunk_reader {
    store *st;
    sm_conn sc;                 /* held for the reader's life */
    mongoc_cursor_t *cur;
};

/* batchSize 1: each step fetches one chunk, so the driver never buffers
 * more than the chunk being read (a download's memory stays one chunk). */
store_chunk_reader *store_chunk_open(store *st, const char *upload, int64_t from_n,
                                     char *err, size_t errlen)
{
    store_chunk_reader *rd;
    bson_t *filter, *opts;

    if (sm_check_media_id(upload, "chunk open", err, errlen) != PX_OK)
        return NULL;
    filter = BCON_NEW("upload", BCON_UTF8(upload), "n", "{", "$gte", BCON_INT64(from_n), "}");
    opts = BCON_NEW("sort", "{", "n", BCON_INT32(1), "}", "batchSize", BCON_INT32(1));
    rd = px_calloc(1, sizeof(*rd));
    rd->st = st;
    sm_conn_get(st, "chunks", &rd->sc);
    rd->cur = mongoc_collection_find_with_opts(rd->sc.coll, filter, opts, NULL);
    bson_destroy(filter);
    bson_destroy(opts);
    return rd;
}

int store_chunk_next(store_chunk_reader *rd, int64_t *n, void *buf, size_t cap, size_t *len,
                     char *err, size_t errlen)
{
    const bson_t *doc;
    bson_error_t error;
    bson_iter_t it;

    if (!mongoc_cursor_next(rd->cur, &doc)) {
        if (mongoc_cursor_error(rd->cur, &error))
            return sm_fail(err, errlen, "chunk next", &error);
        return PX_DECLINED;
    }
    if (!bson_iter_init_find(&it, doc, "n") || sm_iter_int64(&it, n) != PX_OK ||
        sm_chunk_copy(doc, buf, cap, len) != PX_OK)
        return px_err(err, errlen, "chunk next: malformed chunk or over %zu bytes", cap);
    return PX_OK;
}

void store_chunk_close(store_chunk_reader *rd)
{
    if (rd == NULL)
        return;
    mongoc_cursor_destroy(rd->cur);
    sm_conn_put(rd->st, &rd->sc);
    free(rd);
}

static int sm_delete_by(store *st, const char *coll, const char *field, const char *value,
                        int64_t *removed, const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t filter = BSON_INITIALIZER;
    int64_t count = 0;
    int rc;

    BSON_APPEND_UTF8(&filter, field, value);
    sm_conn_get(st, coll, &sc);
    rc = sm_delete_many(&sc, &filter, &count, what, err, errlen);
    sm_conn_put(st, &sc);
    bson_destroy(&filter);
    if (rc == PX_OK && removed != NULL)
        *removed = count;
    return rc;
}

/* The upload record goes last: if deleting the chunks fails, the record
 * remains and the orphan sweep tries again. */
int store_chunk_drop(store *st, const char *upload, int64_t *removed, char *err, size_t errlen)
{
    if (sm_check_media_id(upload, "chunk drop", err, errlen) != PX_OK)
        return PX_ERROR;
    if (sm_delete_by(st, "chunks", "upload", upload, removed, "chunk drop", err, errlen) != PX_OK)
        return PX_ERROR;
    return sm_delete_by(st, "uploads", "_id", upload, NULL, "chunk drop", err, errlen);
}

int store_chunk_count(store *st, const char *upload, int64_t *count, char *err, size_t errlen)
{
    bson_t filter = BSON_INITIALIZER;
    int rc;

    if (count == NULL || (upload != NULL && !sm_media_id_ok(upload)))
        return px_err(err, errlen, "chunk count: bad upload id or NULL count");
    if (upload != NULL)
        BSON_APPEND_UTF8(&filter, "upload", upload);
    rc = sm_count(st, "chunks", &filter, count, "chunk count", err, errlen);
    bson_destroy(&filter);
    return rc;
}

static int sm_copy_str(char *dst, size_t cap, const bson_iter_t *it)
{
    uint32_t len;
    const char *s;

    if (!BSON_ITER_HOLDS_UTF8(it))
        return PX_ERROR;
    s = bson_iter_utf8(it, &len);
    if (len >= cap)
        return PX_ERROR;
    memcpy(dst, s, len + 1);
    return PX_OK;
}

static int sm_media_parse(const bson_t *doc, store_media *m)
{
    bson_iter_t it;
    int rc = PX_OK, have = 0;

    memset(m, 0, sizeof(*m));
    if (!bson_iter_init(&it, doc))
        return PX_ERROR;
    while (rc == PX_OK && bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "_id") == 0)
            rc = sm_copy_str(m->id, sizeof(m->id), &it), have++;
        else if (strcmp(k, "sha256") == 0)
            rc = sm_copy_str(m->sha256, sizeof(m->sha256), &it), have++;
        else if (strcmp(k, "content_type") == 0)
            rc = sm_copy_str(m->content_type, sizeof(m->content_type), &it), have++;
        else if (strcmp(k, "upload") == 0)
            rc = sm_copy_str(m->upload, sizeof(m->upload), &it), have++;
        else if (strcmp(k, "size") == 0)
            rc = sm_iter_int64(&it, &m->size), have++;
        else if (strcmp(k, "ts") == 0)
            rc = sm_iter_int64(&it, &m->ts_ms);
    }
    return rc == PX_OK && have == 5 ? PX_OK : PX_ERROR;
}

/* Reads the one media record matching field = value into *m. */
static int sm_media_find(store *st, const char *field, const char *value, store_media *m,
                         const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_cursor_t *cur;
    const bson_t *doc;
    bson_error_t error;
    bson_t filter = BSON_INITIALIZER;
    int rc = PX_DECLINED;

    BSON_APPEND_UTF8(&filter, field, value);
    sm_conn_get(st, "media", &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, &filter, NULL, NULL);
    if (mongoc_cursor_next(cur, &doc))
        rc = sm_media_parse(doc, m) == PX_OK
                 ? PX_OK : px_err(err, errlen, "%s: malformed media document", what);
    else if (mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, what, &error);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(&filter);
    return rc;
}

int store_media_get(store *st, const char *id, store_media *m, char *err, size_t errlen)
{
    if (m == NULL || sm_check_media_id(id, "media get", err, errlen) != PX_OK)
        return px_err(err, errlen, "media get: bad id or NULL record");
    return sm_media_find(st, "_id", id, m, "media get", err, errlen);
}

static int sm_check_media(const store_media *m, char *err, size_t errlen)
{
    size_t hex = strspn(m->sha256, "0123456789abcdef");

    if (sm_check_media_id(m->id, "media commit", err, errlen) != PX_OK ||
        sm_check_media_id(m->upload, "media commit", err, errlen) != PX_OK)
        return PX_ERROR;
    if (hex != 64 || m->sha256[64] != '\0')
        return px_err(err, errlen, "media commit: sha256 is not 64 lowercase hex digits");
    if (m->size < 0 || !sm_str_ok(m->content_type))
        return px_err(err, errlen, "media commit: negative size or bad content type");
    return PX_OK;
}

/* Moves the media's ts up to ts_ms ($max: never back). PX_DECLINED when
 * the record is gone (never existed, or swept). */
static int sm_media_touch(store *st, const char *id, int64_t ts_ms, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t *sel = BCON_NEW("_id", BCON_UTF8(id));
    bson_t *upd = BCON_NEW("$max", "{", "ts", BCON_DATE_TIME(ts_ms), "}");
    bson_t reply;
    bson_iter_t it;
    bson_error_t error;
    int rc = PX_OK;

    sm_conn_get(st, "media", &sc);
    if (!mongoc_collection_update_one(sc.coll, sel, upd, NULL, &reply, &error))
        rc = sm_fail(err, errlen, "media touch", &error);
    else if (!bson_iter_init_find(&it, &reply, "matchedCount") || bson_iter_as_int64(&it) == 0)
        rc = PX_DECLINED;
    bson_destroy(&reply);
    sm_conn_put(st, &sc);
    bson_destroy(sel);
    bson_destroy(upd);
    return rc;
}

/* Inserts the record; PX_DECLINED when its sha256 (or id) already exists. */
static int sm_media_insert(store *st, const store_media *m, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t doc = BSON_INITIALIZER;
    bson_error_t error;
    int rc = PX_OK;

    BSON_APPEND_UTF8(&doc, "_id", m->id);
    BSON_APPEND_UTF8(&doc, "sha256", m->sha256);
    BSON_APPEND_UTF8(&doc, "content_type", m->content_type);
    BSON_APPEND_UTF8(&doc, "upload", m->upload);
    BSON_APPEND_INT64(&doc, "size", m->size);
    BSON_APPEND_DATE_TIME(&doc, "ts", m->ts_ms);
    sm_conn_get(st, "media", &sc);
    if (!mongoc_collection_insert_one(sc.coll, &doc, NULL, NULL, &error))
        rc = error.code == SM_DUP_KEY ? PX_DECLINED : sm_fail(err, errlen, "media commit", &error);
    sm_conn_put(st, &sc);
    bson_destroy(&doc);
    return rc;
}

int store_media_commit(store *st, store_media *m, const char *uploader, int *created,
                       char *err, size_t errlen)
{
    int64_t ts = m != NULL ? m->ts_ms : 0;
    int rc;

    if (m == NULL || created == NULL || !sm_media_id_ok(uploader))
        return px_err(err, errlen, "media commit: record, created and uploader are required");
    if (sm_check_media(m, err, errlen) != PX_OK)
        return PX_ERROR;
    rc = sm_media_insert(st, m, err, errlen);
    *created = rc == PX_OK;
    if (rc == PX_DECLINED) {
        /* Equal bytes were committed first (maybe concurrently): adopt that
         * record. Its chunks stay; the caller drops ours. */
        char sha[65];
        memcpy(sha, m->sha256, sizeof(sha));
        rc = sm_media_find(st, "sha256", sha, m, "media commit", err, errlen);
        if (rc == PX_DECLINED)
            rc = px_err(err, errlen, "media commit: duplicate of %s but no record found "
                        "(swept meanwhile?); retry", sha);
    }
    if (rc == PX_OK)
        rc = store_media_grant(st, m->id, &uploader, 1, ts, err, errlen);
    /* The chunks belong to the media now: no longer an upload in progress.
     * (A crash before this delete leaves a record the sweep recognises as
     * committed by the media naming its upload.) */
    if (rc == PX_OK && *created)
        rc = sm_delete_by(st, "uploads", "_id", m->upload, NULL, "media commit", err, errlen);
    if (rc == PX_OK && m->ts_ms < ts)
        m->ts_ms = ts;
    return rc;
}

int store_media_access(store *st, const char *id, const char *user, char *err, size_t errlen)
{
    bson_t filter = BSON_INITIALIZER;
    char key[2 * STORE_MEDIA_ID_MAX + 2];
    int64_t c = 0;
    int rc;

    if (sm_check_media_id(id, "media access", err, errlen) != PX_OK ||
        sm_check_media_id(user, "media access", err, errlen) != PX_OK)
        return PX_ERROR;
    sm_pair_id(key, sizeof(key), id, user);
    BSON_APPEND_UTF8(&filter, "_id", key);
    rc = sm_count(st, "media_access", &filter, &c, "media access", err, errlen);
    bson_destroy(&filter);
    if (rc == PX_OK && c == 0)
        rc = PX_DECLINED;
    return rc;
}

/* The touch comes first: once ts is recent the sweep (which re-checks ts
 * as it deletes) keeps the media, and a touch that finds no record means it
 * was swept, so no grant to vanished bytes is written. */
int store_media_grant(store *st, const char *id, const char *const *users, size_t n,
                      int64_t ts_ms, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk;
    bson_error_t error;
    char key[2 * STORE_MEDIA_ID_MAX + 2];
    int rc = sm_check_media_id(id, "media grant", err, errlen);

    if (rc == PX_OK)
        rc = sm_check_n(n, "media grant", err, errlen);
    for (size_t i = 0; rc == PX_OK && i < n; i++)
        rc = sm_check_media_id(users != NULL ? users[i] : NULL, "media grant", err, errlen);
    if (rc == PX_OK)
        rc = sm_media_touch(st, id, ts_ms, err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    sm_conn_get(st, "media_access", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        bson_t doc = BSON_INITIALIZER;
        sm_pair_id(key, sizeof(key), id, users[i]);
        BSON_APPEND_UTF8(&doc, "_id", key);
        BSON_APPEND_UTF8(&doc, "media", id);
        BSON_APPEND_UTF8(&doc, "user", users[i]);
        BSON_APPEND_DATE_TIME(&doc, "ts", ts_ms);
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "media grant", &error);
        bson_destroy(&doc);
    }
    if (rc == PX_OK)
        rc = sm_bulk_insert_run(bulk, n, NULL, "media grant", err, errlen);
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

/* Collects the string field of each document of coll matching filter (at
 * most max, the caller's ceiling) into out[] (each STORE_MEDIA_ID_MAX + 1). */
static int sm_collect_ids(store *st, const char *coll, const bson_t *filter, const char *field,
                          char (*out)[STORE_MEDIA_ID_MAX + 1], size_t max, size_t *n,
                          const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_cursor_t *cur;
    const bson_t *doc;
    bson_error_t error;
    bson_iter_t it;
    bson_t *opts = BCON_NEW("projection", "{", field, BCON_INT32(1), "}",
                            "limit", BCON_INT64((int64_t)max), "singleBatch", BCON_BOOL(true));
    int rc = PX_OK;

    *n = 0;
    sm_conn_get(st, coll, &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, filter, opts, NULL);
    while (*n < max && mongoc_cursor_next(cur, &doc))
        if (bson_iter_init_find(&it, doc, field) &&
            sm_copy_str(out[*n], STORE_MEDIA_ID_MAX + 1, &it) == PX_OK)
            (*n)++;
    if (mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, what, &error);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(opts);
    return rc;
}

/* Deletes one media record if its ts is still before cutoff_ms (a commit or
 * grant since the find keeps it), then its chunks and grants. */
static int sm_media_expire(store *st, const store_media *m, int64_t cutoff_ms, int64_t *gone,
                           char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t filter = BSON_INITIALIZER;
    int64_t deleted = 0;
    int rc;

    BSON_APPEND_UTF8(&filter, "_id", m->id);
    sm_append_lt_date(&filter, "ts", cutoff_ms);
    sm_conn_get(st, "media", &sc);
    rc = sm_delete_many(&sc, &filter, &deleted, "media sweep", err, errlen);
    sm_conn_put(st, &sc);
    bson_destroy(&filter);
    if (rc != PX_OK || deleted == 0)
        return rc;
    (*gone)++;
    rc = sm_delete_by(st, "chunks", "upload", m->upload, NULL, "media sweep", err, errlen);
    if (rc == PX_OK)
        rc = sm_delete_by(st, "media_access", "media", m->id, NULL, "media sweep", err, errlen);
    return rc;
}

static int sm_media_sweep_old(store *st, int64_t cutoff_ms, int64_t *gone, char *err,
                              size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_cursor_t *cur;
    const bson_t *doc;
    bson_error_t error;
    bson_t filter = BSON_INITIALIZER;
    bson_t *opts = BCON_NEW("limit", BCON_INT64(SM_MAX_BATCH), "singleBatch", BCON_BOOL(true));
    store_media *old = px_malloc(SM_MAX_BATCH * sizeof(*old));
    size_t n = 0;
    int rc = PX_OK;

    sm_append_lt_date(&filter, "ts", cutoff_ms);
    sm_conn_get(st, "media", &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, &filter, opts, NULL);
    while (n < SM_MAX_BATCH && mongoc_cursor_next(cur, &doc))
        if (sm_media_parse(doc, &old[n]) == PX_OK)
            n++;
    if (mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, "media sweep", &error);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    for (size_t i = 0; rc == PX_OK && i < n; i++)
        rc = sm_media_expire(st, &old[i], cutoff_ms, gone, err, errlen);
    bson_destroy(&filter);
    bson_destroy(opts);
    free(old);
    return rc;
}

/* Upload records older than the cutoff: those no media names never
 * committed (their uploader is long gone), so their chunks go; those a
 * media names committed but crashed before dropping the record. */
static int sm_media_sweep_orphans(store *st, int64_t cutoff_ms, int64_t *gone, char *err,
                                  size_t errlen)
{
    char (*ups)[STORE_MEDIA_ID_MAX + 1] = px_malloc(SM_MAX_BATCH * sizeof(*ups));
    char (*live)[STORE_MEDIA_ID_MAX + 1] = px_malloc(SM_MAX_BATCH * sizeof(*live));
    bson_t filter = BSON_INITIALIZER, in;
    size_t nups = 0, nlive = 0;
    const char **names = NULL;
    int rc;

    sm_append_lt_date(&filter, "ts", cutoff_ms);
    rc = sm_collect_ids(st, "uploads", &filter, "_id", ups, SM_MAX_BATCH, &nups,
                        "media sweep", err, errlen);
    if (rc != PX_OK || nups == 0)
        goto out;
    names = px_malloc(nups * sizeof(*names));
    for (size_t i = 0; i < nups; i++)
        names[i] = ups[i];
    bson_reinit(&filter);
    BSON_APPEND_DOCUMENT_BEGIN(&filter, "upload", &in);
    sm_append_str_array(&in, "$in", names, nups);
    bson_append_document_end(&filter, &in);
    rc = sm_collect_ids(st, "media", &filter, "upload", live, SM_MAX_BATCH, &nlive,
                        "media sweep", err, errlen);
    for (size_t i = 0; rc == PX_OK && i < nups; i++) {
        size_t j = 0;
        while (j < nlive && strcmp(ups[i], live[j]) != 0)
            j++;
        if (j < nlive) {
            rc = sm_delete_by(st, "uploads", "_id", ups[i], NULL, "media sweep", err, errlen);
            continue;
        }
        rc = store_chunk_drop(st, ups[i], NULL, err, errlen);
        (*gone)++;
    }
out:
    bson_destroy(&filter);
    free(names);
    free(ups);
    free(live);
    return rc;
}

int store_media_sweep(store *st, int64_t cutoff_ms, int64_t orphan_cutoff_ms, int64_t *media,
                      int64_t *orphans, char *err, size_t errlen)
{
    int64_t nm = 0, no = 0;
    int rc = sm_media_sweep_old(st, cutoff_ms, &nm, err, errlen);

    if (rc == PX_OK)
        rc = sm_media_sweep_orphans(st, orphan_cutoff_ms, &no, err, errlen);
    if (media != NULL)
        *media = nm;
    if (orphans != NULL)
        *orphans = no;
    return rc;
}
