/* Media end to end: gateways, presence, message-store and group-fanout as
 * real processes on the real Kafka broker and MongoDB-wire server, spoken
 * to over real sockets (HTTP for the bytes, WebSocket for the messages).
 * Upload, send, the recipient downloads the same bytes (sha256 checked,
 * one Range too); equal bytes from two users stored once (chunks counted in
 * the store); forwarding to a third user and to a group uploads nothing and
 * grants access; 401/403/404 and the send errors; 17 MiB refused with 413
 * while the gateway's RSS stays flat; an upload cut off half way leaves no
 * chunk behind; several ranges get the whole file; a member added after a
 * send gets no access; ?access_token= works like the header (and on
 * /v1/ws, whose plain GET is 400); no /v1/dev/token outside dev mode;
 * message-store's retention sweep (every 300 ms here) takes
 * media, inbox events and dedupe marks past PARLEY_RETENTION_DAYS. Upload
 * and download rates are reported. */
#include "e2e.h"
#include "ids.h"
#include "store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MIB (1024 * 1024)
#define RESP_MAX (20 * MIB)

typedef struct hresp {
    int status;
    char head[4096];
    unsigned char *body;
    size_t len;
} hresp;

static void hresp_free(hresp *r)
{
    free(r->body);
    r->body = NULL;
}

/* Deterministic bytes that differ per seed (xorshift). */
static unsigned char *make_bytes(size_t n, uint32_t seed)
{
    unsigned char *b = malloc(n);
    uint32_t x = seed * 2654435761u + 1;
    ck_assert_ptr_nonnull(b);
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (unsigned char)x;
    }
    return b;
}

static void sha_hex(const void *data, size_t n, char out[65])
{
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256(data, n, md);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* The gateway the HTTP helpers talk to: E2E_GW1 unless a test points them
 * at a gateway of its own (the teardown points them back). */
static int media_port;
static pid_t media_extra;

static void media_teardown(void)
{
    media_port = 0;
    if (media_extra > 0)
        e2e_stop_extra(media_extra);
    media_extra = 0;
}

static int http_connect(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int port = media_port > 0 ? media_port : e2e_port(E2E_GW1);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    struct timeval tv = { 30, 0 };
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    ck_assert_msg(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0, "connect gateway");
    return fd;
}

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The request head: method, path, Bearer token of user (none if NULL),
 * then extra header lines (each ending in \r\n). */
static void send_head(int fd, const char *method, const char *path, const char *user,
                      const char *extra)
{
    char tok[2048] = "", bearer[2100] = "", head[4096];
    if (user != NULL) {
        e2e_token(user, 3600, tok, sizeof(tok));
        snprintf(bearer, sizeof(bearer), "Authorization: Bearer %s\r\n", tok);
    }
    int n = snprintf(head, sizeof(head), "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s%s\r\n",
                     method, path, bearer, extra ? extra : "");
    ck_assert_int_eq(write_all(fd, head, (size_t)n), 0);
}

/* The value of header name in r's head, or "". */
static void head_value(const hresp *r, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    out[0] = '\0';
    for (const char *p = strstr(r->head, "\r\n"); p != NULL; p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, name, nl) == 0 && p[2 + nl] == ':') {
            const char *v = p + 3 + nl, *e = strstr(v, "\r\n");
            while (*v == ' ')
                v++;
            snprintf(out, cap, "%.*s", (int)(e ? e - v : (long)strlen(v)), v);
            return;
        }
    }
}

/* Reads a whole response (the server closes after it). */
static void read_resp(int fd, hresp *r)
{
    size_t cap = RESP_MAX + sizeof(r->head), got = 0;
    char *buf = malloc(cap);
    ssize_t n;
    ck_assert_ptr_nonnull(buf);
    while (got < cap && (n = recv(fd, buf + got, cap - got, 0)) > 0)
        got += (size_t)n;
    char *end = memmem(buf, got, "\r\n\r\n", 4);
    ck_assert_msg(end != NULL, "no HTTP response head (%zu bytes)", got);
    size_t hl = (size_t)(end - buf) + 2;
    ck_assert(hl < sizeof(r->head));
    memcpy(r->head, buf, hl);
    r->head[hl] = '\0';
    r->status = atoi(buf + 9);
    r->len = got - hl - 2;
    r->body = malloc(r->len + 1);
    memcpy(r->body, end + 4, r->len);
    r->body[r->len] = '\0';
    free(buf);
}

/* Connects and sends the head of POST /v1/media as user. */
static int open_upload(const char *user, const char *extra)
{
    int fd = http_connect();
    send_head(fd, "POST", "/v1/media", user, extra);
    return fd;
}

