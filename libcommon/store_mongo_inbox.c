/* store.h's inbox (put, scan, the two halves of an ack, sweep, count) and
 * seen claims (dedupe) over the MongoDB wire protocol; see store_mongo.c. */
#include "store_mongo_int.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

static int sm_inbox_doc(bson_t *doc, const store_event *ev, size_t i, char *err, size_t errlen)
{
    if (!sm_str_ok(ev->user) || !sm_str_ok(ev->id))
        return px_err(err, errlen, "inbox put: event %zu: user or id missing or not UTF-8", i);
    if (ev->kind < STORE_MESSAGE || ev->kind > STORE_KIND_MAX)
        return px_err(err, errlen, "inbox put: event %zu has bad kind %d", i, ev->kind);
    if (ev->sender != NULL && !sm_text_ok(ev->sender, strlen(ev->sender)))
        return px_err(err, errlen, "inbox put: event %zu: sender is not UTF-8", i);
    if (ev->json_len > INT_MAX || !sm_text_ok(ev->json, ev->json_len))
        return px_err(err, errlen, "inbox put: event %zu: json missing or not UTF-8", i);
    bson_init(doc);
    BSON_APPEND_UTF8(doc, "user", ev->user);
    BSON_APPEND_UTF8(doc, "id", ev->id);
    BSON_APPEND_INT64(doc, "seq", ev->seq);
    sm_append_ts(doc, ev->ts_ms);
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
        ev->kind < STORE_MESSAGE || ev->kind > STORE_KIND_MAX)
        return PX_ERROR;
    return PX_OK;
}

/* A user's ack marks, read once per scan or get: id -> the devices that
 * acked it. Sorted for bsearch; strings copied (the documents die with
 * their cursor step). */
typedef struct sm_mark {
    char *id;
    char *dev;
} sm_mark;

typedef struct sm_marks {
    sm_mark *m;
    size_t n, cap;
} sm_marks;

static int sm_mark_cmp(const void *a, const void *b)
{
    const sm_mark *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    return c != 0 ? c : strcmp(x->dev, y->dev);
}

static void sm_marks_free(sm_marks *ms)
{
    for (size_t i = 0; i < ms->n; i++) {
        free(ms->m[i].id);
        free(ms->m[i].dev);
    }
    free(ms->m);
    memset(ms, 0, sizeof(*ms));
}

static void sm_marks_add(sm_marks *ms, const bson_t *doc)
{
    bson_iter_t it;
    const char *id = NULL, *dev = NULL;
    if (bson_iter_init_find(&it, doc, "id") && BSON_ITER_HOLDS_UTF8(&it))
        id = bson_iter_utf8(&it, NULL);
    if (bson_iter_init_find(&it, doc, "dev") && BSON_ITER_HOLDS_UTF8(&it))
        dev = bson_iter_utf8(&it, NULL);
    if (id == NULL || dev == NULL)
        return;
    if (ms->n == ms->cap) {
        ms->cap = ms->cap ? 2 * ms->cap : 16;
        ms->m = px_realloc(ms->m, ms->cap * sizeof(*ms->m));
    }
    ms->m[ms->n++] = (sm_mark){ px_strdup(id), px_strdup(dev) };
}

/* The marks matching filter, sorted by (id, dev). */
static int sm_marks_read(store *st, const bson_t *filter, sm_marks *ms, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    const bson_t *doc;
    bson_error_t error;
    int rc = PX_OK;

    sm_conn_get(st, "inbox_acks", &sc);
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(sc.coll, filter, NULL, NULL);
    while (mongoc_cursor_next(cur, &doc))
        sm_marks_add(ms, doc);
    if (mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, "inbox marks", &error);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    if (ms->n > 1)
        qsort(ms->m, ms->n, sizeof(*ms->m), sm_mark_cmp);
    return rc;
}

/* Fills ev->acked from the marks of ev->id; 1 if dev (may be NULL) is
 * among them. */
