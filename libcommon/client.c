/* Owns the blocking WebSocket client: TCP connect, the HTTP upgrade, the
 * frame codec (client side of RFC 6455) and the JSON backlog.
 *
 * Received bytes land in rbuf and are decoded from there, so a timeout in
 * the middle of a frame loses nothing: the next call carries on from the
 * same bytes. Frame decoding (client_hdr_parse) touches no socket. */
#include "client.h"
#include "common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define CLIENT_WS_GUID    "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define CLIENT_REQ_MAX    16384  /* upgrade request, token included */
#define CLIENT_HDR_MAX    14     /* largest frame header from a server (unmasked) */
#define CLIENT_READ_CHUNK 65536  /* free space kept in rbuf before a read */
#define CLIENT_WCHUNK     16384  /* masked bytes staged per write */
#define CLIENT_LINGER_MS  500    /* client_close waits this long for the echo */

typedef struct client_item {
    json_t *msg;
    size_t bytes;
    struct client_item *next;
} client_item;

struct client {
    int fd;
    int io_timeout_ms;
    size_t max_msg;

    uint8_t *rbuf;        /* bytes read, not yet decoded: [rpos, rlen) */
    size_t rpos, rlen, rcap, rmax;

    uint8_t *msg;         /* message being reassembled, or the one returned */
    size_t mlen, mcap;
    int mop;              /* opcode of a fragmented message in progress, 0 none */
    int returned;         /* msg was handed out: reset on the next call */
    uint8_t ctl[126];     /* control payload handed out (pong, close reason) */

    int close_code;       /* from the server's close frame, 0 if none yet */
    int sent_close;
    int rdead;            /* nothing more to read: EOF, error or close received */
    int wdead;            /* nothing more may be written */
    uint64_t pings;

    client_item *head, *tail;  /* JSON backlog, oldest first */
    size_t blen, bbytes;

    char errstr[PX_ERRLEN];
};

/* A decoded frame header. */
typedef struct client_hdr {
    int fin, rsv, opcode, masked;
    uint64_t len;
    size_t hlen;
} client_hdr;

/* ---- small helpers --------------------------------------------------- */

static int64_t client_deadline(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : px_mono_ms() + timeout_ms;
}

/* Milliseconds left before deadline, in poll()'s terms (-1 = forever). */
static int client_left(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - px_mono_ms();
    return left <= 0 ? 0 : (int)PX_MIN(left, (int64_t)0x7fffffff);
}

/* Masks must be unpredictable to intermediaries (RFC 6455 10.3); getrandom
 * only fails on ancient kernels, where a clock-seeded mix still varies. */
static void client_random(void *buf, size_t n)
{
    if (getrandom(buf, n, 0) == (ssize_t)n)
        return;
    static uint64_t x;
    x ^= (uint64_t)px_mono_ms() * 0x9E3779B97F4A7C15ULL + (uint64_t)getpid();
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        ((uint8_t *)buf)[i] = (uint8_t)x;
    }
}

/* base64(SHA1(key || GUID)), the value the server must send back. */
static void client_accept_for(const char *key, char out[29])
{
    char in[128];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int n = snprintf(in, sizeof(in), "%s%s", key, CLIENT_WS_GUID);
    EVP_Digest(in, (size_t)n, md, &mdlen, EVP_sha1(), NULL);
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
}

/* ---- socket I/O ------------------------------------------------------- */

/* Writes all of buf or fails; a failed or partial write poisons the stream
 * for writing (the peer would see half a frame) but reading goes on. */
static int client_write_all(client *cl, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    int64_t deadline = client_deadline(cl->io_timeout_ms);
    if (cl->wdead)
        return px_err(cl->errstr, sizeof(cl->errstr), "connection no longer writable");
    while (n > 0) {
        ssize_t w = send(cl->fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w, n -= (size_t)w;
            deadline = client_deadline(cl->io_timeout_ms); /* a stall limit, not a total */
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            cl->wdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr), "send: %s", strerror(errno));
        }
        struct pollfd pfd = { .fd = cl->fd, .events = POLLOUT };
        int pr = poll(&pfd, 1, client_left(deadline));
        if (pr == 0) {
            cl->wdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr), "send stalled for %d ms",
                          cl->io_timeout_ms);
        }
        if (pr < 0 && errno != EINTR) {
            cl->wdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr), "poll: %s", strerror(errno));
        }
    }
    return PX_OK;
}

