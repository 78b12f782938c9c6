/* PROTOCOL.md's promises that no other program checks, end to end on the
 * real services (or parleyd): a forged `from` is ignored, the 1000-id and
 * 100-character limits, the group edge cases (the last admin removed, a
 * member removed, invited again and back, group events waiting for an
 * offline invitee, no earlier messages for a member who joins later, no way back for a
 * group everyone left, not even a redelivered create), a gateway's
 * drain on SIGTERM (close 1001, clean exit), and, against the stack, a
 * send while Kafka is stopped: `unavailable`, /readyz 503, then the retry
 * with the same id goes through once; and the database stopped: /readyz
 * 503, sends still `sent`, and what was sent meanwhile is stored once it
 * is back; the same with the database hung (SIGSTOP) rather than gone,
 * where an online recipient still gets every message live. */
#include "e2e.h"

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

/* What a test started that must not outlive it, even when it fails (check
 * runs the teardown below after a failed test too). */
static pid_t proto_extra, proto_stopped;

static void proto_teardown(void)
{
    if (proto_stopped > 0)
        kill(proto_stopped, SIGCONT);
    if (proto_extra > 0)
        e2e_stop_extra(proto_extra);
    proto_stopped = proto_extra = 0;
}

/* The next frame after everything sent so far is the answer to a ping: a
 * sentinel saying no error (or anything else) came for what went before. */
static void expect_nothing_before_pong(client *cl, const char *ref)
{
    json_t *o = json_pack("{s:s, s:s}", "type", "ping", "id", ref);
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
    json_t *m = client_recv_json(cl, E2E_WAIT_MS);
    ck_assert_msg(m != NULL && strcmp(e2e_str(m, "type"), "pong") == 0 &&
                      strcmp(e2e_str(m, "ref"), ref) == 0,
                  "wanted pong %s first, got %s", ref, m ? json_dumps(m, 0) : client_errstr(cl));
    json_decref(m);
}

static json_t *group_of(client *cl, const char *ref, const char *name, json_t *members)
{
    return e2e_cmd(cl, json_pack("{s:s, s:s, s:s, s:o}", "type", "group_create", "id", ref, "name",
                             name, "members", members));
}

static json_t *members_cmd(client *cl, const char *type, const char *ref, const char *gid,
                           const char *who)
{
    return e2e_cmd(cl, json_pack("{s:s, s:s, s:s, s:[s]}", "type", type, "id", ref, "group", gid,
                             "members", who));
}

static void gsend_ok(client *cl, const char *ref, const char *gid, char msg_id[64])
{
    json_t *a = e2e_cmd(cl, json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", ref, "group",
                                  gid, "body", ref));
    ck_assert_msg(strcmp(e2e_str(a, "type"), "sent") == 0, "send: %s", json_dumps(a, 0));
    snprintf(msg_id, 64, "%s", e2e_str(a, "msg_id"));
    json_decref(a);
}

START_TEST(forged_from_is_ignored)
{
    char alice[65], bob[65], gid[80];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(b, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s}", "type", "send", "id", "f2", "to", bob,
                          "body", "who am I", "from", "mallory");
    ck_assert_int_eq(client_send_json(a, o), 0);
    json_decref(o);
    json_t *s = client_wait_ref(a, "f2", E2E_WAIT_MS);
    ck_assert_msg(s != NULL && strcmp(e2e_str(s, "type"), "sent") == 0, "f2 not sent");
    json_decref(s);
    json_t *m = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m, "from"), alice);
    json_decref(m);

    json_t *g = group_of(a, "g1", "forgers", json_pack("[s]", bob));
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(b, gid);
    o = json_pack("{s:s, s:s, s:s, s:s, s:s}", "type", "send", "id", "f3", "group", gid, "body",
                  "who am I", "from", bob);
    e2e_expect_type(e2e_cmd(a, o), "sent", NULL);
    m = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m, "from"), alice);
    ck_assert_str_eq(e2e_str(m, "group"), gid);
    json_decref(m);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* An ack or read of n ids (x0 .. x<n-1>). */
