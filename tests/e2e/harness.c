/* Owns the service processes of an end-to-end run and their environment. */
#include "harness.h"
#include "auth.h"
#include "client.h"
#include "common.h"

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define E2E_SECRET "e2e-secret"

struct e2e_proc {
    const char *bin;
    const char *gateway_id;
    int port;          /* gateway listen port, or admin port */
    pid_t pid;
};

static struct e2e_proc e2e_procs[E2E_NSVC] = {
    [E2E_GW1] = { "gateway", "gw-1", 0, 0 },
    [E2E_GW2] = { "gateway", "gw-2", 0, 0 },
    [E2E_PRESENCE] = { "presence", NULL, 0, 0 },
    [E2E_STORE] = { "message-store", NULL, 0, 0 },
    [E2E_FANOUT] = { "group-fanout", NULL, 0, 0 },
    [E2E_RECEIPT] = { "receipt", NULL, 0, 0 },
    [E2E_PUSH] = { "push", NULL, 0, 0 },
};
static char e2e_prefix[64], e2e_logdir[256];

/* PARLEY_E2E_MODE=parleyd: one parleyd process stands for every service
 * (both "gateways" are its one listener); killing or restarting any
 * service kills or restarts it. Otherwise the microservices. */
static int e2e_parleyd;

static struct e2e_proc *e2e_proc(enum e2e_svc s)
{
    return &e2e_procs[e2e_parleyd ? E2E_GW1 : s];
}

const char *e2e_secret(void)
{
    return E2E_SECRET;
}

int e2e_port(enum e2e_svc gw)
{
    return e2e_proc(gw)->port;
}

pid_t e2e_pid(enum e2e_svc s)
{
    return e2e_proc(s)->pid;
}

static void e2e_setenv(void)
{
    if (e2e_prefix[0] != '\0')
        return;
    int base = atoi(getenv("PARLEY_E2E_PORT") ? getenv("PARLEY_E2E_PORT") : "18080");
    snprintf(e2e_prefix, sizeof(e2e_prefix), "e2e%ld.%d.", (long)time(NULL), (int)getpid());
    snprintf(e2e_logdir, sizeof(e2e_logdir), "%s/parley-e2e-%d",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    mkdir(e2e_logdir, 0755);
    const char *mode = getenv("PARLEY_E2E_MODE");
    e2e_parleyd = mode != NULL && strcmp(mode, "parleyd") == 0;
    if (e2e_parleyd) {
        char data[300];
        snprintf(data, sizeof(data), "%s/data", e2e_logdir);
        setenv("PARLEY_DATA_DIR", data, 1);
        e2e_procs[E2E_GW1].bin = "parleyd";
        e2e_procs[E2E_GW1].gateway_id = "gw-0";
    }
    char db[64];
    snprintf(db, sizeof(db), "e2e_%ld_%d", (long)time(NULL), (int)getpid());
    setenv("PARLEY_TOPIC_PREFIX", e2e_prefix, 1);
    setenv("PARLEY_MONGO_DB", db, 1);
    setenv("PARLEY_JWT_SECRET", E2E_SECRET, 1);
    setenv("PARLEY_HEARTBEAT_MS", "500", 0);
    setenv("PARLEY_PRESENCE_CACHE_MS", "200", 0);
    setenv("PARLEY_PARTITIONS", "4", 0);
    setenv("PARLEY_LOG_LEVEL", "info", 0);
    e2e_procs[E2E_GW1].port = base + 1;
    e2e_procs[E2E_GW2].port = base + 2;
    e2e_procs[E2E_PRESENCE].port = base + 3;
    e2e_procs[E2E_STORE].port = base + 4;
    e2e_procs[E2E_FANOUT].port = base + 6;
    e2e_procs[E2E_RECEIPT].port = base + 5;
    e2e_procs[E2E_PUSH].port = base + 7;
}

void e2e_extra_gateway(const char *id, char *bin, size_t binlen)
{
    e2e_setenv();
    const char *build = getenv("PARLEY_BUILD") ? getenv("PARLEY_BUILD") : "build/san";
    snprintf(bin, binlen, "%s/bin/%s", build, e2e_parleyd ? "parleyd" : "gateway");
    if (!e2e_parleyd)
        return;
    char data[400];
    snprintf(data, sizeof(data), "%s/data-%s", e2e_logdir, id);
    setenv("PARLEY_DATA_DIR", data, 1);
}

static void e2e_logpath(const struct e2e_proc *p, char *log, size_t len)
{
    snprintf(log, len, "%s/%s%s%s.log", e2e_logdir, p->bin, p->gateway_id ? "-" : "",
             p->gateway_id ? p->gateway_id : "");
}

/* p ended with wait status st when it should not have (a crash, a
 * sanitizer report, a bad exit): says how, with the end of its log, on
 * stderr, which tests/run.sh shows for a failed program. */
static void e2e_report_end(const struct e2e_proc *p, int st, const char *what)
{
    char log[512], cmd[600];
    e2e_logpath(p, log, sizeof(log));
    if (WIFSIGNALED(st))
        fprintf(stderr, "e2e: %s %s %s, killed by signal %d; the end of %s:\n", p->bin,
                p->gateway_id ? p->gateway_id : "", what, WTERMSIG(st), log);
    else
        fprintf(stderr, "e2e: %s %s %s, exit status %d; the end of %s:\n", p->bin,
                p->gateway_id ? p->gateway_id : "", what, WEXITSTATUS(st), log);
    fflush(stderr);
    snprintf(cmd, sizeof(cmd), "tail -n 40 '%s' >&2", log);
    if (system(cmd) != 0)
        fprintf(stderr, "e2e: (no log)\n");
}

/* fork(); in the child (0 returned) stdout and stderr go to log, opened
 * with O_APPEND or O_TRUNC (mode). */
static pid_t e2e_fork_logged(const char *log, int mode)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    int fd = open(log, O_WRONLY | O_CREAT | mode, 0644);
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
    }
    return 0;
}

