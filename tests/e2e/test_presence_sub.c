/* Presence to contacts end to end (issue 18): a connection subscribes to
 * the presence of users (presence_sub) and gets each one's state at once
 * and every change after, across gateways; only contacts (users who shared
 * a chat) are watched, a stranger is answered as a user never seen and
 * learns nothing more; the hide setting hides last_seen; a flapping
 * connection is told at most once a second; the subscription's size is
 * capped (PARLEY_PRESENCE_SUB_MAX, 4 here) and bad input refused. */
#include "e2e.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#define SUB_MAX 4

static client *connect_synced(const char *user, enum e2e_svc gw)
{
    client *cl = e2e_connect(user, gw);
    json_decref(e2e_wait_type(cl, "synced"));
    return cl;
}

static void sub(client *cl, const char *id, const char *const *users, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_string(users[i]));
    json_t *o = json_pack("{s:s, s:s, s:o}", "type", "presence_sub", "id", id, "users", a);
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

/* The next presence event about user (other events are skipped); line:
 * the caller's, for the failure message. Twice the usual wait: a dead
 * gateway's users turn offline 10 beats (5 s here) plus twice the
 * consumer session timeout (6 s) after its last beat. */
#define next_presence(cl, user) next_presence_at(cl, user, __LINE__)
static json_t *next_presence_at(client *cl, const char *user, int line)
{
    for (;;) {
        json_t *m = client_recv_json(cl, 2 * E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "line %d: no presence of %s: %s", line, user, client_errstr(cl));
        if (strcmp(e2e_str(m, "type"), "presence") == 0 && strcmp(e2e_str(m, "user"), user) == 0)
            return m;
        json_decref(m);
    }
}

static int online(const json_t *m)
{
    return json_is_true(json_object_get(m, "online"));
}

static int64_t last_seen(const json_t *m)
{
    return json_integer_value(json_object_get(m, "last_seen"));
}

/* Reads presence events of user until one says online == want. */
#define until_presence(cl, user, want) until_presence_at(cl, user, want, __LINE__)
static json_t *until_presence_at(client *cl, const char *user, int want, int line)
{
    for (;;) {
        json_t *m = next_presence_at(cl, user, line);
        if (online(m) == want)
            return m;
        json_decref(m);
    }
}

/* a and b become contacts: a message from a to b (the record is written
 * beside its inbox put, after the push); then cl (a's) subscribes to b
 * until presence answers with b's real state (b online), polling. */
static void contacts_and_watch(client *a, const char *b_user, client *b)
{
    char mid[64];
    e2e_send(a, "hello", b_user, "hello", mid);
    json_decref(e2e_wait_type(b, "message"));
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    for (int i = 0;; i++) {
        char id[16];
        snprintf(id, sizeof(id), "w%d", i);
        sub(a, id, &b_user, 1);
        json_t *m = next_presence(a, b_user);
        int on = online(m);
        json_decref(m);
        if (on)
            return;
        ck_assert_msg(px_mono_ms() < end, "%s never seen online by a contact", b_user);
        usleep(100 * 1000);
    }
}

/* A pair new to message-store's memory is written once, however many of
 * its messages one store round carries: ten messages alice -> bob, held
 * back (microservices: message-store stopped until Kafka has them all) so
 * that one batch takes them. Writing each repeat made FerretDB absorb
 * (and log) a duplicate key per message. */
START_TEST(a_new_pair_is_written_once)
{
    enum { N = 10 };
    static const char *const pairs = "parley_msgstore_contact_pairs_written_total";
    static const char *const stored = "parley_msgstore_inbox_stored_total";
    char alice[65], bob[65], cid[16];
    e2e_user("pa", alice);
    e2e_user("pb", bob);
    client *a = connect_synced(alice, E2E_GW1);
    pid_t ms = e2e_pid(E2E_STORE);
    int stopped = ms != e2e_pid(E2E_GW1);
    long long p0 = e2e_metric(E2E_STORE, pairs), s0 = e2e_metric(E2E_STORE, stored);
    ck_assert_msg(p0 >= 0 && s0 >= 0, "no contact pair or stored metrics");
    if (stopped)
        ck_assert_int_eq(kill(ms, SIGSTOP), 0);
    for (int i = 0; i < N; i++) {
        snprintf(cid, sizeof(cid), "c%d", i);
        e2e_send_async(a, cid, bob, "hi");
    }
    for (int i = 0; i < N; i++)
        json_decref(e2e_wait_type(a, "sent"));
    if (stopped)
        ck_assert_int_eq(kill(ms, SIGCONT), 0);
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    while (e2e_metric(E2E_STORE, stored) < s0 + N && px_mono_ms() < end)
        usleep(50 * 1000);
    ck_assert_int_ge(e2e_metric(E2E_STORE, stored), s0 + N);
    ck_assert_int_eq(e2e_metric(E2E_STORE, pairs), p0 + 1);
    client_free(a);
}
END_TEST

