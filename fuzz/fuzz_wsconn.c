/* libFuzzer target: the WebSocket connection as a whole. A real gateway
 * (gateway_main, linked as parleyd links it, over the embedded SQLite bus
 * in a scratch folder) runs on a thread of this process; each input is
 * the byte stream of one client connection after a valid upgrade: framing,
 * masking, fragments, control frames, UTF-8 and the commands inside, as
 * ws_conn.c reads them through wslay and hands them to commands.c. The
 * client then half-closes and reads until the gateway closes.
 *
 * Beyond the sanitizers: the gateway must close a connection whose client
 * stopped sending (FUZZ_CLOSE_MS), and keep accepting new ones. Each input
 * signs in as a user of its own, so per-user limits never carry over from
 * one input to the next. Seeds (fuzz/corpus/wsconn) are masked frames of
 * every kind the protocol names. */
#include "auth.h"
#include "common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int gateway_main(void);

#define FUZZ_SECRET "fuzz-wsconn-secret"
#define FUZZ_CLOSE_MS 5000 /* a closed client's connection must end by then */
#define FUZZ_START_MS 20000

static struct sockaddr_in fuzz_addr;
static unsigned long fuzz_seq;
static char fuzz_dir[PATH_MAX];

static int64_t fuzz_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void fuzz_die(const char *what)
{
    fprintf(stderr, "fuzz_wsconn: %s: %s\n", what, strerror(errno));
    abort();
}

/* A port the kernel just handed out and took back: the gateway binds it
 * exclusively, so a clash fails the start loudly instead of sharing. */
static int fuzz_free_port(void)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        fuzz_die("pick a port");
    close(fd);
    return ntohs(a.sin_port);
}

static int fuzz_rm(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* The gateway thread still has the files open at exit; Linux lets them go. */
static void fuzz_cleanup(void)
{
    nftw(fuzz_dir, fuzz_rm, 16, FTW_DEPTH | FTW_PHYS);
}

static void *fuzz_gateway(void *unused)
{
    (void)unused;
    int rc = gateway_main();
    fprintf(stderr, "fuzz_wsconn: the gateway ended (exit %d)\n", rc);
    abort();
    return NULL;
}

static int fuzz_connect(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fuzz_die("socket");
    if (connect(fd, (struct sockaddr *)&fuzz_addr, sizeof(fuzz_addr)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads until the peer closes, or until deadline_ms: 0 on EOF or reset. */
static int fuzz_drain(int fd, int64_t deadline_ms)
{
    char buf[16384];
    for (;;) {
        int64_t left = deadline_ms - fuzz_now_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = { fd, POLLIN, 0 };
        if (poll(&p, 1, (int)left) <= 0)
            continue;
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r == 0 || (r < 0 && errno == ECONNRESET))
            return 0;
        if (r < 0 && errno != EINTR)
            fuzz_die("read");
    }
}

/* The upgrade with a fresh user's token; 0 once the 101 head is read. */
static int fuzz_upgrade(int fd)
{
    char tok[1024], req[2048], head[4096];
    char user[32];
    snprintf(user, sizeof(user), "fz%lu", ++fuzz_seq);
    int64_t now = (int64_t)time(NULL);
    if (auth_sign(FUZZ_SECRET, user, now, now + 3600, tok, sizeof(tok)) != PX_OK)
        fuzz_die("auth_sign");
    int n = snprintf(req, sizeof(req),
                     "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n", tok);
    if (write(fd, req, (size_t)n) != n)
        return -1;
    size_t got = 0;
    int64_t deadline = fuzz_now_ms() + FUZZ_CLOSE_MS;
    /* Byte by byte up to the blank line: what follows it is the gateway's
     * first frames, left for fuzz_drain. */
    while (got + 1 < sizeof(head) && fuzz_now_ms() < deadline) {
        struct pollfd p = { fd, POLLIN, 0 };
        if (poll(&p, 1, 100) <= 0)
            continue;
        if (read(fd, head + got, 1) != 1)
            return -1;
        got++;
        if (got >= 4 && memcmp(head + got - 4, "\r\n\r\n", 4) == 0)
            break;
    }
    head[got] = '\0';
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "fuzz_wsconn: upgrade refused: %.200s\n", head);
        abort();
    }
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    char listen[64];
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(fuzz_dir, sizeof(fuzz_dir), "%s/parley-fuzz-wsconn.XXXXXX", tmp);
    if (mkdtemp(fuzz_dir) == NULL)
        fuzz_die("mkdtemp");
    atexit(fuzz_cleanup);
    int port = fuzz_free_port();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    setenv("PARLEY_DATA_DIR", fuzz_dir, 1);
    setenv("PARLEY_LISTEN", listen, 1);
    setenv("PARLEY_ADMIN_LISTEN", "off", 1);
    setenv("PARLEY_JWT_SECRET", FUZZ_SECRET, 1);
    setenv("PARLEY_LOG_LEVEL", getenv("PARLEY_FUZZ_LOG_LEVEL") ? getenv("PARLEY_FUZZ_LOG_LEVEL")
                                                              : "error", 1);
    /* The limits an input may meet on its own connection stay as shipped;
     * only the ones that count across connections are lifted. */
    setenv("PARLEY_HTTP_PER_ADDRESS", "100000", 1);
    setenv("PARLEY_WS_PARK_MS", "0", 1);
    signal(SIGPIPE, SIG_IGN);
    fuzz_addr = (struct sockaddr_in){ .sin_family = AF_INET, .sin_port = htons(port),
                                      .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    pthread_t th;
    if (pthread_create(&th, NULL, fuzz_gateway, NULL) != 0)
        fuzz_die("pthread_create");
    pthread_detach(th);
    int64_t deadline = fuzz_now_ms() + FUZZ_START_MS;
    for (;;) {
        int fd = fuzz_connect();
        if (fd >= 0) {
            close(fd);
            return 0;
        }
        if (fuzz_now_ms() > deadline)
            fuzz_die("the gateway never listened");
        usleep(20000);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    int fd = fuzz_connect();
    if (fd < 0)
        fuzz_die("connect to the gateway");
    if (fuzz_upgrade(fd) != 0) {
        close(fd);
        return 0;
    }
    /* The gateway may close mid-input (a protocol error): what it did not
     * read is dropped, as a real client's bytes would be. */
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, data + off, n - off);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    shutdown(fd, SHUT_WR);
    if (fuzz_drain(fd, fuzz_now_ms() + FUZZ_CLOSE_MS) != 0) {
        fprintf(stderr, "fuzz_wsconn: the gateway kept a connection %d ms after its "
                        "client closed\n", FUZZ_CLOSE_MS);
        abort();
    }
    close(fd);
    return 0;
}
