/* Gateway limits end to end: idle close, server pings, the send-queue
 * ceiling for a client that stops reading; one port per process unless
 * PARLEY_LISTEN_SHARED asks to share it, one parleyd per data folder;
 * identity-provider tokens and key rotation through a JWKS file. Runs
 * extra gateways with short timers and a small queue. */
#include "e2e.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int lim_port;
static pid_t lim_pids[2];
static pid_t idp_pid; /* stopped by main if its test failed before it could */

/* Starts gateway gw-limN on lim_port (shared by both) with the short limits. */
static pid_t lim_spawn(int n)
{
    static const char *const env[] = {
        "PARLEY_PING_MS", "300", "PARLEY_IDLE_MS", "1500", "PARLEY_SEND_QUEUE_BYTES", "65536",
        "PARLEY_SEND_RATE", "5", "PARLEY_SEND_BURST", "10", NULL,
    };
    char id[16];
    snprintf(id, sizeof(id), "gw-lim%d", n);
    return e2e_spawn_extra(id, lim_port, 1, NULL, env, 0);
}

/* The service on gw still answers: a ping, and a send that is stored. */
static void still_serving(enum e2e_svc gw)
{
    char u[65], to[65], msg_id[64];
    e2e_user("alive", u);
    e2e_user("alive_to", to);
    client *cl = e2e_connect(u, gw);
    e2e_send_text(cl, "{\"type\":\"ping\",\"id\":\"p\"}");
    json_decref(client_wait_ref(cl, "p", E2E_WAIT_MS));
    e2e_send(cl, "s1", to, "still here", msg_id);
    client_close(cl, 1000);
}

static client *lim_connect(const char *user)
{
    int status;
    client *cl = e2e_connect_port(lim_port, user, &status);
    ck_assert_msg(cl != NULL, "connect to limits gateway: HTTP %d", status);
    return cl;
}

START_TEST(silent_client_is_closed_for_idleness)
{
    char u[65];
    e2e_user("idle", u);
    client *cl = lim_connect(u);
    /* Reads nothing, so answers no ping, until the gateway drops the TCP
     * connection (its close frame went unanswered); then reads it all. */
    struct pollfd hup = { .fd = client_fd(cl), .events = POLLRDHUP };
    ck_assert_msg(poll(&hup, 1, 30000) == 1, "the idle connection was not closed in 30 s");
    int code = client_wait_close(cl, 5000);
    ck_assert_int_eq(code, 1001);
    ck_assert_int_gt(client_pings(cl), 0);
    client_free(cl);
}
END_TEST

START_TEST(client_answering_pings_stays_open)
{
    char u[65];
    e2e_user("alive", u);
    client *cl = lim_connect(u);
    client_frame f;
    /* Open for twice the idle limit (1.5 s) and through 3 pings, however
     * long those take to come. */
    int64_t open_until = px_mono_ms() + 3000, end = px_mono_ms() + 30000;
    while ((px_mono_ms() < open_until || client_pings(cl) < 3) && px_mono_ms() < end) {
        int rc = client_recv(cl, 100, &f); /* answers pings as it reads */
        ck_assert_msg(rc != PX_ERROR, "connection closed: %s", client_errstr(cl));
    }
    ck_assert_int_ge(client_pings(cl), 3);
    e2e_send_text(cl, "{\"type\":\"ping\",\"id\":\"still-here\"}");
    json_t *p = e2e_wait_type(cl, "pong");
    json_decref(p);
    client_close(cl, 1000);
}
END_TEST

/* The client floods pings and never reads the pongs: the server's queue for
 * it passes 64 KiB and the server drops it instead of buffering, with a
 * 1013 close frame when the socket still takes one. A worker reads at most
 * 64 KiB of one socket per turn and sends what it queued after each, so
 * the queue mostly grows once the socket is full, and then the close frame
 * cannot get through either (PROTOCOL.md says so): the connection just
 * ends. Either way it must end, not stay open. */
START_TEST(client_that_stops_reading_is_closed_at_the_ceiling)
{
    char u[65];
    e2e_user("slow", u);
    client *cl = lim_connect(u);
    char cmd[128];
    int n = snprintf(cmd, sizeof(cmd), "{\"type\":\"ping\",\"id\":\"%060d\"}", 7);
    int sent = 0;
    for (; sent < 400000; sent++)
        if (client_send_text(cl, cmd, (size_t)n) != 0)
            break;
    int code;
    int ended = e2e_wait_end(cl, 20000, &code);
    fprintf(stderr, "report: slow reader: %d pings sent before the close, close code %d\n", sent,
            code);
    ck_assert_msg(ended, "a client that never reads was kept");
    ck_assert_msg(code == 0 || code == 1013, "close code %d", code);
    client_free(cl);
}
END_TEST