/* Online and last seen across two gateways, any device. */
START_TEST(presence_reaches_contacts_across_gateways)
{
    char alice[65], bob[65];
    e2e_user("pa", alice);
    e2e_user("pb", bob);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    contacts_and_watch(a, bob, b);

    /* bob offline: alice is told, with when he was last seen. */
    int64_t t0 = px_now_ms();
    client_free(b);
    json_t *m = until_presence(a, bob, 0);
    ck_assert_int_ge(last_seen(m), t0);
    int64_t seen = last_seen(m);
    json_decref(m);

    /* Back on the other gateway: online; a new subscription says so too,
     * and a user never seen is offline, last seen 0. */
    b = connect_synced(bob, E2E_GW1);
    json_decref(until_presence(a, bob, 1));
    const char *two[] = { bob, "nobody-ever-here" };
    sub(a, "s2", two, 2);
    m = next_presence(a, bob);
    ck_assert(online(m));
    json_decref(m);
    m = next_presence(a, "nobody-ever-here");
    ck_assert(!online(m));
    ck_assert_int_eq(last_seen(m), 0);
    json_decref(m);

    /* Two devices: online while either is connected. */
    client *b2 = connect_synced(bob, E2E_GW2);
    client_free(b);
    json_t *d = e2e_cmd(b2, json_pack("{s:s, s:s}", "type", "devices", "id", "d1"));
    json_decref(d);
    sub(a, "s3", two, 1);
    m = next_presence(a, bob);
    ck_assert_msg(online(m), "offline with a device left: %s", json_dumps(m, 0));
    json_decref(m);
    client_free(b2);
    m = until_presence(a, bob, 0);
    ck_assert_int_gt(last_seen(m), seen);
    json_decref(m);
    client_free(a);
}
END_TEST

/* Members of one group are contacts once both joined, without a word
 * between them: the one who joins and each member before them. An invitee
 * who has not joined is not. */
START_TEST(group_members_are_contacts)
{
    char alice[65], bob[65], carol[65], gid[65];
    e2e_user("ga", alice);
    e2e_user("gb", bob);
    e2e_user("gc", carol);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    client *c = connect_synced(carol, E2E_GW2);
    json_t *g = e2e_cmd(a, json_pack("{s:s, s:s, s:s, s:[s, s]}", "type", "group_create", "id",
                                     "g1", "name", "watchers", "members", bob, carol));
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    /* carol, invited only, is a stranger to alice. */
    sub(a, "i1", (const char *const[]){ carol }, 1);
    json_t *m = next_presence(a, carol);
    ck_assert_msg(!online(m) && last_seen(m) == 0, "an invitee told: %s", json_dumps(m, 0));
    json_decref(m);
    e2e_join(b, gid);
    e2e_join(c, gid);
    /* carol joined after bob: bob watches her (polling: the record is
     * written beside the joined event's inbox put). */
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    for (int i = 0;; i++) {
        char id[16];
        snprintf(id, sizeof(id), "j%d", i);
        sub(b, id, (const char *const[]){ carol }, 1);
        m = next_presence(b, carol);
        int on = online(m);
        json_decref(m);
        if (on)
            break;
        ck_assert_msg(px_mono_ms() < end, "a fellow member never seen online");
        usleep(100 * 1000);
    }
    client_free(a);
    client_free(b);
    client_free(c);
}
END_TEST

/* A stranger (no chat shared) is answered exactly as a user never seen,
 * even while the user is online, and gets none of the user's changes. */
