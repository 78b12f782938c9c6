/* store.h's presence to contacts (issue 18) over the MongoDB wire protocol:
 * the contacts pairs (collection contacts, _id "<lower id>/<higher id>"),
 * each user's last seen and its hide setting (presence_users, _id the
 * user), and the state presence tells watchers; see store_mongo.c. */
#include "store_mongo_int.h"

#include <stdlib.h>
#include <string.h>

/* "<lower>/<higher>": one document per unordered pair ('/' is no user id
 * character, so the name is unambiguous). Caller frees. */
static char *sm_pair_id(const char *x, const char *y)
{
    int lt = strcmp(x, y) < 0;
    const char *lo = lt ? x : y, *hi = lt ? y : x;
    size_t n = strlen(lo) + strlen(hi) + 2;
    char *id = px_malloc(n);
    snprintf(id, n, "%s/%s", lo, hi);
    return id;
}

int store_contacts_put(store *st, const store_pair *p, size_t n, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk;
    bson_error_t error;
    bson_t doc;
    int rc = sm_check_n(n, "contacts put", err, errlen);

    for (size_t i = 0; i < n && rc == PX_OK; i++)
        if (!sm_str_ok(p[i].a) || !sm_str_ok(p[i].b) || strcmp(p[i].a, p[i].b) == 0)
            rc = px_err(err, errlen, "contacts put: pair %zu: two distinct user ids needed", i);
    if (rc != PX_OK || n == 0)
        return rc;
    sm_conn_get(st, "contacts", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        char *id = sm_pair_id(p[i].a, p[i].b);
        bson_init(&doc);
        BSON_APPEND_UTF8(&doc, "_id", id);
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "contacts put", &error);
        bson_destroy(&doc);
        free(id);
    }
    if (rc == PX_OK)
        rc = sm_bulk_insert_run(bulk, n, NULL, "contacts put", err, errlen);
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

/* The documents of coll whose field key is one of v (n strings); cb(arg,
 * doc) for each. One find per distinct value, SM_CONCURRENCY at a time
 * (sm_each): FerretDB cannot push an $in down, and one over contacts or
 * presence_users read the whole collection into FerretDB on every presence
 * subscription and every watcher's state (a few thousand records in one
 * chaos run, scanned on each reconnect). */
typedef void (*sm_doc_cb)(void *arg, const bson_t *doc);

static int sm_find_in(store *st, const char *coll, const char *key, const char *const *v,
                      size_t n, sm_doc_cb cb, void *arg, const char *what, char *err,
                      size_t errlen)
{
    size_t nops = 0;
    sm_op *ops = sm_ops_by(key, v, n, &nops);
    int rc = sm_each(st, coll, ops, nops, 0, what, err, errlen);

    for (size_t i = 0; i < nops && rc == PX_OK; i++)
        for (size_t d = 0; d < ops[i].ndocs; d++)
            cb(arg, ops[i].docs[d]);
    sm_ops_free(ops, nops);
    return rc;
}

/* Sets flags[i] for each name i of names that doc's key names. */
typedef struct sm_flag_ctx {
    const char *key;
    const char *const *names;
    size_t n;
    int *flags;
} sm_flag_ctx;

static void sm_flag_doc(void *arg, const bson_t *doc)
{
    sm_flag_ctx *f = arg;
    bson_iter_t it;
    if (!bson_iter_init_find(&it, doc, f->key) || !BSON_ITER_HOLDS_UTF8(&it))
        return;
    const char *v = bson_iter_utf8(&it, NULL);
    for (size_t i = 0; i < f->n; i++)
        if (strcmp(f->names[i], v) == 0)
            f->flags[i] = 1;
}

