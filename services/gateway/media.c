/* Owns the gateway's media: POST /v1/media (streamed into chunk documents
 * while sha256 is computed, the bytes deduplicated by hash at commit, each
 * upload still getting a record and id of its own), GET
 * /v1/media/<id> (streamed back chunk by chunk, one Range), and the media
 * check of a `send` (exists, the sender may read it, grant the recipient),
 * which runs on its own thread so store round trips never stall a worker's
 * reactor. The store handle here serves media only.
 *
 * Memory: an upload holds one chunk (STORE_MEDIA_CHUNK) and a download one
 * chunk, whatever the file size; at most MEDIA_MAX_TRANSFERS of each run at
 * once (503 beyond), so transfers never take more than 2 x 64 x 255 KiB;
 * queued media checks hold a parsed command each (~10 KiB), at most
 * MEDIA_MAX_QUEUE of them. One user may hold PARLEY_MEDIA_USER_SLOTS of
 * each (429 beyond), so one token cannot take every slot, and a transfer
 * must average PARLEY_MEDIA_MIN_RATE after MEDIA_RATE_GRACE_MS, so a
 * trickle cannot hold a slot for the hour an upload may last, nor a
 * download's slow reader for good. An upload is checked as its bytes come;
 * a download by the media thread once a second, on the bytes the peer
 * acknowledged (handed to MHD, less what still waits in the socket's send
 * queue: a send buffer of megabytes would otherwise pass for progress),
 * and a slow one is shut down (shutdown(2): MHD then closes it and frees
 * the download, whose list entry keeps its fd valid until then).
 * MHD's threads run the store calls of uploads and
 * downloads; that delays only other HTTP requests (handshakes) on the same
 * MHD thread, never upgraded sockets, which live on the workers.
 *
 * Served bytes are whatever a user uploaded, under its own Content-Type,
 * from the origin that also serves the web client: responses carry nosniff
 * and a sandboxing CSP so an uploaded HTML page or SVG cannot run script
 * with the web client's origin (and its token). */
#include "auth.h"
#include "httprange.h"
#include "common.h"
#include "gateway.h"
#include "ids.h"
#include "log.h"

#include <ctype.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>

#define MEDIA_PREFIX "/v1/media"
#define MEDIA_MAX_TRANSFERS 64      /* concurrent uploads; and downloads */
#define MEDIA_MAX_QUEUE 256         /* sends waiting for their media check */
#define MEDIA_BLOCK (64 * 1024)     /* MHD's copy buffer for a download */
#define MEDIA_RATE_GRACE_MS 10000   /* before PARLEY_MEDIA_MIN_RATE applies */
#define MEDIA_USER_BUCKETS 256
#define MEDIA_DEFAULT_TYPE "application/octet-stream"

enum media_kind { MEDIA_UPLOAD = 1, MEDIA_DOWNLOAD };

/* MHD's request state for a media url: an upload in progress, or a mark
 * that a download's headers were seen (kind only). */
struct media_req {
    enum media_kind kind;
    char user[65];
    char upload[ID_BUF];
    char content_type[STORE_MEDIA_TYPE_MAX + 1];
    EVP_MD_CTX *md;
    unsigned char *chunk;       /* STORE_MEDIA_CHUNK bytes */
    size_t fill;
    int64_t nchunks, size, ts, t0_mono;
    int too_big, failed, committed;
};

/* One download: the response's reader state, freed by MHD with it, and
 * listed in md->dls (under md->mu) meanwhile for the rate check. */
typedef struct media_dl {
    struct media_dl *prev, *next;
    gw *g;
    int fd;                     /* MHD's socket, valid while listed */
    int dropped;
    int64_t t0_mono;
    _Atomic int64_t sent;       /* bytes handed to MHD */
    char user[65];              /* holds one of its download slots */
    store_media m;
    uint64_t start, len;
    store_chunk_reader *rd;     /* open from the first read on */
    int64_t cached;             /* chunk number in buf, or -1 */
    size_t cached_len;
    unsigned char buf[];        /* STORE_MEDIA_CHUNK */
} media_dl;

