/* client: the upgrade checks, the frame codec, automatic pongs, ceilings and
 * the JSON backlog, against a loopback server thread that plays the server
 * half of RFC 6455 by hand from a per-test script. The server only records
 * what it saw; the test thread asserts after joining it. */
#include "check_main.h"
#include "client.h"
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define SRV_MAX_FRAMES 8

typedef struct srv_frame {
    int fin, rsv, opcode, masked;
    uint8_t mask[4];
    size_t len;
    uint8_t *payload;     /* unmasked, malloc'd */
    int wire_differs;     /* the masked bytes differ from the payload */
} srv_frame;

typedef struct srv srv;
typedef void (*srv_script)(srv *s, int fd);

struct srv {
    int lfd, port;
    srv_script script;
    uint64_t arg;              /* a number the script may use */
    pthread_t th;
    int go[2];                 /* test -> server: "carry on" */
    char req[8192];            /* the upgrade request as received */
    char peer[INET_ADDRSTRLEN];
    srv_frame frames[SRV_MAX_FRAMES];
    int nframes;
};

/* ---- the scripted server ------------------------------------------------ */

static void srv_accept_value(const char *key, char out[29])
{
    char in[128];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int n = snprintf(in, sizeof(in), "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    EVP_Digest(in, (size_t)n, md, &mdlen, EVP_sha1(), NULL);
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
}

static int srv_read_n(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);
        if (r <= 0)
            return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

static void srv_write(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w, n -= (size_t)w;
    }
}

/* Reads the request head into s->req. */
static int srv_read_req(srv *s, int fd)
{
    size_t got = 0;
    while (got < sizeof(s->req) - 1) {
        if (srv_read_n(fd, s->req + got, 1) != 0)
            return -1;
        s->req[++got] = '\0';
        if (got >= 4 && memcmp(s->req + got - 4, "\r\n\r\n", 4) == 0)
            return 0;
    }
    return -1;
}

/* Answers 101 with the right accept; extra bytes (frames) go in the same
 * write, as a fast server may do. */
