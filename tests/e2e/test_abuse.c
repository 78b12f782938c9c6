/* Abuse resistance end to end (issue 22): what one token, or no token at
 * all, can do to a gateway. Each test meets one limit of an extra gateway
 * ("gw-abuse": one worker, so every connection shares one reactor, and
 * small limits) and checks the refusal, its metric, or that another
 * connection is still served. Loopback only; counts and deadlines bound
 * every loop. */
#include "e2e.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int abuse_port;
static pid_t abuse_pid;

static client *abuse_connect(const char *user)
{
    int status;
    client *cl = e2e_connect_port(abuse_port, user, &status);
    ck_assert_msg(cl != NULL, "connect %s to gw-abuse: HTTP %d", user, status);
    json_decref(e2e_wait_type(cl, "synced"));
    return cl;
}

/* gw-abuse serves /metrics on PARLEY_METRICS_LISTEN, port abuse_port + 2. */
static long long abuse_metric(const char *name)
{
    return e2e_metric_at(abuse_port + 2, name);
}

/* Sends n commands made from fmt (%d: 0..n-1) in a row and counts those
 * refused rate_limited. With an id (id_prefix: the id is id_prefix and
 * the number), each answer is waited for; without (ack and read have no
 * answer), a ping sent after them marks the end. */
static int rate_burst(client *cl, const char *fmt, const char *id_prefix, int n)
{
    char cmd[160], ref[32];
    for (int i = 0; i < n; i++) {
        int len = snprintf(cmd, sizeof(cmd), fmt, i);
        ck_assert_int_eq(client_send_text(cl, cmd, (size_t)len), 0);
    }
    int limited = 0;
    for (int i = 0; id_prefix != NULL && i < n; i++) {
        snprintf(ref, sizeof(ref), "%s%d", id_prefix, i);
        json_t *r = client_wait_ref(cl, ref, E2E_WAIT_MS);
        ck_assert_msg(r != NULL, "no answer to %s: %s", ref, client_errstr(cl));
        limited += strcmp(e2e_str(r, "code"), "rate_limited") == 0;
        json_decref(r);
    }
    if (id_prefix != NULL)
        return limited;
    static int sentinels;
    snprintf(ref, sizeof(ref), "end%d", ++sentinels);
    int len = snprintf(cmd, sizeof(cmd), "{\"type\":\"ping\",\"id\":\"%s\"}", ref);
    ck_assert_int_eq(client_send_text(cl, cmd, (size_t)len), 0);
    for (;;) {
        json_t *m = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "no answer to %s: %s", ref, client_errstr(cl));
        int end = strcmp(e2e_str(m, "ref"), ref) == 0;
        limited += !end && strcmp(e2e_str(m, "code"), "rate_limited") == 0;
        json_decref(m);
        if (end)
            return limited;
    }
}

/* The most commands that a full bucket of burst 10 refilling 5/s (gw-abuse's
 * rates) can pass in ms, measured by the client from before its first send
 * to the last answer, a span that holds every admission: a slow run (ASan,
 * a loaded box) lets more through and the bound follows instead of failing.
 * +1: the bucket counts in float. */
static int rate_most(int64_t ms)
{
    return 10 + (int)(5 * ms / 1000) + 1;
}

/* gw-abuse runs PARLEY_CMD_RATE=5, PARLEY_CMD_BURST=10: of 30 commands of
 * one kind in a row the burst passes and what refilled meanwhile, whatever
 * the kind; each kind has a bucket of its own (pings first: later kinds end
 * with a ping). */
START_TEST(every_command_kind_is_rate_limited)
{
    static const struct { const char *kind, *fmt, *id; } kinds[] = {
        { "ping", "{\"type\":\"ping\",\"id\":\"p%d\"}", "p" },
        { "group", "{\"type\":\"group_info\",\"id\":\"g%d\",\"group\":\"g_none\"}", "g" },
        { "ack", "{\"type\":\"ack\",\"ids\":[\"x%d\"]}", NULL },
        { "read", "{\"type\":\"read\",\"ids\":[\"x%d\"]}", NULL },
    };
    char u[65], name[96];
    e2e_user("kinds", u);
    client *cl = abuse_connect(u);
    for (size_t k = 0; k < PX_ARRAY_LEN(kinds); k++) {
        int64_t t0 = px_mono_ms();
        int limited = rate_burst(cl, kinds[k].fmt, kinds[k].id, 30);
        int64_t ms = px_mono_ms() - t0;
        fprintf(stderr, "report: %s: %d of 30 refused rate_limited in %lld ms\n", kinds[k].kind,
                limited, (long long)ms);
        ck_assert_msg(limited <= 22 && 30 - limited <= rate_most(ms),
                      "%s: %d of 30 refused in %lld ms", kinds[k].kind, limited, (long long)ms);
        snprintf(name, sizeof(name), "parley_gateway_rate_limited_total{kind=\"%s\"}",
                 kinds[k].kind);
        ck_assert_int_ge(abuse_metric(name), limited);
    }
    client_close(cl, 1000);
}
END_TEST

