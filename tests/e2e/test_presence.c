/* The presence registry end to end: it holds exactly one record per open
 * connection, read back from the store the services use, and none once
 * every client has gone, also when presence was killed -9 mid-stream and
 * consumed part of its topic again (stack mode; in parleyd mode a kill
 * would take the connections with it, so there the churn runs without
 * one). With two presence replicas (stack mode), one killed -9 costs no
 * live gateway its users. */
#include "e2e.h"
#include "store.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* Generous: after the kill the restarted presence waits out its killed
 * predecessor's session (6 s) before it reads, on a box that may be busy. */
enum { USERS = 30, REGISTRY_WAIT_MS = 60000 };
#define CONNECTS "parley_presence_records_total{type=\"connect\"}"
#define EXPIRED "parley_presence_expired_total"

static store *registry_open(void)
{
    char err[PX_ERRLEN] = "";
    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store: %s", err);
    return st;
}

/* How many users' record counts differ from want; the first such user's
 * count in *got. */
static int registry_off(store *st, char (*users)[65], int64_t want, int64_t *got)
{
    int off = 0;
    for (int i = 0; i < USERS; i++) {
        char err[PX_ERRLEN] = "";
        int64_t n = -1;
        ck_assert_msg(store_presence_count(st, users[i], &n, err, sizeof(err)) == PX_OK,
                      "count: %s", err);
        if (n != want && off++ == 0)
            *got = n;
    }
    return off;
}

/* Polls until every user has exactly want records. */
static void registry_expect(store *st, char (*users)[65], int64_t want, const char *when)
{
    int64_t deadline = px_mono_ms() + REGISTRY_WAIT_MS, got = -1;
    int off;
    while ((off = registry_off(st, users, want, &got)) > 0 && px_mono_ms() < deadline)
        usleep(100 * 1000);
    ck_assert_msg(off == 0, "%s: %d of %d users without exactly %lld presence records (one "
                  "has %lld)", when, off, USERS, (long long)want, (long long)got);
}

static client *connect_synced(const char *user, enum e2e_svc gw)
{
    client *c = e2e_connect(user, gw);
    json_decref(e2e_wait_type(c, "synced"));
    return c;
}

START_TEST(registry_is_exact_and_empties)
{
    static char users[USERS][65];
    client *c1[USERS], *c2[USERS], *c3[USERS];
    const char *mode = getenv("PARLEY_E2E_MODE");
    int stack = mode == NULL || strcmp(mode, "parleyd") != 0;
    store *st = registry_open();

    for (int i = 0; i < USERS; i++) {
        e2e_user("pres", users[i]);
        c1[i] = connect_synced(users[i], E2E_GW1);
        c2[i] = connect_synced(users[i], E2E_GW2);
    }
    registry_expect(st, users, 2, "both connections open");

    /* presence is killed as soon as it has applied the connects: they were
     * committed only if the auto-commit (1 s) came in between, so most are
     * consumed and applied again after the restart. Meanwhile each user's
     * first connection is replaced and a third opened: the records wait on
     * the bus, and the count moves from 2 to 3 only once presence applied
     * them. */
    long long before = stack ? e2e_metric(E2E_PRESENCE, CONNECTS) : 0;
    if (stack)
        e2e_kill9(E2E_PRESENCE);
    for (int i = 0; i < USERS; i++) {
        client_close(c1[i], 1000);
        c1[i] = connect_synced(users[i], E2E_GW1);
        c3[i] = connect_synced(users[i], E2E_GW2);
    }
    if (stack)
        ck_assert_int_eq(e2e_restart(E2E_PRESENCE), 0);
    registry_expect(st, users, 3, "one connection replaced, one added");
    if (stack)
        fprintf(stderr, "report: presence applied %lld connects before its kill -9 and %lld "
                "after (%d new: the rest were applied again)\n", before,
                e2e_metric(E2E_PRESENCE, CONNECTS), 2 * USERS);

    for (int i = 0; i < USERS; i++) {
        client_close(c1[i], 1000);
        client_close(c2[i], 1000);
        client_close(c3[i], 1000);
    }
    registry_expect(st, users, 0, "every client gone");
    store_close(st);
}
END_TEST

/* Lines of log id (a replica's, or "presence") that tell an assignment of
 * every partition. */
static int took_all(const char *id)
{
    char needle[64];
    snprintf(needle, sizeof(needle), "{\"count\":%s,\"result\":\"NO_ERROR\"",
             getenv("PARLEY_PARTITIONS") ? getenv("PARLEY_PARTITIONS") : "4");
    return e2e_extra_log_count(id, needle);
}

/* Waits until log id has more lines with needle than before. */
static void log_grows(const char *id, const char *needle, int before)
{
    int64_t deadline = px_mono_ms() + REGISTRY_WAIT_MS;
    while (e2e_extra_log_count(id, needle) <= before && px_mono_ms() < deadline)
        usleep(100 * 1000);
    ck_assert_msg(e2e_extra_log_count(id, needle) > before, "%s: no new '%s'", id, needle);
}