/* POST /v1/media as user with a Content-Length body. */
static hresp upload_raw(const char *user, const void *data, size_t len, const char *ctype)
{
    hresp r = { 0 };
    char extra[256];
    snprintf(extra, sizeof(extra), "Content-Type: %s\r\nContent-Length: %zu\r\n", ctype, len);
    int fd = open_upload(user, extra);
    ck_assert_int_eq(write_all(fd, data, len), 0);
    read_resp(fd, &r);
    close(fd);
    return r;
}

/* Uploads and checks the 201 answer; copies the media id out. */
static void upload_ok(const char *user, const void *data, size_t len, const char *ctype,
                      char id[65])
{
    char sha[65];
    hresp r = upload_raw(user, data, len, ctype);
    ck_assert_msg(r.status == 201, "upload answered %d: %s", r.status, r.body);
    json_t *o = json_loads((const char *)r.body, 0, NULL);
    ck_assert_ptr_nonnull(o);
    sha_hex(data, len, sha);
    ck_assert_str_eq(e2e_str(o, "sha256"), sha);
    ck_assert_str_eq(e2e_str(o, "content_type"), ctype);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "size")), (json_int_t)len);
    snprintf(id, 65, "%s", e2e_str(o, "media_id"));
    ck_assert_msg(id[0] != '\0', "no media_id in %s", r.body);
    json_decref(o);
    hresp_free(&r);
}

static hresp download(const char *user, const char *id, const char *range)
{
    hresp r = { 0 };
    char path[128], extra[128] = "";
    int fd = http_connect();
    snprintf(path, sizeof(path), "/v1/media/%s", id);
    if (range != NULL)
        snprintf(extra, sizeof(extra), "Range: %s\r\n", range);
    send_head(fd, "GET", path, user, extra);
    read_resp(fd, &r);
    close(fd);
    return r;
}

static void expect_status(const char *user, const char *id, int status)
{
    hresp r = download(user, id, NULL);
    ck_assert_msg(r.status == status, "GET %s as %s: %d, wanted %d (%s)", id,
                  user ? user : "(no token)", r.status, status, r.body);
    hresp_free(&r);
}

static int64_t chunks_stored(void)
{
    char err[PX_ERRLEN] = "";
    int64_t n = -1;
    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store: %s", err);
    ck_assert_msg(store_chunk_count(st, NULL, &n, err, sizeof(err)) == PX_OK, "count: %s", err);
    store_close(st);
    return n;
}

static long gateway_rss_kib(void)
{
    char path[64], line[256];
    long kib = -1;
    snprintf(path, sizeof(path), "/proc/%d/status", (int)e2e_pid(E2E_GW1));
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) != NULL)
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

/* A send naming media (body may be NULL); returns the answer. */
static json_t *send_media(client *cl, const char *ref, const char *key, const char *to,
                          const char *media, const char *body, int forwarded)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", ref, key, to, "media",
                          media);
    if (body != NULL)
        json_object_set_new(o, "body", json_string(body));
    if (forwarded)
        json_object_set_new(o, "forwarded", json_true());
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
    json_t *a = client_wait_ref(cl, ref, E2E_WAIT_MS);
    ck_assert_msg(a != NULL, "no answer to %s: %s", ref, client_errstr(cl));
    return a;
}

/* Waits for the `message` carrying media id and checks its media object. */
static void expect_media_message(client *cl, const char *id, size_t size, const char *sha,
                                 int forwarded)
{
    json_t *m = e2e_wait_type(cl, "message");
    json_t *md = json_object_get(m, "media");
    ck_assert_msg(md != NULL, "message without media: %s", json_dumps(m, 0));
    ck_assert_str_eq(e2e_str(md, "id"), id);
    ck_assert_str_eq(e2e_str(md, "sha256"), sha);
    ck_assert_int_eq(json_integer_value(json_object_get(md, "size")), (json_int_t)size);
    ck_assert_int_eq(json_is_true(json_object_get(m, "forwarded")), forwarded);
    e2e_ack(cl, e2e_str(m, "id"));
    json_decref(m);
}

static double mb_per_s(size_t bytes, int64_t ms)
{
    return (double)bytes / MIB * 1000.0 / (double)(ms > 0 ? ms : 1);
}