/* e2e_fork_logged for a test's own extra process: it gets SIGTERM when
 * the test's process ends. A failed check ends that process without the
 * test's e2e_stop_extra, and extras left so kept consuming and querying
 * the store for minutes under the next tests. Not for the suite's
 * services, which a test may restart and which outlive it. */
static pid_t e2e_fork_extra(const char *log)
{
    pid_t me = getpid();
    pid_t pid = e2e_fork_logged(log, O_TRUNC);
    if (pid == 0 && (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != me))
        _exit(125);
    return pid;
}

static pid_t e2e_spawn(enum e2e_svc s)
{
    struct e2e_proc *p = &e2e_procs[s];
    char bin[512], log[512], listen[64];
    const char *build = getenv("PARLEY_BUILD") ? getenv("PARLEY_BUILD") : "build/san";
    snprintf(bin, sizeof(bin), "%s/bin/%s", build, p->bin);
    e2e_logpath(p, log, sizeof(log));
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", p->port);
    pid_t pid = e2e_fork_logged(log, O_APPEND);
    if (pid != 0)
        return pid;
    if (p->gateway_id != NULL) {
        setenv("PARLEY_GATEWAY_ID", p->gateway_id, 1);
        setenv("PARLEY_LISTEN", listen, 1);
        setenv("PARLEY_ADMIN_LISTEN", "off", 1);
    } else {
        setenv("PARLEY_ADMIN_LISTEN", listen, 1);
    }
    execl(bin, bin, (char *)NULL);
    fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
    _exit(127);
}

int e2e_http_get_from(const char *src, int port, const char *path, char *buf, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), status = -1;
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    struct sockaddr_in from = { .sin_family = AF_INET };
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    struct timeval tv = { 2, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char req[256];
    size_t got = 0;
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
    int bound = src == NULL || (inet_pton(AF_INET, src, &from.sin_addr) == 1 &&
                                bind(fd, (struct sockaddr *)&from, sizeof(from)) == 0);
    if (bound && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        write(fd, req, (size_t)n) == n) {
        ssize_t r;
        while (got + 1 < cap && (r = read(fd, buf + got, cap - 1 - got)) > 0)
            got += (size_t)r;
    }
    buf[got] = '\0';
    if (got > 12)
        status = atoi(buf + 9);
    close(fd);
    return status;
}

static int e2e_http_status(int port, const char *path)
{
    char resp[256];
    return e2e_http_get_from(NULL, port, path, resp, sizeof(resp));
}

long long e2e_metric(enum e2e_svc s, const char *name)
{
    return e2e_metric_at(e2e_port(s), name);
}

long long e2e_metric_at(int port, const char *name)
{
    static char buf[256 << 10];
    if (e2e_http_get_from(NULL, port, "/metrics", buf, sizeof(buf)) != 200)
        return -1;
    size_t len = strlen(name);
    for (const char *line = buf; line != NULL; line = strchr(line, '\n')) {
        line += *line == '\n';
        if (strncmp(line, name, len) == 0 && line[len] == ' ')
            return atoll(line + len + 1);
    }
    return -1;
}