/* Makes room for CLIENT_READ_CHUNK more bytes (never beyond rmax), dropping
 * what was already decoded first. */
static int client_rbuf_room(client *cl)
{
    if (cl->rpos > 0) {
        memmove(cl->rbuf, cl->rbuf + cl->rpos, cl->rlen - cl->rpos);
        cl->rlen -= cl->rpos;
        cl->rpos = 0;
    }
    if (cl->rcap - cl->rlen >= CLIENT_READ_CHUNK || cl->rcap == cl->rmax)
        return cl->rlen < cl->rcap ? PX_OK : PX_ERROR;
    size_t cap = PX_MIN(PX_MAX(cl->rcap * 2, cl->rlen + CLIENT_READ_CHUNK), cl->rmax);
    uint8_t *p = realloc(cl->rbuf, cap);
    if (p == NULL)
        return px_err(cl->errstr, sizeof(cl->errstr), "out of memory for %zu bytes", cap);
    cl->rbuf = p;
    cl->rcap = cap;
    return PX_OK;
}

/* Reads whatever arrives before deadline. PX_OK: got bytes; PX_AGAIN:
 * timeout; PX_ERROR: EOF or socket error (rdead is then set). */
static int client_fill(client *cl, int64_t deadline)
{
    if (client_rbuf_room(cl) != PX_OK) {
        cl->rdead = 1;
        return px_err(cl->errstr, sizeof(cl->errstr), "receive buffer full");
    }
    for (;;) {
        ssize_t r = recv(cl->fd, cl->rbuf + cl->rlen, cl->rcap - cl->rlen, 0);
        if (r > 0) {
            cl->rlen += (size_t)r;
            return PX_OK;
        }
        if (r == 0) {
            cl->rdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr),
                          "connection closed by the server without a close frame");
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            cl->rdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr), "recv: %s", strerror(errno));
        }
        if (errno == EINTR)
            continue;
        struct pollfd pfd = { .fd = cl->fd, .events = POLLIN };
        int pr = poll(&pfd, 1, client_left(deadline));
        if (pr == 0)
            return PX_AGAIN;
        if (pr < 0 && errno != EINTR) {
            cl->rdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr), "poll: %s", strerror(errno));
        }
    }
}

/* ---- connecting and the upgrade --------------------------------------- */

static int client_wait_connect(int fd, int64_t deadline, char *err, size_t errlen)
{
    struct pollfd pfd = { .fd = fd, .events = POLLOUT };
    int pr;
    do {
        pr = poll(&pfd, 1, client_left(deadline));
    } while (pr < 0 && errno == EINTR);
    if (pr == 0)
        return px_err(err, errlen, "connect timed out");
    int soerr = 0;
    socklen_t sl = sizeof(soerr);
    if (pr < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
        return px_err(err, errlen, "connect: %s", strerror(errno));
    if (soerr != 0)
        return px_err(err, errlen, "connect: %s", strerror(soerr));
    return PX_OK;
}

/* One connect attempt to ai, from src when given. Returns the fd or -1. */
static int client_try_addr(const struct addrinfo *ai, const struct addrinfo *src,
                           int64_t deadline, char *err, size_t errlen)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
    if (fd < 0) {
        px_err(err, errlen, "socket: %s", strerror(errno));
        goto fail;
    }
    if (src != NULL) {
        /* Let connect() pick the port per destination, so one source address
         * can hold more than the ~28k connections bind() alone would allow. */
        int noport = 1;
        (void)setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &noport, sizeof(noport));
        if (bind(fd, src->ai_addr, src->ai_addrlen) != 0) {
            px_err(err, errlen, "bind to source address: %s", strerror(errno));
            goto fail;
        }
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        if (errno != EINPROGRESS) {
            px_err(err, errlen, "connect: %s", strerror(errno));
            goto fail;
        }
        if (client_wait_connect(fd, deadline, err, errlen) != PX_OK)
            goto fail;
    }
    int nodelay = 1; /* small frames, sent as soon as written */
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, sizeof(nodelay));
    return fd;
fail:
    if (fd >= 0)
        close(fd);
    return -1;
}