static void send_ids(client *cl, const char *type, int n)
{
    json_t *ids = json_array();
    char id[16];
    for (int i = 0; i < n; i++) {
        snprintf(id, sizeof(id), "x%d", i);
        json_array_append_new(ids, json_string(id));
    }
    json_t *o = json_pack("{s:s, s:o}", "type", type, "ids", ids);
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

START_TEST(limits_of_ids_and_names)
{
    char u[65], name[512];
    e2e_user("lim", u);
    client *cl = e2e_connect(u, E2E_GW1);
    json_decref(e2e_wait_type(cl, "synced"));
    send_ids(cl, "ack", 1000);
    send_ids(cl, "read", 1000);
    expect_nothing_before_pong(cl, "p1");
    const char *types[] = { "ack", "read" };
    for (int i = 0; i < 2; i++) {
        send_ids(cl, types[i], 1001);
        json_t *e = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(e != NULL, "no answer to %s of 1001 ids", types[i]);
        e2e_expect_type(e, "error", "bad_request");
    }
    /* 100 characters, in ASCII and in two-byte UTF-8; then 101. */
    memset(name, 'n', 100);
    name[100] = '\0';
    e2e_expect_type(group_of(cl, "n1", name, json_array()), "group", NULL);
    for (int i = 0; i < 100; i++)
        memcpy(name + 2 * i, "\xc3\xa9", 2); /* é */
    name[200] = '\0';
    e2e_expect_type(group_of(cl, "n2", name, json_array()), "group", NULL);
    memcpy(name + 200, "\xc3\xa9", 3);
    e2e_expect_type(group_of(cl, "n3", name, json_array()), "error", "bad_request");
    memset(name, 'n', 101);
    name[101] = '\0';
    e2e_expect_type(group_of(cl, "n4", name, json_array()), "error", "bad_request");
    client_close(cl, 1000);
}
END_TEST

/* Message ids (and group_event kinds, as "event:<kind>") cl receives until
 * and with the message stop_id, as a JSON array. */
static json_t *events_until(client *cl, const char *stop_id)
{
    json_t *got = json_array();
    for (;;) {
        json_t *m = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "nothing more before %s: %s", stop_id, client_errstr(cl));
        char item[96];
        if (strcmp(e2e_str(m, "type"), "group_event") == 0)
            snprintf(item, sizeof(item), "event:%s", e2e_str(m, "event"));
        else
            snprintf(item, sizeof(item), "%s:%s", e2e_str(m, "type"), e2e_str(m, "id"));
        json_array_append_new(got, json_string(item));
        int done = strcmp(e2e_str(m, "type"), "message") == 0 &&
                   strcmp(e2e_str(m, "id"), stop_id) == 0;
        json_decref(m);
        if (done)
            return got;
    }
}

static void expect_items(json_t *got, const char *const *want, size_t n)
{
    char *dump = json_dumps(got, JSON_COMPACT);
    ck_assert_msg(json_array_size(got) == n, "got %s", dump);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(strcmp(json_string_value(json_array_get(got, i)), want[i]) == 0,
                      "item %zu of %s is not %s", i, dump, want[i]);
    free(dump);
    json_decref(got);
}

