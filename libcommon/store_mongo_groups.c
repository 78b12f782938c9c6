/* store.h's groups over the MongoDB wire protocol: one document per group,
 * replaced whole, read by _id; see store_mongo.c. */
#include "store_mongo_int.h"

#include <stdlib.h>
#include <string.h>

/* ---- groups ------------------------------------------------------------- */

/* groups {_id: group id, name, creator, members: [join order], admins,
 * invited, applied, ts} (invited is missing in records older than it). Looked up by _id only; one document per group, replaced
 * whole, so each change is single-document atomic. */

static int sm_check_group(const store_group *g, char *err, size_t errlen)
{
    if (!sm_str_ok(g->id) || !sm_str_ok(g->name) || !sm_str_ok(g->creator))
        return px_err(err, errlen, "group put: id, name or creator empty or not UTF-8");
    if (g->nmembers + g->ninvited > STORE_GROUP_MAX || g->nadmins > g->nmembers)
        return px_err(err, errlen, "group put: %zu members, %zu admins, %zu invited",
                      g->nmembers, g->nadmins, g->ninvited);
    if (sm_check_strs(g->members, g->nmembers, "group put: members", err, errlen) != PX_OK ||
        sm_check_strs(g->invited, g->ninvited, "group put: invited", err, errlen) != PX_OK)
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
    sm_append_str_array(doc, "invited", g->invited, g->ninvited);
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
    const char *invited[STORE_GROUP_MAX];
} sm_group_buf;

static int sm_group_parse(const bson_t *doc, store_group *g, sm_group_buf *b)
{
    bson_iter_t it;
    size_t nm = 0, na = 0, ni = 0;
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
        else if (strcmp(k, "invited") == 0)
            rc = sm_iter_strs(&it, b->invited, STORE_GROUP_MAX, &ni);
        else if (strcmp(k, "applied") == 0)
            rc = sm_iter_int64(&it, &g->applied);
        else if (strcmp(k, "ts") == 0)
            rc = sm_iter_int64(&it, &g->ts_ms);
    }
    g->members = b->members;
    g->nmembers = nm;
    g->admins = b->admins;
    g->nadmins = na;
    g->invited = b->invited;
    g->ninvited = ni;
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