START_TEST(two_gateways_share_one_port)
{
    /* Both limits gateways listen on lim_port; connections land on either
     * and every one of them works. */
    for (int i = 0; i < 6; i++) {
        char u[65];
        e2e_user("share", u);
        client *cl = lim_connect(u);
        json_decref(e2e_wait_type(cl, "synced"));
        client_close(cl, 1000);
    }
    int st;
    ck_assert_int_eq(waitpid(lim_pids[0], &st, WNOHANG), 0);
    ck_assert_int_eq(waitpid(lim_pids[1], &st, WNOHANG), 0);
}
END_TEST

/* A second gateway (or parleyd) on a port in use stops at once, naming the
 * setting, and the first keeps serving; so does one that does not ask to
 * share a port that others share. */
START_TEST(second_process_on_a_used_port_fails)
{
    char used[64];
    snprintf(used, sizeof(used), "PARLEY_LISTEN=127.0.0.1:%d", e2e_port(E2E_GW1));
    pid_t pid = e2e_spawn_extra("gw-dup", e2e_port(E2E_GW1), 0, NULL, NULL, 0);
    int st = e2e_extra_exit_status(pid);
    ck_assert_msg(st != -1, "a second process on a used port kept running");
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) != 0, "exit status %d", st);
    ck_assert(e2e_extra_log_has("gw-dup", (const char *const[]){ used, "already in use", NULL }));
    still_serving(E2E_GW1);

    snprintf(used, sizeof(used), "PARLEY_LISTEN=127.0.0.1:%d", lim_port);
    pid = e2e_spawn_extra("gw-dup2", lim_port, 0, NULL, NULL, 0);
    st = e2e_extra_exit_status(pid);
    ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) != 0, "exit status %d", st);
    ck_assert(e2e_extra_log_has("gw-dup2", (const char *const[]){ used, "already in use", NULL }));
}
END_TEST

/* parleyd only: a second parleyd on the first one's data folder (on a port
 * of its own) stops at once, naming the folder and the holder's pid; the
 * first keeps serving. */
START_TEST(second_parleyd_on_the_same_folder_fails)
{
    const char *mode = getenv("PARLEY_E2E_MODE");
    if (mode == NULL || strcmp(mode, "parleyd") != 0)
        return;
    const char *dir = getenv("PARLEY_DATA_DIR");
    ck_assert_ptr_nonnull(dir);
    char folder[400], holder[32];
    snprintf(folder, sizeof(folder), "PARLEY_DATA_DIR=\\\"%s\\\"", dir);
    snprintf(holder, sizeof(holder), "(pid %d)", (int)e2e_pid(E2E_GW1));
    pid_t pid = e2e_spawn_extra("pd-dup", lim_port + 1, 0, dir, NULL, 0);
    int st = e2e_extra_exit_status(pid);
    ck_assert_msg(st != -1, "a second parleyd on the same folder kept running");
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) != 0, "exit status %d", st);
    ck_assert(e2e_extra_log_has("pd-dup", (const char *const[]){ folder, holder, NULL }));
    still_serving(E2E_GW1);
}
END_TEST

/* The token named name in the fixture file (tests/unit/jwt_fixtures.py). */
static void idp_token(const char *dir, const char *name, char *out, size_t outlen)
{
    char tsv[300], line[4096];
    snprintf(tsv, sizeof(tsv), "%s/tokens.tsv", dir);
    FILE *f = fopen(tsv, "r");
    ck_assert_ptr_nonnull(f);
    out[0] = '\0';
    while (out[0] == '\0' && fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        char *tab = strchr(line, '\t'), *tok = strrchr(line, '\t');
        if (tab != NULL && (size_t)(tab - line) == strlen(name) &&
            strncmp(line, name, strlen(name)) == 0)
            snprintf(out, outlen, "%s", tok + 1);
    }
    fclose(f);
    ck_assert_msg(out[0] != '\0', "no fixture token %s", name);
}

/* The HTTP status of an upgrade with fixture token name (101: it opened),
 * retried while nothing answers (the gateway may still be starting). */
static int idp_connect(int port, const char *dir, const char *name)
{
    char tok[4096], err[256];
    int status = 0;
    idp_token(dir, name, tok, sizeof(tok));
    for (int i = 0; i < 100 && status == 0; i++) {
        client *cl = client_connect("127.0.0.1", port, tok, NULL, 5000, &status, err, sizeof(err));
        if (cl != NULL) {
            client_close(cl, 1000);
            return 101;
        }
        if (status == 0)
            usleep(100 * 1000);
    }
    return status;
}