static int sm_marks_attach(const sm_marks *ms, store_event *ev, const char *dev)
{
    sm_mark probe = { (char *)ev->id, "" };
    size_t lo = 0, hi = ms->n;
    int mine = 0;
    while (lo < hi) { /* the first mark with id >= ev->id */
        size_t mid = lo + (hi - lo) / 2;
        if (sm_mark_cmp(&ms->m[mid], &probe) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t i = lo; i < ms->n && strcmp(ms->m[i].id, ev->id) == 0; i++) {
        if (ev->nacked < STORE_ACKED_MAX)
            ev->acked[ev->nacked++] = ms->m[i].dev;
        mine |= dev != NULL && strcmp(ms->m[i].dev, dev) == 0;
    }
    return mine;
}

/* The scan's marks: those of user on events past after_seq. */
static int sm_scan_marks(store *st, const char *user, int64_t after_seq, sm_marks *ms,
                         char *err, size_t errlen)
{
    bson_t *filter = BCON_NEW("user", BCON_UTF8(user), "seq", "{", "$gt", BCON_INT64(after_seq),
                              "}");
    int rc = sm_marks_read(st, filter, ms, err, errlen);
    bson_destroy(filter);
    return rc;
}

/* Events dev acked are skipped here, not in the query (FerretDB would
 * evaluate that filter itself anyway), so the query has no limit: the
 * cursor stops after limit visits. */
int store_inbox_scan(store *st, const char *user, const char *dev, int64_t after_seq,
                     size_t limit, store_event_cb cb, void *arg, char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    sm_marks ms = { 0 };
    mongoc_cursor_t *cur = NULL;
    const bson_t *doc;
    bson_error_t error;
    store_event ev;
    size_t visited = 0;
    int rc;

    if (user == NULL || cb == NULL)
        return px_err(err, errlen, "inbox scan: user and cb are required");
    if (limit == 0)
        return PX_OK;
    rc = sm_scan_marks(st, user, after_seq, &ms, err, errlen);
    if (rc != PX_OK)
        goto out;
    bson_t *filter = BCON_NEW("user", BCON_UTF8(user), "seq", "{", "$gt", BCON_INT64(after_seq),
                              "}");
    bson_t *opts = BCON_NEW("sort", "{", "seq", BCON_INT32(1), "}", "batchSize",
                            BCON_INT32((int32_t)PX_MIN(limit, (size_t)SM_SCAN_BATCH)));
    sm_conn_get(st, "inbox", &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, filter, opts, NULL);
    while (rc == PX_OK && visited < limit && mongoc_cursor_next(cur, &doc)) {
        if (sm_event_parse(doc, &ev) != PX_OK) {
            rc = px_err(err, errlen, "inbox scan: malformed inbox document");
            break;
        }
        if (sm_marks_attach(&ms, &ev, dev))
            continue;
        visited++;
        rc = cb(arg, &ev);
    }
    if (rc == PX_OK && mongoc_cursor_error(cur, &error))
        rc = sm_fail(err, errlen, "inbox scan", &error);
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(filter);
    bson_destroy(opts);
out:
    sm_marks_free(&ms);
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

/* Fills *ops (one per user, in user order: the inbox's (user, id) index
 * serves each) and runs them. */
static int sm_by_user(store *st, const char *coll, const store_key *keys, size_t n, int del,
                      sm_op **ops_out, size_t *nops_out, char *err, size_t errlen)
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
    return sm_each(st, coll, ops, nops, del, del ? "inbox delete" : "inbox get", err, errlen);
}

/* One user's marks for store_inbox_get, read side by side with the other
 * users' (one call each; one after another they were most of an ack
 * chunk's time on FerretDB). */
typedef struct sm_marks_job {
    store *st;
    const sm_op *op;
    sm_marks ms;
    int rc;
    char err[PX_ERRLEN];
} sm_marks_job;

static void sm_marks_run(void *arg, size_t i)
{
    sm_marks_job *j = (sm_marks_job *)arg + i;
    j->rc = j->op->ndocs == 0 ? PX_OK /* none of this user's events found */
                              : sm_marks_read(j->st, &j->op->filter, &j->ms, j->err,
                                              sizeof(j->err));
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
    int rc = sm_by_user(st, "inbox", keys, n, 0, &ops, &nops, err, errlen);
    sm_marks_job *jobs = px_calloc(nops, sizeof(*jobs));
    for (size_t i = 0; i < nops; i++)
        jobs[i] = (sm_marks_job){ .st = st, .op = &ops[i] };
    if (rc == PX_OK)
        px_parallel(nops, SM_CONCURRENCY, sm_marks_run, jobs);
    for (size_t i = 0; i < nops && rc == PX_OK; i++) {
        if (jobs[i].rc != PX_OK)
            rc = px_err(err, errlen, "%s", jobs[i].err);
        for (size_t d = 0; d < ops[i].ndocs && rc == PX_OK; d++) {
            if (sm_event_parse(ops[i].docs[d], &ev) != PX_OK) {
                rc = px_err(err, errlen, "inbox get: malformed inbox document");
                break;
            }
            sm_marks_attach(&jobs[i].ms, &ev, NULL);
            rc = cb(arg, &ev);
        }
    }
    for (size_t i = 0; i < nops; i++)
        sm_marks_free(&jobs[i].ms);
    free(jobs);
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
    int rc = sm_by_user(st, "inbox", keys, n, 1, &ops, &nops, err, errlen);
    for (size_t i = 0; i < nops; i++)
        total += ops[i].removed;
    sm_ops_free(ops, nops);
    if (removed != NULL)
        *removed = total;
    return rc;
}

int store_inbox_unmark(store *st, const store_key *keys, size_t n, char *err, size_t errlen)
{
    sm_op *ops = NULL;
    size_t nops = 0;

    if (sm_check_keys(keys, n, "inbox unmark", err, errlen) != PX_OK)
        return PX_ERROR;
    if (n == 0)
        return PX_OK;
    int rc = sm_by_user(st, "inbox_acks", keys, n, 1, &ops, &nops, err, errlen);
    sm_ops_free(ops, nops);
    return rc;
}

/* inbox_acks {_id: "user/id/dev", user, id, dev, seq, ts}: inserts only (a
 * repeat is a duplicate _id, absorbed). FerretDB 1.24 over PostgreSQL
 * never gave back the pool connections of updates of inbox documents
 * ($addToSet by _id wedged the whole server), so marks are documents of
 * their own, and the inbox document is never updated. seq and ts are the
 * event's: a scan reads the marks past its start, the sweep takes them
 * with their events. */
static int sm_mark_doc(bson_t *doc, const store_event *ev, const char *dev)
{
    size_t len = strlen(ev->user) + strlen(ev->id) + strlen(dev) + 3;
    char *id = px_malloc(len);
    snprintf(id, len, "%s/%s/%s", ev->user, ev->id, dev);
    bson_init(doc);
    BSON_APPEND_UTF8(doc, "_id", id);
    BSON_APPEND_UTF8(doc, "user", ev->user);
    BSON_APPEND_UTF8(doc, "id", ev->id);
    BSON_APPEND_UTF8(doc, "dev", dev);
    BSON_APPEND_INT64(doc, "seq", ev->seq);
    sm_append_ts(doc, ev->ts_ms);
    free(id);
    return PX_OK;
}

int store_inbox_mark(store *st, const store_event *ev, size_t n, const char *dev, char *err,
                     size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_bulk_operation_t *bulk = NULL;
    bson_error_t error;
    bson_t doc;
    int rc = sm_check_n(n, "inbox mark", err, errlen);

    if (rc != PX_OK || n == 0)
        return rc;
    if (!sm_str_ok(dev))
        return px_err(err, errlen, "inbox mark: dev missing or not UTF-8");
    for (size_t i = 0; i < n; i++)
        if (!sm_str_ok(ev[i].user) || !sm_str_ok(ev[i].id))
            return px_err(err, errlen, "inbox mark: event %zu: user or id missing", i);
    sm_conn_get(st, "inbox_acks", &sc);
    bulk = sm_bulk_new(&sc, false);
    for (size_t i = 0; i < n && rc == PX_OK; i++) {
        sm_mark_doc(&doc, &ev[i], dev);
        if (!mongoc_bulk_operation_insert_with_opts(bulk, &doc, NULL, &error))
            rc = sm_fail(err, errlen, "inbox mark", &error);
        bson_destroy(&doc);
    }
    if (rc == PX_OK)
        rc = sm_bulk_insert_run(bulk, n, NULL, "inbox mark", err, errlen);
    mongoc_bulk_operation_destroy(bulk);
    sm_conn_put(st, &sc);
    return rc;
}

int store_inbox_sweep(store *st, int64_t cutoff_ms, int64_t *removed, char *err, size_t errlen)
{
    int rc = sm_sweep(st, "inbox", cutoff_ms, removed, "inbox sweep", err, errlen);
    if (rc == PX_OK)
        rc = sm_sweep(st, "inbox_acks", cutoff_ms, NULL, "inbox sweep", err, errlen);
    return rc;
}

int store_inbox_count(store *st, const char *user, int64_t *count, char *err, size_t errlen)
{
    return sm_count_user(st, "inbox", user, count, "inbox count", err, errlen);
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
        sm_append_ts(&doc, ts_ms);
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