START_TEST(upload_send_download_same_bytes)
{
    char alice[65], bob[65], id[65], sha[65], ct[128], msg_id[64];
    const size_t len = 8 * MIB + 12345;
    unsigned char *data = make_bytes(len, 1);
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    sha_hex(data, len, sha);

    int64_t t0 = px_mono_ms();
    upload_ok(alice, data, len, "image/jpeg", id);
    int64_t t1 = px_mono_ms();
    client *a = e2e_connect(alice, E2E_GW1), *b = e2e_connect(bob, E2E_GW2);
    e2e_expect_type(send_media(a, "c1", "to", bob, id, "look", 0), "sent", NULL);
    expect_media_message(b, id, len, sha, 0);

    int64_t t2 = px_mono_ms();
    hresp r = download(bob, id, NULL);
    int64_t t3 = px_mono_ms();
    ck_assert_msg(r.status == 200, "download: %d %s", r.status, r.body);
    ck_assert_uint_eq(r.len, len);
    char got[65];
    sha_hex(r.body, r.len, got);
    ck_assert_str_eq(got, sha);
    head_value(&r, "Content-Type", ct, sizeof(ct));
    ck_assert_str_eq(ct, "image/jpeg");
    head_value(&r, "X-Content-Type-Options", ct, sizeof(ct));
    ck_assert_str_eq(ct, "nosniff");      /* uploaded bytes never run as our origin */
    hresp_free(&r);
    printf("report: upload %.1f MB/s, download %.1f MB/s (%.1f MiB, gateway from %s, "
           "FerretDB)\n", mb_per_s(len, t1 - t0), mb_per_s(len, t3 - t2), (double)len / MIB,
           getenv("PARLEY_BUILD") ? getenv("PARLEY_BUILD") : "build/san");

    /* One range across a chunk boundary, one suffix range, one beyond. */
    size_t at = STORE_MEDIA_CHUNK - 10;
    char range[64];
    snprintf(range, sizeof(range), "bytes=%zu-%zu", at, at + 99);
    r = download(bob, id, range);
    ck_assert_int_eq(r.status, 206);
    ck_assert_uint_eq(r.len, 100);
    ck_assert(memcmp(r.body, data + at, 100) == 0);
    head_value(&r, "Content-Range", ct, sizeof(ct));
    snprintf(range, sizeof(range), "bytes %zu-%zu/%zu", at, at + 99, len);
    ck_assert_str_eq(ct, range);
    hresp_free(&r);
    r = download(bob, id, "bytes=-5");
    ck_assert_int_eq(r.status, 206);
    ck_assert(r.len == 5 && memcmp(r.body, data + len - 5, 5) == 0);
    hresp_free(&r);
    snprintf(range, sizeof(range), "bytes=%zu-", len);
    r = download(bob, id, range);
    ck_assert_int_eq(r.status, 416);
    hresp_free(&r);
    /* Several ranges get the whole file. */
    r = download(bob, id, "bytes=0-9,20-29");
    ck_assert_int_eq(r.status, 200);
    ck_assert(r.len == len && memcmp(r.body, data, len) == 0);
    hresp_free(&r);

    /* The uploader reads it too; the message with media and no body works. */
    expect_status(alice, id, 200);
    e2e_send(a, "c2", bob, "plain text after media", msg_id);
    client_free(a);
    client_free(b);
    free(data);
}
END_TEST

/* Equal bytes are stored once, but each upload gets a media id and record
 * of its own (issue 22): the second uploader learns nothing of the first's
 * id, type or access, and neither may read the other's id. */
START_TEST(equal_bytes_from_two_users_stored_once)
{
    char carol[65], dave[65], id1[65], id2[65], id3[65], ct[128];
    const size_t len = 3 * STORE_MEDIA_CHUNK + 777;   /* 4 chunks */
    unsigned char *data = make_bytes(len, 2);
    e2e_user("carol", carol);
    e2e_user("dave", dave);

    int64_t before = chunks_stored();
    upload_ok(carol, data, len, "video/mp4", id1);
    int64_t after_first = chunks_stored();
    upload_ok(dave, data, len, "application/x-dave", id2);
    upload_ok(carol, data, len, "video/mp4", id3);
    int64_t after_all = chunks_stored();
    ck_assert_int_eq(after_first - before, 4);
    ck_assert_int_eq(after_all, after_first);
    ck_assert_str_ne(id1, id2);
    ck_assert_str_ne(id1, id3);
    ck_assert_str_ne(id2, id3);
    expect_status(dave, id1, 403);
    expect_status(carol, id2, 403);
    hresp r = download(dave, id2, NULL);
    ck_assert_int_eq(r.status, 200);
    ck_assert_uint_eq(r.len, len);
    ck_assert_int_eq(memcmp(r.body, data, len), 0);
    head_value(&r, "Content-Type", ct, sizeof(ct));
    ck_assert_str_eq(ct, "application/x-dave");
    hresp_free(&r);
    free(data);
}
END_TEST