/* Three connections of one user share one send bucket (burst 10, 5/s):
 * a new connection brings no fresh burst. */
START_TEST(send_rate_is_per_user)
{
    char u[65], to[65], cid[16];
    e2e_user("peruser", u);
    e2e_user("peruser_to", to);
    client *cl[3];
    for (int j = 0; j < 3; j++)
        cl[j] = abuse_connect(u);
    int64_t t0 = px_mono_ms();
    for (int j = 0; j < 3; j++)
        for (int i = 0; i < 10; i++) {
            snprintf(cid, sizeof(cid), "s%d_%d", j, i);
            e2e_send_async(cl[j], cid, to, "x");
        }
    int sent = 0, limited = 0;
    for (int j = 0; j < 3; j++)
        for (int i = 0; i < 10; i++) {
            snprintf(cid, sizeof(cid), "s%d_%d", j, i);
            json_t *r = client_wait_ref(cl[j], cid, E2E_WAIT_MS);
            ck_assert_msg(r != NULL, "no answer to %s", cid);
            sent += strcmp(e2e_str(r, "type"), "sent") == 0;
            limited += strcmp(e2e_str(r, "code"), "rate_limited") == 0;
            json_decref(r);
        }
    int64_t ms = px_mono_ms() - t0;
    fprintf(stderr, "report: one user, 3 connections, 30 sends: %d sent, %d rate_limited in "
            "%lld ms\n", sent, limited, (long long)ms);
    ck_assert_int_eq(sent + limited, 30);
    ck_assert_int_le(sent, rate_most(ms));
    for (int j = 0; j < 3; j++)
        client_close(cl[j], 1000);
}
END_TEST

/* PARLEY_USER_CONNS=3: a fourth connection of the user is refused 429. */
START_TEST(a_user_holds_at_most_its_connection_cap)
{
    char u[65];
    e2e_user("conncap", u);
    long long before = abuse_metric("parley_gateway_user_conns_refused_total");
    client *cl[3];
    for (int j = 0; j < 3; j++)
        cl[j] = abuse_connect(u);
    int status;
    client *extra = e2e_connect_port(abuse_port, u, &status);
    ck_assert_msg(extra == NULL, "a fourth connection was accepted");
    ck_assert_int_eq(status, 429);
    ck_assert_int_gt(abuse_metric("parley_gateway_user_conns_refused_total"), before);
    for (int j = 0; j < 3; j++)
        client_close(cl[j], 1000);
}
END_TEST

/* One flooding connection: acks of 1000 long ids (~64 KiB each, masked
 * with a zero key), written as fast as the socket takes them; what comes
 * back (rate_limited answers) is read and dropped so the flood is never
 * closed as a slow reader. Runs until told to stop, 20 s at most. */
typedef struct flood {
    int fd;
    atomic_int stop, running;
    atomic_llong written;
} flood;

static size_t flood_frame(unsigned char **out)
{
    size_t cap = 70000, len = 0;
    char *p = px_malloc(cap);
    len += (size_t)snprintf(p, cap, "{\"type\":\"ack\",\"ids\":[");
    for (int i = 0; i < 1000; i++)
        len += (size_t)snprintf(p + len, cap - len, "%s\"%060d\"", i ? "," : "", i);
    len += (size_t)snprintf(p + len, cap - len, "]}");
    unsigned char *f = px_malloc(len + 8);
    ck_assert_uint_lt(len, 65536); /* a 16-bit length, as RFC 6455 wants it minimal */
    f[0] = 0x81;
    f[1] = 0x80 | 126;
    f[2] = (unsigned char)(len >> 8);
    f[3] = (unsigned char)len;
    memset(f + 4, 0, 4);
    memcpy(f + 8, p, len);
    free(p);
    *out = f;
    return len + 8;
}

