/* store.h's devices over the MongoDB wire protocol: one document per
 * (user, device), {_id: "user/dev", user, dev, first, last, since,
 * unlinked, push_gone (issue 18, absent: never)}, {user:1}; see store_mongo.c. Without transactions the limit
 * is kept by insert-then-count: a device that finds itself past the limit
 * after its insert removes itself, so two racing for the last place may
 * both be refused, never both admitted. */
#include "store_mongo_int.h"

#include <stdlib.h>
#include <string.h>

static void sm_device_id(bson_t *b, const char *user, const char *dev)
{
    char id[2 * 65];
    snprintf(id, sizeof(id), "%s/%s", user, dev);
    BSON_APPEND_UTF8(b, "_id", id);
}

/* Parses one device document; strings point into doc. */
static int sm_device_parse(const bson_t *doc, store_device *d)
{
    bson_iter_t it;
    memset(d, 0, sizeof(*d));
    d->since = STORE_DEVICE_UNSYNCED;
    if (!bson_iter_init(&it, doc))
        return PX_ERROR;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "user") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            d->user = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "dev") == 0 && BSON_ITER_HOLDS_UTF8(&it))
            d->dev = bson_iter_utf8(&it, NULL);
        else if (strcmp(k, "first") == 0)
            sm_iter_int64(&it, &d->first_ms);
        else if (strcmp(k, "last") == 0)
            sm_iter_int64(&it, &d->last_ms);
        else if (strcmp(k, "since") == 0)
            sm_iter_int64(&it, &d->since);
        else if (strcmp(k, "unlinked") == 0 && BSON_ITER_HOLDS_BOOL(&it))
            d->unlinked = bson_iter_bool(&it);
        else if (strcmp(k, "push_gone") == 0)
            sm_iter_int64(&it, &d->push_gone_ms);
    }
    return d->user != NULL && d->dev != NULL ? PX_OK : PX_ERROR;
}

int store_device_list(store *st, const char *user, store_device_cb cb, void *arg, char *err,
                      size_t errlen)
{
    sm_conn sc = { 0 };
    const bson_t *doc;
    bson_error_t error;
    store_device d;
    int rc = PX_OK;

    if (user == NULL || cb == NULL)
        return px_err(err, errlen, "device list: user and cb are required");
    bson_t *filter = BCON_NEW("user", BCON_UTF8(user));
    sm_conn_get(st, "devices", &sc);
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(sc.coll, filter, NULL, NULL);
    while (rc == PX_OK && mongoc_cursor_next(cur, &doc))
        rc = sm_device_parse(doc, &d) == PX_OK
                 ? cb(arg, &d)
                 : px_err(err, errlen, "device list: malformed device document");
    if (rc == PX_OK && mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, "device list", &error);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(filter);
    return rc;
}

/* What touch needs to know about the user's devices. */
typedef struct sm_device_seen {
    const char *dev;
    int found, unlinked;
    long linked;
    int64_t mine_first;   /* first_ms of dev */
    long older;           /* linked devices registered before dev (ties: by id) */
} sm_device_seen;

static int sm_device_seen_cb(void *arg, const store_device *d)
{
    sm_device_seen *s = arg;
    if (strcmp(d->dev, s->dev) == 0) {
        s->found = 1;
        s->unlinked = d->unlinked;
        return PX_OK;
    }
    if (!d->unlinked)
        s->linked++;
    return PX_OK;
}

/* Linked devices other than seen->dev registered before it (ties broken by
 * id), after its insert: its place in the order of arrival. */
static int sm_device_rank_cb(void *arg, const store_device *d)
{
    sm_device_seen *s = arg;
    if (!d->unlinked && strcmp(d->dev, s->dev) != 0 &&
        (d->first_ms < s->mine_first ||
         (d->first_ms == s->mine_first && strcmp(d->dev, s->dev) < 0)))
        s->older++;
    return PX_OK;
}

static int sm_device_update(store *st, const char *user, const char *dev, const bson_t *upd,
                            int upsert, const char *what, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    bson_error_t error;
    bson_t sel = BSON_INITIALIZER;
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(upsert != 0));
    int rc = PX_OK;

    sm_device_id(&sel, user, dev);
    sm_conn_get(st, "devices", &sc);
    bool ok = mongoc_collection_update_one(sc.coll, &sel, upd, opts, NULL, &error);
    /* Two upserts of one new device at once (a client reconnecting while
     * its first attempt is still being registered): the loser's insert
     * hits the _id the winner made. Its update now finds that document, as
     * MongoDB's documentation advises for upserts on a unique key. */
    if (!ok && upsert && error.code == SM_DUP_KEY)
        ok = mongoc_collection_update_one(sc.coll, &sel, upd, opts, NULL, &error);
    if (!ok)
        rc = sm_fail(err, errlen, what, &error);
    sm_conn_put(st, &sc);
    bson_destroy(&sel);
    bson_destroy(opts);
    return rc;
}