int store_contacts_check(store *st, const char *user, const char *const *others, size_t n,
                         int *is_contact, char *err, size_t errlen)
{
    int rc = sm_check_n(n, "contacts check", err, errlen);
    if (rc == PX_OK && (!sm_str_ok(user) || (n > 0 && (others == NULL || is_contact == NULL))))
        rc = px_err(err, errlen, "contacts check: user, others and is_contact are required");
    if (rc == PX_OK)
        rc = sm_check_strs(others, n, "contacts check", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    char **ids = px_malloc(n * sizeof(*ids));
    for (size_t i = 0; i < n; i++) {
        ids[i] = sm_pair_id(user, others[i]);
        is_contact[i] = strcmp(user, others[i]) == 0;
    }
    sm_flag_ctx f = { "_id", (const char *const *)ids, n, is_contact };
    rc = sm_find_in(st, "contacts", "_id", (const char *const *)ids, n, sm_flag_doc, &f,
                    "contacts check", err, errlen);
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
    return rc;
}

/* Upserts by _id alone (FerretDB 1.24 over PostgreSQL never gives back the
 * pool connection of an update that filters on other fields). */
static int sm_user_update(store *st, const char *const *users, size_t n, const bson_t *upd,
                          const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk;
    bson_error_t error;
    bson_t reply;
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(true));
    int rc = PX_OK;

    sm_conn_get(st, "presence_users", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        bson_t *sel = BCON_NEW("_id", BCON_UTF8(users[i]));
        if (!mongoc_bulk_operation_update_one_with_opts(bulk, sel, upd, opts, &error))
            rc = sm_fail(err, errlen, what, &error);
        bson_destroy(sel);
    }
    if (rc == PX_OK) {
        if (!mongoc_bulk_operation_execute(bulk, &reply, &error))
            rc = sm_fail(err, errlen, what, &error);
        else
            rc = sm_bulk_wc_errors(&reply, what, err, errlen);
        bson_destroy(&reply);
    }
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    bson_destroy(opts);
    return rc;
}

int store_last_seen_put(store *st, const char *const *users, size_t n, int64_t ts_ms,
                        char *err, size_t errlen)
{
    int rc = sm_check_n(n, "last seen put", err, errlen);
    if (rc == PX_OK)
        rc = sm_check_strs(users, n, "last seen put", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    bson_t *upd = BCON_NEW("$max", "{", "last_seen", BCON_INT64(ts_ms), "}");
    rc = sm_user_update(st, users, n, upd, "last seen put", err, errlen);
    bson_destroy(upd);
    return rc;
}

int store_presence_hide(store *st, const char *user, int hide, char *err, size_t errlen)
{
    if (!sm_str_ok(user))
        return px_err(err, errlen, "presence hide: user missing or not UTF-8");
    bson_t *upd = BCON_NEW("$set", "{", "hide", BCON_BOOL(hide != 0), "}");
    int rc = sm_user_update(st, &user, 1, upd, "presence hide", err, errlen);
    bson_destroy(upd);
    return rc;
}

/* Fills the state of the user a presence_users document names. */
typedef struct sm_state_ctx {
    const char *const *users;
    size_t n;
    store_user_presence *out;
} sm_state_ctx;

static void sm_state_doc(void *arg, const bson_t *doc)
{
    sm_state_ctx *c = arg;
    bson_iter_t it;
    int64_t ts = 0;
    if (!bson_iter_init_find(&it, doc, "_id") || !BSON_ITER_HOLDS_UTF8(&it))
        return;
    const char *user = bson_iter_utf8(&it, NULL);
    int hide = bson_iter_init_find(&it, doc, "hide") && bson_iter_as_bool(&it);
    if (bson_iter_init_find(&it, doc, "last_seen"))
        sm_iter_int64(&it, &ts);
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->users[i], user) == 0) {
            c->out[i].last_seen = ts;
            c->out[i].hide_last_seen = hide;
        }
}

int store_presence_state(store *st, const char *const *users, size_t n,
                         store_user_presence *out, char *err, size_t errlen)
{
    int rc = sm_check_n(n, "presence state", err, errlen);
    if (rc == PX_OK)
        rc = sm_check_strs(users, n, "presence state", err, errlen);
    if (rc != PX_OK || n == 0)
        return rc;
    int *online = px_calloc(n, sizeof(*online));
    memset(out, 0, n * sizeof(*out));
    sm_flag_ctx f = { "user", users, n, online };
    rc = sm_find_in(st, "connections", "user", users, n, sm_flag_doc, &f, "presence state",
                    err, errlen);
    sm_state_ctx c = { users, n, out };
    if (rc == PX_OK)
        rc = sm_find_in(st, "presence_users", "_id", users, n, sm_state_doc, &c,
                        "presence state", err, errlen);
    for (size_t i = 0; i < n; i++)
        out[i].online = online[i];
    free(online);
    return rc;
}
