/* store.h's media over the MongoDB wire protocol: upload chunks, media
 * records deduplicated by sha256, access grants and the sweep; see
 * store_mongo.c. */
#include "store_mongo_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* media_alias {_id: media id, content: the media id holding the bytes,
 * content_type, ts}: the record of a later uploader of stored bytes. Its
 * ts never passes its content's (every touch of an alias touches the
 * content first), so the sweep takes an alias no later than its bytes. */
static int sm_alias_find(store *st, const char *id, char content[STORE_MEDIA_ID_MAX + 1],
                         char type[STORE_MEDIA_TYPE_MAX + 1], int64_t *ts, const char *what,
                         char *err, size_t errlen)
{
    sm_conn sc = { 0 };
    mongoc_cursor_t *cur;
    const bson_t *doc;
    bson_error_t error;
    bson_iter_t it;
    bson_t filter = BSON_INITIALIZER;
    int rc = PX_DECLINED;

    BSON_APPEND_UTF8(&filter, "_id", id);
    sm_conn_get(st, "media_alias", &sc);
    cur = mongoc_collection_find_with_opts(sc.coll, &filter, NULL, NULL);
    if (mongoc_cursor_next(cur, &doc)) {
        rc = bson_iter_init_find(&it, doc, "content") &&
                     sm_copy_str(content, STORE_MEDIA_ID_MAX + 1, &it) == PX_OK &&
                     bson_iter_init_find(&it, doc, "content_type") &&
                     sm_copy_str(type, STORE_MEDIA_TYPE_MAX + 1, &it) == PX_OK &&
                     bson_iter_init_find(&it, doc, "ts") && sm_iter_int64(&it, ts) == PX_OK
                 ? PX_OK : px_err(err, errlen, "%s: malformed alias document", what);
    } else if (mongoc_cursor_error(cur, &error)) {
        rc = sm_fail(err, errlen, what, &error);
    }
    mongoc_cursor_destroy(cur);
    sm_conn_put(st, &sc);
    bson_destroy(&filter);
    return rc;
}

