/* store.h's receipt tracking over the MongoDB wire protocol: one document
 * per (reader, msg_id), looked up and deleted by _id; see store_mongo.c. */
#include "store_mongo_int.h"

#include <stdlib.h>
#include <string.h>

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
        sm_append_ts(&doc, t[i].ts_ms);
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