START_TEST(group_edge_cases)
{
    char alice[65], bob[65], carol[65], dave[65], gid[80], m1[64], m2[64], m3[64];
    char want_m2[80], want_m3[80];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("carol", carol);
    e2e_user("dave", dave);
    client *a = e2e_connect(alice, E2E_GW1);
    client *b = e2e_connect(bob, E2E_GW2);
    client *c = e2e_connect(carol, E2E_GW1);
    json_decref(e2e_wait_type(c, "synced"));
    json_t *g = group_of(a, "e1", "edges", json_pack("[s,s]", bob, carol));
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(b, gid);
    e2e_join(c, gid);

    /* The last admin removes herself: bob, first in join order, takes over. */
    g = members_cmd(a, "group_remove", "e2", gid, alice);
    ck_assert_msg(strcmp(e2e_str(g, "type"), "group") == 0, "%s", json_dumps(g, 0));
    json_t *admins = json_object_get(json_object_get(g, "group"), "admins");
    ck_assert_int_eq(json_array_size(admins), 1);
    ck_assert_str_eq(json_string_value(json_array_get(admins, 0)), bob);
    json_decref(g);
    e2e_expect_type(members_cmd(a, "group_add", "e3", gid, alice), "error", "forbidden");

    /* carol removed, a message without her, carol invited again and back,
     * and one with her: she gets the events (as a member, or about her own
     * invitation: not dave's) and only the second message. dave is invited
     * while offline, before the second message. */
    e2e_expect_type(members_cmd(b, "group_remove", "e4", gid, carol), "group", NULL);
    gsend_ok(b, "e5", gid, m1);
    e2e_expect_type(members_cmd(b, "group_add", "e6", gid, carol), "group", NULL);
    e2e_expect_type(members_cmd(b, "group_add", "e7", gid, dave), "group", NULL);
    e2e_join(c, gid);
    gsend_ok(b, "e8", gid, m2);
    snprintf(want_m2, sizeof(want_m2), "message:%s", m2);
    const char *carol_saw[] = { "event:invited", "event:joined", "event:removed", "event:removed",
                                "event:invited", "event:joined", want_m2 };
    expect_items(events_until(c, m2), carol_saw, 7);

    /* dave's first connection: his invitation, before synced, and no
     * message (he is not a member); he joins, then gets the group live. */
    client *d = e2e_connect(dave, E2E_GW2);
    json_t *ev = e2e_wait_type(d, "group_event");
    ck_assert_str_eq(e2e_str(ev, "event"), "invited");
    ck_assert_str_eq(e2e_str(ev, "group"), gid);
    json_decref(ev);
    json_decref(e2e_wait_type(d, "synced"));
    e2e_join(d, gid);
    gsend_ok(b, "e9", gid, m3);
    snprintf(want_m3, sizeof(want_m3), "message:%s", m3);
    const char *dave_saw[] = { "event:joined", want_m3 };
    expect_items(events_until(d, m3), dave_saw, 2);
    ck_assert(strcmp(m1, m2) != 0);

    /* Everyone leaves: the group stays gone, even for the creator's create
     * sent again with the same id (a redelivered create). */
    client *who[] = { b, c, d };
    for (int i = 0; i < 3; i++)
        e2e_expect_type(e2e_cmd(who[i], json_pack("{s:s, s:s, s:s}", "type", "group_leave", "id",
                                              "bye", "group", gid)), "group", NULL);
    json_t *again = group_of(a, "e1", "edges", json_pack("[s,s]", bob, carol));
    ck_assert_msg(strcmp(e2e_str(again, "type"), "error") == 0, "the group came back: %s",
                  json_dumps(again, 0));
    json_decref(again);
    e2e_expect_type(e2e_cmd(b, json_pack("{s:s, s:s, s:s}", "type", "group_info", "id", "gone",
                                     "group", gid)), "error", "not_found");
    client_close(a, 1000);
    client_close(b, 1000);
    client_close(c, 1000);
    client_close(d, 1000);
}
END_TEST

/* A gateway (parleyd) told to stop closes its connections with 1001 and
 * exits cleanly. */
START_TEST(sigterm_drains_with_1001)
{
    char u[65];
    int status = 0, port = e2e_port(E2E_GW2) + 13;
    e2e_user("drain", u);
    pid_t pid = proto_extra = e2e_spawn_extra("gw-drain", port, 0, NULL, NULL, 0);
    client *cl = e2e_connect_port(port, u, &status);
    ck_assert_msg(cl != NULL, "connect to the draining gateway: HTTP %d", status);
    json_decref(e2e_wait_type(cl, "synced"));
    ck_assert_int_eq(kill(pid, SIGTERM), 0);
    ck_assert_int_eq(client_wait_close(cl, E2E_WAIT_MS), 1001);
    client_free(cl);
    int st = e2e_extra_exit_status(pid);
    proto_extra = 0;
    ck_assert_msg(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
}
END_TEST

/* The pid of the stack's `name` process (kafka, mongo: FerretDB) from its
 * pid file in the stack's folder (tests/run.sh exports it), or 0 against
 * parleyd. */
static pid_t stack_pid(const char *name)
{
    const char *mode = getenv("PARLEY_E2E_MODE"), *dir = getenv("PARLEY_STACK_DIR");
    if (mode != NULL && strcmp(mode, "parleyd") == 0)
        return 0;
    ck_assert_msg(dir != NULL, "PARLEY_STACK_DIR is not set (tests/run.sh sets it)");
    char path[512];
    long pid = 0;
    snprintf(path, sizeof(path), "%s/%s.pid", dir, name);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL && fscanf(f, "%ld", &pid) == 1, "no pid in %s", path);
    fclose(f);
    return (pid_t)pid;
}

