/* Owns the gateway's HTTP surface on libmicrohttpd: health, readiness,
 * metrics, the web client (libcommon/web_assets), the dev token endpoint,
 * and the WebSocket handshake on GET /v1/ws (auth before upgrade; 401
 * means no upgrade). Upgraded sockets leave MHD's thread for a worker at once. */
#include "auth.h"
#include "common.h"
#include "gateway.h"
#include "log.h"
#include "web_assets.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

/* Per connection, and kept by MHD for the life of an upgraded socket. It
 * holds the request line and headers of the handshake (a browser's fit in
 * 4 KiB; media bodies stream through it in pieces). Measured on parleyd,
 * 6,000 idle upgraded connections: 20.0 KiB each at 8 KiB, 16.0 at 4 KiB,
 * 14.0 at 2 KiB (too tight for browsers carrying cookies). */
#define HTTP_MEMORY_LIMIT (4 * 1024)
#define HTTP_BODY_MAX 1024            /* small JSON bodies (dev token) */
#define HTTP_TOKEN_TTL_S 86400
/* MHD threads: media transfers make blocking store calls on them (one
 * chunk each), so one slow transfer must not hold up every handshake. */
#define HTTP_THREADS 4

/* Per-request state (MHD's con_cls); freed by http_completed. */
typedef struct http_req {
    char user[65];
    char dev[65];                /* the token's device */
    media_req *media;            /* media.c's state for /v1/media requests */
    char body[HTTP_BODY_MAX];
    size_t body_len;
    int body_too_big;
    int upgraded;                /* answered 101: the socket is a worker's now */
} http_req;

/* libmicrohttpd's own errors (accept failures at the file limit, the
 * connection limit) can come thousands a second: counted summaries. */
static log_tally http_mhd_tally = LOG_TALLY_INIT("http server errors");

static void http_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    log_tally_add(&http_mhd_tally, line);
}