static int client_tcp_connect(const client_opts *o, int64_t deadline, char *err, size_t errlen)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL, *src = NULL;
    char port[16];
    int fd = -1, gai;
    if (o->bind_addr != NULL) {
        struct addrinfo sh = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST };
        gai = getaddrinfo(o->bind_addr, NULL, &sh, &src);
        if (gai != 0) {
            px_err(err, errlen, "bad source address %s: %s", o->bind_addr, gai_strerror(gai));
            goto out;
        }
        hints.ai_family = src->ai_family;
    }
    snprintf(port, sizeof(port), "%d", o->port);
    gai = getaddrinfo(o->host, port, &hints, &res);
    if (gai != 0) {
        px_err(err, errlen, "resolve %s: %s", o->host, gai_strerror(gai));
        goto out;
    }
    for (const struct addrinfo *ai = res; ai != NULL && fd < 0; ai = ai->ai_next)
        fd = client_try_addr(ai, src, deadline, err, errlen);
out:
    if (res != NULL)
        freeaddrinfo(res);
    if (src != NULL)
        freeaddrinfo(src);
    return fd;
}

/* Percent-encodes s for a query string; PX_ERROR if it does not fit. */
static int client_urlencode(const char *s, char *out, size_t outlen)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        int plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                    (c >= '0' && c <= '9') || strchr("-._~", c) != NULL;
        if (o + 4 > outlen)
            return PX_ERROR;
        if (plain) {
            out[o++] = (char)c;
        } else {
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = '\0';
    return PX_OK;
}

static int client_build_request(const client_opts *o, const char *key, char *req,
                                size_t reqlen, char *err, size_t errlen)
{
    char query[CLIENT_REQ_MAX / 2] = "", auth[CLIENT_REQ_MAX / 2] = "";
    const char *lb = strchr(o->host, ':') ? "[" : "", *rb = *lb ? "]" : "";
    if (o->token != NULL && strpbrk(o->token, "\r\n") != NULL)
        return px_err(err, errlen, "token contains a line break");
    if (o->token != NULL && o->token_in_query) {
        memcpy(query, "?access_token=", 15);
        if (client_urlencode(o->token, query + 14, sizeof(query) - 14) != PX_OK)
            return px_err(err, errlen, "token too long");
    } else if (o->token != NULL) {
        int n = snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", o->token);
        if (n < 0 || (size_t)n >= sizeof(auth))
            return px_err(err, errlen, "token too long");
    }
    int n = snprintf(req, reqlen,
                     "GET /v1/ws%s HTTP/1.1\r\n"
                     "Host: %s%s%s:%d\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "%s\r\n",
                     query, lb, o->host, rb, o->port, key, auth);
    if (n < 0 || (size_t)n >= reqlen)
        return px_err(err, errlen, "upgrade request too long");
    return n;
}

/* Reads the response head (up to the blank line) into head; leftover frame
 * bytes stay after it. Returns the head length or PX_ERROR. */
static long client_read_head(int fd, int64_t deadline, char *head, size_t cap,
                             size_t *got, char *err, size_t errlen)
{
    *got = 0;
    for (;;) {
        char *end = memmem(head, *got, "\r\n\r\n", 4);
        if (end != NULL)
            return (long)(end + 4 - head);
        if (*got == cap)
            return px_err(err, errlen, "HTTP response head over %zu bytes", cap);
        ssize_t r = recv(fd, head + *got, cap - *got, 0);
        if (r > 0) {
            *got += (size_t)r;
            continue;
        }
        if (r == 0)
            return px_err(err, errlen, "connection closed during the handshake");
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return px_err(err, errlen, "recv: %s", strerror(errno));
        if (errno == EINTR)
            continue;
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        int pr = poll(&pfd, 1, client_left(deadline));
        if (pr == 0)
            return px_err(err, errlen, "handshake timed out");
        if (pr < 0 && errno != EINTR)
            return px_err(err, errlen, "poll: %s", strerror(errno));
    }
}