/* A gateway given only a JWKS file (PARLEY_JWT_JWKS_FILE, issuer and
 * audience) admits RS256 tokens made by PyJWT, refuses a wrong audience,
 * and takes a rotated key set at once, without a restart. */
START_TEST(identity_provider_tokens_and_key_rotation)
{
    char dir[] = "/tmp/parley-e2e-idp.XXXXXX", cmd[1024], live[64], next[64];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(cmd, sizeof(cmd), "/usr/bin/python3 tests/unit/jwt_fixtures.py %s %lld", dir,
             (long long)(px_now_ms() / 1000));
    ck_assert_msg(system(cmd) == 0, "%s failed", cmd);
    snprintf(live, sizeof(live), "%s/live.json", dir);
    snprintf(next, sizeof(next), "%s/next.json", dir);
    snprintf(cmd, sizeof(cmd), "cp %s/jwks-1.json %s && cp %s/jwks-2.json %s", dir, live, dir,
             next);
    ck_assert_int_eq(system(cmd), 0);
    const char *const env[] = { "PARLEY_JWT_SECRET", "", "PARLEY_JWT_JWKS_FILE", live,
                                "PARLEY_JWT_ISSUER", "https://idp.example.test/",
                                "PARLEY_JWT_AUDIENCE", "parley", NULL };
    int port = lim_port + 6;
    idp_pid = e2e_spawn_extra("gw-idp", port, 0, NULL, env, 0);
    ck_assert_int_eq(idp_connect(port, dir, "rs256"), 101);
    ck_assert_int_eq(idp_connect(port, dir, "eddsa"), 101);
    ck_assert_int_eq(idp_connect(port, dir, "wrong_aud"), 401);
    ck_assert_int_eq(idp_connect(port, dir, "new_kid_after_rotation"), 401);
    ck_assert_int_eq(rename(next, live), 0);
    ck_assert_int_eq(idp_connect(port, dir, "new_kid_after_rotation"), 101);
    ck_assert_int_eq(idp_connect(port, dir, "rs256"), 401);
    pid_t pid = idp_pid;
    idp_pid = 0;
    ck_assert_int_eq(e2e_stop_extra(pid), 0);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* Burst 10 at 5/s: of 30 sends in a row the burst passes, plus what the
 * rate refilled while they came in; the rest are refused with
 * rate_limited (and nothing else is lost: every send gets an answer). */
START_TEST(sends_over_the_rate_are_refused)
{
    char u[65], to[65], cid[16];
    e2e_user("rate", u);
    e2e_user("rate_to", to);
    client *cl = lim_connect(u);
    int64_t t0 = px_mono_ms();
    for (int i = 0; i < 30; i++) {
        snprintf(cid, sizeof(cid), "r%d", i);
        e2e_send_async(cl, cid, to, "x");
    }
    int sent = 0, limited = 0;
    for (int i = 0; i < 30; i++) {
        snprintf(cid, sizeof(cid), "r%d", i);
        json_t *r = client_wait_ref(cl, cid, E2E_WAIT_MS);
        ck_assert_msg(r != NULL, "no answer to %s", cid);
        if (strcmp(e2e_str(r, "type"), "sent") == 0)
            sent++;
        else if (strcmp(e2e_str(r, "code"), "rate_limited") == 0)
            limited++;
        json_decref(r);
    }
    /* The bucket, full (10) at the first send, refills 5 a second until
     * the last send is taken, before its answer: no more can have passed. */
    int64_t refill = (px_mono_ms() - t0) * 5 / 1000 + 1;
    ck_assert_int_ge(sent, 10);
    ck_assert_msg(sent <= 10 + refill, "%d passed, at most %lld could", sent,
                  (long long)(10 + refill));
    ck_assert_int_eq(sent + limited, 30);
    client_close(cl, 1000);
}
END_TEST

/* Waits until the gateway's counter passes from; returns its value. */
static long long park_wait_above(const char *name, long long from)
{
    long long v = -1;
    int64_t end = px_mono_ms() + 30000;
    while ((v = e2e_metric(E2E_GW1, name)) <= from && px_mono_ms() < end)
        usleep(100 * 1000);
    ck_assert_msg(v > from, "%s stayed at %lld", name, v);
    return v;
}

/* Connections parked now, plus those closed while parked (a constant
 * here): parked minus unparked, read in that order so it can only lag. */
static long long park_now(void)
{
    long long parked = e2e_metric(E2E_GW1, "parley_gateway_ws_parked_total");
    return parked - e2e_metric(E2E_GW1, "parley_gateway_ws_unparked_total");
}

static void park_expect_pong(client *cl, const char *id)
{
    json_t *r = client_wait_ref(cl, id, E2E_WAIT_MS);
    ck_assert_msg(r != NULL, "no pong for %s: %s", id, client_errstr(cl));
    ck_assert_str_eq(e2e_str(r, "type"), "pong");
    json_decref(r);
}

/* Waits until the gateway has tried to park the connection and refused,
 * a frame or a message being cut (after PARLEY_WS_PARK_MS of quiet: 0
 * under tests/run.sh, 2 s by default): so the rest is sent after a park
 * was tried, never merely before the tick that would have tried it. */
static void park_refused_since(long long deferred)
{
    park_wait_above("parley_gateway_ws_park_deferred_total", deferred);
}

/* A quiet connection gives back its wslay context and gets one again on
 * its next frame. A frame cut across the gateway's 1 s tick, and a
 * fragmented message whose fragments straddle it, must not be parked in
 * the middle: a fresh context would take the rest for garbage and close
 * with 1002. */
START_TEST(quiet_connections_park_and_wake)
{
    char u[65];
    e2e_user("park", u);
    long long before = park_now();
    client *cl = e2e_connect(u, E2E_GW1);
    json_decref(e2e_wait_type(cl, "synced"));
    /* The only connection on this gateway, parked after "synced" (it may
     * have parked before, during the sync, and woken for the rest). */
    long long now = park_now();
    for (int64_t end = px_mono_ms() + 30000; now != before + 1 && px_mono_ms() < end;
         now = park_now())
        usleep(100 * 1000);
    ck_assert_msg(now == before + 1, "not parked after synced (%lld, %lld before)", now, before);
    long long woken = e2e_metric(E2E_GW1, "parley_gateway_ws_unparked_total");
    e2e_send_text(cl, "{\"type\":\"ping\",\"id\":\"woken\"}");
    park_expect_pong(cl, "woken");
    park_wait_above("parley_gateway_ws_unparked_total", woken);

    static const char part1[] = "{\"type\":\"ping\",", part2[] = "\"id\":\"fragments\"}";
    long long deferred = e2e_metric(E2E_GW1, "parley_gateway_ws_park_deferred_total");
    ck_assert_int_eq(client_send_frame(cl, CLIENT_OP_TEXT, part1, sizeof(part1) - 1, 0), 0);
    park_refused_since(deferred);
    ck_assert_int_eq(client_send_frame(cl, CLIENT_OP_CONT, part2, sizeof(part2) - 1, 1), 0);
    park_expect_pong(cl, "fragments");

    /* One masked frame (key 0: payload as is) written in two pieces. */
    static const char cmd[] = "{\"type\":\"ping\",\"id\":\"split\"}";
    unsigned char frame[64] = { 0x81, 0x80 | (unsigned char)(sizeof(cmd) - 1), 0, 0, 0, 0 };
    memcpy(frame + 6, cmd, sizeof(cmd) - 1);
    size_t total = 6 + sizeof(cmd) - 1;
    deferred = e2e_metric(E2E_GW1, "parley_gateway_ws_park_deferred_total");
    ck_assert_int_eq(write(client_fd(cl), frame, 3), 3);
    park_refused_since(deferred);
    ck_assert_int_eq(write(client_fd(cl), frame + 3, total - 3), (ssize_t)(total - 3));
    park_expect_pong(cl, "split");
    client_close(cl, 1000);
}
END_TEST

static Suite *gateway_suite(void)
{
    Suite *s = suite_create("e2e-gateway");
    TCase *tc = tcase_create("limits");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, silent_client_is_closed_for_idleness);
    tcase_add_test(tc, client_answering_pings_stays_open);
    tcase_add_test(tc, client_that_stops_reading_is_closed_at_the_ceiling);
    tcase_add_test(tc, two_gateways_share_one_port);
    tcase_add_test(tc, second_process_on_a_used_port_fails);
    tcase_add_test(tc, second_parleyd_on_the_same_folder_fails);
    tcase_add_test(tc, sends_over_the_rate_are_refused);
    tcase_add_test(tc, quiet_connections_park_and_wake);
    tcase_add_test(tc, identity_provider_tokens_and_key_rotation);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    if (e2e_start() != 0) {
        e2e_stop();
        return EXIT_FAILURE;
    }
    lim_port = e2e_port(E2E_GW2) + 10;
    lim_pids[0] = lim_spawn(1);
    lim_pids[1] = lim_spawn(2);
    SRunner *sr = srunner_create(gateway_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    if (idp_pid > 0)
        e2e_stop_extra(idp_pid);
    int bad = (e2e_stop_extra(lim_pids[0]) != 0) + (e2e_stop_extra(lim_pids[1]) != 0);
    if (bad)
        fprintf(stderr, "a limits gateway exited badly; read its log (gw-lim*.log)\n");
    bad += e2e_stop();
    return failed == 0 && bad == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