enum MHD_Result http_text(struct MHD_Connection *mc, unsigned status,
                                 const char *type, const char *body, size_t len)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body,
                                                             MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result ret = MHD_queue_response(mc, status, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result http_json_error(struct MHD_Connection *mc, unsigned status,
                                       const char *code, const char *msg)
{
    json_t *o = json_pack("{s:s, s:s}", "code", code, "message", msg);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    enum MHD_Result ret = http_text(mc, status, "application/json", s, strlen(s));
    free(s);
    return ret;
}

/* MHD 0.9.75 queues a response only before a request's body or after its
 * end, so a refusal in mid-body (a chunked upload past its limit) would
 * mean reading the rest first, 40 MiB if the client likes. Instead the
 * answer goes straight to the socket (nothing else has been written on it
 * for this request but an interim 100) and the caller returns MHD_NO,
 * which makes MHD close the connection. Best effort: a full send buffer
 * drops the answer, never blocks. */
enum MHD_Result http_json_refuse_now(struct MHD_Connection *mc, unsigned status,
                                     const char *reason, const char *code, const char *msg)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    json_t *o = json_pack("{s:s, s:s}", "code", code, "message", msg);
    char *body = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    char out[512];
    int n = snprintf(out, sizeof(out),
                     "HTTP/1.1 %u %s\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     status, reason, strlen(body), body);
    if (ci != NULL && n > 0 && (size_t)n < sizeof(out))
        (void)!send(ci->connect_fd, out, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    free(body);
    return MHD_NO;
}

static enum MHD_Result http_metrics(struct MHD_Connection *mc)
{
    size_t len;
    char *s = metrics_render(&len);
    enum MHD_Result ret = http_text(mc, 200, "text/plain; version=0.0.4", s, len);
    free(s);
    return ret;
}

int http_readiness(void *arg, char *err, size_t errlen)
{
    gw *g = arg;
    int64_t last = atomic_load(&g->last_beat_ok);
    char why[PX_ERRLEN];
    if (last == 0 || px_now_ms() - last > 3 * g->cfg.heartbeat_ms)
        return px_err(err, errlen, "kafka not acknowledging heartbeats");
    /* This gateway is its delivery topic's only reader: without its
     * partitions no client of it gets `synced` or a live event. */
    if (bus_assigned(g->b) == 0)
        return px_err(err, errlen, "delivery topic not assigned");
    if (store_ping(g->st, why, sizeof(why)) != PX_OK)
        return px_err(err, errlen, "database unreachable");
    return PX_OK;
}

static enum MHD_Result http_ready(gw *g, struct MHD_Connection *mc)
{
    char err[PX_ERRLEN], body[PX_ERRLEN + 2];
    if (http_readiness(g, err, sizeof(err)) == PX_OK)
        return http_text(mc, 200, "text/plain", "ready\n", 6);
    int n = snprintf(body, sizeof(body), "%s\n", err);
    return http_text(mc, 503, "text/plain", body, (size_t)n);
}

/* The token from "Authorization: Bearer X", else the access_token query. */
const char *http_token(struct MHD_Connection *mc)
{
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (h != NULL && strncasecmp(h, "Bearer ", 7) == 0)
        return h + 7;
    return MHD_lookup_connection_value(mc, MHD_GET_ARGUMENT_KIND, "access_token");
}

/* 1 if header name is a comma-separated list holding token (any case):
 * "keep-alive, Upgrade" holds "upgrade", "not-upgrade" does not. */
static int http_header_has(struct MHD_Connection *mc, const char *name, const char *token)
{
    const char *v = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, name);
    size_t n = strlen(token);
    while (v != NULL && *v != '\0') {
        v += strspn(v, " \t,");
        size_t len = strcspn(v, ",");
        while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
            len--;
        if (len == n && strncasecmp(v, token, n) == 0)
            return 1;
        v += strcspn(v, ",");
    }
    return 0;
}

/* Browsers cannot set headers on a WebSocket, and a token in the URL ends
 * up in proxies' logs: the web client offers the subprotocols "parley.v1"
 * and "bearer.<token>" instead (a JWT's characters are all legal there).
 * Copies the token into buf and returns 1 when both are offered. */
#define HTTP_WS_PROTOCOL "parley.v1"
static int http_ws_protocol_token(struct MHD_Connection *mc, char *buf, size_t cap)
{
    const char *v = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Sec-WebSocket-Protocol");
    int named = 0, found = 0;
    while (v != NULL && *v != '\0') {
        v += strspn(v, " \t,");
        size_t len = strcspn(v, ", \t");
        if (len == sizeof(HTTP_WS_PROTOCOL) - 1 && strncmp(v, HTTP_WS_PROTOCOL, len) == 0)
            named = 1;
        else if (len > 7 && len - 7 < cap && strncmp(v, "bearer.", 7) == 0) {
            snprintf(buf, cap, "%.*s", (int)(len - 7), v + 7);
            found = 1;
        }
        v += len;
    }
    return named && found;
}

/* Sec-WebSocket-Key must be the base64 of 16 bytes: 22 characters and "==". */
static int http_ws_key_ok(const char *key)
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    return key != NULL && strlen(key) == 24 && strspn(key, b64) == 22 &&
           strcmp(key + 22, "==") == 0 && strchr("AQgw", key[21]) != NULL;
}

/* A browser's Origin must be listed in PARLEY_ALLOWED_ORIGINS when that is
 * set (comma-separated, exact); clients that send none (apps) pass. */
static int http_origin_ok(gw *g, struct MHD_Connection *mc)
{
    const char *o = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Origin");
    const char *list = g->cfg.allowed_origins;
    if (o == NULL || list == NULL || *list == '\0')
        return 1;
    size_t n = strlen(o);
    for (const char *p = list; *p != '\0'; p += strcspn(p, ",")) {
        p += strspn(p, " ,");
        size_t len = strcspn(p, ",");
        while (len > 0 && p[len - 1] == ' ')
            len--;
        if (len == n && strncmp(p, o, n) == 0)
            return 1;
    }
    return 0;
}

struct http_framing {
    int lengths, chunked;
    const char *first_length;
    int lengths_differ;
};

static enum MHD_Result http_framing_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                           const char *value)
{
    struct http_framing *f = cls;
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
        if (f->lengths++ > 0 && strcmp(f->first_length, value) != 0)
            f->lengths_differ = 1;
        f->first_length = value;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        f->chunked = 1;
    }
    return MHD_YES;
}

/* Request smuggling shapes a proxy in front could read otherwise than we
 * do: two different Content-Length values, or Content-Length beside
 * Transfer-Encoding (RFC 9112 6.3). */