START_TEST(forward_to_user_and_group_uploads_nothing)
{
    char alice[65], bob[65], erin[65], frank[65], grace[65], id[65], sha[65];
    const size_t len = 600 * 1024;
    unsigned char *data = make_bytes(len, 3);
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("erin", erin);
    e2e_user("frank", frank);
    e2e_user("grace", grace);
    sha_hex(data, len, sha);

    upload_ok(alice, data, len, "application/pdf", id);
    client *a = e2e_connect(alice, E2E_GW1), *b = e2e_connect(bob, E2E_GW2);
    client *e = e2e_connect(erin, E2E_GW1), *f = e2e_connect(frank, E2E_GW2);
    e2e_expect_type(send_media(a, "s1", "to", bob, id, "the contract", 0), "sent", NULL);
    expect_media_message(b, id, len, sha, 0);
    expect_status(erin, id, 403);
    expect_status(frank, id, 403);

    int64_t before = chunks_stored();
    /* 1:1 forward without a body. */
    e2e_expect_type(send_media(b, "f1", "to", erin, id, NULL, 1), "sent", NULL);
    expect_media_message(e, id, len, sha, 1);
    expect_status(erin, id, 200);
    /* Group forward: members at the time of the send gain access. */
    json_t *o = json_pack("{s:s, s:s, s:s, s:[s, s]}", "type", "group_create", "id", "g1",
                          "name", "team", "members", frank, grace);
    ck_assert_int_eq(client_send_json(b, o), 0);
    json_decref(o);
    json_t *g = client_wait_ref(b, "g1", E2E_WAIT_MS);
    ck_assert_msg(g != NULL && strcmp(e2e_str(g, "type"), "group") == 0, "group_create");
    char gid[96];
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(f, gid);
    client *gr = e2e_connect(grace, E2E_GW2);
    e2e_join(gr, gid);
    client_free(gr);
    e2e_expect_type(send_media(b, "f2", "group", gid, id, "fyi", 1), "sent", NULL);
    expect_media_message(f, id, len, sha, 1);
    expect_status(frank, id, 200);
    expect_status(grace, id, 200);    /* offline, still a member at the send */
    ck_assert_int_eq(chunks_stored(), before);
    /* A user invited after the send gains nothing. */
    char henry[65];
    e2e_user("henry", henry);
    o = json_pack("{s:s, s:s, s:s, s:[s]}", "type", "group_add", "id", "g3", "group", gid,
                  "members", henry);
    ck_assert_int_eq(client_send_json(b, o), 0);
    json_decref(o);
    g = client_wait_ref(b, "g3", E2E_WAIT_MS);
    ck_assert_msg(g != NULL && strcmp(e2e_str(g, "type"), "group") == 0, "group_add");
    json_decref(g);
    expect_status(henry, id, 403);

    client_free(a);
    client_free(b);
    client_free(e);
    client_free(f);
    free(data);
}
END_TEST

START_TEST(access_errors)
{
    char alice[65], mallory[65], bob[65], id[65];
    unsigned char *data = make_bytes(1000, 4);
    e2e_user("alice", alice);
    e2e_user("mallory", mallory);
    e2e_user("bob", bob);
    upload_ok(alice, data, 1000, "text/plain", id);

    expect_status(mallory, id, 403);
    expect_status(NULL, id, 401);
    expect_status(mallory, "NOSUCHMEDIA0000000000000000", 404);
    expect_status(mallory, "..", 404);
    hresp r = upload_raw(NULL, data, 1000, "text/plain");
    ck_assert_int_eq(r.status, 401);
    hresp_free(&r);
    r = upload_raw(alice, data, 0, "text/plain");
    ck_assert_int_eq(r.status, 400);
    hresp_free(&r);

    client *m = e2e_connect(mallory, E2E_GW1);
    e2e_expect_type(send_media(m, "x1", "to", bob, id, "stolen", 1), "error", "forbidden");
    e2e_expect_type(send_media(m, "x2", "to", bob, "NOSUCHMEDIA0000000000000000", NULL, 1), "error",
                "not_found");
    expect_status(bob, id, 403);      /* the refused forward granted nothing */
    client_free(m);
    free(data);
}
END_TEST

/* Polls the stored chunk count for up to 10 s until it equals want (equal)
 * or differs from it (!equal); returns the last count. */
static int64_t poll_chunks(int64_t want, int equal)
{
    int64_t end = px_mono_ms() + 10000, n;
    while (((n = chunks_stored()) == want) != equal && px_mono_ms() < end)
        usleep(50 * 1000);
    return n;
}

/* Sends reps copies of data[0..len) chunk-encoded (no size announced),
 * stopping early if the server stops reading; *sent gets the body bytes the
 * socket took. Returns the answer. */