/* Value of header name in a NUL-terminated head, copied into out ("" if absent). */
static void client_header(const char *head, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    out[0] = '\0';
    for (const char *l = strstr(head, "\r\n"); l != NULL; l = strstr(l, "\r\n")) {
        l += 2;
        if (strncasecmp(l, name, nl) != 0 || l[nl] != ':')
            continue;
        const char *v = l + nl + 1, *e = strstr(v, "\r\n");
        while (*v == ' ' || *v == '\t')
            v++;
        size_t n = e != NULL ? (size_t)(e - v) : strlen(v);
        while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t'))
            n--;
        snprintf(out, outlen, "%.*s", (int)n, v);
        return;
    }
}

/* Checks the 101 answer; head is NUL-terminated at the end of its head. */
static int client_check_head(const char *head, const char *key, int *status,
                             char *err, size_t errlen)
{
    char val[256], want[29];
    int code = 0;
    if (sscanf(head, "HTTP/1.%*d %3d", &code) != 1 || code < 100 || code > 599)
        return px_err(err, errlen, "not an HTTP response");
    *status = code;
    if (code != 101)
        return px_err(err, errlen, "server answered HTTP %d instead of 101", code);
    client_header(head, "Upgrade", val, sizeof(val));
    if (strcasecmp(val, "websocket") != 0)
        return px_err(err, errlen, "101 without Upgrade: websocket");
    client_header(head, "Connection", val, sizeof(val));
    if (strcasestr(val, "upgrade") == NULL)
        return px_err(err, errlen, "101 without Connection: Upgrade");
    client_accept_for(key, want);
    client_header(head, "Sec-WebSocket-Accept", val, sizeof(val));
    if (strcmp(val, want) != 0)
        return px_err(err, errlen, "Sec-WebSocket-Accept is \"%s\", expected \"%s\"", val, want);
    return PX_OK;
}

static client *client_new(int fd, const client_opts *o)
{
    client *cl = px_calloc(1, sizeof(*cl));
    cl->fd = fd;
    cl->io_timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : CLIENT_IO_TIMEOUT_MS;
    cl->max_msg = o->max_msg > 0 ? o->max_msg : CLIENT_MAX_MSG;
    /* A whole frame must fit in rbuf, plus room to read the next one's start. */
    cl->rmax = cl->max_msg + CLIENT_HDR_MAX + CLIENT_READ_CHUNK;
    snprintf(cl->errstr, sizeof(cl->errstr), "no error");
    cl->rbuf = px_malloc(CLIENT_READ_CHUNK); /* never NULL: decoding needs no special case */
    cl->rcap = CLIENT_READ_CHUNK;
    return cl;
}

/* Sends the upgrade and checks the answer; leftover bytes go to cl->rbuf. */
static int client_handshake(client *cl, const client_opts *o, int64_t deadline,
                            int *status, char *err, size_t errlen)
{
    uint8_t raw[16];
    char key[25], req[CLIENT_REQ_MAX], head[CLIENT_HEAD_MAX + 1];
    size_t got = 0;
    client_random(raw, sizeof(raw));
    EVP_EncodeBlock((unsigned char *)key, raw, sizeof(raw));
    int n = client_build_request(o, key, req, sizeof(req), err, errlen);
    if (n < 0)
        return PX_ERROR;
    if (client_write_all(cl, req, (size_t)n) != PX_OK)
        return px_err(err, errlen, "sending the upgrade: %s", cl->errstr);
    long hl = client_read_head(cl->fd, deadline, head, CLIENT_HEAD_MAX, &got, err, errlen);
    if (hl < 0)
        return PX_ERROR;
    char saved = head[hl];
    head[hl] = '\0';
    if (client_check_head(head, key, status, err, errlen) != PX_OK)
        return PX_ERROR;
    head[hl] = saved;
    if (got > (size_t)hl) {
        if (client_rbuf_room(cl) != PX_OK)
            return px_err(err, errlen, "%s", cl->errstr);
        memcpy(cl->rbuf, head + hl, got - (size_t)hl);
        cl->rlen = got - (size_t)hl;
    }
    return PX_OK;
}

