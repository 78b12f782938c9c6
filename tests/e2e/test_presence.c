/* The presence registry end to end: it holds exactly one record per open
 * connection, read back from the store the services use, and none once
 * every client has gone, also when presence was killed -9 mid-stream and
 * consumed part of its topic again (stack mode; in parleyd mode a kill
 * would take the connections with it, so there the churn runs without
 * one). */
#include "e2e.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Generous: after the kill the restarted presence waits out its killed
 * predecessor's session (6 s) before it reads, on a box that may be busy. */
enum { USERS = 30, REGISTRY_WAIT_MS = 60000 };
#define CONNECTS "parley_presence_records_total{type=\"connect\"}"

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

static Suite *presence_suite(void)
{
    Suite *s = suite_create("e2e-presence");
    TCase *tc = tcase_create("registry");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, registry_is_exact_and_empties);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return e2e_main(presence_suite());
}