static hresp upload_chunked(const char *user, const unsigned char *data, size_t len, int reps,
                            size_t *sent)
{
    hresp r = { 0 };
    char sz[32];
    int ok = 1;
    int fd = open_upload(user,
                         "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n");
    *sent = 0;
    for (int i = 0; i < reps && ok; i++)
        for (size_t off = 0; off < len && ok; off += 64 * 1024) {
            size_t n = PX_MIN((size_t)64 * 1024, len - off);
            int k = snprintf(sz, sizeof(sz), "%zx\r\n", n);
            ok = write_all(fd, sz, (size_t)k) == 0 && write_all(fd, data + off, n) == 0 &&
                 write_all(fd, "\r\n", 2) == 0;
            *sent += ok ? n : 0;
        }
    if (ok)
        ck_assert_int_eq(write_all(fd, "0\r\n\r\n", 5), 0);
    read_resp(fd, &r);
    close(fd);
    return r;
}

START_TEST(too_large_refused_without_buffering)
{
    char alice[65];
    const size_t len = 17 * MIB;
    unsigned char *data = make_bytes(MIB, 5);
    e2e_user("alice", alice);
    int64_t chunks0 = chunks_stored();

    /* Announced size: refused from the headers, before the body is sent. */
    hresp r = { 0 };
    char extra[160];
    snprintf(extra, sizeof(extra), "Content-Length: %zu\r\nExpect: 100-continue\r\n", len);
    int fd = open_upload(alice, extra);
    read_resp(fd, &r);
    close(fd);
    ck_assert_int_eq(r.status, 413);
    hresp_free(&r);

    /* No size announced: streamed, counted, refused at the limit (16 MiB)
     * and the connection dropped there, so the client cannot finish
     * sending 40 MiB: what it got through is the limit plus what the two
     * sockets' buffers held. */
    long rss0 = gateway_rss_kib();
    size_t sent;
    r = upload_chunked(alice, data, MIB, 40, &sent);
    long rss1 = gateway_rss_kib();
    printf("report: chunked upload of 40 MiB: the server stopped it after %zu KiB sent; "
           "gateway RSS %ld -> %ld KiB (+%ld KiB)\n", sent / 1024, rss0, rss1, rss1 - rss0);
    ck_assert_msg(r.status == 413, "40 MiB chunked answered %d: %s", r.status, r.body);
    ck_assert_msg(sent < 40 * MIB, "the gateway read all 40 MiB of a body past its 16 MiB limit");
    hresp_free(&r);
    ck_assert_msg(rss1 - rss0 < 17 * 1024, "gateway RSS grew by %ld KiB", rss1 - rss0);
    ck_assert_int_eq(poll_chunks(chunks0, 1), chunks0);
    free(data);
}
END_TEST

/* Announces 2 * len bytes, sends the first len and leaves the upload half
 * way; returns the socket. */
static int upload_half(const char *user, const unsigned char *data, size_t len)
{
    char extra[128];
    snprintf(extra, sizeof(extra), "Content-Type: image/png\r\nContent-Length: %zu\r\n",
             2 * len);
    int fd = open_upload(user, extra);
    ck_assert_int_eq(write_all(fd, data, len), 0);
    return fd;
}

START_TEST(cut_off_upload_leaves_nothing)
{
    char alice[65];
    unsigned char *data = make_bytes(MIB, 6);
    e2e_user("alice", alice);
    int64_t chunks0 = chunks_stored();

    int fd = upload_half(alice, data, MIB);
    ck_assert_int_gt(poll_chunks(chunks0, 0), chunks0); /* stored what came before the cut */
    close(fd);
    ck_assert_int_eq(poll_chunks(chunks0, 1), chunks0);
    free(data);
}
END_TEST

/* A client that stops sending mid-upload is dropped after
 * PARLEY_HTTP_TIMEOUT_S (3 s here) and its chunks are deleted. */
START_TEST(stalled_upload_timed_out_leaves_nothing)
{
    char alice[65], byte;
    unsigned char *data = make_bytes(MIB, 7);
    e2e_user("alice", alice);
    int64_t chunks0 = chunks_stored();

    int fd = upload_half(alice, data, MIB);
    /* Blocks until the gateway gives up; the bound only keeps a gateway
     * that never does from hanging the test. How long it took is a report. */
    struct timeval bound = { 2 * E2E_WAIT_MS / 1000, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof(bound));
    int64_t t0 = px_mono_ms();
    ssize_t n = recv(fd, &byte, 1, 0);
    int timed_out = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    int64_t waited = px_mono_ms() - t0;
    close(fd);
    ck_assert_msg(n <= 0 && !timed_out, "recv %zd (%s) after %lld ms: the stalled upload was "
                  "not dropped", n, timed_out ? "timed out" : "data", (long long)waited);
    printf("report: media: a stalled upload was dropped after %lld ms (PARLEY_HTTP_TIMEOUT_S=3)\n",
           (long long)waited);
    ck_assert_int_eq(poll_chunks(chunks0, 1), chunks0);
    free(data);
}
END_TEST