static int sm_device_remove(store *st, const char *user, const char *dev, char *err,
                            size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t sel = BSON_INITIALIZER;
    int64_t removed = 0;

    sm_device_id(&sel, user, dev);
    sm_conn_get(st, "devices", &sc);
    int rc = sm_delete_many(&sc, &sel, &removed, "device touch", err, errlen);
    sm_conn_put(st, &sc);
    bson_destroy(&sel);
    return rc;
}

int store_device_touch(store *st, const char *user, const char *dev, int64_t now_ms, long max,
                       int *status, char *err, size_t errlen)
{
    sm_device_seen s = { .dev = dev };
    int rc;

    *status = STORE_DEVICE_OK;
    if (!sm_str_ok(user) || !sm_str_ok(dev))
        return px_err(err, errlen, "device touch: user or dev missing or not UTF-8");
    rc = store_device_list(st, user, sm_device_seen_cb, &s, err, errlen);
    if (rc != PX_OK)
        return rc;
    if (s.found && s.unlinked) {
        *status = STORE_DEVICE_UNLINKED;
        return PX_OK;
    }
    if (!s.found && s.linked >= max) {
        *status = STORE_DEVICE_FULL;
        return PX_OK;
    }
    bson_t *upd = BCON_NEW("$max", "{", "last", BCON_INT64(now_ms), "}", "$setOnInsert", "{",
                           "user", BCON_UTF8(user), "dev", BCON_UTF8(dev), "first",
                           BCON_INT64(now_ms), "since", BCON_INT64(STORE_DEVICE_UNSYNCED),
                           "unlinked", BCON_BOOL(false), "}");
    rc = sm_device_update(st, user, dev, upd, 1, "device touch", err, errlen);
    bson_destroy(upd);
    if (rc != PX_OK || s.found)
        return rc;
    /* A new device: is it still within the limit now that it is in? */
    s.mine_first = now_ms;
    rc = store_device_list(st, user, sm_device_rank_cb, &s, err, errlen);
    if (rc == PX_OK && s.older >= max) {
        *status = STORE_DEVICE_FULL;
        rc = sm_device_remove(st, user, dev, err, errlen);
    }
    return rc;
}

int store_device_link(store *st, const char *user, const char *dev, int64_t since, char *err,
                      size_t errlen)
{
    if (!sm_str_ok(user) || !sm_str_ok(dev))
        return px_err(err, errlen, "device link: user or dev missing or not UTF-8");
    /* Filtered by _id alone (see sm_inbox_id); $min keeps an earlier link,
     * and only an unsynced device (since = INT64_MAX) moves. */
    bson_t *upd = BCON_NEW("$min", "{", "since", BCON_INT64(since), "}");
    int rc = sm_device_update(st, user, dev, upd, 0, "device link", err, errlen);
    bson_destroy(upd);
    return rc;
}

int store_device_unlink(store *st, const char *user, const char *dev, char *err, size_t errlen)
{
    sm_device_seen s = { .dev = dev };
    if (!sm_str_ok(user) || !sm_str_ok(dev))
        return px_err(err, errlen, "device unlink: user or dev missing or not UTF-8");
    int rc = store_device_list(st, user, sm_device_seen_cb, &s, err, errlen);
    if (rc != PX_OK)
        return rc;
    if (!s.found)
        return PX_DECLINED;
    bson_t *upd = BCON_NEW("$set", "{", "unlinked", BCON_BOOL(true), "}");
    rc = sm_device_update(st, user, dev, upd, 0, "device unlink", err, errlen);
    bson_destroy(upd);
    return rc;
}

int store_device_push_gone(store *st, const char *user, const char *dev, int64_t at_ms,
                           char *err, size_t errlen)
{
    if (!sm_str_ok(user) || !sm_str_ok(dev))
        return px_err(err, errlen, "device push gone: user or dev missing or not UTF-8");
    bson_t *upd = BCON_NEW("$max", "{", "push_gone", BCON_INT64(at_ms), "}");
    int rc = sm_device_update(st, user, dev, upd, 0, "device push gone", err, errlen);
    bson_destroy(upd);
    return rc;
}
