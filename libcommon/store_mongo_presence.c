/* store.h's presence registry over the MongoDB wire protocol: one document
 * per connection, gateway beats, lookups and the expiry of dead gateways;
 * see store_mongo.c. */
#include "store_mongo_int.h"

#include <stdlib.h>
#include <string.h>

/* A (gateway, epoch) pair read back from presence or gateways. */
typedef struct sm_gw {
    char name[SM_MAX_GATEWAY + 1];
    int64_t epoch;
} sm_gw;

/* ---- presence ----------------------------------------------------------- */

/* One document per connection, named by _id = "gateway/epoch/conn" (the
 * last two parts are numbers, so the name is unambiguous whatever the
 * gateway id holds): a connect is an upsert of it, a disconnect a delete,
 * both idempotent, so a redelivered batch leaves the registry exact. */

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

static void sm_presence_id(bson_t *b, const store_presence *op)
{
    char id[SM_MAX_GATEWAY + 48];

    snprintf(id, sizeof(id), "%s/%lld/%llu", op->gateway, (long long)op->epoch,
             (unsigned long long)op->conn);
    bson_init(b);
    BSON_APPEND_UTF8(b, "_id", id);
}

/* A connect's document, inserted: a connection's fields never change
 * (its _id names gateway, epoch and conn; the user and device are the
 * connection's), so a repeat (a presence record consumed again) is a
 * duplicate _id, absorbed, as the upsert by _id it replaces left it.
 * FerretDB 1.24 runs each update of a bulk as its own statement and
 * commit, but a bulk's inserts together: a batch of ~140 connects was 140
 * upserts (presence_apply 0.8 s a batch while 1,000 clients synced). */
static void sm_presence_connect_doc(bson_t *doc, const store_presence *op)
{
    sm_presence_id(doc, op);
    BSON_APPEND_UTF8(doc, "user", op->user);
    BSON_APPEND_UTF8(doc, "gateway", op->gateway);
    BSON_APPEND_INT64(doc, "epoch", op->epoch);
    BSON_APPEND_INT64(doc, "conn", (int64_t)op->conn);
    BSON_APPEND_UTF8(doc, "device", op->device != NULL ? op->device : "");
}

/* The deleting half, run after the inserts: a disconnect drops its
 * connection's document; a connect drops the user's documents of older
 * epochs on that gateway (dead connections of its previous life), which
 * never match a document of this batch's epoch. */
static int sm_presence_delete_op(mongoc_bulk_operation_t *bulk, const store_presence *op,
                                 bson_error_t *error)
{
    bson_t sel, cond;
    bool ok;

    if (op->delta < 0) {
        sm_presence_id(&sel, op);
    } else {
        bson_init(&sel);
        BSON_APPEND_UTF8(&sel, "user", op->user);
        BSON_APPEND_UTF8(&sel, "gateway", op->gateway);
        BSON_APPEND_DOCUMENT_BEGIN(&sel, "epoch", &cond);
        BSON_APPEND_INT64(&cond, "$lt", op->epoch);
        bson_append_document_end(&sel, &cond);
    }
    ok = mongoc_bulk_operation_remove_many_with_opts(bulk, &sel, NULL, error);
    bson_destroy(&sel);
    return ok ? PX_OK : PX_ERROR;
}

/* Two round trips: the connects' inserts in one bulk, then the deletes
 * in another (store.h: the order of ops does not matter, but a connect and
 * a disconnect of one connection in a batch must leave nothing). */
int store_presence_apply(store *st, const store_presence *ops, size_t n,
                         char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_error_t error;
    bson_t reply, doc;
    size_t nconn = 0;
    int rc;

    rc = sm_check_presence(ops, n, err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    sm_conn_get(st, "connections", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        if (ops[i].delta <= 0)
            continue;
        sm_presence_connect_doc(&doc, &ops[i]);
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "presence apply", &error);
        bson_destroy(&doc);
        nconn++;
    }
    if (rc == PX_OK && nconn > 0)
        rc = sm_bulk_insert_run(bulk, nconn, NULL, "presence apply", err, errlen);
    mongoc_bulk_operation_destroy(bulk);
    bulk = rc == PX_OK ? sm_bulk_new(&sc, true) : NULL;
    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (sm_presence_delete_op(bulk, &ops[i], &error) != PX_OK)
            rc = sm_fail(err, errlen, "presence apply", &error);
    if (rc == PX_OK) {
        if (!mongoc_bulk_operation_execute(bulk, &reply, &error))
            rc = sm_fail(err, errlen, "presence apply", &error);
        bson_destroy(&reply);
    }
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
    sm_conn_get(st, "connections", &sc);
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
    filter = BCON_NEW("user", BCON_UTF8(user));
    rc = sm_find_gws(st, "connections", filter, "gateway", rec, SM_MAX_PRESENCE, &nrec,
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

int store_presence_devices(store *st, const char *user, char (*devs)[65], size_t max, size_t *n,
                           char *err, size_t errlen)
{
    if (user == NULL || n == NULL || (devs == NULL && max > 0))
        return px_err(err, errlen, "presence devices: user, devs and n are required");
    *n = 0;
    sm_gw *rec = px_malloc(SM_MAX_PRESENCE * sizeof(*rec));
    size_t nrec = 0;
    bson_t *filter = BCON_NEW("user", BCON_UTF8(user));
    int rc = sm_find_gws(st, "connections", filter, "device", rec, SM_MAX_PRESENCE, &nrec,
                         "presence devices", err, errlen);
    for (size_t i = 0; rc == PX_OK && i < nrec; i++)
        if (rec[i].name[0] != '\0') /* "": a connection of no known device */
            sm_add_unique(devs, max, n, rec[i].name);
    bson_destroy(filter);
    free(rec);
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
    rc = sm_each(st, "connections", ops, n, 1, "presence expire", err, errlen);
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

int store_presence_count(store *st, const char *user, int64_t *count, char *err, size_t errlen)
{
    return sm_count_user(st, "connections", user, count, "presence count", err, errlen);
}

int store_gateway_list(store *st, int64_t alive_after_ms, char (*gws)[65], size_t max,
                       size_t *n, char *err, size_t errlen)
{
    if (n == NULL || (gws == NULL && max > 0))
        return px_err(err, errlen, "gateway list: gws and n are required");
    *n = 0;
    if (max == 0)
        return PX_OK;
    sm_gw *live = px_malloc(max * sizeof(*live));
    size_t nlive = 0;
    bson_t *filter = BCON_NEW("ts", "{", "$gte", BCON_DATE_TIME(alive_after_ms), "}");
    int rc = sm_find_gws(st, "gateways", filter, "_id", live, max, &nlive, "gateway list", err,
                         errlen);
    for (size_t i = 0; rc == PX_OK && i < nlive; i++)
        sm_add_unique(gws, max, n, live[i].name);
    bson_destroy(filter);
    free(live);
    return rc;
}