client *client_connect_ex(const client_opts *o, int *http_status, char *err, size_t errlen)
{
    client *cl = NULL;
    int status = 0;
    if (o == NULL || o->host == NULL || o->port <= 0 || o->port > 65535) {
        px_err(err, errlen, "host and a port in 1-65535 are required");
        goto out;
    }
    int64_t deadline = client_deadline(o->timeout_ms > 0 ? o->timeout_ms : CLIENT_IO_TIMEOUT_MS);
    int fd = client_tcp_connect(o, deadline, err, errlen);
    if (fd < 0)
        goto out;
    cl = client_new(fd, o); /* owns fd from here */
    if (client_handshake(cl, o, deadline, &status, err, errlen) != PX_OK) {
        client_free(cl);
        cl = NULL;
    }
out:
    if (http_status != NULL)
        *http_status = status;
    return cl;
}

client *client_connect(const char *host, int port, const char *token,
                       const char *bind_addr, int timeout_ms, int *http_status,
                       char *err, size_t errlen)
{
    client_opts o = { .host = host, .port = port, .token = token,
                      .bind_addr = bind_addr, .timeout_ms = timeout_ms };
    return client_connect_ex(&o, http_status, err, errlen);
}

/* ---- sending ---------------------------------------------------------- */

static size_t client_put_hdr(uint8_t *b, int opcode, size_t len, int fin, const uint8_t mask[4])
{
    size_t h = 0;
    b[h++] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0x7F));
    if (len < 126) {
        b[h++] = (uint8_t)(0x80 | len);
    } else if (len <= 0xFFFF) {
        b[h++] = 0x80 | 126;
        b[h++] = (uint8_t)(len >> 8);
        b[h++] = (uint8_t)len;
    } else {
        b[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            b[h++] = (uint8_t)((uint64_t)len >> (i * 8));
    }
    memcpy(b + h, mask, 4);
    return h + 4;
}

int client_send_frame(client *cl, int opcode, const void *payload, size_t len, int fin)
{
    /* Header and masked payload are staged in one buffer so a small frame
     * leaves in one segment (TCP_NODELAY is on). */
    uint8_t buf[CLIENT_WCHUNK], mask[4];
    const uint8_t *p = payload;
    client_random(mask, sizeof(mask));
    size_t n = client_put_hdr(buf, opcode, len, fin, mask);
    for (size_t i = 0; i < len; i++) {
        buf[n++] = p[i] ^ mask[i & 3];
        if (n < sizeof(buf))
            continue;
        if (client_write_all(cl, buf, n) != PX_OK)
            return PX_ERROR;
        n = 0;
    }
    if (n > 0 && client_write_all(cl, buf, n) != PX_OK)
        return PX_ERROR;
    return PX_OK;
}

int client_send_text(client *cl, const char *s, size_t len)
{
    return client_send_frame(cl, CLIENT_OP_TEXT, s, len, 1);
}

int client_send_json(client *cl, const json_t *msg)
{
    char *s = json_dumps(msg, JSON_COMPACT);
    if (s == NULL)
        return px_err(cl->errstr, sizeof(cl->errstr), "message cannot be encoded as JSON");
    int rc = client_send_text(cl, s, strlen(s));
    free(s);
    return rc;
}

/* Best effort: the server may already be gone. code 0 sends no code. */
static void client_send_close(client *cl, int code)
{
    uint8_t b[2] = { (uint8_t)(code >> 8), (uint8_t)code };
    if (cl->sent_close || cl->wdead)
        return;
    cl->sent_close = 1;
    (void)client_send_frame(cl, CLIENT_OP_CLOSE, b, code > 0 ? 2 : 0, 1);
}

/* ---- receiving -------------------------------------------------------- */

/* Decodes a header from b. PX_OK: h filled; PX_AGAIN: need more bytes. */
static int client_hdr_parse(const uint8_t *b, size_t n, client_hdr *h)
{
    if (n < 2)
        return PX_AGAIN;
    h->fin = b[0] >> 7;
    h->rsv = (b[0] >> 4) & 7;
    h->opcode = b[0] & 0x0F;
    h->masked = b[1] >> 7;
    h->len = b[1] & 0x7F;
    h->hlen = 2;
    if (h->len == 126) {
        if (n < 4)
            return PX_AGAIN;
        h->len = (uint64_t)b[2] << 8 | b[3];
        h->hlen = 4;
    } else if (h->len == 127) {
        if (n < 10)
            return PX_AGAIN;
        h->len = 0;
        for (int i = 0; i < 8; i++)
            h->len = h->len << 8 | b[2 + i];
        h->hlen = 10;
    }
    if (h->masked)
        h->hlen += 4;
    return n < h->hlen ? PX_AGAIN : PX_OK;
}