static int e2e_wait_ready(enum e2e_svc s, int timeout_ms)
{
    struct e2e_proc *p = e2e_proc(s);
    int64_t end = px_mono_ms() + timeout_ms;
    while (px_mono_ms() < end) {
        if (e2e_http_status(p->port, "/readyz") == 200)
            return 0;
        int st;
        if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
            e2e_report_end(p, st, "exited before it was ready");
            p->pid = 0;
            return -1;
        }
        usleep(100 * 1000);
    }
    fprintf(stderr, "e2e: %s not ready in %d ms; read the logs in %s/\n", p->bin,
            timeout_ms, e2e_logdir);
    return -1;
}

/* In parleyd mode a restart of a service whose process still runs (the
 * test killed another "service" and restarted it already) only waits. */
int e2e_restart(enum e2e_svc s)
{
    e2e_setenv();
    struct e2e_proc *p = e2e_proc(s);
    if (p->pid <= 0)
        p->pid = e2e_spawn(e2e_parleyd ? E2E_GW1 : s);
    return e2e_wait_ready(s, 60000);
}

int e2e_start(void)
{
    e2e_setenv();
    for (int s = 0; s < E2E_NSVC; s++)
        if (e2e_proc((enum e2e_svc)s) == &e2e_procs[s])
            e2e_procs[s].pid = e2e_spawn((enum e2e_svc)s);
    for (int s = 0; s < E2E_NSVC; s++)
        if (e2e_wait_ready((enum e2e_svc)s, 60000) != 0)
            return -1;
    return 0;
}

/* Signals p and waits; returns 0 if it exited with status 0 (after SIGTERM
 * that means a clean drain, and no sanitizer or leak report), or died of
 * the SIGKILL sent. A process that had already ended before the signal
 * (a crash, a sanitizer error) is reported and returns -1, never reaped
 * silently. */
static int e2e_reap(struct e2e_proc *p, int sig, int grace_ms)
{
    if (p->pid <= 0)
        return 0;
    int st = 0, rc = 0;
    if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
        e2e_report_end(p, st, sig == SIGKILL ? "had already ended before kill -9"
                                             : "had already ended before SIGTERM");
        p->pid = 0;
        return -1;
    }
    kill(p->pid, sig);
    int64_t end = px_mono_ms() + grace_ms;
    while (waitpid(p->pid, &st, WNOHANG) == 0) {
        if (px_mono_ms() > end) {
            fprintf(stderr, "e2e: %s did not stop in %d ms; its threads:\n", p->bin, grace_ms);
            char cmd[128];
            snprintf(cmd, sizeof(cmd), "gdb -p %d -batch -ex 'thread apply all bt' 2>&1 | "
                     "grep -E '^(Thread|#)' >&2", (int)p->pid);
            if (system(cmd) != 0)
                fprintf(stderr, "e2e: (no gdb backtrace)\n");
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &st, 0);
            rc = -1;
            break;
        }
        usleep(20 * 1000);
    }
    if (sig != SIGKILL && rc == 0 && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
        e2e_report_end(p, st, "did not drain cleanly");
        rc = -1;
    }
    p->pid = 0;
    return rc;
}

void e2e_kill9(enum e2e_svc s)
{
    struct e2e_proc *p = e2e_proc(s);
    ck_assert_msg(e2e_reap(p, SIGKILL, 5000) == 0, "kill -9 of %s: it had ended already, or did not end (above)",
                  p->bin);
}


int e2e_stop(void)
{
    int bad = 0;
    for (int s = 0; s < E2E_NSVC; s++)
        bad += e2e_reap(&e2e_procs[s], SIGTERM, 15000) != 0;
    return bad;
}

void e2e_token(const char *user, long ttl_s, char *out, size_t outlen)
{
    int64_t now = px_now_ms() / 1000;
    auth_sign(E2E_SECRET, user, now - 10, now + ttl_s, out, outlen);
}

void e2e_user(const char *prefix, char out[65])
{
    static int n;
    snprintf(out, 65, "%s%d_%d", prefix, (int)getpid() % 100000, ++n);
}