/* Records as old as the retention period cannot be made through the
 * protocol (it stamps them now), so the test writes them into the store
 * with old timestamps, beside fresh ones, lets message-store's own sweep
 * run, and checks the outcome through the protocol: the old media answers
 * 404, the old event is not in the sync, and a resend of the id whose
 * dedupe mark is old is stored again while the fresh mark still holds (the
 * recipient is offline: what the sync shows is what was stored). */
START_TEST(retention_sweep_removes_old_media_inbox_and_dedupe_marks)
{
    char alice[65], bob[65], carol[65], err[PX_ERRLEN] = "", sha[65], old_media[65], fresh_media[65];
    char old_mid[ID_BUF], fresh_mid[ID_BUF], old_key[200], fresh_key[200], upload[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("carol", carol);
    unsigned char *data = make_bytes(1000, 8);
    upload_ok(alice, data, 1000, "image/png", fresh_media);
    free(data);
    data = make_bytes(1000, 9);
    sha_hex(data, 1000, sha);
    snprintf(old_media, sizeof(old_media), "Mold%d", (int)getpid());
    snprintf(upload, sizeof(upload), "Uold%d", (int)getpid());
    int64_t now = px_now_ms(), day = 86400000LL, old = now - 40 * day;
    long long swept0[3];
    const char *const swept[3] = { "parley_msgstore_swept_total{what=\"media\"}",
                                   "parley_msgstore_swept_total{what=\"seen\"}",
                                   "parley_msgstore_swept_total{what=\"inbox\"}" };
    for (int i = 0; i < 3; i++)
        swept0[i] = e2e_metric(E2E_STORE, swept[i]);

    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store: %s", err);
    store_media m = { .size = 1000, .ts_ms = old };
    snprintf(m.id, sizeof(m.id), "%s", old_media);
    snprintf(m.sha256, sizeof(m.sha256), "%s", sha);
    snprintf(m.content_type, sizeof(m.content_type), "image/png");
    snprintf(m.upload, sizeof(m.upload), "%s", upload);
    int created = 0;
    ck_assert_msg(store_chunk_put(st, upload, 0, data, 1000, old, err, sizeof(err)) == PX_OK &&
                      store_media_commit(st, &m, alice, &created, err, sizeof(err)) == PX_OK &&
                      created, "old media: %s", err);
    free(data);
    id_for_send(alice, "old-c", old_mid);
    id_for_send(alice, "fresh-c", fresh_mid);
    snprintf(old_key, sizeof(old_key), "%s/%s", carol, old_mid);
    snprintf(fresh_key, sizeof(fresh_key), "%s/%s", carol, fresh_mid);
    const char *tag[] = { "0/0" };
    int fresh = 0;
    ck_assert_msg(store_seen_claim(st, (const char *[]){ old_key }, tag, 1, old, &fresh, err,
                                   sizeof(err)) == PX_OK &&
                      store_seen_claim(st, (const char *[]){ fresh_key }, tag, 1, now, &fresh,
                                       err, sizeof(err)) == PX_OK, "seen: %s", err);
    static const char ev_old[] = "{\"type\":\"message\",\"id\":\"old-ev\",\"body\":\"old\"}";
    static const char ev_new[] = "{\"type\":\"message\",\"id\":\"fresh-ev\",\"body\":\"new\"}";
    store_event ev[2] = {
        { .user = bob, .id = "old-ev", .seq = 1, .ts_ms = now - 31 * day, .kind = STORE_MESSAGE,
          .sender = alice, .json = ev_old, .json_len = sizeof(ev_old) - 1 },
        { .user = bob, .id = "fresh-ev", .seq = 2, .ts_ms = now, .kind = STORE_MESSAGE,
          .sender = alice, .json = ev_new, .json_len = sizeof(ev_new) - 1 },
    };
    ck_assert_msg(store_inbox_put(st, ev, 2, NULL, err, sizeof(err)) == PX_OK, "inbox: %s", err);
    store_close(st);

    /* One sweep pass took each kind of record (nothing else here is old). */
    int64_t end = px_mono_ms() + 2 * E2E_WAIT_MS;
    int done = 0;
    while (!done && px_mono_ms() < end) {
        done = 1;
        for (int i = 0; i < 3; i++)
            done &= e2e_metric(E2E_STORE, swept[i]) > swept0[i];
        if (!done)
            usleep(100 * 1000);
    }
    ck_assert_msg(done, "the sweep did not remove the old records within %d ms",
                  2 * E2E_WAIT_MS);

    expect_status(alice, old_media, 404);
    expect_status(alice, fresh_media, 200);
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *m1 = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m1, "id"), "fresh-ev");
    json_decref(m1);
    json_decref(e2e_wait_type(b, "synced"));
    client_close(b, 1000);
    client *a = e2e_connect(alice, E2E_GW1);
    char mid[64];
    e2e_send(a, "old-c", carol, "its mark was swept", mid);
    e2e_send(a, "fresh-c", carol, "its mark holds", mid);
    e2e_send(a, "end", carol, "sentinel", mid);
    client *c = e2e_connect(carol, E2E_GW2);
    const char *want[] = { old_mid, mid };
    for (int i = 0; i < 2; i++) {
        json_t *got = e2e_wait_type(c, "message");
        ck_assert_msg(strcmp(e2e_str(got, "id"), want[i]) == 0, "got %s, wanted %s",
                      e2e_str(got, "id"), want[i]);
        json_decref(got);
    }
    json_decref(e2e_wait_type(c, "synced"));
    client_close(a, 1000);
    client_close(c, 1000);
}
END_TEST