/* 1 if every thread of pid is in state T (stopped). */
static int all_threads_stopped(pid_t pid)
{
    char path[300], line[256];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    int all = d != NULL;
    struct dirent *e;
    while (all && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/%d/task/%s/status", (int)pid, e->d_name);
        FILE *f = fopen(path, "r");
        int stopped = 0;
        while (f != NULL && fgets(line, sizeof(line), f) != NULL)
            if (strncmp(line, "State:", 6) == 0)
                stopped = strstr(line, "T (stopped)") != NULL;
        if (f != NULL)
            fclose(f);
        all = stopped;
    }
    if (d != NULL)
        closedir(d);
    return all;
}

/* SIGSTOP takes effect asynchronously: polls for up to 5 s. */
static int stopped_within(pid_t pid)
{
    for (int tries = 0; tries < 500; tries++) {
        if (all_threads_stopped(pid))
            return 1;
        usleep(10 * 1000);
    }
    return 0;
}

/* Polls port's /readyz until its status is (want_ok: 200, else an answer
 * of 500 or more: a probe that times out (2 s) is no answer); returns 1 if
 * it got there within E2E_WAIT_MS. No assertion: the caller may have a
 * broker to wake first. */
static int readyz_becomes(int port, int want_ok)
{
    char buf[512];
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    while (px_mono_ms() < end) {
        int status = e2e_http_get_from(NULL, port, "/readyz", buf, sizeof(buf));
        if (want_ok ? status == 200 : status >= 500)
            return 1;
        usleep(100 * 1000);
    }
    return 0;
}

/* Kafka stopped (SIGSTOP, for a few seconds: under the consumers' session
 * timeout): a send on a gateway whose produces time out after 3 s is
 * answered `unavailable` and its /readyz turns 503; Kafka back, /readyz is
 * 200 again and the same send (same id) is delivered, once: the next
 * message bob gets after it is a later one. Against parleyd there is no
 * Kafka: nothing to do. */