int e2e_main(Suite *suite)
{
    if (e2e_start() != 0) {
        e2e_stop();
        srunner_free(srunner_create(suite));
        return EXIT_FAILURE;
    }
    SRunner *sr = srunner_create(suite);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    int bad = e2e_stop();
    return failed == 0 && bad == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

pid_t e2e_spawn_extra(const char *id, int port, int shared, const char *data_dir,
                      const char *const *env, long nofile)
{
    char listen[32], log[512], bin[512];
    e2e_setenv();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    snprintf(log, sizeof(log), "%s/%s.log", e2e_logdir, id);
    pid_t pid = e2e_fork_extra(log);
    if (pid != 0)
        return pid;
    e2e_extra_gateway(id, bin, sizeof(bin));
    if (data_dir != NULL)
        setenv("PARLEY_DATA_DIR", data_dir, 1);
    setenv("PARLEY_GATEWAY_ID", id, 1);
    setenv("PARLEY_LISTEN", listen, 1);
    setenv("PARLEY_LISTEN_SHARED", shared ? "1" : "0", 1);
    for (; env != NULL && env[0] != NULL; env += 2)
        setenv(env[0], env[1], 1);
    struct rlimit rl = { (rlim_t)nofile, (rlim_t)nofile };
    if (nofile > 0 && setrlimit(RLIMIT_NOFILE, &rl) != 0)
        _exit(126);
    execl(bin, bin, (char *)NULL);
    _exit(127);
}

pid_t e2e_spawn_replica(enum e2e_svc s, const char *id, int port)
{
    char listen[32], log[512], bin[512];
    const char *build = getenv("PARLEY_BUILD") ? getenv("PARLEY_BUILD") : "build/san";
    e2e_setenv();
    snprintf(bin, sizeof(bin), "%s/bin/%s", build, e2e_procs[s].bin);
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    snprintf(log, sizeof(log), "%s/%s.log", e2e_logdir, id);
    pid_t pid = e2e_fork_extra(log);
    if (pid != 0)
        return pid;
    setenv("PARLEY_ADMIN_LISTEN", listen, 1);
    execl(bin, bin, (char *)NULL);
    _exit(127);
}

int e2e_extra_exit_status(pid_t pid)
{
    int st = 0;
    for (int i = 0; i < 300; i++) {
        if (waitpid(pid, &st, WNOHANG) == pid)
            return st;
        usleep(100 * 1000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return -1;
}

/* The "ts" of the first log line of process id whose msg is msg, or -1. */
static long long e2e_extra_log_ts(const char *id, const char *msg)
{
    char path[512], line[4096], want[128];
    snprintf(path, sizeof(path), "%s/%s.log", e2e_logdir, id);
    snprintf(want, sizeof(want), "\"msg\":\"%s\"", msg);
    FILE *f = fopen(path, "r");
    long long ts = -1;
    while (f != NULL && ts < 0 && fgets(line, sizeof(line), f) != NULL) {
        const char *t = strstr(line, "\"ts\":");
        if (strstr(line, want) != NULL && t != NULL)
            ts = atoll(t + 5);
    }
    if (f != NULL)
        fclose(f);
    return ts;
}

long long e2e_extra_stop_ms(const char *id)
{
    long long from = e2e_extra_log_ts(id, "stopping"), to = e2e_extra_log_ts(id, "stopped");
    return from >= 0 && to >= from ? to - from : -1;
}

int e2e_extra_log_has(const char *id, const char *const *needles)
{
    char path[512];
    static char buf[64 << 10];
    snprintf(path, sizeof(path), "%s/%s.log", e2e_logdir, id);
    FILE *f = fopen(path, "r");
    size_t n = f != NULL ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
    if (f != NULL)
        fclose(f);
    buf[n] = '\0';
    for (; *needles != NULL; needles++)
        if (strstr(buf, *needles) == NULL) {
            fprintf(stderr, "%s: no \"%s\" in:\n%s\n", path, *needles, buf);
            return 0;
        }
    return 1;
}

int e2e_extra_log_count(const char *id, const char *needle)
{
    char path[512], line[8192];
    snprintf(path, sizeof(path), "%s/%s.log", e2e_logdir, id);
    FILE *f = fopen(path, "r");
    int n = 0;
    while (f != NULL && fgets(line, sizeof(line), f) != NULL)
        n += strstr(line, needle) != NULL;
    if (f != NULL)
        fclose(f);
    return n;
}

int e2e_stop_extra(pid_t pid)
{
    int st = 0;
    kill(pid, SIGTERM);
    for (int i = 0; i < 150 && waitpid(pid, &st, WNOHANG) == 0; i++)
        usleep(100 * 1000);
    if (waitpid(pid, &st, WNOHANG) == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        return -1;
    }
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

client *e2e_connect_port(int port, const char *user, int *status)
{
    char tok[2048], err[256];
    e2e_token(user, 3600, tok, sizeof(tok));
    client *cl = NULL;
    *status = 0;
    /* Retried while nothing answers: the process may still be starting. */
    for (int i = 0; i < 100 && cl == NULL && *status == 0; i++) {
        cl = client_connect("127.0.0.1", port, tok, NULL, 5000, status, err, sizeof(err));
        if (cl == NULL && *status == 0)
            usleep(100 * 1000);
    }
    return cl;
}