/* A send waiting for its media check; owns cmd's strings. */
typedef struct media_job {
    struct media_job *next;
    char user[65];
    char dev[65];               /* the sending connection's device */
    uint64_t conn_id;
    proto_cmd cmd;
} media_job;

/* Transfers one user runs here, by direction (MEDIA_UPLOAD - 1, ...). */
typedef struct media_user {
    struct media_user *next;
    int n[2];
    char user[65];
} media_user;

struct media {
    pthread_t thread;
    pthread_mutex_t mu;         /* the job queue and dls */
    pthread_cond_t cv;
    media_job *head, *tail;
    media_dl *dls;              /* downloads in progress */
    size_t queued;
    int stop, started;
    _Atomic int uploads, downloads;
    pthread_mutex_t umu;        /* users */
    media_user *users[MEDIA_USER_BUCKETS];
    metric *user_refused, *slow_refused, *slow_dl_refused;
};

/* ---- helpers ---- */

int media_route(const char *url)
{
    size_t n = sizeof(MEDIA_PREFIX) - 1;
    return strncmp(url, MEDIA_PREFIX, n) == 0 && (url[n] == '\0' || url[n] == '/');
}

typedef struct media_dev {
    const char *dev;
    int unlinked;
} media_dev;

static int media_dev_cb(void *arg, const store_device *d)
{
    media_dev *m = arg;
    m->unlinked |= d->unlinked && strcmp(d->dev, m->dev) == 0;
    return PX_OK;
}

/* The token, and its device not unlinked (issue 17: an unlinked device's
 * tokens are refused everywhere, media included; one device read). */
static int media_auth(gw *g, struct MHD_Connection *mc, char user[65], char *err,
                      size_t errlen)
{
    char dev[65];
    const char *tok = http_token(mc);
    if (tok == NULL)
        return px_err(err, errlen, "no token");
    if (auth_verify_device(g->auth, tok, px_now_ms() / 1000, user, dev, err, errlen) != PX_OK)
        return PX_ERROR;
    media_dev m = { dev, 0 };
    if (store_device_list(g->st, user, media_dev_cb, &m, err, errlen) != PX_OK)
        return PX_ERROR;
    return m.unlinked ? px_err(err, errlen, "this device was unlinked") : PX_OK;
}

/* Takes a transfer slot from counter; 0 when all MEDIA_MAX_TRANSFERS are
 * busy. */
static int media_slot_take(_Atomic int *counter)
{
    if (atomic_fetch_add(counter, 1) < MEDIA_MAX_TRANSFERS)
        return 1;
    atomic_fetch_sub(counter, 1);
    return 0;
}

static media_user **media_user_slot(media *md, const char *user)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (const char *s = user; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    media_user **pp = &md->users[h % MEDIA_USER_BUCKETS];
    while (*pp != NULL && strcmp((*pp)->user, user) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* Adds d (+1 or -1) to user's transfers of kind; with +1, 0 (and nothing
 * added) when the user holds PARLEY_MEDIA_USER_SLOTS already. */
static int media_user_add(gw *g, const char *user, enum media_kind kind, int d)
{
    media *md = g->md;
    int ok = 1;
    pthread_mutex_lock(&md->umu);
    media_user **pp = media_user_slot(md, user);
    if (*pp == NULL && d > 0) {
        *pp = px_calloc(1, sizeof(**pp));
        snprintf((*pp)->user, sizeof((*pp)->user), "%s", user);
    }
    media_user *u = *pp;
    if (u != NULL && d > 0 && u->n[kind - 1] >= g->cfg.media_user_slots)
        ok = 0;
    else if (u != NULL)
        u->n[kind - 1] += d;
    if (u != NULL && u->n[0] == 0 && u->n[1] == 0) {
        *pp = u->next;
        free(u);
    }
    pthread_mutex_unlock(&md->umu);
    return ok;
}

/* A slot of the gateway's and one of the user's, or the refusal answered. */
static enum MHD_Result media_slots_take(gw *g, struct MHD_Connection *mc, const char *user,
                                        enum media_kind kind, int *ok)
{
    _Atomic int *counter = kind == MEDIA_UPLOAD ? &g->md->uploads : &g->md->downloads;
    *ok = 0;
    if (!media_slot_take(counter))
        return http_json_error(mc, 503, "unavailable", "too many transfers in progress, retry");
    if (!media_user_add(g, user, kind, 1)) {
        atomic_fetch_sub(counter, 1);
        metric_add(g->md->user_refused, 1);
        return http_json_error(mc, 429, "rate_limited",
                               "you run PARLEY_MEDIA_USER_SLOTS transfers already, retry");
    }
    *ok = 1;
    return MHD_YES;
}

static void media_slots_put(gw *g, const char *user, enum media_kind kind)
{
    atomic_fetch_sub(kind == MEDIA_UPLOAD ? &g->md->uploads : &g->md->downloads, 1);
    media_user_add(g, user, kind, -1);
}

static void media_hex(const unsigned char *md, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[md[i] >> 4];
        out[2 * i + 1] = digits[md[i] & 15];
    }
    out[2 * n] = '\0';
}