START_TEST(kafka_down_unavailable_then_retry_same_id)
{
    pid_t kpid = stack_pid("kafka");
    if (kpid == 0)
        return;
    char alice[65], bob[65], mid[64], next[64];
    int status = 0, port = e2e_port(E2E_GW2) + 14;
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    const char *env[] = { "PARLEY_KAFKA_PRODUCER_CONFIG", "message.timeout.ms=3000", NULL };
    pid_t gw = proto_extra = e2e_spawn_extra("gw-nokafka", port, 0, NULL, env, 0);
    client *a = e2e_connect_port(port, alice, &status);
    ck_assert_msg(a != NULL, "connect: HTTP %d", status);
    json_decref(e2e_wait_type(a, "synced"));
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(b, "synced"));

    /* Nothing may fail the test while Kafka is stopped: look, wake it, then
     * assert. */
    ck_assert_int_eq(kill(kpid, SIGSTOP), 0);
    proto_stopped = kpid;
    int was_stopped = stopped_within(kpid);
    e2e_send_async(a, "k1", bob, "through the outage");
    json_t *r = client_wait_ref(a, "k1", E2E_WAIT_MS);
    int not_ready = readyz_becomes(port, 0);
    ck_assert_int_eq(kill(kpid, SIGCONT), 0);
    proto_stopped = 0;
    ck_assert_msg(was_stopped, "Kafka (pid %d) not stopped after SIGSTOP", (int)kpid);
    ck_assert_msg(r != NULL, "no answer while Kafka was stopped: %s", client_errstr(a));
    ck_assert_msg(strcmp(e2e_str(r, "type"), "error") == 0 &&
                      strcmp(e2e_str(r, "code"), "unavailable") == 0,
                  "answer while Kafka was stopped: %s", json_dumps(r, 0));
    json_decref(r);
    ck_assert_msg(not_ready, "/readyz stayed 200 with Kafka stopped");
    ck_assert_msg(readyz_becomes(port, 1), "/readyz not 200 again with Kafka back");

    e2e_send(a, "k1", bob, "through the outage", mid);
    e2e_send(a, "k2", bob, "after it", next);
    /* The timed-out produce may have reached the broker after all (it was
     * stopped, not gone): bob may see k1's id twice on the wire, never
     * another id before k2. */
    int got = 0;
    for (;;) {
        /* Consumers rejoin their groups after the pause first: a bound
         * for a loaded box. */
        json_t *m = client_wait_type(b, "message", 4 * E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "bob got nothing after the outage: %s", client_errstr(b));
        int done = strcmp(e2e_str(m, "id"), next) == 0;
        ck_assert_msg(done || strcmp(e2e_str(m, "id"), mid) == 0, "unexpected %s",
                      json_dumps(m, 0));
        got += !done;
        json_decref(m);
        if (done)
            break;
    }
    ck_assert_msg(got >= 1, "the retried send never reached bob");
    client_close(a, 1000);
    client_close(b, 1000);
    proto_extra = 0;
    ck_assert_int_eq(e2e_stop_extra(gw), 0);
}
END_TEST

/* After the database came back: r (taken), the answer to the send a made
 * to bob meanwhile, is `sent`; GW1's /readyz is 200 again and bob,
 * connecting now, gets the message from the store. Closes a. */
static void db_back_nothing_lost(client *a, json_t *r, const char *bob)
{
    char mid[64];
    ck_assert_msg(r != NULL && strcmp(e2e_str(r, "type"), "sent") == 0,
                  "send with the database out: %s", r ? json_dumps(r, 0) : client_errstr(a));
    snprintf(mid, sizeof(mid), "%s", e2e_str(r, "msg_id"));
    json_decref(r);
    ck_assert_msg(readyz_becomes(e2e_port(E2E_GW1), 1), "/readyz not 200 again");
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *m = client_wait_type(b, "message", 4 * E2E_WAIT_MS);
    ck_assert_msg(m != NULL, "the message sent meanwhile never came: %s", client_errstr(b));
    ck_assert_str_eq(e2e_str(m, "id"), mid);
    json_decref(m);
    json_decref(e2e_wait_type(b, "synced"));
    client_close(a, 1000);
    client_close(b, 1000);
}

/* The database (FerretDB and its PostgreSQL) stopped and started again
 * with the stack's own script: the gateways' /readyz is 503 meanwhile, a
 * send is still `sent` (it only needs Kafka), message-store retries until
 * it can store it, and the offline recipient finds it in his sync. */