static void *flood_main(void *arg)
{
    flood *fl = arg;
    unsigned char *frame, sink[65536];
    size_t n = flood_frame(&frame), off = 0;
    int64_t end = px_mono_ms() + 20000;
    while (!atomic_load(&fl->stop) && px_mono_ms() < end) {
        struct pollfd pfd = { fl->fd, POLLIN | POLLOUT, 0 };
        if (poll(&pfd, 1, 100) < 0 && errno != EINTR)
            break;
        if ((pfd.revents & POLLIN) && recv(fl->fd, sink, sizeof(sink), MSG_DONTWAIT) == 0)
            break;
        if (!(pfd.revents & POLLOUT))
            continue;
        ssize_t w = send(fl->fd, frame + off, n - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            break;
        if (w > 0) {
            off = (off + (size_t)w) % n;
            atomic_fetch_add(&fl->written, w);
        }
    }
    free(frame);
    atomic_store(&fl->running, 0);
    return NULL;
}

/* The gateway reads at most a budget from one socket per turn of its
 * reactor: another connection on the same worker gets its pong while the
 * flood is still going, not after it. */
START_TEST(a_flooding_connection_does_not_starve_its_neighbour)
{
    char a[65], b[65];
    e2e_user("flooder", a);
    e2e_user("neighbour", b);
    client *fc = abuse_connect(a), *nc = abuse_connect(b);
    flood fl = { .fd = client_fd(fc) };
    atomic_store(&fl.running, 1);
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, flood_main, &fl), 0);
    /* The flood is under way once some MiB went out (bounded: it stops by itself). */
    while (atomic_load(&fl.running) && atomic_load(&fl.written) < (4 << 20))
        usleep(10 * 1000);
    e2e_send_text(nc, "{\"type\":\"ping\",\"id\":\"neighbour\"}");
    json_t *r = client_wait_ref(nc, "neighbour", E2E_WAIT_MS);
    int flooding = atomic_load(&fl.running);
    atomic_store(&fl.stop, 1);
    pthread_join(th, NULL);
    fprintf(stderr, "report: flood wrote %lld bytes; neighbour's pong %s\n",
            (long long)atomic_load(&fl.written), r ? "came" : "never came");
    ck_assert_msg(r != NULL, "the neighbour's ping was not answered: %s", client_errstr(nc));
    ck_assert_msg(flooding, "the neighbour's pong came only once the flood had ended");
    json_decref(r);
    client_free(fc);
    client_close(nc, 1000);
}
END_TEST

/* Control pings, never reading: the gateway's pongs count against its send
 * queue (64 KiB here) like any message, and the connection is dropped
 * (close 1013 if it still fits, else the socket just ends). */
START_TEST(pings_never_read_are_dropped_at_the_ceiling)
{
    char u[65], payload[125];
    e2e_user("pinger", u);
    memset(payload, 'p', sizeof(payload));
    long long before = abuse_metric("parley_gateway_slow_client_closed_total");
    client *cl = abuse_connect(u);
    int sent = 0;
    for (; sent < 200000; sent++)
        if (client_send_frame(cl, CLIENT_OP_PING, payload, sizeof(payload), 1) != 0)
            break;
    int code;
    int ended = e2e_wait_end(cl, 20000, &code);
    fprintf(stderr, "report: %d pings sent unread; connection %s (close code %d)\n", sent,
            ended ? "dropped" : "kept", code);
    ck_assert_msg(ended, "a client that pings and never reads was kept");
    ck_assert_msg(code == 0 || code == 1013, "close code %d", code);
    ck_assert_int_gt(abuse_metric("parley_gateway_slow_client_closed_total"), before);
    client_free(cl);
}
END_TEST

/* PARLEY_MAX_FRAGMENTS=8: a message in 20 one-byte fragments is closed
 * 1009 instead of being held chunk by chunk. */
START_TEST(too_many_fragments_close_1009)
{
    char u[65];
    e2e_user("frags", u);
    long long before = abuse_metric("parley_gateway_fragments_closed_total");
    client *cl = abuse_connect(u);
    ck_assert_int_eq(client_send_frame(cl, CLIENT_OP_TEXT, "{", 1, 0), 0);
    for (int i = 0; i < 20 && client_send_frame(cl, CLIENT_OP_CONT, " ", 1, 0) == 0; i++)
        ;
    ck_assert_int_eq(client_wait_close(cl, E2E_WAIT_MS), 1009);
    ck_assert_int_gt(abuse_metric("parley_gateway_fragments_closed_total"), before);
    client_free(cl);
}
END_TEST