/* The object a `message` carries and POST answers (plus media_id there). */
static char *media_json(const store_media *m, const char *id_key)
{
    json_t *o = json_pack("{s:s, s:s, s:I, s:s}", id_key, m->id, "content_type",
                          m->content_type, "size", (json_int_t)m->size, "sha256", m->sha256);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

/* Content type as sent, or the default; refused when not 1-127 printable
 * ASCII characters (it is echoed into headers and JSON). */
static int media_content_type(struct MHD_Connection *mc, char out[STORE_MEDIA_TYPE_MAX + 1])
{
    const char *ct = MHD_lookup_connection_value(mc, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_TYPE);
    if (ct == NULL || ct[0] == '\0')
        ct = MEDIA_DEFAULT_TYPE;
    size_t len = strlen(ct);
    if (len > STORE_MEDIA_TYPE_MAX)
        return PX_ERROR;
    for (size_t i = 0; i < len; i++)
        if (!isprint((unsigned char)ct[i]))
            return PX_ERROR;
    memcpy(out, ct, len + 1);
    return PX_OK;
}

/* ---- upload ---- */

static void media_req_free(gw *g, media_req *r)
{
    if (r->kind == MEDIA_UPLOAD)
        media_slots_put(g, r->user, MEDIA_UPLOAD);
    if (r->md != NULL)
        EVP_MD_CTX_free(r->md);
    free(r->chunk);
    free(r);
}

/* Headers only: who, how big, what type. Refusals here are answered before
 * the body is sent (MHD skips the 100-continue and closes afterwards). */
static enum MHD_Result media_upload_begin(gw *g, struct MHD_Connection *mc, media_req **mr)
{
    char user[65], err[PX_ERRLEN], type[STORE_MEDIA_TYPE_MAX + 1];
    if (media_auth(g, mc, user, err, sizeof(err)) != PX_OK)
        return http_json_error(mc, 401, "unauthorized", err);
    const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl != NULL && strtoll(cl, NULL, 10) > g->cfg.max_media_bytes) {
        metric_add(g->m.media_refused, 1);
        return http_json_error(mc, 413, "too_large", "over PARLEY_MAX_MEDIA_BYTES");
    }
    if (media_content_type(mc, type) != PX_OK)
        return http_json_error(mc, 400, "bad_request",
                               "Content-Type must be 1-127 printable ASCII characters");
    int ok;
    enum MHD_Result refused = media_slots_take(g, mc, user, MEDIA_UPLOAD, &ok);
    if (!ok)
        return refused;
    media_req *r = px_calloc(1, sizeof(*r));
    r->kind = MEDIA_UPLOAD;
    memcpy(r->user, user, sizeof(r->user));
    memcpy(r->content_type, type, sizeof(type));
    id_new(r->upload);
    r->ts = px_now_ms();
    r->t0_mono = px_mono_ms();
    r->md = EVP_MD_CTX_new();
    r->chunk = px_malloc(STORE_MEDIA_CHUNK);
    if (r->md == NULL || EVP_DigestInit_ex(r->md, EVP_sha256(), NULL) != 1)
        r->failed = 1;
    *mr = r;
    return MHD_YES;
}