START_TEST(a_stranger_learns_nothing)
{
    char alice[65], bob[65], eve[65];
    e2e_user("qa", alice);
    e2e_user("qb", bob);
    e2e_user("qe", eve);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    client *e = connect_synced(eve, E2E_GW2);
    contacts_and_watch(a, bob, b);

    const char *asks[] = { bob, "never-seen-user" };
    sub(e, "e1", asks, 2);
    json_t *mb = next_presence(e, bob), *mn = next_presence(e, "never-seen-user");
    json_object_set_new(mb, "user", json_string("x"));
    json_object_set_new(mn, "user", json_string("x"));
    ck_assert_msg(json_equal(mb, mn), "a stranger told %s, never seen is %s", json_dumps(mb, 0),
                  json_dumps(mn, 0));
    json_decref(mb);
    json_decref(mn);

    /* bob goes and comes back: alice is told both; eve nothing (a ping
     * sent after alice saw both is answered before anything else). */
    client_free(b);
    json_decref(until_presence(a, bob, 0));
    b = connect_synced(bob, E2E_GW1);
    json_decref(until_presence(a, bob, 1));
    json_t *ping = json_pack("{s:s, s:s}", "type", "ping", "id", "p1");
    ck_assert_int_eq(client_send_json(e, ping), 0);
    json_decref(ping);
    json_t *r = client_recv_json(e, E2E_WAIT_MS);
    ck_assert_msg(r != NULL, "no pong: %s", client_errstr(e));
    ck_assert_msg(strcmp(e2e_str(r, "type"), "pong") == 0, "a stranger got %s", json_dumps(r, 0));
    json_decref(r);
    client_free(a);
    client_free(b);
    client_free(e);
}
END_TEST

/* hide_last_seen: watchers still see online / offline, never last_seen. */
START_TEST(the_hide_setting_hides_last_seen)
{
    char alice[65], bob[65];
    e2e_user("ha", alice);
    e2e_user("hb", bob);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    contacts_and_watch(a, bob, b);
    json_t *r = e2e_cmd(b, json_pack("{s:s, s:s, s:b}", "type", "presence_settings", "id", "h1",
                                     "hide_last_seen", 1));
    ck_assert_str_eq(e2e_str(r, "type"), "presence_settings");
    ck_assert(json_is_true(json_object_get(r, "hide_last_seen")));
    json_decref(r);
    /* Without a value it only reads the setting. */
    r = e2e_cmd(b, json_pack("{s:s, s:s}", "type", "presence_settings", "id", "h0"));
    ck_assert_msg(json_is_true(json_object_get(r, "hide_last_seen")), "%s", json_dumps(r, 0));
    json_decref(r);
    /* The watchers are told at once: online, no last seen. */
    json_t *m;
    for (;;) {
        m = next_presence(a, bob);
        if (last_seen(m) == 0)
            break;
        json_decref(m);
    }
    ck_assert(online(m));
    json_decref(m);
    client_free(b);
    m = until_presence(a, bob, 0);
    ck_assert_int_eq(last_seen(m), 0);
    json_decref(m);
    sub(a, "h2", (const char *const[]){ bob }, 1);
    m = next_presence(a, bob);
    ck_assert(!online(m));
    ck_assert_int_eq(last_seen(m), 0);
    json_decref(m);

    /* Shown again once the setting is off. */
    b = connect_synced(bob, E2E_GW2);
    json_decref(until_presence(a, bob, 1));
    r = e2e_cmd(b, json_pack("{s:s, s:s, s:b}", "type", "presence_settings", "id", "h3",
                             "hide_last_seen", 0));
    json_decref(r);
    client_free(b);
    for (;;) {
        m = until_presence(a, bob, 0);
        if (last_seen(m) > 0)
            break;
        json_decref(m);
    }
    json_decref(m);
    client_free(a);
}
END_TEST

/* A connection that flaps: its watchers are told at most once a second
 * (the events' own times, on the presence service's clock, are at least
 * a second apart), and the last thing they are told is the truth. */
START_TEST(flapping_is_damped)
{
    char alice[65], bob[65];
    e2e_user("fa", alice);
    e2e_user("fb", bob);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    contacts_and_watch(a, bob, b);
    client_free(b);
    for (int i = 0; i < 12; i++) {
        b = e2e_connect(bob, i % 2 ? E2E_GW1 : E2E_GW2);
        client_free(b);
    }
    int64_t end = px_now_ms();
    int64_t prev = 0;
    for (;;) {
        json_t *m = next_presence(a, bob);
        int64_t t = last_seen(m);
        int on = online(m);
        json_decref(m);
        ck_assert_msg(prev == 0 || t - prev >= 990, "two changes %lld ms apart",
                      (long long)(t - prev));
        prev = t;
        if (!on && t >= end)
            break;
    }
    client_free(a);
}
END_TEST