static int http_framing_ok(struct MHD_Connection *mc)
{
    struct http_framing f = { 0, 0, NULL, 0 };
    MHD_get_connection_values(mc, MHD_HEADER_KIND, http_framing_header, &f);
    return !f.lengths_differ && !(f.lengths > 0 && f.chunked);
}

static void http_ws_accept(const char *key, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    char buf[128];
    int n = snprintf(buf, sizeof(buf), "%s%s", key, guid);
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)buf, (size_t)n, md);
    EVP_EncodeBlock((unsigned char *)out, md, SHA_DIGEST_LENGTH);
}

static void http_upgraded(void *cls, struct MHD_Connection *mc, void *con_cls,
                          const char *extra_in, size_t extra_in_size, MHD_socket sock,
                          struct MHD_UpgradeResponseHandle *urh)
{
    gw *g = cls;
    http_req *req = con_cls;
    int fl = fcntl(sock, F_GETFL);
    if (fl < 0 || fcntl(sock, F_SETFL, fl | O_NONBLOCK) < 0) {
        MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
        return;
    }
    conn *c = ws_conn_new(g, sock, urh, req->user, req->dev, extra_in, extra_in_size);
    size_t i = atomic_fetch_add(&g->next_worker, 1) % g->nworkers;
    mail *m = mail_new(MAIL_CONN, 0, NULL, 0);
    m->c = c;
    worker_post(g->workers[i], m);
}

/* Registers the connection's device (its first connection links it), last
 * of the checks so a refused handshake registers nothing. PX_OK, or the
 * refusal queued in *refused: 403 device_limit when the user already has
 * PARLEY_MAX_DEVICES linked, 403 device_unlinked for an unlinked device,
 * 503 when the store does not answer (the client retries). A blocking
 * store call on an MHD thread, as media's are (HTTP_THREADS of them). */
static int http_ws_device(gw *g, struct MHD_Connection *mc, const http_req *req,
                          enum MHD_Result *refused)
{
    char err[PX_ERRLEN];
    int status;
    if (store_device_touch(g->st, req->user, req->dev, px_now_ms(), g->cfg.max_devices, &status,
                           err, sizeof(err)) != PX_OK) {
        log_warn("device registration failed", "{s:s, s:s, s:s}", "user", req->user, "device",
                 req->dev, "error", err);
        *refused = http_json_error(mc, 503, "unavailable", "device registry unavailable, retry");
        return PX_ERROR;
    }
    if (status == STORE_DEVICE_OK)
        return PX_OK;
    metric_add(g->m.devices_refused, 1);
    *refused = status == STORE_DEVICE_FULL
                   ? http_json_error(mc, 403, "device_limit",
                                     "this user has PARLEY_MAX_DEVICES linked devices already;"
                                     " unlink one first")
                   : http_json_error(mc, 403, "device_unlinked", "this device was unlinked");
    return PX_ERROR;
}

static enum MHD_Result http_ws(gw *g, struct MHD_Connection *mc, http_req *req)
{
    char err[PX_ERRLEN], ptok[AUTH_TOKEN_MAX + 1];
    int via_protocol = http_ws_protocol_token(mc, ptok, sizeof(ptok));
    const char *tok = via_protocol ? ptok : http_token(mc);
    if (tok == NULL ||
        auth_verify_device(g->auth, tok, px_now_ms() / 1000, req->user, req->dev, err,
                           sizeof(err)) != PX_OK) {
        metric_add(g->m.refused_auth, 1);
        return http_json_error(mc, 401, "unauthorized", tok ? err : "no token");
    }
    /* Counted at adoption, so handshakes in flight can pass it by a few. */
    if (registry_count(g->reg, req->user) >= (size_t)g->cfg.user_conns) {
        metric_add(g->m.user_conns_refused, 1);
        return http_json_error(mc, 429, "rate_limited",
                               "this user holds PARLEY_USER_CONNS connections here already");
    }
    const char *key = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Sec-WebSocket-Key");
    const char *ver = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Sec-WebSocket-Version");
    if (!http_header_has(mc, MHD_HTTP_HEADER_UPGRADE, "websocket") ||
        !http_header_has(mc, MHD_HTTP_HEADER_CONNECTION, "upgrade") || !http_ws_key_ok(key) ||
        ver == NULL || strcmp(ver, "13") != 0)
        return http_json_error(mc, 400, "bad_request", "not a WebSocket version 13 handshake");
    if (!http_origin_ok(g, mc))
        return http_json_error(mc, 403, "forbidden", "Origin not in PARLEY_ALLOWED_ORIGINS");
    enum MHD_Result refused;
    if (http_ws_device(g, mc, req, &refused) != PX_OK)
        return refused;
    char accept[29];
    http_ws_accept(key, accept);
    struct MHD_Response *r = MHD_create_response_for_upgrade(http_upgraded, g);
    MHD_add_response_header(r, MHD_HTTP_HEADER_UPGRADE, "websocket");
    MHD_add_response_header(r, "Sec-WebSocket-Accept", accept);
    if (via_protocol) /* a browser fails a handshake that picks none of its offers */
        MHD_add_response_header(r, "Sec-WebSocket-Protocol", HTTP_WS_PROTOCOL);
    enum MHD_Result ret = MHD_queue_response(mc, MHD_HTTP_SWITCHING_PROTOCOLS, r);
    MHD_destroy_response(r);
    req->upgraded = ret == MHD_YES;
    return ret;
}