static void media_flush_chunk(gw *g, media_req *r)
{
    char err[PX_ERRLEN];
    if (r->failed || r->fill == 0)
        return;
    if (store_chunk_put(g->st, r->upload, r->nchunks, r->chunk, r->fill, r->ts, err,
                        sizeof(err)) != PX_OK) {
        log_warn("media chunk not stored", "{s:s, s:s}", "upload", r->upload, "error", err);
        r->failed = 1;
        return;
    }
    r->nchunks++;
    r->fill = 0;
}

/* Body bytes: hashed, gathered into one chunk, written as each fills.
 * Past the limit (a chunked body, whose size no header announced) only
 * too_big is set: the caller refuses at once. */
static void media_upload_data(gw *g, media_req *r, const char *data, size_t n)
{
    if (r->too_big || r->failed)
        return;
    if (r->size + (int64_t)n > g->cfg.max_media_bytes) {
        r->too_big = 1;
        return;
    }
    r->size += (int64_t)n;
    if (EVP_DigestUpdate(r->md, data, n) != 1)
        r->failed = 1;
    while (n > 0 && !r->failed) {
        size_t take = PX_MIN(n, (size_t)STORE_MEDIA_CHUNK - r->fill);
        memcpy(r->chunk + r->fill, data, take);
        r->fill += take;
        data += take;
        n -= take;
        if (r->fill == STORE_MEDIA_CHUNK)
            media_flush_chunk(g, r);
    }
}

static enum MHD_Result media_answer_upload(gw *g, struct MHD_Connection *mc,
                                           const store_media *m, int created)
{
    metric_add(g->m.media_uploads, 1);
    metric_add(created ? g->m.media_stored : g->m.media_deduped, m->size);
    char *s = media_json(m, "media_id");
    enum MHD_Result ret = http_text(mc, 201, "application/json", s, strlen(s));
    free(s);
    return ret;
}

/* The body is complete: hash known, so commit (over the equal bytes
 * already stored, if any, dropping ours: the record and id are this
 * upload's own either way). */
static enum MHD_Result media_upload_end(gw *g, struct MHD_Connection *mc, media_req *r)
{
    char err[PX_ERRLEN];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (r->size == 0)
        return http_json_error(mc, 400, "bad_request", "empty body: nothing to upload");
    media_flush_chunk(g, r);
    if (r->failed || EVP_DigestFinal_ex(r->md, md, &mdlen) != 1 || mdlen != 32)
        return http_json_error(mc, 503, "unavailable", "media not stored, retry");
    store_media m = { .size = r->size, .ts_ms = r->ts };
    id_secret(m.id); /* ids name what one may fetch: none guessable */
    media_hex(md, mdlen, m.sha256);
    memcpy(m.content_type, r->content_type, sizeof(m.content_type));
    memcpy(m.upload, r->upload, sizeof(r->upload));
    int created = 0;
    if (store_media_commit(g->st, &m, r->user, &created, err, sizeof(err)) != PX_OK) {
        log_warn("media commit failed", "{s:s, s:s}", "upload", r->upload, "error", err);
        return http_json_error(mc, 503, "unavailable", "media not stored, retry");
    }
    r->committed = 1;
    if (!created && store_chunk_drop(g->st, r->upload, NULL, err, sizeof(err)) != PX_OK)
        log_warn("duplicate upload's chunks left for the sweep", "{s:s, s:s}", "upload",
                 r->upload, "error", err);
    return media_answer_upload(g, mc, &m, created);
}

static log_tally media_slow_tally = LOG_TALLY_INIT("uploads under PARLEY_MEDIA_MIN_RATE dropped");