/* Fails the connection: a close with code to the server, nothing more read. */
static int client_fail(client *cl, int code, const char *why)
{
    client_send_close(cl, code);
    cl->rdead = 1;
    return px_err(cl->errstr, sizeof(cl->errstr), "%s", why);
}

/* Rules a server frame must follow before its payload is even awaited. */
static int client_hdr_check(client *cl, const client_hdr *h)
{
    int control = h->opcode >= CLIENT_OP_CLOSE;
    if (h->rsv != 0)
        return client_fail(cl, 1002, "server set reserved bits (no extension was agreed)");
    if (h->masked)
        return client_fail(cl, 1002, "server sent a masked frame");
    if (h->opcode > CLIENT_OP_BINARY && !control)
        return client_fail(cl, 1002, "server sent an unknown data opcode");
    if (h->opcode > CLIENT_OP_PONG)
        return client_fail(cl, 1002, "server sent an unknown control opcode");
    if (control && (h->len > 125 || !h->fin))
        return client_fail(cl, 1002, "server sent a control frame over 125 bytes or fragmented");
    if (h->opcode == CLIENT_OP_CONT && cl->mop == 0)
        return client_fail(cl, 1002, "server sent a continuation with no message open");
    if ((h->opcode == CLIENT_OP_TEXT || h->opcode == CLIENT_OP_BINARY) && cl->mop != 0)
        return client_fail(cl, 1002, "server started a message inside a fragmented one");
    /* Checked on the header alone so an oversized frame is refused at once,
     * without buffering any of it. */
    if (!control && h->len > cl->max_msg - cl->mlen)
        return client_fail(cl, 1009, "server message exceeds the receive ceiling");
    return PX_OK;
}

static int client_msg_append(client *cl, const uint8_t *p, size_t n)
{
    if (cl->mlen + n + 1 > cl->mcap) {
        size_t cap = PX_MIN(PX_MAX(cl->mcap * 2, cl->mlen + n + 1), cl->max_msg + 1);
        uint8_t *m = realloc(cl->msg, cap);
        if (m == NULL) {
            cl->rdead = 1;
            return px_err(cl->errstr, sizeof(cl->errstr), "out of memory for %zu bytes", cap);
        }
        cl->msg = m;
        cl->mcap = cap;
    }
    memcpy(cl->msg + cl->mlen, p, n);
    cl->mlen += n;
    cl->msg[cl->mlen] = '\0';
    return PX_OK;
}

/* A data frame: part or end of a message. PX_OK when a message is done. */
static int client_on_data(client *cl, const client_hdr *h, const uint8_t *p, client_frame *out)
{
    if (h->opcode != CLIENT_OP_CONT)
        cl->mop = h->opcode;
    if (client_msg_append(cl, p, (size_t)h->len) != PX_OK)
        return PX_ERROR;
    if (!h->fin)
        return PX_AGAIN;
    out->opcode = cl->mop;
    out->payload = cl->msg;
    out->len = cl->mlen;
    cl->mop = 0;
    cl->returned = 1;
    return PX_OK;
}

static int client_on_close(client *cl, const uint8_t *p, size_t n, client_frame *out)
{
    if (n == 1)
        return client_fail(cl, 1002, "server sent a close payload of one byte");
    cl->close_code = n >= 2 ? (p[0] << 8 | p[1]) : 1005;
    size_t rl = n >= 2 ? n - 2 : 0;
    memcpy(cl->ctl, p + (n - rl), rl);
    cl->ctl[rl] = '\0';
    out->opcode = CLIENT_OP_CLOSE;
    out->payload = cl->ctl;
    out->len = rl;
    out->close_code = cl->close_code;
    /* Echo the code back, as RFC 6455 5.5.1 asks; the server then drops TCP. */
    client_send_close(cl, cl->close_code == 1005 ? 0 : cl->close_code);
    cl->rdead = 1;
    return PX_OK;
}