int store_media_get(store *st, const char *id, store_media *m, char *err, size_t errlen)
{
    char content[STORE_MEDIA_ID_MAX + 1], type[STORE_MEDIA_TYPE_MAX + 1];
    int64_t ts = 0;

    if (m == NULL || sm_check_media_id(id, "media get", err, errlen) != PX_OK)
        return px_err(err, errlen, "media get: bad id or NULL record");
    int rc = sm_media_find(st, "_id", id, m, "media get", err, errlen);
    if (rc == PX_DECLINED)
        rc = sm_alias_find(st, id, content, type, &ts, "media get", err, errlen);
    else
        return rc;
    if (rc == PX_OK)
        rc = sm_media_find(st, "_id", content, m, "media get", err, errlen);
    if (rc == PX_OK) {
        snprintf(m->id, sizeof(m->id), "%s", id);
        memcpy(m->content_type, type, sizeof(type));
        m->ts_ms = ts;
    }
    return rc;
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

/* Moves the ts of coll's document id up to ts_ms ($max: never back).
 * PX_DECLINED when the document is gone (never existed, or swept). */
static int sm_touch(store *st, const char *coll, const char *id, int64_t ts_ms, char *err,
                    size_t errlen)
{
    sm_conn sc = { 0 };
    bson_t *sel = BCON_NEW("_id", BCON_UTF8(id));
    bson_t *upd = BCON_NEW("$max", "{", "ts", BCON_DATE_TIME(ts_ms), "}");
    bson_t reply;
    bson_iter_t it;
    bson_error_t error;
    int rc = PX_OK;

    sm_conn_get(st, coll, &sc);
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

/* Moves a media's ts up to ts_ms: a record of the bytes' own, or an alias
 * and (first) its content. PX_DECLINED when gone. */
static int sm_media_touch(store *st, const char *id, int64_t ts_ms, char *err, size_t errlen)
{
    char content[STORE_MEDIA_ID_MAX + 1], type[STORE_MEDIA_TYPE_MAX + 1];
    int64_t ts;
    int rc = sm_touch(st, "media", id, ts_ms, err, errlen);
    if (rc == PX_DECLINED)
        rc = sm_alias_find(st, id, content, type, &ts, "media touch", err, errlen);
    else
        return rc;
    if (rc == PX_OK)
        rc = sm_touch(st, "media", content, ts_ms, err, errlen);
    if (rc == PX_OK)
        rc = sm_touch(st, "media_alias", id, ts_ms, err, errlen);
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

/* Equal bytes were committed first (maybe concurrently): m becomes an
 * alias of that record, keeping its own id and content type, with the
 * content's upload and size. The content's ts moves up first, so the sweep
 * (which re-checks ts as it deletes) keeps the bytes. The caller drops its
 * own chunks. */
static int sm_media_alias(store *st, store_media *m, char *err, size_t errlen)
{
    store_media c;
    sm_conn sc = { 0 };
    bson_error_t error;
    int rc = sm_media_find(st, "sha256", m->sha256, &c, "media commit", err, errlen);
    if (rc == PX_OK)
        rc = sm_touch(st, "media", c.id, m->ts_ms, err, errlen);
    if (rc == PX_DECLINED)
        return px_err(err, errlen, "media commit: duplicate of %s but no record found "
                      "(swept meanwhile?); retry", m->sha256);
    if (rc != PX_OK)
        return rc;
    bson_t *doc = BCON_NEW("_id", BCON_UTF8(m->id), "content", BCON_UTF8(c.id), "content_type",
                           BCON_UTF8(m->content_type), "ts", BCON_DATE_TIME(m->ts_ms));
    sm_conn_get(st, "media_alias", &sc);
    if (!mongoc_collection_insert_one(sc.coll, doc, NULL, NULL, &error))
        rc = sm_fail(err, errlen, "media commit", &error);
    sm_conn_put(st, &sc);
    bson_destroy(doc);
    memcpy(m->upload, c.upload, sizeof(m->upload));
    m->size = c.size;
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
    if (rc == PX_DECLINED)
        rc = sm_media_alias(st, m, err, errlen);
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

/* Aliases untouched since the cutoff, each deleted only if its ts is still
 * old (a grant since keeps it), then its grants. */
static int sm_alias_sweep(store *st, int64_t cutoff_ms, int64_t *gone, char *err, size_t errlen)
{
    char (*ids)[STORE_MEDIA_ID_MAX + 1] = px_malloc(SM_MAX_BATCH * sizeof(*ids));
    bson_t filter = BSON_INITIALIZER;
    size_t n = 0;

    sm_append_lt_date(&filter, "ts", cutoff_ms);
    int rc = sm_collect_ids(st, "media_alias", &filter, "_id", ids, SM_MAX_BATCH, &n,
                            "media sweep", err, errlen);
    for (size_t i = 0; rc == PX_OK && i < n; i++) {
        sm_conn sc = { 0 };
        int64_t deleted = 0;
        bson_reinit(&filter);
        BSON_APPEND_UTF8(&filter, "_id", ids[i]);
        sm_append_lt_date(&filter, "ts", cutoff_ms);
        sm_conn_get(st, "media_alias", &sc);
        rc = sm_delete_many(&sc, &filter, &deleted, "media sweep", err, errlen);
        sm_conn_put(st, &sc);
        if (rc == PX_OK && deleted > 0) {
            (*gone)++;
            rc = sm_delete_by(st, "media_access", "media", ids[i], NULL, "media sweep", err,
                              errlen);
        }
    }
    bson_destroy(&filter);
    free(ids);
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
    int rc = sm_alias_sweep(st, cutoff_ms, &nm, err, errlen);

    if (rc == PX_OK)
        rc = sm_media_sweep_old(st, cutoff_ms, &nm, err, errlen);
    if (rc == PX_OK)
        rc = sm_media_sweep_orphans(st, orphan_cutoff_ms, &no, err, errlen);
    if (media != NULL)
        *media = nm;
    if (orphans != NULL)
        *orphans = no;
    return rc;
}