static enum MHD_Result media_upload(gw *g, struct MHD_Connection *mc, const char *upload_data,
                                    size_t *upload_data_size, media_req **mr)
{
    if (*mr == NULL)
        return media_upload_begin(g, mc, mr);
    if (*upload_data_size > 0) {
        /* A trickle that never trips the idle timeout still ends: the sweep
         * counts on no upload outliving STORE_MEDIA_UPLOAD_MAX_MS. */
        if (px_now_ms() - (*mr)->ts > STORE_MEDIA_UPLOAD_MAX_MS)
            return MHD_NO;
        /* So does one that keeps under the idle timeout byte by byte. */
        int64_t ms = px_mono_ms() - (*mr)->t0_mono;
        if (ms > MEDIA_RATE_GRACE_MS && (*mr)->size * 1000 / ms < g->cfg.media_min_rate) {
            metric_add(g->md->slow_refused, 1);
            log_tally_add(&media_slow_tally, (*mr)->user);
            return MHD_NO;
        }
        media_upload_data(g, *mr, upload_data, *upload_data_size);
        *upload_data_size = 0;
        if ((*mr)->too_big) {
            /* The rest is never read: answered and dropped here, its
             * chunks deleted by media_req_done. */
            metric_add(g->m.media_refused, 1);
            return http_json_refuse_now(mc, 413, "Content Too Large", "too_large",
                                        "over PARLEY_MAX_MEDIA_BYTES");
        }
        return MHD_YES;
    }
    return media_upload_end(g, mc, *mr);
}

void media_req_done(gw *g, media_req *r, enum MHD_RequestTerminationCode toe)
{
    char err[PX_ERRLEN];
    if (r->kind == MEDIA_UPLOAD && !r->committed && r->nchunks > 0) {
        /* Cut off, timed out, refused or failed: nothing may stay behind.
         * If this delete fails too, the orphan sweep removes the chunks. */
        if (store_chunk_drop(g->st, r->upload, NULL, err, sizeof(err)) != PX_OK)
            log_warn("aborted upload's chunks left for the sweep", "{s:s, s:s}", "upload",
                     r->upload, "error", err);
        log_info("upload aborted", "{s:s, s:s, s:I, s:i}", "user", r->user, "upload", r->upload,
                 "bytes", (json_int_t)r->size, "toe", (int)toe);
    }
    media_req_free(g, r);
}

/* ---- download ---- */

/* Reopens the reader at chunk k. */
static void media_dl_reopen(media_dl *d, int64_t k, char *err, size_t errlen)
{
    store_chunk_close(d->rd);
    d->rd = store_chunk_open(d->g->st, d->m.upload, k, err, errlen);
}

/* Puts chunk k in d->buf. Reads go forward one chunk at a time; a reader
 * that failed (e.g. its server cursor timed out under a slow client) is
 * reopened once at k. */
static int media_dl_load(media_dl *d, int64_t k, char *err, size_t errlen)
{
    int64_t n = -1;
    int rc = PX_ERROR;
    if (d->rd == NULL || k != d->cached + 1)
        media_dl_reopen(d, k, err, errlen);
    d->cached = -1;
    for (int attempt = 0; attempt < 2 && rc == PX_ERROR && d->rd != NULL; attempt++) {
        if (attempt > 0)
            media_dl_reopen(d, k, err, errlen);
        if (d->rd != NULL)
            rc = store_chunk_next(d->rd, &n, d->buf, STORE_MEDIA_CHUNK, &d->cached_len, err,
                                  errlen);
    }
    if (rc == PX_OK && n != k)
        rc = px_err(err, errlen, "chunk %lld missing (next is %lld)", (long long)k, (long long)n);
    else if (rc == PX_DECLINED)
        rc = px_err(err, errlen, "chunk %lld missing (no more)", (long long)k);
    if (rc == PX_OK)
        d->cached = k;
    return rc;
}

static ssize_t media_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    media_dl *d = cls;
    char err[PX_ERRLEN] = "";
    uint64_t at = d->start + pos;
    int64_t k = (int64_t)(at / STORE_MEDIA_CHUNK);
    if (pos >= d->len)
        return MHD_CONTENT_READER_END_OF_STREAM;
    if (d->cached != k && media_dl_load(d, k, err, sizeof(err)) != PX_OK) {
        log_warn("media chunk unreadable", "{s:s, s:I, s:s}", "media", d->m.id, "chunk",
                 (json_int_t)k, "error", err);
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t off = (size_t)(at % STORE_MEDIA_CHUNK);
    if (off >= d->cached_len)
        return MHD_CONTENT_READER_END_WITH_ERROR; /* a short chunk: stored size lies */
    size_t n = PX_MIN(max, d->cached_len - off);
    n = (size_t)PX_MIN((uint64_t)n, d->len - pos);
    memcpy(buf, d->buf + off, n);
    metric_add(d->g->m.media_bytes_out, (int64_t)n);
    atomic_fetch_add(&d->sent, (int64_t)n);
    return (ssize_t)n;
}