static int srv_upgrade(srv *s, int fd, const void *extra, size_t n)
{
    char key[64] = "", acc[29], resp[512 + 256];
    if (srv_read_req(s, fd) != 0)
        return -1;
    const char *k = strstr(s->req, "Sec-WebSocket-Key: ");
    if (k != NULL)
        sscanf(k + 19, "%63[^\r]", key);
    srv_accept_value(key, acc);
    int hl = snprintf(resp, 512, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
    if (n > 0)
        memcpy(resp + hl, extra, n);
    srv_write(fd, resp, (size_t)hl + n);
    return 0;
}

/* Encodes a server (unmasked) frame header claiming len bytes. */
static size_t srv_hdr(uint8_t *b, int b0, uint64_t len)
{
    size_t h = 0;
    b[h++] = (uint8_t)b0;
    if (len < 126) {
        b[h++] = (uint8_t)len;
    } else if (len <= 0xFFFF) {
        b[h++] = 126, b[h++] = (uint8_t)(len >> 8), b[h++] = (uint8_t)len;
    } else {
        b[h++] = 127;
        for (int i = 7; i >= 0; i--)
            b[h++] = (uint8_t)(len >> (i * 8));
    }
    return h;
}

/* b0 is the first byte: 0x80 (FIN) | opcode. */
static void srv_frame_out(int fd, int b0, const void *payload, size_t len)
{
    uint8_t b[14 + 4096];
    size_t h = srv_hdr(b, b0, len);
    ck_assert_uint_le(len, 4096);
    memcpy(b + h, payload, len);
    srv_write(fd, b, h + len);
}

static void srv_text(int fd, const char *s)
{
    srv_frame_out(fd, 0x81, s, strlen(s));
}

/* Reads one client frame into s->frames. */
static int srv_frame_in(srv *s, int fd)
{
    uint8_t h[14];
    srv_frame *f = &s->frames[s->nframes];
    if (s->nframes == SRV_MAX_FRAMES || srv_read_n(fd, h, 2) != 0)
        return -1;
    f->fin = h[0] >> 7, f->rsv = (h[0] >> 4) & 7, f->opcode = h[0] & 15;
    f->masked = h[1] >> 7;
    uint64_t len = h[1] & 127;
    size_t extra = len == 126 ? 2 : len == 127 ? 8 : 0;
    if (srv_read_n(fd, h + 2, extra) != 0)
        return -1;
    if (extra > 0)
        len = 0;
    for (size_t i = 0; i < extra; i++)
        len = len << 8 | h[2 + i];
    if ((f->masked && srv_read_n(fd, f->mask, 4) != 0) || len > (64u << 20))
        return -1;
    f->len = (size_t)len;
    f->payload = malloc(f->len + 1);
    if (f->payload == NULL || srv_read_n(fd, f->payload, f->len) != 0) {
        free(f->payload);
        f->payload = NULL;
        return -1;
    }
    for (size_t i = 0; i < f->len && f->masked; i++) {
        uint8_t plain = f->payload[i] ^ f->mask[i & 3];
        f->wire_differs |= plain != f->payload[i];
        f->payload[i] = plain;
    }
    f->payload[f->len] = '\0';
    s->nframes++;
    return 0;
}

static int srv_close_code(const srv_frame *f)
{
    return f->len >= 2 ? f->payload[0] << 8 | f->payload[1] : -1;
}

static void srv_wait_go(srv *s)
{
    char c;
    ck_assert_int_eq(read(s->go[0], &c, 1), 1);
}

static void srv_go(srv *s)
{
    ck_assert_int_eq(write(s->go[1], "g", 1), 1);
}

static void *srv_main(void *arg)
{
    srv *s = arg;
    struct sockaddr_in peer;
    socklen_t pl = sizeof(peer);
    int fd = accept(s->lfd, (struct sockaddr *)&peer, &pl);
    if (fd < 0)
        return NULL;
    /* A script waiting for a frame the client never sends gives up. */
    struct timeval tv = { .tv_sec = 3 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    inet_ntop(AF_INET, &peer.sin_addr, s->peer, sizeof(s->peer));
    s->script(s, fd);
    close(fd);
    return NULL;
}

static void srv_start(srv *s, srv_script script, uint64_t arg)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof(a);
    memset(s, 0, sizeof(*s));
    s->script = script;
    s->arg = arg;
    s->lfd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(s->lfd, 0);
    ck_assert_int_eq(bind(s->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    ck_assert_int_eq(listen(s->lfd, 4), 0);
    ck_assert_int_eq(getsockname(s->lfd, (struct sockaddr *)&a, &al), 0);
    s->port = ntohs(a.sin_port);
    ck_assert_int_eq(pipe(s->go), 0);
    ck_assert_int_eq(pthread_create(&s->th, NULL, srv_main, s), 0);
}

static void srv_join(srv *s)
{
    pthread_join(s->th, NULL);
    close(s->lfd);
    close(s->go[0]);
    close(s->go[1]);
}

/* After the test's assertions: the frames it looked at. */
static void srv_free(srv *s)
{
    for (int i = 0; i < s->nframes; i++)
        free(s->frames[i].payload);
}

static client *connect_to(srv *s, size_t max_msg)
{
    char err[PX_ERRLEN];
    int status = -1;
    client_opts o = { .host = "127.0.0.1", .port = s->port, .token = "tok.en",
                      .timeout_ms = 2000, .max_msg = max_msg };
    client *cl = client_connect_ex(&o, &status, err, sizeof(err));
    ck_assert_msg(cl != NULL, "connect: %s", err);
    ck_assert_int_eq(status, 101);
    return cl;
}

/* ---- scripts ------------------------------------------------------------- */

static void script_hello(srv *s, int fd)
{
    uint8_t f[64];
    const char *m = "{\"type\":\"synced\"}";
    size_t h = srv_hdr(f, 0x81, strlen(m));
    memcpy(f + h, m, strlen(m));
    if (srv_upgrade(s, fd, f, h + strlen(m)) == 0)
        srv_frame_in(s, fd);
}

static void script_upgrade_only(srv *s, int fd)
{
    srv_upgrade(s, fd, NULL, 0);
}

static void script_wrong_accept(srv *s, int fd)
{
    static const char resp[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               "Connection: Upgrade\r\n"
                               "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    if (srv_read_req(s, fd) == 0)
        srv_write(fd, resp, sizeof(resp) - 1);
}

static void script_401(srv *s, int fd)
{
    static const char resp[] = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
    if (srv_read_req(s, fd) == 0)
        srv_write(fd, resp, sizeof(resp) - 1);
}

static void script_fragments(srv *s, int fd)
{
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_frame_out(fd, 0x01, "hel", 3);           /* text, not final */
    srv_frame_out(fd, 0x89, "p1", 2);            /* ping between fragments */
    srv_frame_out(fd, 0x00, "lo ", 3);           /* continuation */
    srv_frame_out(fd, 0x80, "world", 5);         /* final continuation */
    srv_frame_out(fd, 0x8A, "", 0);              /* unsolicited pong */
    for (int i = 0; i < 3; i++)                  /* the pong, then two of ours */
        if (srv_frame_in(s, fd) != 0)
            return;
}

static void script_oversized_header(srv *s, int fd)
{
    uint8_t h[14];
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    /* Claims s->arg bytes and sends none: the client must refuse on the
     * header alone. */
    srv_write(fd, h, srv_hdr(h, 0x81, s->arg));
    srv_frame_in(s, fd);
}

static void script_oversized_fragments(srv *s, int fd)
{
    char part[600];
    memset(part, 'x', sizeof(part));
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_frame_out(fd, 0x01, part, 512);          /* 512 + 512: exactly the ceiling */
    srv_frame_out(fd, 0x80, part, 512);
    srv_frame_out(fd, 0x01, part, 600);          /* 600 + 600: over it */
    srv_frame_out(fd, 0x80, part, 600);
    srv_frame_in(s, fd);
}

static void script_close_1003(srv *s, int fd)
{
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_frame_out(fd, 0x88, "\x03\xEB" "binary", 8);
    srv_frame_in(s, fd);
}

static void script_events(srv *s, int fd)
{
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_text(fd, "{\"type\":\"message\",\"id\":\"m1\"}");
    srv_text(fd, "{\"type\":\"sent\",\"ref\":\"c1\",\"msg_id\":\"x\"}");
    srv_text(fd, "{\"type\":\"receipt\",\"id\":\"r1\"}");
    srv_text(fd, "{\"type\":\"error\",\"ref\":\"c2\",\"code\":\"bad_request\"}");
    srv_wait_go(s);   /* keep the connection open until the test is done */
}

static void script_error_then_close(srv *s, int fd)
{
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_text(fd, "{\"type\":\"error\",\"code\":\"too_large\"}");
    srv_frame_out(fd, 0x88, "\x03\xF1", 2);
    srv_frame_in(s, fd);
}

static void script_slow_frame(srv *s, int fd)
{
    uint8_t f[32];
    size_t n = srv_hdr(f, 0x81, 7);
    memcpy(f + n, "{\"a\":1}", 7);
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_wait_go(s);
    srv_write(fd, f, 3);              /* header and one payload byte */
    srv_wait_go(s);
    srv_write(fd, f + 3, n + 7 - 3);
    srv_wait_go(s);
}

static void script_masked_from_server(srv *s, int fd)
{
    static const uint8_t f[] = { 0x81, 0x82, 1, 2, 3, 4, 'h' ^ 1, 'i' ^ 2 };
    if (srv_upgrade(s, fd, NULL, 0) != 0)
        return;
    srv_write(fd, f, sizeof(f));
    srv_frame_in(s, fd);
}

static void script_eof(srv *s, int fd)
{
    srv_upgrade(s, fd, NULL, 0);
}

/* ---- tests ---------------------------------------------------------------- */

START_TEST(accept_value_matches_rfc_example)
{
    /* RFC 6455 section 1.3: the test server's accept helper is right. */
    char acc[29];
    srv_accept_value("dGhlIHNhbXBsZSBub25jZQ==", acc);
    ck_assert_str_eq(acc, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}
END_TEST

START_TEST(handshake_with_bearer_token)
{
    srv s;
    client_frame f;
    srv_start(&s, script_hello, 0);
    client *cl = connect_to(&s, 0);
    /* The frame came in the same segment as the 101: it must not be lost. */
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_OK);
    ck_assert_int_eq(f.opcode, CLIENT_OP_TEXT);
    ck_assert_str_eq((const char *)f.payload, "{\"type\":\"synced\"}");
    ck_assert_int_eq(client_send_text(cl, "hi", 2), PX_OK);
    srv_join(&s);
    ck_assert_ptr_nonnull(strstr(s.req, "GET /v1/ws HTTP/1.1\r\n"));
    ck_assert_ptr_nonnull(strstr(s.req, "\r\nAuthorization: Bearer tok.en\r\n"));
    ck_assert_ptr_nonnull(strstr(s.req, "\r\nUpgrade: websocket\r\n"));
    ck_assert_ptr_nonnull(strstr(s.req, "\r\nSec-WebSocket-Version: 13\r\n"));
    ck_assert_int_eq(s.nframes, 1);
    ck_assert_int_eq(s.frames[0].opcode, CLIENT_OP_TEXT);
    ck_assert_str_eq((const char *)s.frames[0].payload, "hi");
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(token_in_query)
{
    srv s;
    char err[PX_ERRLEN];
    srv_start(&s, script_upgrade_only, 0);
    client_opts o = { .host = "127.0.0.1", .port = s.port, .token = "a b/c",
                      .token_in_query = 1, .timeout_ms = 2000 };
    client *cl = client_connect_ex(&o, NULL, err, sizeof(err));
    ck_assert_msg(cl != NULL, "connect: %s", err);
    srv_join(&s);
    ck_assert_ptr_nonnull(strstr(s.req, "GET /v1/ws?access_token=a%20b%2Fc HTTP/1.1\r\n"));
    ck_assert_ptr_null(strstr(s.req, "Authorization"));
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(wrong_accept_refused)
{
    srv s;
    char err[PX_ERRLEN];
    int status = -1;
    srv_start(&s, script_wrong_accept, 0);
    client *cl = client_connect("127.0.0.1", s.port, "t", NULL, 2000, &status, err, sizeof(err));
    srv_join(&s);
    ck_assert_ptr_null(cl);
    ck_assert_int_eq(status, 101);
    ck_assert_ptr_nonnull(strstr(err, "Sec-WebSocket-Accept"));
    srv_free(&s);
}
END_TEST

START_TEST(status_401_reported)
{
    srv s;
    char err[PX_ERRLEN];
    int status = -1;
    srv_start(&s, script_401, 0);
    client *cl = client_connect("127.0.0.1", s.port, NULL, NULL, 2000, &status, err, sizeof(err));
    srv_join(&s);
    ck_assert_ptr_null(cl);
    ck_assert_int_eq(status, 401);
    ck_assert_ptr_nonnull(strstr(err, "401"));
    ck_assert_ptr_null(strstr(s.req, "Authorization"));  /* NULL token: no header */
    srv_free(&s);
}
END_TEST

START_TEST(connection_refused_reports_no_status)
{
    /* A port that was just free: nobody listens there. */
    srv s;
    char err[PX_ERRLEN];
    int status = -1;
    srv_start(&s, script_eof, 0);
    int port = s.port;
    client *probe = connect_to(&s, 0);
    client_free(probe);
    srv_join(&s);
    client *cl = client_connect("127.0.0.1", port, "t", NULL, 2000, &status, err, sizeof(err));
    ck_assert_ptr_null(cl);
    ck_assert_int_eq(status, 0);
    ck_assert_ptr_nonnull(strstr(err, "connect"));
    srv_free(&s);
}
END_TEST

START_TEST(bind_source_address)
{
    srv s;
    char err[PX_ERRLEN];
    srv_start(&s, script_upgrade_only, 0);
    client *cl = client_connect("127.0.0.1", s.port, "t", "127.0.0.2", 2000, NULL, err, sizeof(err));
    ck_assert_msg(cl != NULL, "connect: %s", err);
    srv_join(&s);
    ck_assert_str_eq(s.peer, "127.0.0.2");
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(fragments_reassembled_ping_answered_frames_masked)
{
    srv s;
    client_frame f;
    static uint8_t big[70000];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)(i * 7 + 1);
    srv_start(&s, script_fragments, 0);
    client *cl = connect_to(&s, 0);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_OK);
    ck_assert_int_eq(f.opcode, CLIENT_OP_TEXT);
    ck_assert_uint_eq(f.len, 11);
    ck_assert_str_eq((const char *)f.payload, "hello world");
    ck_assert_uint_eq(client_pings(cl), 1);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_OK);   /* pongs are handed out */
    ck_assert_int_eq(f.opcode, CLIENT_OP_PONG);
    /* 64-bit length encoding, then a fragment with the 7-bit one. */
    ck_assert_int_eq(client_send_frame(cl, CLIENT_OP_BINARY, big, sizeof(big), 0), PX_OK);
    ck_assert_int_eq(client_send_frame(cl, CLIENT_OP_CONT, "tail!", 5, 1), PX_OK);
    srv_join(&s);

    ck_assert_int_eq(s.nframes, 3);
    const srv_frame *pong = &s.frames[0], *bin = &s.frames[1], *cont = &s.frames[2];
    ck_assert_int_eq(pong->opcode, CLIENT_OP_PONG);
    ck_assert_str_eq((const char *)pong->payload, "p1");
    ck_assert(pong->fin && pong->masked);
    ck_assert_int_eq(bin->opcode, CLIENT_OP_BINARY);
    ck_assert(!bin->fin && bin->masked && bin->wire_differs && bin->rsv == 0);
    ck_assert_uint_eq(bin->len, sizeof(big));
    ck_assert_mem_eq(bin->payload, big, sizeof(big));
    ck_assert_int_eq(cont->opcode, CLIENT_OP_CONT);
    ck_assert(cont->fin && cont->masked);
    ck_assert_str_eq((const char *)cont->payload, "tail!");
    /* A fresh mask per frame (equal by chance once in 2^32). */
    ck_assert_mem_ne(bin->mask, cont->mask, 4);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(oversized_frame_refused_on_header)
{
    /* _i is 0 or 1: a 1 KiB ceiling, then the default 16 MiB one. */
    srv s;
    client_frame f;
    srv_start(&s, script_oversized_header, _i == 0 ? 1025 : CLIENT_MAX_MSG + 1ull);
    client *cl = connect_to(&s, _i == 0 ? 1024 : 0);
    /* The payload is never sent: a client that waited for it would run out
     * of time (PX_AGAIN), not fail on the ceiling. */
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(client_errstr(cl), "ceiling"));
    ck_assert_int_eq(client_recv(cl, 0, &f), PX_ERROR);  /* and stays failed */
    srv_join(&s);
    ck_assert_int_eq(s.nframes, 1);
    ck_assert_int_eq(s.frames[0].opcode, CLIENT_OP_CLOSE);
    ck_assert_int_eq(srv_close_code(&s.frames[0]), 1009);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(oversized_reassembly_refused)
{
    srv s;
    client_frame f;
    srv_start(&s, script_oversized_fragments, 0);
    client *cl = connect_to(&s, 1024);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_OK);
    ck_assert_uint_eq(f.len, 1024);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_ERROR);
    srv_join(&s);
    ck_assert_int_eq(s.nframes, 1);
    ck_assert_int_eq(srv_close_code(&s.frames[0]), 1009);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(close_frame_parsed_and_echoed)
{
    srv s;
    client_frame f;
    srv_start(&s, script_close_1003, 0);
    client *cl = connect_to(&s, 0);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_OK);
    ck_assert_int_eq(f.opcode, CLIENT_OP_CLOSE);
    ck_assert_int_eq(f.close_code, 1003);
    ck_assert_str_eq((const char *)f.payload, "binary");
    ck_assert_int_eq(client_close_code(cl), 1003);
    ck_assert_int_eq(client_recv(cl, 100, &f), PX_ERROR);
    srv_join(&s);
    ck_assert_int_eq(s.nframes, 1);
    ck_assert_int_eq(s.frames[0].opcode, CLIENT_OP_CLOSE);
    ck_assert_int_eq(srv_close_code(&s.frames[0]), 1003);
    client_close(cl, 1000);   /* nothing more is sent after the echo */
    srv_free(&s);
}
END_TEST

START_TEST(backlog_keeps_other_messages_in_order)
{
    srv s;
    srv_start(&s, script_events, 0);
    client *cl = connect_to(&s, 0);
    json_t *m = client_wait_type(cl, "sent", 2000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m, "ref")), "c1");
    json_decref(m);
    ck_assert_uint_eq(client_backlog_len(cl), 1);
    m = client_wait_ref(cl, "c2", 2000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m, "type")), "error");
    json_decref(m);
    ck_assert_uint_eq(client_backlog_len(cl), 2);
    m = client_recv_json(cl, 0);
    ck_assert_str_eq(json_string_value(json_object_get(m, "id")), "m1");
    json_decref(m);
    m = client_recv_json(cl, 0);
    ck_assert_str_eq(json_string_value(json_object_get(m, "id")), "r1");
    json_decref(m);
    ck_assert_uint_eq(client_backlog_len(cl), 0);
    ck_assert_ptr_null(client_recv_json(cl, 100));
    ck_assert_ptr_nonnull(strstr(client_errstr(cl), "no message"));
    srv_go(&s);
    srv_join(&s);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(backlog_survives_close)
{
    srv s;
    srv_start(&s, script_error_then_close, 0);
    client *cl = connect_to(&s, 0);
    ck_assert_int_eq(client_wait_close(cl, 2000), 1009);
    ck_assert_int_eq(client_wait_close(cl, 0), 1009);
    json_t *m = client_recv_json(cl, 0);   /* read before the close, still there */
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m, "code")), "too_large");
    json_decref(m);
    ck_assert_ptr_null(client_recv_json(cl, 0));
    srv_join(&s);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(timeout_keeps_partial_frame)
{
    srv s;
    client_frame f;
    srv_start(&s, script_slow_frame, 0);
    client *cl = connect_to(&s, 0);
    ck_assert_int_eq(client_recv(cl, 100, &f), PX_AGAIN);
    srv_go(&s);
    ck_assert_int_eq(client_recv(cl, 200, &f), PX_AGAIN);   /* half a frame */
    srv_go(&s);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_OK);
    ck_assert_str_eq((const char *)f.payload, "{\"a\":1}");
    srv_go(&s);
    srv_join(&s);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(masked_server_frame_is_protocol_error)
{
    srv s;
    client_frame f;
    srv_start(&s, script_masked_from_server, 0);
    client *cl = connect_to(&s, 0);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(client_errstr(cl), "masked"));
    srv_join(&s);
    ck_assert_int_eq(s.nframes, 1);
    ck_assert_int_eq(srv_close_code(&s.frames[0]), 1002);
    client_free(cl);
    srv_free(&s);
}
END_TEST