START_TEST(store_down_readyz_then_nothing_lost)
{
    if (stack_pid("kafka") == 0)
        return;
    char alice[65], bob[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    /* Nothing may fail the test while the database is down: look, start it
     * again, then assert. */
    int stopped = system("bash deploy/local/stack.sh stop mongo >/dev/null 2>&1");
    int not_ready = readyz_becomes(e2e_port(E2E_GW1), 0);
    e2e_send_async(a, "d1", bob, "while the database is down");
    json_t *r = client_wait_ref(a, "d1", E2E_WAIT_MS);
    int started = system("PARLEY_STACK_FRESH=0 bash deploy/local/stack.sh start mongo "
                         ">/dev/null 2>&1");
    ck_assert_msg(stopped == 0 && started == 0, "stack.sh stop/start mongo: %d/%d", stopped,
                  started);
    ck_assert_msg(not_ready, "/readyz stayed 200 with the database stopped");
    db_back_nothing_lost(a, r, bob);
}
END_TEST

/* FerretDB hung with SIGSTOP (the teardown wakes it if a test fails
 * first); 1 once every thread of it is stopped. */
static int db_hang(pid_t mpid)
{
    ck_assert_int_eq(kill(mpid, SIGSTOP), 0);
    proto_stopped = mpid;
    return stopped_within(mpid);
}

static void db_wake(pid_t mpid, int was_stopped)
{
    ck_assert_int_eq(kill(mpid, SIGCONT), 0);
    proto_stopped = 0;
    ck_assert_msg(was_stopped, "FerretDB (pid %d) not stopped after SIGSTOP", (int)mpid);
}

/* The database hanging rather than refusing (FerretDB stopped with
 * SIGSTOP: connections stay open, nothing answers): the gateway's /readyz
 * answers 503 within a few seconds (not after the socket timeout), a send
 * is still `sent`, and once the database answers again /readyz is 200 and
 * the offline recipient finds the message. */
START_TEST(store_hangs_readyz_then_nothing_lost)
{
    pid_t mpid = stack_pid("mongo");
    if (mpid == 0)
        return;
    char alice[65], bob[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    /* Nothing may fail the test while the database is stopped: look, wake
     * it, then assert. */
    int was_stopped = db_hang(mpid);
    int not_ready = readyz_becomes(e2e_port(E2E_GW1), 0);
    e2e_send_async(a, "h1", bob, "while the database hangs");
    json_t *r = client_wait_ref(a, "h1", E2E_WAIT_MS);
    db_wake(mpid, was_stopped);
    ck_assert_msg(not_ready, "/readyz never answered non-200 with the database hung");
    db_back_nothing_lost(a, r, bob);
}
END_TEST

/* The live path never waits for the store (message-store's write-behind
 * pipeline, services/message-store/writer.c): with the database hung, an
 * online recipient still gets each message as it is sent, not only the
 * first one (whose store step then hangs). Sent one after another, each
 * after the previous one arrived, so each is its own consumed batch. */
START_TEST(store_hangs_online_recipient_gets_each_message)
{
    enum { LIVE_N = 3 };
    pid_t mpid = stack_pid("mongo");
    if (mpid == 0)
        return;
    char alice[65], bob[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(b, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    /* Nothing may fail the test while the database is stopped: look, wake
     * it, then assert. */
    int was_stopped = db_hang(mpid), got = 0;
    char want[LIVE_N][32], body[LIVE_N][64];
    for (int i = 0; i < LIVE_N && got == i; i++) {
        char cid[16];
        snprintf(cid, sizeof(cid), "l%d", i);
        snprintf(want[i], sizeof(want[i]), "live %d", i);
        e2e_send_async(a, cid, bob, want[i]);
        json_t *m = client_wait_type(b, "message", E2E_WAIT_MS);
        snprintf(body[i], sizeof(body[i]), "%s", m != NULL ? e2e_str(m, "body") : "");
        got += m != NULL;
        json_decref(m);
    }
    db_wake(mpid, was_stopped);
    ck_assert_msg(got == LIVE_N, "with the database hung bob got %d of %d messages live", got,
                  LIVE_N);
    for (int i = 0; i < LIVE_N; i++)
        ck_assert_str_eq(body[i], want[i]);
    ck_assert_msg(readyz_becomes(e2e_port(E2E_GW1), 1), "/readyz not 200 again");
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

static Suite *protocol_suite(void)
{
    Suite *s = suite_create("e2e-protocol");
    TCase *tc = tcase_create("protocol");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, NULL, proto_teardown);
    tcase_add_test(tc, forged_from_is_ignored);
    tcase_add_test(tc, limits_of_ids_and_names);
    tcase_add_test(tc, group_edge_cases);
    tcase_add_test(tc, sigterm_drains_with_1001);
    tcase_add_test(tc, kafka_down_unavailable_then_retry_same_id);
    tcase_add_test(tc, store_down_readyz_then_nothing_lost);
    tcase_add_test(tc, store_hangs_readyz_then_nothing_lost);
    tcase_add_test(tc, store_hangs_online_recipient_gets_each_message);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return e2e_main(protocol_suite());
}