/* A request with the token in ?access_token= (no Authorization header);
 * returns the answer. body may be NULL (then no body is sent). */
static hresp query_token_request(const char *method, const char *path, const char *user,
                                 const char *body)
{
    char tok[2048], full[2300], extra[128] = "";
    hresp r = { 0 };
    e2e_token(user, 3600, tok, sizeof(tok));
    snprintf(full, sizeof(full), "%s%caccess_token=%s", path, strchr(path, '?') ? '&' : '?',
             user[0] == '!' ? "not-a-token" : tok);
    if (body != NULL)
        snprintf(extra, sizeof(extra), "Content-Type: text/plain\r\nContent-Length: %zu\r\n",
                 strlen(body));
    int fd = http_connect();
    send_head(fd, method, full, NULL, extra);
    if (body != NULL)
        ck_assert_int_eq(write_all(fd, body, strlen(body)), 0);
    read_resp(fd, &r);
    close(fd);
    return r;
}

static void expect_http(hresp r, int status, const char *what)
{
    ck_assert_msg(r.status == status, "%s: %d, wanted %d (%s)", what, r.status, status, r.body);
    hresp_free(&r);
}

/* The token in the query works like the header, for media and the
 * WebSocket path; a plain GET of /v1/ws (no upgrade) is 400; the dev token
 * endpoint does not exist outside dev mode (the harness never sets it). */
START_TEST(query_token_plain_ws_get_and_no_dev_token)
{
    char alice[65], id[65];
    e2e_user("alice", alice);
    hresp r = query_token_request("POST", "/v1/media", alice, "by query token");
    ck_assert_msg(r.status == 201, "upload with ?access_token=: %d %s", r.status, r.body);
    json_t *o = json_loads((const char *)r.body, 0, NULL);
    snprintf(id, sizeof(id), "%s", e2e_str(o, "media_id"));
    json_decref(o);
    hresp_free(&r);
    char path[128];
    snprintf(path, sizeof(path), "/v1/media/%s", id);
    r = query_token_request("GET", path, alice, NULL);
    ck_assert_msg(r.status == 200 && r.len == 14 && memcmp(r.body, "by query token", 14) == 0,
                  "download with ?access_token=: %d %s", r.status, r.body);
    hresp_free(&r);
    expect_http(query_token_request("GET", path, "!bad", NULL), 401, "bad query token");
    expect_http(query_token_request("GET", "/v1/ws", alice, NULL), 400, "plain GET /v1/ws");
    expect_http(query_token_request("GET", "/v1/ws", "!bad", NULL), 401, "bad token on /v1/ws");
    int fd = http_connect();
    send_head(fd, "GET", "/v1/ws", alice, NULL);
    read_resp(fd, &r);
    close(fd);
    expect_http(r, 400, "plain GET /v1/ws, header token");
    fd = http_connect();
    send_head(fd, "POST", "/v1/dev/token", NULL, "Content-Length: 16\r\n");
    ck_assert_int_eq(write_all(fd, "{\"user\":\"alice\"}", 16), 0);
    read_resp(fd, &r);
    close(fd);
    ck_assert_msg(strstr((const char *)r.body, "token") == NULL, "a token outside dev mode");
    expect_http(r, 404, "POST /v1/dev/token outside dev mode");
}
END_TEST

/* 64 uploads in progress on a gateway (each user's own, under the per-user
 * slots) and the next one is 503 unavailable; once they are cut off, an
 * upload goes through again. The uploads are registered asynchronously,
 * so the 65th is retried until refused, within a bound. A gateway of the
 * test's own, whose idle timeout (30 s) outlasts opening the 64 on a
 * loaded box (this program's gateways drop a silent upload after 3 s). */