static enum MHD_Result http_dev_token(gw *g, struct MHD_Connection *mc, http_req *req)
{
    if (req->body_too_big)
        return http_json_error(mc, 413, "too_large", "body over 1 KiB");
    json_t *o = json_loadb(req->body, req->body_len, 0, NULL);
    const char *user = json_string_value(json_object_get(o, "user"));
    json_t *dv = json_object_get(o, "device");
    char tok[AUTH_TOKEN_MAX];
    int64_t now = px_now_ms() / 1000;
    enum MHD_Result ret;
    if (user == NULL || (dv != NULL && !json_is_string(dv)) ||
        auth_sign_device(g->secret, user, json_string_value(dv), now, now + HTTP_TOKEN_TTL_S, tok,
                         sizeof(tok)) != PX_OK) {
        ret = http_json_error(mc, 400, "bad_request",
                              "body must be {\"user\":\"<user id>\"}, optionally with"
                              " \"device\":\"<device id>\"");
    } else {
        json_t *out = json_pack("{s:s}", "token", tok);
        char *s = json_dumps(out, JSON_COMPACT);
        ret = http_text(mc, 200, "application/json", s, strlen(s));
        free(s);
        json_decref(out);
    }
    json_decref(o);
    return ret;
}

static enum MHD_Result http_access(void *cls, struct MHD_Connection *mc, const char *url,
                                   const char *method, const char *version,
                                   const char *upload_data, size_t *upload_data_size,
                                   void **con_cls)
{
    gw *g = cls;
    if (*con_cls == NULL) {
        http_guard_head_done(g->guard, mc);
        if (!http_framing_ok(mc))
            return http_json_error(mc, 400, "bad_request",
                                   "conflicting Content-Length / Transfer-Encoding headers");
        *con_cls = px_calloc(1, sizeof(http_req));
        /* media.c sees the first call too: it refuses a bad upload from the
         * headers alone, before the body is sent. */
        if (!media_route(url))
            return MHD_YES;
    }
    http_req *req = *con_cls;
    if (media_route(url))
        return media_access(g, mc, url, method, upload_data, upload_data_size, &req->media);
    if (*upload_data_size > 0) {
        size_t room = sizeof(req->body) - req->body_len;
        if (*upload_data_size > room)
            req->body_too_big = 1;
        else
            memcpy(req->body + req->body_len, upload_data, *upload_data_size);
        req->body_len += req->body_too_big ? 0 : *upload_data_size;
        *upload_data_size = 0;
        return MHD_YES;
    }
    int get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    if (get && strcmp(url, "/v1/ws") == 0)
        return http_ws(g, mc, req);
    if (get && strcmp(url, "/healthz") == 0)
        return http_text(mc, 200, "text/plain", "ok\n", 3);
    if (get && strcmp(url, "/readyz") == 0)
        return http_ready(g, mc);
    if (get && strcmp(url, "/metrics") == 0 && g->cfg.metrics_listen == NULL)
        return http_metrics(mc);
    const web_asset *wa = get ? web_assets_find(url) : NULL;
    if (wa != NULL)
        return (enum MHD_Result)web_assets_respond(mc, wa);
    if (post && g->cfg.dev && strcmp(url, "/v1/dev/token") == 0)
        return http_dev_token(g, mc, req);
    return http_json_error(mc, 404, "not_found", "no such endpoint");
}