/* A TCP connection to 127.0.0.1:port from src; -1 on failure. */
static int raw_connect(const char *src, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in from = { .sin_family = AF_INET }, to = { .sin_family = AF_INET,
                                                               .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, src, &from.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    if (fd < 0 || bind(fd, (struct sockaddr *)&from, sizeof(from)) != 0 ||
        connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* 1 once the server has closed fd (EOF or reset). */
static int raw_closed(int fd)
{
    char c;
    ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
}

/* Slowloris: a header byte every 300 ms never lets libmicrohttpd's silence
 * timeout fire; PARLEY_HTTP_HEAD_TIMEOUT_S=2 drops the connection anyway. */
START_TEST(a_slow_request_head_is_dropped)
{
    static const char start[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    const char *name = "parley_gateway_http_refused_total{reason=\"head_timeout\"}";
    long long before = abuse_metric(name);
    int fd = raw_connect("127.0.0.1", abuse_port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(send(fd, start, sizeof(start) - 1, MSG_NOSIGNAL), (ssize_t)(sizeof(start) - 1));
    int closed = 0, trickled = 0;
    for (; trickled < 50 && !closed; trickled++) { /* 15 s of trickle at most */
        usleep(300 * 1000);
        closed = send(fd, "a", 1, MSG_NOSIGNAL) != 1 || raw_closed(fd);
    }
    close(fd);
    fprintf(stderr, "report: slow head: %s after %d trickled bytes\n",
            closed ? "dropped" : "still open", trickled);
    ck_assert_msg(closed, "a request head trickled for 15 s was kept");
    ck_assert_int_gt(abuse_metric(name), before);
}
END_TEST

/* 100 silent connections from one address against a gateway whose
 * connection limit is 84 (PARLEY_MAX_CONNS=20 + 64): past
 * PARLEY_HTTP_PER_ADDRESS=16 unfinished heads that address is refused, so
 * a health probe from another address is still answered. The flood comes
 * from an address no other test uses: its connections count against it
 * until the server has read their ends, which a loaded server does well
 * after they are closed, and the tests after this one connect from
 * 127.0.0.1 at once. */
START_TEST(one_address_cannot_fill_the_server)
{
    const char *name = "parley_gateway_http_refused_total{reason=\"per_address\"}";
    long long before = abuse_metric(name);
    int fds[100], opened = 0;
    for (int i = 0; i < 100; i++) {
        fds[i] = raw_connect("127.0.0.3", abuse_port);
        opened += fds[i] >= 0;
        if (fds[i] >= 0) /* a refused one may fail the send: fine */
            (void)!send(fds[i], "GET / HTTP/1.1\r\n", 16, MSG_NOSIGNAL);
    }
    char resp[512];
    int status = -1;
    for (int i = 0; i < 30 && status != 200; i++) {
        status = e2e_http_get_from("127.0.0.2", abuse_port, "/healthz", resp, sizeof(resp));
        if (status != 200)
            usleep(100 * 1000);
    }
    for (int i = 0; i < 100; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    /* Every refusal is counted by now: the probe was queued behind them. */
    long long refused = abuse_metric(name);
    fprintf(stderr, "report: %d connections from one address: %lld refused; probe answered %d\n",
            opened, refused - before, status);
    ck_assert_int_eq(status, 200);
    ck_assert_int_gt(refused, before);
}
END_TEST

/* The HTTP status the server answered on fd, or -1 if none came in time. */
static int upload_status(int fd)
{
    char buf[512];
    struct pollfd pfd = { fd, POLLIN, 0 };
    if (poll(&pfd, 1, E2E_WAIT_MS) != 1)
        return -1;
    ssize_t r = recv(fd, buf, sizeof(buf) - 1, 0);
    if (r < 13)
        return -1;
    buf[r] = '\0';
    return atoi(buf + 9);
}

/* Starts an upload of 100,000 bytes as user on a raw connection. It asks
 * `Expect: 100-continue`, so the server answers the head alone: 100 once
 * the upload holds its slots, or the refusal; *status gets it (-1: none).
 * After a 100 the first body bytes are sent. -1 if the connection failed. */
static int upload_start(const char *user, int *status)
{
    char tok[2048], head[2400];
    e2e_token(user, 3600, tok, sizeof(tok));
    int n = snprintf(head, sizeof(head),
                     "POST /v1/media HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n"
                     "Expect: 100-continue\r\n\r\n",
                     tok);
    *status = -1;
    int fd = raw_connect("127.0.0.1", abuse_port);
    if (fd >= 0 && send(fd, head, (size_t)n, MSG_NOSIGNAL) != n) {
        close(fd);
        return -1;
    }
    if (fd >= 0 && (*status = upload_status(fd)) == 100)
        (void)!send(fd, "ab", 2, MSG_NOSIGNAL);
    return fd;
}

/* PARLEY_MEDIA_USER_SLOTS=2: a user's third upload at once is refused 429
 * (the gateway's 64 slots are not one user's to take). Each upload is
 * opened only once the one before holds its slots (its 100 came), so the
 * server sees them in this order whatever its load. */
START_TEST(a_user_holds_at_most_its_media_slots)
{
    char u[65];
    e2e_user("uploader", u);
    const char *name = "parley_gateway_media_refused_total{reason=\"user_slots\"}";
    long long before = abuse_metric(name);
    int sa, sb, sc;
    int a = upload_start(u, &sa), b = upload_start(u, &sb), c = upload_start(u, &sc);
    ck_assert(a >= 0 && b >= 0 && c >= 0);
    close(a);
    close(b);
    close(c);
    ck_assert_int_eq(sa, 100);
    ck_assert_int_eq(sb, 100);
    ck_assert_int_eq(sc, 429);
    ck_assert_int_gt(abuse_metric(name), before);
}
END_TEST

/* An upload trickling a byte every 500 ms (never silent long enough for
 * the idle timeout) is dropped once PARLEY_MEDIA_MIN_RATE (64 KiB/s here)
 * fails after its first 10 s. */
START_TEST(a_trickled_upload_is_dropped)
{
    char u[65];
    e2e_user("trickler", u);
    const char *name = "parley_gateway_media_refused_total{reason=\"too_slow\"}";
    long long before = abuse_metric(name);
    int status, fd = upload_start(u, &status), closed = 0, trickled = 0;
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(status, 100);
    for (; trickled < 50 && !closed; trickled++) { /* 25 s at most */
        usleep(500 * 1000);
        closed = send(fd, "c", 1, MSG_NOSIGNAL) != 1 || raw_closed(fd);
    }
    close(fd);
    fprintf(stderr, "report: trickled upload: %s after %d bytes\n", closed ? "dropped" : "kept",
            trickled);
    ck_assert_msg(closed, "an upload trickled for 25 s was kept");
    ck_assert_int_gt(abuse_metric(name), before);
}
END_TEST

/* Uploads len bytes as user to gw-abuse; copies the media id out. */
static void upload_file(const char *user, size_t len, char id[65])
{
    char tok[2048], head[2400], resp[1024];
    e2e_token(user, 3600, tok, sizeof(tok));
    int n = snprintf(head, sizeof(head),
                     "POST /v1/media HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "Connection: close\r\nContent-Length: %zu\r\n\r\n", tok, len);
    unsigned char *body = malloc(len);
    for (size_t i = 0; i < len; i++)
        body[i] = (unsigned char)(i * 7 + len);
    int fd = raw_connect("127.0.0.1", abuse_port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(send(fd, head, (size_t)n, MSG_NOSIGNAL), n);
    for (size_t off = 0; off < len;) {
        ssize_t w = send(fd, body + off, len - off, MSG_NOSIGNAL);
        ck_assert_int_gt(w, 0);
        off += (size_t)w;
    }
    size_t got = 0;
    ssize_t r;
    while (got < sizeof(resp) - 1 && (r = recv(fd, resp + got, sizeof(resp) - 1 - got, 0)) > 0)
        got += (size_t)r;
    resp[got] = '\0';
    close(fd);
    free(body);
    const char *json = strstr(resp, "\r\n\r\n");
    json_t *o = json != NULL ? json_loads(json + 4, 0, NULL) : NULL;
    ck_assert_msg(o != NULL && json_is_string(json_object_get(o, "media_id")), "upload: %s", resp);
    snprintf(id, 65, "%s", json_string_value(json_object_get(o, "media_id")));
    json_decref(o);
}

/* Starts a download of media id as user on a raw connection whose receive
 * buffer is 4 KiB, and reads nothing of the body: the file (larger than
 * both sockets' buffers) cannot be handed over whole, so the download
 * holds its slots. *status gets the answer's status (-1: none). */
static int download_start(const char *user, const char *id, int *status)
{
    char tok[2048], head[2400];
    int small = 4096;
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons((uint16_t)abuse_port) };
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    e2e_token(user, 3600, tok, sizeof(tok));
    int n = snprintf(head, sizeof(head),
                     "GET /v1/media/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n",
                     id, tok);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    *status = -1;
    ck_assert_int_ge(fd, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
    ck_assert_int_eq(send(fd, head, (size_t)n, MSG_NOSIGNAL), n);
    *status = upload_status(fd);
    return fd;
}

/* PARLEY_MEDIA_USER_SLOTS=2 holds for downloads too: a user's third
 * download at once is refused 429. Each download holds its slot before its
 * 200 is sent, so the order is the one the test makes. The held downloads
 * read nothing, so past 10 s the rate check would free their slots: a try
 * during which it dropped one (a gateway slow to answer, under load) says
 * nothing and is made again. */
START_TEST(a_user_holds_at_most_its_download_slots)
{
    char u[65], id[65];
    e2e_user("downloader", u);
    upload_file(u, 8 << 20, id);
    const char *name = "parley_gateway_media_refused_total{reason=\"user_slots\"}";
    const char *slow = "parley_gateway_media_refused_total{reason=\"too_slow_download\"}";
    long long before = abuse_metric(name), dropped;
    int sa, sb, sc, tries = 0;
    do {
        dropped = abuse_metric(slow);
        int a = download_start(u, id, &sa), b = download_start(u, id, &sb);
        int c = download_start(u, id, &sc);
        close(a);
        close(b);
        close(c);
    } while (abuse_metric(slow) != dropped && ++tries < 3);
    ck_assert_int_eq(sa, 200);
    ck_assert_int_eq(sb, 200);
    ck_assert_int_eq(sc, 429);
    ck_assert_int_gt(abuse_metric(name), before);
}
END_TEST

/* A download whose reader takes nothing is dropped once it averages under
 * PARLEY_MEDIA_MIN_RATE (64 KiB/s here) past its first 10 s, counting
 * only what the reader acknowledged: well before the 30 s silence timeout
 * would end it. */
START_TEST(a_slow_download_is_dropped)
{
    char u[65], id[65], buf[65536];
    e2e_user("slowreader", u);
    upload_file(u, 8 << 20, id);
    const char *name = "parley_gateway_media_refused_total{reason=\"too_slow_download\"}";
    long long before = abuse_metric(name);
    int status, fd = download_start(u, id, &status);
    ck_assert_int_eq(status, 200);
    int64_t t0 = px_mono_ms();
    while (abuse_metric(name) == before && px_mono_ms() - t0 < 25000)
        usleep(200 * 1000);
    int64_t dropped_ms = px_mono_ms() - t0;
    ck_assert_msg(abuse_metric(name) > before, "a download read by nobody was kept 25 s");
    /* What the sockets held still comes, then the end, short of the file. */
    struct timeval tv = { 5, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ssize_t r;
    size_t got = 0;
    while ((r = recv(fd, buf, sizeof(buf), 0)) > 0)
        got += (size_t)r;
    ck_assert_msg(r == 0 || errno == ECONNRESET, "download still open after the drop (%s)",
                  strerror(errno));
    ck_assert_msg(got < (8 << 20), "the whole file was served (%zu bytes)", got);
    close(fd);
    fprintf(stderr, "report: a download read by nobody was dropped after %lld ms (%zu bytes "
            "had reached the reader's side)\n", (long long)dropped_ms, got);
}
END_TEST

/* The status of one raw request to gw-abuse (head as given, then a blank
 * line), or -1. */
static int raw_request(const char *head)
{
    char req[4096];
    int n = snprintf(req, sizeof(req), "%s\r\n", head);
    int fd = raw_connect("127.0.0.1", abuse_port), status = -1;
    if (fd >= 0 && send(fd, req, (size_t)n, MSG_NOSIGNAL) == n)
        status = upload_status(fd);
    if (fd >= 0)
        close(fd);
    return status;
}

/* The WebSocket handshake is checked as RFC 6455 says, not by substrings:
 * Connection and Upgrade are token lists, the key is 16 bytes of base64,
 * and with PARLEY_ALLOWED_ORIGINS set a browser's Origin must be listed. */
START_TEST(handshakes_are_checked_strictly)
{
    static const struct { const char *connection, *key, *origin; int status; } cases[] = {
        { "keep-alive, Upgrade", "dGhlIHNhbXBsZSBub25jZQ==", "https://app.example", 101 },
        { "Upgrade", "dGhlIHNhbXBsZSBub25jZQ==", NULL, 101 },
        { "not-upgrade", "dGhlIHNhbXBsZSBub25jZQ==", NULL, 400 },
        { "Upgrade", "AAAAAAAAAAAAAAAAAAAAAAAA", NULL, 400 },
        { "Upgrade", "dGhlIHNhbXBsZSBub25jZR==", NULL, 400 },
        { "Upgrade", "dGhlIHNhbXBsZSBub25jZQ==", "https://evil.example", 403 },
    };
    char u[65], tok[2048], head[3072], origin[128];
    e2e_user("handshake", u);
    e2e_token(u, 3600, tok, sizeof(tok));
    for (size_t i = 0; i < PX_ARRAY_LEN(cases); i++) {
        snprintf(origin, sizeof(origin), "Origin: %s\r\n", cases[i].origin);
        snprintf(head, sizeof(head),
                 "GET /v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 "Upgrade: websocket\r\nConnection: %s\r\nSec-WebSocket-Key: %s\r\n"
                 "Sec-WebSocket-Version: 13\r\n%s",
                 tok, cases[i].connection, cases[i].key, cases[i].origin ? origin : "");
        ck_assert_msg(raw_request(head) == cases[i].status, "case %zu: not %d", i,
                      cases[i].status);
    }
}
END_TEST

/* A browser's token rides as the subprotocol "bearer.<token>" beside
 * "parley.v1" (not in the URL, where proxies log it); the server picks
 * "parley.v1". Without "parley.v1" offered the entry is not read. */
START_TEST(the_token_may_come_as_a_subprotocol)
{
    char u[65], tok[2048], head[3072];
    e2e_user("subproto", u);
    e2e_token(u, 3600, tok, sizeof(tok));
    static const char *const offers[] = { "parley.v1, bearer.%s", "bearer.%s" };
    static const int want[] = { 101, 401 };
    for (int i = 0; i < 2; i++) {
        char offer[2200];
        snprintf(offer, sizeof(offer), offers[i], tok);
        snprintf(head, sizeof(head),
                 "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n", offer);
        ck_assert_int_eq(raw_request(head), want[i]);
    }
}
END_TEST

/* Two different Content-Length values, or one beside Transfer-Encoding,
 * are refused 400 (a proxy in front could frame the request otherwise). */
START_TEST(conflicting_lengths_are_refused)
{
    ck_assert_int_eq(raw_request("GET /healthz HTTP/1.1\r\nHost: x\r\n"), 200);
    ck_assert_int_eq(raw_request("GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                 "Content-Length: 0\r\nContent-Length: 5\r\n"), 400);
    ck_assert_int_eq(raw_request("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                 "Transfer-Encoding: chunked\r\n"), 400);
}
END_TEST

/* Uploads body as user; copies the answer's media_id into id. */
static void upload_small(const char *user, const char *body, char id[64])
{
    char tok[2048], req[3072], resp[2048];
    e2e_token(user, 3600, tok, sizeof(tok));
    int n = snprintf(req, sizeof(req),
                     "POST /v1/media HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: text/plain\r\nContent-Length: %zu\r\nConnection: close\r\n"
                     "\r\n%s", tok, strlen(body), body);
    int fd = raw_connect("127.0.0.1", abuse_port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
    size_t got = 0;
    ssize_t r;
    struct pollfd pfd = { fd, POLLIN, 0 };
    while (got + 1 < sizeof(resp) && poll(&pfd, 1, E2E_WAIT_MS) == 1 &&
           (r = recv(fd, resp + got, sizeof(resp) - 1 - got, 0)) > 0)
        got += (size_t)r;
    resp[got] = '\0';
    close(fd);
    const char *at = strstr(resp, "\"media_id\":\"");
    ck_assert_msg(at != NULL, "no media_id in: %s", resp);
    snprintf(id, 64, "%.*s", (int)strcspn(at + 12, "\""), at + 12);
}

/* Media ids are 128 random bits: two uploads in a row share no prefix
 * (time-ordered ids shared their first characters for minutes), so the
 * 403 (exists) / 404 (unknown) answers of a download tell nothing of ids
 * nobody gave you. */
START_TEST(media_ids_are_unguessable)
{
    char u[65], a[64], b[64], body[96];
    e2e_user("mediaid", u);
    snprintf(body, sizeof(body), "first %s", u);
    upload_small(u, body, a);
    snprintf(body, sizeof(body), "second %s", u);
    upload_small(u, body, b);
    fprintf(stderr, "report: media ids in a row: %s %s\n", a, b);
    ck_assert_int_ne(strncmp(a, b, 6), 0);
}
END_TEST

/* With PARLEY_METRICS_LISTEN set, /metrics leaves the public port (404
 * there) for its own address, which answers /readyz too. */
START_TEST(metrics_are_off_the_client_port)
{
    char buf[4096];
    ck_assert_int_eq(e2e_http_get_from(NULL, abuse_port, "/metrics", buf, sizeof(buf)), 404);
    ck_assert_int_eq(e2e_http_get_from(NULL, abuse_port + 2, "/readyz", buf, sizeof(buf)), 200);
    ck_assert_int_ge(abuse_metric("parley_gateway_connections"), 0);
}
END_TEST

/* RLIMIT_NOFILE 600 with PARLEY_MAX_CONNS=20000: the gateway starts with
 * the cap lowered to fit (600 - 256 reserved) and says so, instead of
 * meeting the file limit in accept() once it is busy. */
START_TEST(max_conns_fits_the_file_limit)
{
    static const char *const env[] = { "PARLEY_MAX_CONNS", "20000", NULL };
    int port = abuse_port + 1;
    pid_t pid = e2e_spawn_extra("gw-nofile", port, 0, NULL, env, 600);
    long long cap = -1;
    for (int i = 0; i < 300 && cap < 0; i++) {
        cap = e2e_metric_at(port, "parley_gateway_max_connections");
        if (cap < 0)
            usleep(100 * 1000);
    }
    ck_assert_int_eq(cap, 600 - 256);
    ck_assert(e2e_extra_log_has("gw-nofile", (const char *const[]){ "lowered", NULL }));
    ck_assert_int_eq(e2e_stop_extra(pid), 0);
}
END_TEST

static Suite *abuse_suite(void)
{
    Suite *s = suite_create("e2e-abuse");
    TCase *tc = tcase_create("abuse");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, every_command_kind_is_rate_limited);
    tcase_add_test(tc, send_rate_is_per_user);
    tcase_add_test(tc, a_user_holds_at_most_its_connection_cap);
    tcase_add_test(tc, a_flooding_connection_does_not_starve_its_neighbour);
    tcase_add_test(tc, pings_never_read_are_dropped_at_the_ceiling);
    tcase_add_test(tc, too_many_fragments_close_1009);
    tcase_add_test(tc, a_slow_request_head_is_dropped);
    tcase_add_test(tc, one_address_cannot_fill_the_server);
    tcase_add_test(tc, a_user_holds_at_most_its_media_slots);
    tcase_add_test(tc, a_user_holds_at_most_its_download_slots);
    tcase_add_test(tc, a_slow_download_is_dropped);
    tcase_add_test(tc, a_trickled_upload_is_dropped);
    tcase_add_test(tc, handshakes_are_checked_strictly);
    tcase_add_test(tc, the_token_may_come_as_a_subprotocol);
    tcase_add_test(tc, conflicting_lengths_are_refused);
    tcase_add_test(tc, media_ids_are_unguessable);
    tcase_add_test(tc, metrics_are_off_the_client_port);
    tcase_add_test(tc, max_conns_fits_the_file_limit);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    static char metrics_listen[32];
    static const char *env[] = {
        "PARLEY_WORKERS", "1", "PARLEY_MAX_CONNS", "20", "PARLEY_CMD_RATE", "5",
        "PARLEY_CMD_BURST", "10", "PARLEY_SEND_RATE", "5", "PARLEY_SEND_BURST", "10",
        "PARLEY_USER_CONNS", "3", "PARLEY_SEND_QUEUE_BYTES", "65536",
        "PARLEY_HTTP_HEAD_TIMEOUT_S", "2", "PARLEY_HTTP_PER_ADDRESS", "16",
        "PARLEY_MAX_FRAGMENTS", "8", "PARLEY_MEDIA_USER_SLOTS", "2",
        "PARLEY_MEDIA_MIN_RATE", "65536",
        "PARLEY_ALLOWED_ORIGINS", "https://other.example, https://app.example",
        "PARLEY_METRICS_LISTEN", metrics_listen, NULL,
    };
    if (e2e_start() != 0) {
        e2e_stop();
        return EXIT_FAILURE;
    }
    abuse_port = e2e_port(E2E_GW2) + 30; /* +10: test_gateway's, +20: the browser tests' */
    snprintf(metrics_listen, sizeof(metrics_listen), "127.0.0.1:%d", abuse_port + 2);
    abuse_pid = e2e_spawn_extra("gw-abuse", abuse_port, 0, NULL, env, 0);
    SRunner *sr = srunner_create(abuse_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    int bad = e2e_stop_extra(abuse_pid) != 0;
    if (bad)
        fprintf(stderr, "gw-abuse exited badly; read its log (gw-abuse.log)\n");
    bad += e2e_stop();
    return failed == 0 && bad == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