/* kill -9 of one presence replica; returns once the survivor (log id,
 * admin port) owns every partition, having expired nobody: the dead one's
 * partitions went unread for the group's session timeout (6 s) and the
 * rebalance, longer than the 10 heartbeats (500 ms here) after which a
 * gateway is dead, and the beats of the gateways keyed there waited in
 * them. Before presence added the
 * session to its cutoff, the survivor, caught up on its own partitions,
 * expired those gateways' users meanwhile. pid: the extra replica's, 0
 * for the harness's presence. */
static void kill_one_replica(store *st, char (*users)[65], pid_t pid, const char *survivor,
                             int port)
{
    int before = took_all(survivor);
    long long expired = e2e_metric_at(port, EXPIRED);
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    } else {
        e2e_kill9(E2E_PRESENCE);
    }
    int64_t deadline = px_mono_ms() + REGISTRY_WAIT_MS;
    while (took_all(survivor) == before && px_mono_ms() < deadline)
        usleep(100 * 1000);
    ck_assert_msg(took_all(survivor) > before, "%s never took the partitions over", survivor);
    int64_t got = -1;
    int off = registry_off(st, users, 2, &got);
    ck_assert_msg(off == 0, "%d of %d users lost presence records (one has %lld) while a dead "
                  "replica's partitions waited for %s; it expired %lld", off, USERS,
                  (long long)got, survivor, e2e_metric_at(port, EXPIRED) - expired);
    ck_assert_int_eq(e2e_metric_at(port, EXPIRED), expired);
}

START_TEST(a_dead_replica_costs_no_live_gateway_its_users)
{
    const char *mode = getenv("PARLEY_E2E_MODE");
    if (mode != NULL && strcmp(mode, "parleyd") == 0) {
        fprintf(stderr, "report: presence replicas: parleyd runs one\n");
        return;
    }
    static char users[USERS][65];
    client *c1[USERS], *c2[USERS];
    store *st = registry_open();
    /* The harness's gw-1 and gw-2 beat on partition 1 of 4; gw-other on 3.
     * The range assignment gives each of two replicas 0-1 or 2-3, so each
     * kill below leaves the survivor reading fresh beats of one gateway
     * while those of another wait in the dead replica's partitions. */
    int base = e2e_port(E2E_GW1) - 1, main_port = e2e_port(E2E_PRESENCE), status = 0;
    const char *const env[] = { "PARLEY_ADMIN_LISTEN", "off", NULL };
    pid_t gw = e2e_spawn_extra("gw-other", base + 43, 0, NULL, env, 0);
    char buf[512];
    int64_t deadline = px_mono_ms() + REGISTRY_WAIT_MS;
    while (e2e_http_get_from(NULL, base + 43, "/readyz", buf, sizeof(buf)) != 200 &&
           px_mono_ms() < deadline)
        usleep(100 * 1000);
    for (int i = 0; i < USERS; i++) {
        e2e_user("prep", users[i]);
        c1[i] = connect_synced(users[i], E2E_GW1);
        c2[i] = e2e_connect_port(base + 43, users[i], &status);
        ck_assert_msg(c2[i] != NULL, "gw-other: status %d", status);
        json_decref(e2e_wait_type(c2[i], "synced"));
    }
    registry_expect(st, users, 2, "both connections open");

    /* Each replica killed in turn. */
    const char *assigned = "partitions assigned";
    int had = e2e_extra_log_count("presence", assigned);
    pid_t other = e2e_spawn_replica(E2E_PRESENCE, "presence-2", base + 42);
    log_grows("presence", assigned, had); /* both hold partitions: the rebalance is done */
    log_grows("presence-2", assigned, 0);
    kill_one_replica(st, users, 0, "presence-2", base + 42);
    had = e2e_extra_log_count("presence", assigned);
    ck_assert_int_eq(e2e_restart(E2E_PRESENCE), 0);
    log_grows("presence", assigned, had);
    kill_one_replica(st, users, other, "presence", main_port);
    fprintf(stderr, "report: presence replicas: each killed -9 in turn, the other took every "
            "partition and expired nobody\n");

    for (int i = 0; i < USERS; i++) {
        client_close(c1[i], 1000);
        client_close(c2[i], 1000);
    }
    registry_expect(st, users, 0, "every client gone");
    ck_assert_int_eq(e2e_stop_extra(gw), 0);
    store_close(st);
}
END_TEST

static Suite *presence_suite(void)
{
    Suite *s = suite_create("e2e-presence");
    TCase *tc = tcase_create("registry");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, registry_is_exact_and_empties);
    tcase_add_test(tc, a_dead_replica_costs_no_live_gateway_its_users);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return e2e_main(presence_suite());
}