/* Opens a half upload (a user's own) in every slot of fds that is -1 or
 * whose connection the gateway ended; the number opened. */
static int top_up_uploads(int *fds, int n, const unsigned char *data)
{
    char user[65], tmp[256];
    int opened = 0;
    for (int i = 0; i < n; i++) {
        if (fds[i] >= 0 && recv(fds[i], tmp, sizeof(tmp), MSG_DONTWAIT) < 0 &&
            (errno == EAGAIN || errno == EWOULDBLOCK))
            continue; /* still in progress: nothing answered, not closed */
        if (fds[i] >= 0)
            close(fds[i]);
        e2e_user("up", user);
        fds[i] = upload_half(user, data, 500);
        opened++;
    }
    return opened;
}

START_TEST(sixty_four_uploads_in_progress_then_503)
{
    enum { SLOTS = 64 };
    int fds[SLOTS];
    char user[65], buf[256];
    unsigned char *data = make_bytes(1000, 10);
    const char *env[] = { "PARLEY_HTTP_TIMEOUT_S", "30", NULL };
    int port = e2e_port(E2E_GW2) + 15;
    media_extra = e2e_spawn_extra("gw-slots", port, 0, NULL, env, 0);
    int64_t end = px_mono_ms() + 4 * E2E_WAIT_MS;
    while (e2e_http_get_from(NULL, port, "/readyz", buf, sizeof(buf)) != 200 &&
           px_mono_ms() < end)
        usleep(100 * 1000);
    media_port = port;
    for (int i = 0; i < SLOTS; i++)
        fds[i] = -1;
    e2e_user("late", user);
    int refused = 0, topped_up = -SLOTS;
    end = px_mono_ms() + E2E_WAIT_MS;
    while (!refused && px_mono_ms() < end) {
        /* Every upload in progress, again: on a loaded box the gateway may
         * drop one (its request-head guard), which frees its slot. */
        topped_up += top_up_uploads(fds, SLOTS, data);
        hresp r = upload_raw(user, data, 1000, "text/plain");
        refused = r.status == 503;
        ck_assert_msg(refused || r.status == 201, "upload answered %d: %s", r.status, r.body);
        hresp_free(&r);
    }
    for (int i = 0; i < SLOTS; i++)
        close(fds[i]);
    ck_assert_msg(refused, "no 503 with %d uploads in progress", SLOTS);
    printf("report: media: 503 with %d uploads in progress (%d reopened after the gateway "
           "dropped them)\n", SLOTS, topped_up);
    int ok = 0;
    end = px_mono_ms() + E2E_WAIT_MS;
    while (!ok && px_mono_ms() < end) {
        hresp r = upload_raw(user, data, 1000, "text/plain");
        ok = r.status == 201;
        hresp_free(&r);
        if (!ok)
            usleep(50 * 1000);
    }
    ck_assert_msg(ok, "uploads still refused after the %d were cut off", SLOTS);
    free(data);
}
END_TEST

static Suite *media_suite(void)
{
    Suite *s = suite_create("e2e-media");
    TCase *tc = tcase_create("media");
    tcase_set_timeout(tc, 180);
    tcase_add_checked_fixture(tc, NULL, media_teardown);
    tcase_add_test(tc, upload_send_download_same_bytes);
    tcase_add_test(tc, equal_bytes_from_two_users_stored_once);
    tcase_add_test(tc, forward_to_user_and_group_uploads_nothing);
    tcase_add_test(tc, access_errors);
    tcase_add_test(tc, query_token_plain_ws_get_and_no_dev_token);
    tcase_add_test(tc, too_large_refused_without_buffering);
    tcase_add_test(tc, cut_off_upload_leaves_nothing);
    tcase_add_test(tc, stalled_upload_timed_out_leaves_nothing);
    tcase_add_test(tc, sixty_four_uploads_in_progress_then_503);
    tcase_add_test(tc, retention_sweep_removes_old_media_inbox_and_dedupe_marks);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    /* The RSS check measures what the gateway holds, not what ASan's
     * quarantine keeps of freed memory (256 MB by default: every freed
     * chunk buffer would stay resident). A small quarantine keeps
     * use-after-free detection for recent frees. */
    char asan[512];
    const char *cur = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof(asan), "%s%squarantine_size_mb=4", cur ? cur : "", cur && *cur ? ":" : "");
    setenv("ASAN_OPTIONS", asan, 1);
    setenv("PARLEY_HTTP_TIMEOUT_S", "3", 0);
    setenv("PARLEY_SWEEP_MS", "300", 0);
    return e2e_main(media_suite());
}