static void media_dl_list(media_dl *d, struct MHD_Connection *mc)
{
    media *md = d->g->md;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    d->fd = ci != NULL ? ci->connect_fd : -1;
    d->t0_mono = px_mono_ms();
    pthread_mutex_lock(&md->mu);
    d->next = md->dls;
    if (md->dls != NULL)
        md->dls->prev = d;
    md->dls = d;
    pthread_mutex_unlock(&md->mu);
}

static void media_dl_unlist(media_dl *d)
{
    media *md = d->g->md;
    pthread_mutex_lock(&md->mu);
    if (d->prev != NULL)
        d->prev->next = d->next;
    else
        md->dls = d->next;
    if (d->next != NULL)
        d->next->prev = d->prev;
    pthread_mutex_unlock(&md->mu);
}

static void media_dl_free(void *cls)
{
    media_dl *d = cls;
    media_dl_unlist(d);
    store_chunk_close(d->rd);
    media_slots_put(d->g, d->user, MEDIA_DOWNLOAD);
    free(d);
}

static enum MHD_Result media_send_file(gw *g, struct MHD_Connection *mc, const char *user,
                                       const store_media *m)
{
    uint64_t size = (uint64_t)m->size, start = 0, len = size;
    char cr[96];
    const char *rh = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_RANGE);
    int rr = httprange_parse(rh, size, &start, &len);
    if (rr == PX_DECLINED) {
        snprintf(cr, sizeof(cr), "bytes */%llu", (unsigned long long)size);
        struct MHD_Response *r = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
        enum MHD_Result ret = MHD_queue_response(mc, 416, r);
        MHD_destroy_response(r);
        return ret;
    }
    int ok;
    enum MHD_Result refused = media_slots_take(g, mc, user, MEDIA_DOWNLOAD, &ok);
    if (!ok)
        return refused;
    media_dl *d = px_malloc(sizeof(*d) + STORE_MEDIA_CHUNK);
    *d = (media_dl){ .g = g, .m = *m, .start = start, .len = len, .cached = -1 };
    snprintf(d->user, sizeof(d->user), "%s", user);
    struct MHD_Response *r = MHD_create_response_from_callback(len, MEDIA_BLOCK, media_read, d,
                                                               media_dl_free);
    media_dl_list(d, mc);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, m->content_type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "private, max-age=31536000, immutable");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Content-Security-Policy", "sandbox; default-src 'none'");
    unsigned status = 200;
    if (rr == PX_OK) {
        snprintf(cr, sizeof(cr), "bytes %llu-%llu/%llu", (unsigned long long)start,
                 (unsigned long long)(start + len - 1), (unsigned long long)size);
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
        status = 206;
    }
    metric_add(g->m.media_downloads, 1);
    enum MHD_Result ret = MHD_queue_response(mc, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result media_download(gw *g, struct MHD_Connection *mc, const char *url)
{
    char user[65], err[PX_ERRLEN];
    const char *id = url + sizeof(MEDIA_PREFIX);   /* past "/v1/media/" */
    store_media m;
    if (media_auth(g, mc, user, err, sizeof(err)) != PX_OK)
        return http_json_error(mc, 401, "unauthorized", err);
    if (!id_valid_user(id))
        return http_json_error(mc, 404, "not_found", "no such media");
    int rc = store_media_get(g->st, id, &m, err, sizeof(err));
    if (rc == PX_OK)
        rc = store_media_access(g->st, id, user, err, sizeof(err));
    else if (rc == PX_DECLINED)
        return http_json_error(mc, 404, "not_found", "no such media");
    if (rc == PX_DECLINED)
        return http_json_error(mc, 403, "forbidden", "no message gave you this media");
    if (rc != PX_OK) {
        log_warn("media lookup failed", "{s:s, s:s}", "media", id, "error", err);
        return http_json_error(mc, 503, "unavailable", "media store unavailable, retry");
    }
    return media_send_file(g, mc, user, &m);
}

enum MHD_Result media_access(gw *g, struct MHD_Connection *mc, const char *url,
                             const char *method, const char *upload_data,
                             size_t *upload_data_size, media_req **mr)
{
    int post = strcmp(method, "POST") == 0, get = strcmp(method, "GET") == 0;
    if (post && strcmp(url, MEDIA_PREFIX) == 0)
        return media_upload(g, mc, upload_data, upload_data_size, mr);
    if (get && url[sizeof(MEDIA_PREFIX) - 1] == '/') {
        /* The first call has only headers; answer on the second, as MHD
         * expects for requests without a body. */
        if (*mr == NULL) {
            *mr = px_calloc(1, sizeof(**mr));
            (*mr)->kind = MEDIA_DOWNLOAD;
            return MHD_YES;
        }
        return media_download(g, mc, url);
    }
    return http_json_error(mc, 405, "bad_request", "POST /v1/media or GET /v1/media/<id>");
}

/* ---- the media check of a send ---- */

/* The checks of a send naming media: the answer's code and message, or
 * PX_OK with *m filled. */
static int media_check(gw *g, const media_job *j, store_media *m, enum proto_code *code,
                       const char **msg)
{
    char err[PX_ERRLEN];
    const proto_cmd *cmd = &j->cmd;
    int rc = store_media_get(g->st, cmd->media, m, err, sizeof(err));
    *code = PROTO_NOT_FOUND;
    *msg = "unknown media id";
    if (rc != PX_OK)
        goto out;
    rc = store_media_access(g->st, cmd->media, j->user, err, sizeof(err));
    *code = PROTO_FORBIDDEN;
    *msg = "you have no access to this media";
    /* 1:1: the recipient may read it before the message can reach them;
     * group-fanout grants group members (only it knows them). */
    if (rc == PX_OK && cmd->to != NULL) {
        rc = store_media_grant(g->st, m->id, &cmd->to, 1, px_now_ms(), err, sizeof(err));
        *code = PROTO_NOT_FOUND;
        *msg = "media expired";
    }
out:
    if (rc == PX_ERROR) {
        log_warn("media check failed", "{s:s, s:s}", "media", cmd->media, "error", err);
        *code = PROTO_UNAVAILABLE;
        *msg = "media store unavailable, retry";
    }
    return rc;
}

static void media_check_and_send(gw *g, const media_job *j)
{
    store_media m;
    enum proto_code code;
    const char *msg;
    if (media_check(g, j, &m, &code, &msg) != PX_OK) {
        commands_post_error(g, j->conn_id, j->cmd.id, code, msg);
        return;
    }
    char *json = media_json(&m, "id");
    if (commands_produce_send(g, j->user, j->dev, j->conn_id, &j->cmd, json) != PX_OK)
        commands_post_error(g, j->conn_id, j->cmd.id, PROTO_UNAVAILABLE,
                            "message bus unavailable, retry");
    free(json);
}

static void media_job_free(media_job *j)
{
    proto_cmd_free(&j->cmd);
    free(j);
}

static log_tally media_slow_dl_tally =
    LOG_TALLY_INIT("downloads under PARLEY_MEDIA_MIN_RATE dropped");

/* Under md->mu: shuts down the downloads whose peer, past the grace, has
 * averaged under PARLEY_MEDIA_MIN_RATE. */
static void media_dl_sweep(gw *g)
{
    int64_t now = px_mono_ms();
    for (media_dl *d = g->md->dls; d != NULL; d = d->next) {
        int64_t ms = now - d->t0_mono;
        int queued = 0;
        if (d->dropped || d->fd < 0 || ms <= MEDIA_RATE_GRACE_MS ||
            ioctl(d->fd, TIOCOUTQ, &queued) != 0)
            continue;
        int64_t acked = atomic_load(&d->sent) - queued;
        if (acked * 1000 / ms >= g->cfg.media_min_rate)
            continue;
        d->dropped = 1;
        metric_add(g->md->slow_dl_refused, 1);
        log_tally_add(&media_slow_dl_tally, d->user);
        shutdown(d->fd, SHUT_RDWR);
    }
}

static void *media_main(void *arg)
{
    gw *g = arg;
    media *md = g->md;
    px_thread_name("gw-media");
    int64_t swept = px_mono_ms();
    pthread_mutex_lock(&md->mu);
    for (;;) {
        while (!md->stop && md->head == NULL && px_mono_ms() - swept < 1000) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&md->cv, &md->mu, &ts);
        }
        if (md->stop)
            break;
        if (px_mono_ms() - swept >= 1000) {
            if (g->cfg.media_min_rate > 0)
                media_dl_sweep(g);
            swept = px_mono_ms();
        }
        if (md->head == NULL)
            continue;
        media_job *j = md->head;
        md->head = j->next;
        if (md->head == NULL)
            md->tail = NULL;
        md->queued--;
        pthread_mutex_unlock(&md->mu);
        media_check_and_send(g, j);
        media_job_free(j);
        pthread_mutex_lock(&md->mu);
    }
    pthread_mutex_unlock(&md->mu);
    return NULL;
}