/* A control frame. PX_OK when it is for the caller (pong, close). */
static int client_on_control(client *cl, const client_hdr *h, const uint8_t *p, client_frame *out)
{
    size_t n = (size_t)h->len;
    if (h->opcode == CLIENT_OP_CLOSE)
        return client_on_close(cl, p, n, out);
    if (h->opcode == CLIENT_OP_PING) {
        cl->pings++;
        if (!cl->wdead && !cl->sent_close)
            (void)client_send_frame(cl, CLIENT_OP_PONG, p, n, 1);
        return PX_AGAIN;
    }
    memcpy(cl->ctl, p, n);
    cl->ctl[n] = '\0';
    out->opcode = CLIENT_OP_PONG;
    out->payload = cl->ctl;
    out->len = n;
    return PX_OK;
}

/* Decodes buffered frames until one completes a message for the caller.
 * PX_AGAIN: the buffer ran out first. */
static int client_decode(client *cl, client_frame *out)
{
    for (;;) {
        client_hdr h;
        const uint8_t *b = cl->rbuf + cl->rpos;
        size_t avail = cl->rlen - cl->rpos;
        if (client_hdr_parse(b, avail, &h) != PX_OK)
            return PX_AGAIN;
        if (client_hdr_check(cl, &h) != PX_OK)
            return PX_ERROR;
        if (avail - h.hlen < h.len)
            return PX_AGAIN;
        cl->rpos += h.hlen + (size_t)h.len;
        int rc = h.opcode >= CLIENT_OP_CLOSE ? client_on_control(cl, &h, b + h.hlen, out)
                                             : client_on_data(cl, &h, b + h.hlen, out);
        if (rc != PX_AGAIN)
            return rc;
    }
}

int client_recv(client *cl, int timeout_ms, client_frame *out)
{
    int64_t deadline = client_deadline(timeout_ms);
    memset(out, 0, sizeof(*out));
    if (cl->returned) {
        cl->mlen = 0;
        cl->returned = 0;
    }
    if (cl->rdead) {
        if (cl->close_code != 0)
            px_err(cl->errstr, sizeof(cl->errstr), "connection closed (code %d)", cl->close_code);
        return PX_ERROR;
    }
    for (;;) {
        int rc = client_decode(cl, out);
        if (rc != PX_AGAIN)
            return rc;
        rc = client_fill(cl, deadline);
        if (rc != PX_OK)
            return rc;
    }
}

/* ---- JSON and the backlog --------------------------------------------- */

static int client_backlog_push(client *cl, json_t *msg, size_t bytes)
{
    if (cl->blen >= CLIENT_BACKLOG_MAX || cl->bbytes + bytes > CLIENT_BACKLOG_BYTES) {
        json_decref(msg);
        return px_err(cl->errstr, sizeof(cl->errstr),
                      "backlog full (%zu messages, %zu bytes): nobody reads them",
                      cl->blen, cl->bbytes);
    }
    client_item *it = px_malloc(sizeof(*it));
    it->msg = msg; /* the backlog owns msg now */
    it->bytes = bytes;
    it->next = NULL;
    if (cl->tail != NULL)
        cl->tail->next = it;
    else
        cl->head = it;
    cl->tail = it;
    cl->blen++;
    cl->bbytes += bytes;
    return PX_OK;
}

/* Unlinks and returns the oldest backlog message satisfying pred, or NULL. */
static json_t *client_backlog_take(client *cl, client_pred pred, void *arg)
{
    client_item *prev = NULL;
    for (client_item *it = cl->head; it != NULL; prev = it, it = it->next) {
        if (pred != NULL && !pred(it->msg, arg))
            continue;
        if (prev != NULL)
            prev->next = it->next;
        else
            cl->head = it->next;
        if (cl->tail == it)
            cl->tail = prev;
        cl->blen--;
        cl->bbytes -= it->bytes;
        json_t *msg = it->msg;
        free(it);
        return msg;
    }
    return NULL;
}

/* Turns one received frame into JSON, or says why it cannot be. */
static int client_frame_json(client *cl, const client_frame *f, json_t **msg)
{
    json_error_t jerr;
    if (f->opcode == CLIENT_OP_CLOSE)
        return px_err(cl->errstr, sizeof(cl->errstr), "server closed the connection (code %d%s%s)",
                      f->close_code, f->len ? ": " : "", (const char *)f->payload);
    if (f->opcode == CLIENT_OP_BINARY)
        return px_err(cl->errstr, sizeof(cl->errstr), "server sent a binary message");
    *msg = json_loadb((const char *)f->payload, f->len, 0, &jerr);
    if (*msg == NULL)
        return px_err(cl->errstr, sizeof(cl->errstr), "server sent non-JSON text: %s", jerr.text);
    return PX_OK;
}