START_TEST(eof_without_close_is_error)
{
    srv s;
    client_frame f;
    srv_start(&s, script_eof, 0);
    client *cl = connect_to(&s, 0);
    srv_join(&s);
    ck_assert_int_eq(client_recv(cl, 2000, &f), PX_ERROR);
    ck_assert_ptr_nonnull(strstr(client_errstr(cl), "without a close frame"));
    ck_assert_int_eq(client_close_code(cl), 0);
    client_close(cl, 1000);   /* must not hang on a dead peer */
    srv_free(&s);
}
END_TEST

static Suite *client_suite(void)
{
    Suite *s = suite_create("client");
    TCase *hs = tcase_create("handshake");
    tcase_add_test(hs, accept_value_matches_rfc_example);
    tcase_add_test(hs, handshake_with_bearer_token);
    tcase_add_test(hs, token_in_query);
    tcase_add_test(hs, wrong_accept_refused);
    tcase_add_test(hs, status_401_reported);
    tcase_add_test(hs, connection_refused_reports_no_status);
    tcase_add_test(hs, bind_source_address);
    suite_add_tcase(s, hs);
    TCase *fr = tcase_create("frames");
    tcase_add_test(fr, fragments_reassembled_ping_answered_frames_masked);
    tcase_add_loop_test(fr, oversized_frame_refused_on_header, 0, 2);
    tcase_add_test(fr, oversized_reassembly_refused);
    tcase_add_test(fr, close_frame_parsed_and_echoed);
    tcase_add_test(fr, timeout_keeps_partial_frame);
    tcase_add_test(fr, masked_server_frame_is_protocol_error);
    tcase_add_test(fr, eof_without_close_is_error);
    suite_add_tcase(s, fr);
    TCase *js = tcase_create("json");
    tcase_add_test(js, backlog_keeps_other_messages_in_order);
    tcase_add_test(js, backlog_survives_close);
    suite_add_tcase(s, js);
    return s;
}

PX_CHECK_MAIN(client_suite)