int media_send(gw *g, const char *user, const char *dev, uint64_t conn_id, proto_cmd *cmd)
{
    media *md = g->md;
    pthread_mutex_lock(&md->mu);
    if (md->queued >= MEDIA_MAX_QUEUE) {
        pthread_mutex_unlock(&md->mu);
        return PX_AGAIN;
    }
    media_job *j = px_malloc(sizeof(*j));
    j->next = NULL;
    snprintf(j->user, sizeof(j->user), "%s", user);
    snprintf(j->dev, sizeof(j->dev), "%s", dev);
    j->conn_id = conn_id;
    j->cmd = *cmd;
    cmd->root = NULL;                 /* the job owns the strings now */
    if (md->tail != NULL)
        md->tail->next = j;
    else
        md->head = j;
    md->tail = j;
    md->queued++;
    pthread_cond_signal(&md->cv);
    pthread_mutex_unlock(&md->mu);
    return PX_OK;
}

int media_start(gw *g, char *err, size_t errlen)
{
    g->st = store_open(g->cfg.mongo_uri, g->cfg.mongo_db, err, errlen);
    if (g->st == NULL)
        return PX_ERROR;
    media *md = px_calloc(1, sizeof(*md));
    pthread_mutex_init(&md->mu, NULL);
    pthread_mutex_init(&md->umu, NULL);
    px_cond_init_mono(&md->cv);
    md->user_refused = metrics_counter("parley_gateway_media_refused_total{reason=\"user_slots\"}",
                                       "Media transfers refused or dropped, by reason");
    md->slow_refused = metrics_counter("parley_gateway_media_refused_total{reason=\"too_slow\"}",
                                       "Media transfers refused or dropped, by reason");
    md->slow_dl_refused = metrics_counter(
        "parley_gateway_media_refused_total{reason=\"too_slow_download\"}",
        "Media transfers refused or dropped, by reason");
    g->md = md;
    int rc = pthread_create(&md->thread, NULL, media_main, g);
    if (rc != 0)
        return px_err(err, errlen, "media thread: %s", strerror(rc));
    md->started = 1;
    return PX_OK;
}

void media_stop(gw *g)
{
    media *md = g->md;
    if (md != NULL && md->started) {
        pthread_mutex_lock(&md->mu);
        md->stop = 1;
        pthread_cond_signal(&md->cv);
        pthread_mutex_unlock(&md->mu);
        pthread_join(md->thread, NULL);
    }
    while (md != NULL && md->head != NULL) {
        media_job *j = md->head;
        md->head = j->next;
        media_job_free(j);
    }
    for (size_t i = 0; md != NULL && i < MEDIA_USER_BUCKETS; i++)
        while (md->users[i] != NULL) { /* none once MHD stopped; kept tidy */
            media_user *next = md->users[i]->next;
            free(md->users[i]);
            md->users[i] = next;
        }
    if (md != NULL) {
        pthread_mutex_destroy(&md->umu);
        pthread_mutex_destroy(&md->mu);
        pthread_cond_destroy(&md->cv);
        free(md);
    }
    g->md = NULL;
    store_close(g->st);
    g->st = NULL;
}