int client_next(client *cl, client_pred pred, void *arg, int timeout_ms, json_t **out)
{
    int64_t deadline = client_deadline(timeout_ms);
    *out = client_backlog_take(cl, pred, arg);
    if (*out != NULL)
        return PX_OK;
    for (;;) {
        client_frame f;
        json_t *msg = NULL;
        int left = client_left(deadline);
        int rc = client_recv(cl, left, &f);
        if (rc != PX_OK)
            return rc;
        if (f.opcode == CLIENT_OP_PONG)
            continue;
        if (client_frame_json(cl, &f, &msg) != PX_OK)
            return PX_ERROR;
        if (pred == NULL || pred(msg, arg)) {
            *out = msg; /* the caller owns it */
            return PX_OK;
        }
        if (client_backlog_push(cl, msg, f.len) != PX_OK)
            return PX_ERROR;
    }
}

/* arg is {key, value}: matches messages whose string field key equals value. */
static int client_field_is(const json_t *msg, void *arg)
{
    const char **kv = arg;
    const char *v = json_string_value(json_object_get(msg, kv[0]));
    return v != NULL && strcmp(v, kv[1]) == 0;
}

json_t *client_recv_json(client *cl, int timeout_ms)
{
    json_t *msg = NULL;
    if (client_next(cl, NULL, NULL, timeout_ms, &msg) == PX_AGAIN)
        px_err(cl->errstr, sizeof(cl->errstr), "no message within %d ms", timeout_ms);
    return msg;
}

static json_t *client_wait_field(client *cl, const char *key, const char *value, int timeout_ms)
{
    const char *kv[2] = { key, value };
    json_t *msg = NULL;
    if (client_next(cl, client_field_is, kv, timeout_ms, &msg) == PX_AGAIN)
        px_err(cl->errstr, sizeof(cl->errstr), "no message with %s \"%s\" within %d ms",
               key, value, timeout_ms);
    return msg;
}

json_t *client_wait_type(client *cl, const char *type, int timeout_ms)
{
    return client_wait_field(cl, "type", type, timeout_ms);
}

json_t *client_wait_ref(client *cl, const char *ref, int timeout_ms)
{
    return client_wait_field(cl, "ref", ref, timeout_ms);
}

static int client_none(const json_t *msg, void *arg)
{
    return 0;
}

int client_wait_close(client *cl, int timeout_ms)
{
    json_t *msg = NULL;
    int rc = client_next(cl, client_none, NULL, timeout_ms, &msg);
    if (rc == PX_AGAIN)
        px_err(cl->errstr, sizeof(cl->errstr), "no close within %d ms", timeout_ms);
    return rc == PX_ERROR && cl->close_code != 0 ? cl->close_code : -1;
}

/* ---- accessors and teardown -------------------------------------------- */

int client_close_code(const client *cl)
{
    return cl->close_code;
}

size_t client_backlog_len(const client *cl)
{
    return cl->blen;
}

uint64_t client_pings(const client *cl)
{
    return cl->pings;
}

int client_fd(const client *cl)
{
    return cl->fd;
}

const char *client_errstr(const client *cl)
{
    return cl->errstr;
}

void client_close(client *cl, int code)
{
    if (cl == NULL)
        return;
    client_send_close(cl, code);
    /* Wait for the server's echo (or EOF) so it closes TCP first and our
     * close() finds nothing unread: no RST, no spurious error on its side. */
    int64_t deadline = client_deadline(CLIENT_LINGER_MS);
    client_frame f;
    while (!cl->rdead) {
        if (client_recv(cl, client_left(deadline), &f) != PX_OK)
            break;
    }
    client_free(cl);
}

void client_free(client *cl)
{
    if (cl == NULL)
        return;
    for (client_item *it = cl->head, *next; it != NULL; it = next) {
        next = it->next;
        json_decref(it->msg);
        free(it);
    }
    if (cl->fd >= 0)
        close(cl->fd);
    free(cl->rbuf);
    free(cl->msg);
    free(cl);
}