START_TEST(subscriptions_are_capped_and_checked)
{
    char alice[65];
    e2e_user("ca", alice);
    client *a = connect_synced(alice, E2E_GW1);
    const char *five[] = { "u1", "u2", "u3", "u4", "u5" };
    sub(a, "c1", five, SUB_MAX + 1);
    json_t *r = client_wait_ref(a, "c1", E2E_WAIT_MS);
    ck_assert_msg(r != NULL, "no answer: %s", client_errstr(a));
    ck_assert_msg(strstr(e2e_str(r, "message"), "PARLEY_PRESENCE_SUB_MAX") != NULL, "%s",
                  json_dumps(r, 0));
    e2e_expect_type(r, "error", "too_large");
    e2e_expect_type(e2e_cmd(a, json_pack("{s:s, s:s, s:[s]}", "type", "presence_sub", "id", "c2",
                                         "users", "not a user")),
                    "error", "bad_request");
    e2e_expect_type(e2e_cmd(a, json_pack("{s:s, s:s, s:s}", "type", "presence_sub", "id", "c3",
                                         "users", "u1")),
                    "error", "bad_request");
    e2e_expect_type(e2e_cmd(a, json_pack("{s:s, s:s, s:s}", "type", "presence_settings", "id",
                                         "c4", "hide_last_seen", "yes")),
                    "error", "bad_request");
    sub(a, "c5", five, SUB_MAX);
    for (size_t i = 0; i < SUB_MAX; i++)
        json_decref(next_presence(a, five[i]));
    client_free(a);
}
END_TEST

/* A gateway killed with a watched user on it: the user turns offline for
 * the watchers once presence expires the silent gateway (10 heartbeats,
 * 5 s here, plus twice the consumer session timeout, 6 s). Stack only: in parleyd the gateway's death is the whole
 * process's, watchers included. */
START_TEST(a_dead_gateway_turns_its_users_offline)
{
    if (strcmp(getenv("PARLEY_E2E_MODE") ? getenv("PARLEY_E2E_MODE") : "", "parleyd") == 0) {
        fprintf(stderr, "report: presence_sub: parleyd has one gateway; its kill -9 kills all\n");
        return;
    }
    char alice[65], bob[65];
    e2e_user("ka", alice);
    e2e_user("kb", bob);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    contacts_and_watch(a, bob, b);
    int64_t t0 = px_now_ms();
    e2e_kill9(E2E_GW2);
    json_t *m = until_presence(a, bob, 0);
    ck_assert_int_ge(last_seen(m), t0);
    json_decref(m);
    client_free(b);
    ck_assert_int_eq(e2e_restart(E2E_GW2), 0);
    client_free(a);
}
END_TEST

/* parleyctl presence prints one JSON line per user asked about. */
START_TEST(parleyctl_prints_presence)
{
    char alice[65], bob[65], cmd[512], line[512];
    e2e_user("la", alice);
    e2e_user("lb", bob);
    client *a = connect_synced(alice, E2E_GW1), *b = connect_synced(bob, E2E_GW2);
    contacts_and_watch(a, bob, b);
    const char *build = getenv("PARLEY_BUILD");
    snprintf(cmd, sizeof(cmd),
             "PARLEY_JWT_SECRET='%s' %s/bin/parleyctl presence --url ws://127.0.0.1:%d --as %s "
             "%s nobody-at-all",
             e2e_secret(), build != NULL ? build : "build/san", e2e_port(E2E_GW2), alice, bob);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    json_t *got[2] = { NULL, NULL };
    for (int i = 0; i < 2 && fgets(line, sizeof(line), p) != NULL; i++)
        got[i] = json_loads(line, 0, NULL);
    ck_assert_int_eq(pclose(p), 0);
    ck_assert_msg(got[0] != NULL && got[1] != NULL, "parleyctl printed fewer than 2 lines");
    ck_assert_str_eq(e2e_str(got[0], "user"), bob);
    ck_assert(online(got[0]));
    ck_assert_str_eq(e2e_str(got[1], "user"), "nobody-at-all");
    ck_assert(!online(got[1]));
    ck_assert_int_eq(last_seen(got[1]), 0);
    json_decref(got[0]);
    json_decref(got[1]);
    client_free(a);
    client_free(b);
}
END_TEST

static Suite *presence_sub_suite(void)
{
    Suite *s = suite_create("e2e-presence-sub");
    TCase *tc = tcase_create("presence_sub");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, presence_reaches_contacts_across_gateways);
    tcase_add_test(tc, a_stranger_learns_nothing);
    tcase_add_test(tc, group_members_are_contacts);
    tcase_add_test(tc, the_hide_setting_hides_last_seen);
    tcase_add_test(tc, flapping_is_damped);
    tcase_add_test(tc, subscriptions_are_capped_and_checked);
    tcase_add_test(tc, parleyctl_prints_presence);
    tcase_add_test(tc, a_dead_gateway_turns_its_users_offline);
    tcase_add_test(tc, a_new_pair_is_written_once);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    char cap[16];
    snprintf(cap, sizeof(cap), "%d", SUB_MAX);
    setenv("PARLEY_PRESENCE_SUB_MAX", cap, 1);
    return e2e_main(presence_sub_suite());
}