static void http_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                           enum MHD_RequestTerminationCode toe)
{
    gw *g = cls;
    http_req *req = *con_cls;
    if (req != NULL && req->media != NULL)
        media_req_done(g, req->media, toe);
    if (req != NULL && !req->upgraded && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK)
        http_guard_rearm(g->guard, mc);
    free(*con_cls);
    *con_cls = NULL;
}

/* Our own listening socket: exclusive unless PARLEY_LISTEN_SHARED asks for
 * SO_REUSEPORT (then the kernel spreads new connections over every process
 * that asked too). Exclusive by default because a second parleyd or
 * gateway left running by mistake would silently take half the clients. */
static int http_listen(const char *listen_addr, int shared, char *err, size_t errlen)
{
    char host[64];
    const char *colon = strrchr(listen_addr, ':');
    if (colon == NULL || (size_t)(colon - listen_addr) >= sizeof(host))
        return px_err(err, errlen, "PARLEY_LISTEN=\"%s\" is not host:port", listen_addr);
    snprintf(host, sizeof(host), "%.*s", (int)(colon - listen_addr), listen_addr);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1)) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        return px_err(err, errlen, "PARLEY_LISTEN host \"%s\" is not an IPv4 address", host);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        (shared && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) ||
        bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4096) < 0) {
        if (errno == EADDRINUSE)
            px_err(err, errlen, "PARLEY_LISTEN=%s: address already in use (another parleyd "
                   "or gateway? PARLEY_LISTEN_SHARED=1 on every process shares it)",
                   listen_addr);
        else
            px_err(err, errlen, "PARLEY_LISTEN=%s: %s", listen_addr, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

int http_bind(gw *g, char *err, size_t errlen)
{
    g->listen_fd = http_listen(g->cfg.listen, g->cfg.listen_shared, err, errlen);
    return g->listen_fd >= 0 ? PX_OK : PX_ERROR;
}

int http_start(gw *g, char *err, size_t errlen)
{
    g->guard = http_guard_new(g, err, errlen);
    if (g->guard == NULL)
        return PX_ERROR;
    /* The logger must come first or MHD logs its own way until it sees it.
     * poll(), not epoll: libmicrohttpd 0.9.75's MHD_quiesce_daemon on an
     * epoll thread pool races each worker to take the listen socket out of
     * its epoll set, and the loser aborts the process ("Failed to remove
     * listen FD from epoll set": a gateway draining on SIGTERM, about one
     * shutdown in 45). poll() quiesces by a wake-up instead. MHD polls only
     * HTTP requests in progress: an upgraded WebSocket is suspended for it
     * and lives on our own epoll workers. */
    g->mhd = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_ALLOW_UPGRADE | MHD_USE_ITC |
            MHD_USE_ERROR_LOG,
        0, NULL, NULL, http_access, g,
        MHD_OPTION_EXTERNAL_LOGGER, http_mhd_log, NULL,
        MHD_OPTION_LISTEN_SOCKET, g->listen_fd,
        MHD_OPTION_NOTIFY_CONNECTION, http_guard_notify, g->guard,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_MEMORY_LIMIT,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)(g->cfg.max_conns + 64),
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)HTTP_THREADS,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)g->cfg.http_timeout_s,
        MHD_OPTION_NOTIFY_COMPLETED, http_completed, g,
        MHD_OPTION_END);
    if (g->mhd == NULL)
        return px_err(err, errlen, "libmicrohttpd did not start on %s", g->cfg.listen);
    return PX_OK;
}

void http_quiesce(gw *g)
{
    if (g->listen_fd < 0)
        return;
    if (g->mhd != NULL)
        MHD_quiesce_daemon(g->mhd);
    close(g->listen_fd);
    g->listen_fd = -1;
}

void http_stop(gw *g)
{
    http_quiesce(g);
    if (g->mhd != NULL)
        MHD_stop_daemon(g->mhd);
    g->mhd = NULL;
    http_guard_free(g->guard);
    g->guard = NULL;
}
