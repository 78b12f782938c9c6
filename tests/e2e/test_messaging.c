/* 1:1 messaging end to end: two gateways, presence and message-store as
 * real processes on the real Kafka broker and MongoDB-wire server. */
#include "e2e.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Events (type "message") read until `synced`, as a JSON array; each
 * within wait_ms of the one before. */
static int has_id(const json_t *arr, const char *id);

/* The messages before `synced`, each once, in order of first arrival. A
 * page whose delivery was not yet acknowledged when its batch step was
 * retried is served again (sync.c; at-least-once, clients dedupe by id):
 * a repeat is counted and said, not kept. */
static json_t *until_synced_within(client *cl, int wait_ms)
{
    json_t *got = json_array();
    int dups = 0;
    for (;;) {
        json_t *m = client_recv_json(cl, wait_ms);
        ck_assert_msg(m != NULL, "no synced: %s", client_errstr(cl));
        if (strcmp(e2e_str(m, "type"), "synced") == 0) {
            json_decref(m);
            if (dups > 0)
                fprintf(stderr, "report: sync: %d event(s) came twice before synced (a page "
                        "served again)\n", dups);
            return got;
        }
        if (strcmp(e2e_str(m, "type"), "message") == 0 && has_id(got, e2e_str(m, "id")))
            dups++;
        else if (strcmp(e2e_str(m, "type"), "message") == 0)
            json_array_append(got, m);
        json_decref(m);
    }
}

static json_t *until_synced(client *cl)
{
    return until_synced_within(cl, E2E_WAIT_MS);
}

static int has_id(const json_t *arr, const char *id)
{
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) if (strcmp(e2e_str(v, "id"), id) == 0) return 1;
    return 0;
}

/* A connection's sync does not ask the presence registry on
 * message-store's consume thread (a FerretDB call each: a wave of 256
 * group members' syncs held every record ~10 s on a loaded box): the
 * route takes the sync's gateway and the first push goes there at once.
 * A user whose every synced device synced here since (bob with one,
 * carol with a phone and a laptop on two gateways) needs no lookup at
 * all; test_devices covers a device the cache does not know
 * (a_device_connected_through_a_store_restart_gets_live_messages). First
 * in the suite, so no earlier test's traffic asks the registry
 * meanwhile. */
START_TEST(a_sync_leaves_the_registry_for_after_the_first_push)
{
    const char *lookups = "parley_msgstore_store_ms_count{op=\"presence_lookup\"}";
    char alice[65], bob[65], carol[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("carol", carol);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(until_synced(a));
    long long before = e2e_metric(E2E_STORE, lookups);
    ck_assert_int_ge(before, 0);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b));
    client *phone = e2e_connect_device(carol, "phone", E2E_GW1);
    json_decref(until_synced(phone));
    client *laptop = e2e_connect_device(carol, "laptop", E2E_GW2);
    json_decref(until_synced(laptop));
    ck_assert_int_eq(e2e_metric(E2E_STORE, lookups), before);
    e2e_send(a, "c1", bob, "first push", mid);
    json_t *m = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m, "id"), mid);
    json_decref(m);
    e2e_send(a, "c2", carol, "to both", mid);
    client *devs[] = { phone, laptop };
    for (int i = 0; i < 2; i++) {
        m = e2e_wait_type(devs[i], "message");
        ck_assert_str_eq(e2e_str(m, "id"), mid);
        json_decref(m);
    }
    usleep(1000 * 1000); /* a lookup after a push comes within milliseconds */
    ck_assert_int_eq(e2e_metric(E2E_STORE, lookups), before);
    client_close(a, 1000);
    client_close(b, 1000);
    client_close(phone, 1000);
    client_close(laptop, 1000);
}
END_TEST

START_TEST(online_delivery_across_gateways)
{
    char alice[65], bob[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b));
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "hello bob", mid);
    json_t *m = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m, "id"), mid);
    ck_assert_str_eq(e2e_str(m, "from"), alice);
    ck_assert_str_eq(e2e_str(m, "to"), bob);
    ck_assert_str_eq(e2e_str(m, "body"), "hello bob");
    ck_assert(json_integer_value(json_object_get(m, "ts")) > 0);
    json_decref(m);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* message-store keeps an online user's route for
 * PARLEY_PRESENCE_ONLINE_CACHE_MS (30 s by default, which the harness
 * keeps): a user who moves to another gateway must be reached there at
 * once, by the note its new connection's sync leaves in the route cache,
 * not when the old route expires. E2E_WAIT_MS (15 s) is well inside the
 * 30 s, so a message that waited for the expiry fails here. */
START_TEST(a_user_who_moves_gateway_is_reached_there_at_once)
{
    char alice[65], bob[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(until_synced(a));
    client *b = e2e_connect(bob, E2E_GW1);
    json_decref(until_synced(b));
    e2e_send(a, "before", bob, "on gateway 1", mid);
    json_t *m = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m, "id"), mid); /* routed: bob's entry names gateway 1 */
    e2e_ack(b, mid);
    json_decref(m);
    client_close(b, 1000);
    b = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b));
    e2e_send(a, "after", bob, "on gateway 2", mid);
    m = client_wait_type(b, "message", E2E_WAIT_MS);
    ck_assert_msg(m != NULL, "not live on the new gateway: %s", client_errstr(b));
    ck_assert_str_eq(e2e_str(m, "id"), mid);
    json_decref(m);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

START_TEST(offline_delivery_on_connect_before_synced)
{
    char alice[65], bob[65], m1[64], m2[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "first", m1);
    e2e_send(a, "c2", bob, "second", m2);
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *got = until_synced(b);
    ck_assert_int_eq(json_array_size(got), 2);
    ck_assert_str_eq(e2e_str(json_array_get(got, 0), "id"), m1);
    ck_assert_str_eq(e2e_str(json_array_get(got, 1), "id"), m2);
    json_decref(got);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

START_TEST(ack_stops_redelivery_and_no_ack_redelivers)
{
    char alice[65], bob[65], m1[64], m2[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "will be acked", m1);
    e2e_send(a, "c2", bob, "never acked", m2);
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *got = until_synced(b);
    ck_assert_int_eq(json_array_size(got), 2);
    json_decref(got);
    e2e_ack(b, m1);
    client_close(b, 1000);
    /* The ack travels through Kafka to message-store: poll until it lands. */
    int acked = 0;
    for (int tries = 0; tries < 50 && !acked; tries++) {
        b = e2e_connect(bob, tries % 2 ? E2E_GW1 : E2E_GW2);
        got = until_synced(b);
        ck_assert_msg(has_id(got, m2), "unacked message not redelivered");
        acked = !has_id(got, m1);
        json_decref(got);
        client_close(b, 1000);
        if (!acked)
            usleep(200 * 1000);
    }
    ck_assert_msg(acked, "acked message still redelivered after 10 s");
    client_close(a, 1000);
}
END_TEST

/* Live pushes go out before the dedupe claim is stored: a resend to an
 * online recipient must still not be pushed again (message-store's memory
 * of recent pushes), acked or not. The sentinel, sent after the resend's
 * `sent` to the same recipient (one partition, in order), bounds the wait. */
START_TEST(resend_to_online_recipient_is_pushed_once)
{
    char alice[65], bob[65], m1[64], again[64], sentinel[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b));
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "twice", bob, "once only", m1);
    json_t *m = e2e_wait_type(b, "message");
    ck_assert_str_eq(e2e_str(m, "id"), m1);
    json_decref(m);
    e2e_ack(b, m1);
    e2e_send(a, "twice", bob, "once only", again);
    ck_assert_str_eq(m1, again);
    e2e_send(a, "after", bob, "sentinel", sentinel);
    m = e2e_wait_type(b, "message");
    ck_assert_msg(strcmp(e2e_str(m, "id"), sentinel) == 0, "got %s again before the sentinel",
                  e2e_str(m, "id"));
    json_decref(m);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

START_TEST(resend_is_idempotent)
{
    char alice[65], bob[65], m1[64], m1b[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "same-id", bob, "once", m1);
    e2e_send(a, "same-id", bob, "once", m1b);
    ck_assert_str_eq(m1, m1b);
    client_close(a, 1000);
    /* Resent from the other gateway, too. */
    a = e2e_connect(alice, E2E_GW2);
    e2e_send(a, "same-id", bob, "once", m1b);
    ck_assert_str_eq(m1, m1b);
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *got = until_synced(b);
    ck_assert_int_eq(json_array_size(got), 1);
    e2e_ack(b, m1);
    json_decref(got);
    client_close(b, 1000);
    /* Poll until the ack has deleted the inbox copy; bob stays connected. */
    int gone = 0;
    for (int tries = 0; tries < 50 && !gone; tries++) {
        b = e2e_connect(bob, E2E_GW1);
        got = until_synced(b);
        gone = json_array_size(got) == 0;
        json_decref(got);
        if (!gone) {
            client_close(b, 1000);
            usleep(200 * 1000);
        }
    }
    ck_assert_msg(gone, "acked message still pending after 10 s");
    /* A resend now still delivers nothing: the next thing bob gets is a
     * sentinel sent after it (one sender to one recipient keeps order). */
    e2e_send(a, "same-id", bob, "once", m1b);
    ck_assert_str_eq(m1, m1b);
    char sentinel[64];
    e2e_send(a, "sentinel", bob, "sentinel", sentinel);
    json_t *m = e2e_wait_type(b, "message");
    ck_assert_msg(strcmp(e2e_str(m, "id"), sentinel) == 0, "resend after ack delivered again: %s",
                  e2e_str(m, "id"));
    json_decref(m);
    client_close(b, 1000);
    client_close(a, 1000);
}
END_TEST

START_TEST(thousand_messages_in_order)
{
    enum { N = 1000 };
    char alice[65], bob[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b));
    client *a = e2e_connect(alice, E2E_GW1);
    char cid[32], body[32];
    for (int i = 0; i < N; i++) {
        snprintf(cid, sizeof(cid), "c%d", i);
        snprintf(body, sizeof(body), "%d", i);
        e2e_send_async(a, cid, bob, body);
    }
    int sent = 0;
    while (sent < N) {
        json_t *r = e2e_wait_type(a, "sent");
        sent++;
        json_decref(r);
    }
    for (int i = 0; i < N; i++) {
        json_t *m = e2e_wait_type(b, "message");
        ck_assert_int_eq(atoi(e2e_str(m, "body")), i);
        json_decref(m);
    }
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* A backlog five times the gateway's send-queue ceiling (1 MiB) arrives
 * whole and in order on a connection that stays open: the sync is served in
 * pages the gateway asks for as the connection writes them out. Against
 * the microservices message-store is stopped (SIGSTOP) from the first send
 * until bob has connected, so none of the backlog is stored yet when his
 * sync is asked for: `synced` must still come after all of it (a sync
 * served before message-store had consumed the inbox records sent ahead of
 * it once ended early and left the rest to come live after `synced`). */
START_TEST(big_backlog_is_synced_in_pages)
{
    enum { N = 600, BODY = 8000 };
    char alice[65], bob[65], cid[32];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    pid_t store = e2e_pid(E2E_STORE) != e2e_pid(E2E_GW1) ? e2e_pid(E2E_STORE) : 0;
    if (store > 0)
        ck_assert_int_eq(kill(store, SIGSTOP), 0);
    char *body = malloc(BODY + 16);
    for (int i = 0; i < N; i++) {
        snprintf(cid, sizeof(cid), "c%d", i);
        memset(body, 'x', BODY);
        snprintf(body + BODY, 16, ":%d", i);
        e2e_send_async(a, cid, bob, body);
    }
    for (int i = 0; i < N; i++)
        json_decref(e2e_wait_type(a, "sent"));
    client *b = e2e_connect(bob, E2E_GW2);
    if (store > 0)
        ck_assert_int_eq(kill(store, SIGCONT), 0);
    /* The first page comes once message-store has stored the 4.8 MB ahead
     * of the sync request: a bound for a loaded box. */
    json_t *got = until_synced_within(b, 4 * E2E_WAIT_MS);
    ck_assert_int_eq(json_array_size(got), N);
    for (int i = 0; i < N; i++) {
        const char *text = e2e_str(json_array_get(got, (size_t)i), "body");
        ck_assert_int_eq(atoi(strrchr(text, ':') + 1), i);
    }
    json_decref(got);
    /* Still open and live after the sync. Backlog messages message-store
     * stored only after bob connected were also pushed live and may come
     * again after `synced` (the client dedupes by id); nothing else may. */
    char mid[64];
    e2e_send(a, "after", bob, "live", mid);
    for (;;) {
        json_t *live = e2e_wait_type(b, "message");
        int done = strcmp(e2e_str(live, "id"), mid) == 0;
        if (!done)
            ck_assert_msg(e2e_str(live, "body")[0] == 'x', "unexpected message %s",
                          e2e_str(live, "body"));
        json_decref(live);
        if (done)
            break;
    }
    free(body);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* A backlog of three pages is read from the store once (issue 14): the
 * first page's scan keeps what follows it, and the next pages come from
 * there (FerretDB decodes and sorts the whole inbox for every scan, so a
 * scan per page made a 10k reconnect take seconds). Every message still
 * comes before `synced`, each sender's in order. Five senders, as one
 * user's sends are rate limited (PARLEY_SEND_BURST 1000). */
START_TEST(a_backlog_of_pages_is_scanned_once)
{
    enum { SENDERS = 5, EACH = 1000, N = SENDERS * EACH };
    static const char *const scan = "parley_msgstore_sync_pages_total{read=\"scan\"}";
    static const char *const kept = "parley_msgstore_sync_pages_total{read=\"kept\"}";
    char bob[65], from[SENDERS][65];
    client *a[SENDERS];
    e2e_user("bob", bob);
    for (int s = 0; s < SENDERS; s++) {
        e2e_user("alice", from[s]);
        a[s] = e2e_connect(from[s], E2E_GW1);
        e2e_send_numbered(a[s], bob, EACH);
    }
    for (int s = 0; s < SENDERS; s++)
        for (int i = 0; i < EACH; i++)
            json_decref(e2e_wait_type(a[s], "sent"));
    long long scan0 = e2e_metric(E2E_STORE, scan), kept0 = e2e_metric(E2E_STORE, kept);
    ck_assert_msg(scan0 >= 0 && kept0 >= 0, "no sync page metrics");
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *got = until_synced_within(b, 4 * E2E_WAIT_MS);
    ck_assert_int_eq(json_array_size(got), N);
    int last[SENDERS];
    for (int s = 0; s < SENDERS; s++)
        last[s] = -1;
    size_t i;
    json_t *m;
    json_array_foreach(got, i, m)
    {
        int s = 0;
        while (s < SENDERS && strcmp(e2e_str(m, "from"), from[s]) != 0)
            s++;
        ck_assert_msg(s < SENDERS, "a message from %s", e2e_str(m, "from"));
        ck_assert_int_eq(atoi(e2e_str(m, "body")), last[s] + 1);
        last[s]++;
    }
    json_decref(got);
    long long scans = e2e_metric(E2E_STORE, scan) - scan0;
    long long kepts = e2e_metric(E2E_STORE, kept) - kept0;
    fprintf(stderr, "report: a %d-event backlog took %lld page(s) from a scan, %lld from the "
            "kept rest\n", N, scans, kepts);
    ck_assert_msg(kepts >= 2, "%lld of the pages came from a kept rest", kepts);
    for (int s = 0; s < SENDERS; s++)
        client_close(a[s], 1000);
    client_close(b, 1000);
}
END_TEST

/* A reader slower than the sync: bob reads one event every 2 ms while a
 * 2.4 MB backlog is synced to him and alice sends 1.6 MB more live (past
 * the gateway's 1 MiB ceiling for live events held until `synced`). No
 * 1013 close, and every message arrives (by id: the held ones the gateway
 * dropped come in the sync's pages instead). */
START_TEST(slow_reader_gets_everything_without_1013)
{
    enum { BACKLOG = 300, LIVE = 200, BODY = 8000 };
    char alice[65], bob[65], cid[32];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    char *body = malloc(BODY + 1);
    memset(body, 'y', BODY);
    body[BODY] = '\0';
    for (int i = 0; i < BACKLOG; i++) {
        snprintf(cid, sizeof(cid), "b%d", i);
        e2e_send_async(a, cid, bob, body);
    }
    for (int i = 0; i < BACKLOG; i++)
        json_decref(e2e_wait_type(a, "sent"));
    long long dropped0 = e2e_metric(E2E_GW2, "parley_gateway_sync_held_overflow_total");
    client *b = e2e_connect(bob, E2E_GW2);
    for (int i = 0; i < LIVE; i++) {
        snprintf(cid, sizeof(cid), "l%d", i);
        e2e_send_async(a, cid, bob, body);
    }
    free(body);
    json_t *ids = json_object();
    int synced = 0;
    while (json_object_size(ids) < BACKLOG + LIVE) {
        json_t *m = client_recv_json(b, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "%zu of %d messages, then: %s (close %d)",
                      json_object_size(ids), BACKLOG + LIVE, client_errstr(b),
                      client_close_code(b));
        if (strcmp(e2e_str(m, "type"), "message") == 0)
            json_object_set_new(ids, e2e_str(m, "id"), json_true());
        synced |= strcmp(e2e_str(m, "type"), "synced") == 0;
        json_decref(m);
        usleep(2000);
    }
    json_decref(ids);
    /* Still open: a ping is answered. */
    e2e_send_text(b, "{\"type\":\"ping\",\"id\":\"p\"}");
    json_decref(e2e_wait_type(b, "pong"));
    fprintf(stderr, "report: slow reader: %d messages, synced %s, held live events dropped for "
            "the sync %lld time(s)\n", BACKLOG + LIVE, synced ? "seen" : "not yet seen",
            e2e_metric(E2E_GW2, "parley_gateway_sync_held_overflow_total") - dropped0);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* A connection is reached live while the presence registry lags behind
 * it (presence stopped from before bob connects): message-store keeps the
 * gateway of bob's sync although the registry does not name it yet. It
 * used to forget it after one cache period (a refresh read the registry's
 * "offline"), and the rest waited for bob's next connection: online
 * members of a 256-member group missed live messages on a loaded box.
 * Sends are spread over several cache periods (200 ms in the harness,
 * 1 s for a sync's note). bob has one device, so his route is his sync's
 * gateway and the registry is not asked at all; a route the registry
 * answers while it lags (a user with another device) is test_devices'
 * a_device_connected_through_a_store_restart_gets_live_messages.
 * Microservices only: parleyd's presence cannot lag on its own. */
START_TEST(live_while_the_registry_lags)
{
    enum { N = 10, GAP_MS = 300 };
    char alice[65], bob[65], cid[16], mid[64];
    pid_t presence = e2e_pid(E2E_PRESENCE);
    if (presence == e2e_pid(E2E_GW1))
        return;
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(until_synced(a));
    ck_assert_int_eq(kill(presence, SIGSTOP), 0);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b));
    for (int i = 0; i < N; i++) {
        snprintf(cid, sizeof(cid), "lag%d", i);
        e2e_send(a, cid, bob, "while presence lags", mid);
        json_t *m = client_wait_type(b, "message", E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "message %d of %d not live: %s", i + 1, N, client_errstr(b));
        ck_assert_str_eq(e2e_str(m, "id"), mid);
        json_decref(m);
        usleep(GAP_MS * 1000);
    }
    ck_assert_int_eq(kill(presence, SIGCONT), 0);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* Issue 16: a live push that reaches a connection during its sync, of an
 * event a page of that sync carries too, is written to it once. With
 * message-store stopped, m lands in bob's inbox partition before the new
 * connection's sync request but is pushed only after the gateway holds
 * that connection: the push is held until `synced`, the page carries m,
 * and the gateway drops the held copy (counted). Stack only: parleyd
 * cannot stop message-store alone. */
START_TEST(a_push_held_during_a_sync_that_carried_it_is_written_once)
{
    char alice[65], bob[65], warm[64], mid[64], sentinel[64] = "";
    pid_t store = e2e_pid(E2E_STORE);
    if (store == e2e_pid(E2E_GW1))
        return;
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(until_synced(a));
    client *b1 = e2e_connect(bob, E2E_GW1);
    json_decref(until_synced(b1));
    e2e_send(a, "warm", bob, "route known", warm); /* message-store knows bob's gateway */
    json_decref(e2e_wait_type(b1, "message"));
    long long dropped = e2e_metric(E2E_GW1, "parley_gateway_duplicates_dropped_total");
    ck_assert_int_ge(dropped, 0);

    ck_assert_int_eq(kill(store, SIGSTOP), 0);
    e2e_send(a, "m", bob, "held and synced", mid);
    client *b2 = e2e_connect(bob, E2E_GW1);
    json_decref(e2e_cmd(b2, json_pack("{s:s, s:s}", "type", "ping", "id", "p"))); /* held */
    ck_assert_int_eq(kill(store, SIGCONT), 0);

    json_t *m = e2e_wait_type(b1, "message");
    ck_assert_str_eq(e2e_str(m, "id"), mid);
    json_decref(m);
    int copies = 0;
    for (;;) { /* until the sentinel, which alice sends once b2 is synced */
        m = client_recv_json(b2, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "b2: %s", client_errstr(b2));
        const char *type = e2e_str(m, "type"), *id = e2e_str(m, "id");
        if (strcmp(type, "synced") == 0)
            e2e_send(a, "s", bob, "sentinel", sentinel);
        int end = strcmp(type, "message") == 0 && sentinel[0] != '\0' &&
                  strcmp(id, sentinel) == 0;
        copies += strcmp(type, "message") == 0 && strcmp(id, mid) == 0;
        json_decref(m);
        if (end)
            break;
    }
    ck_assert_msg(copies == 1, "m written %d times to one connection", copies);
    ck_assert_int_ge(e2e_metric(E2E_GW1, "parley_gateway_duplicates_dropped_total"),
                     dropped + 1);
    client_close(a, 1000);
    client_close(b1, 1000);
    client_close(b2, 1000);
}
END_TEST

START_TEST(two_connections_of_one_user_both_receive)
{
    char alice[65], bob[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b1 = e2e_connect(bob, E2E_GW1);
    client *b2 = e2e_connect(bob, E2E_GW2);
    json_decref(until_synced(b1));
    json_decref(until_synced(b2));
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "to both", mid);
    json_t *m1 = e2e_wait_type(b1, "message");
    json_t *m2 = e2e_wait_type(b2, "message");
    ck_assert_str_eq(e2e_str(m1, "id"), mid);
    ck_assert_str_eq(e2e_str(m2, "id"), mid);
    json_decref(m1);
    json_decref(m2);
    client_close(a, 1000);
    client_close(b1, 1000);
    client_close(b2, 1000);
}
END_TEST

static int connect_status(const char *token)
{
    char err[256];
    int status = 0;
    client *cl = client_connect("127.0.0.1", e2e_port(E2E_GW1), token, NULL, 5000, &status,
                                err, sizeof(err));
    client_free(cl);
    return cl ? 101 : status;
}

START_TEST(unauthorized_upgrades_get_401)
{
    char tok[2048];
    ck_assert_int_eq(connect_status(NULL), 401);
    e2e_token("alice", -60, tok, sizeof(tok));
    ck_assert_int_eq(connect_status(tok), 401);
    ck_assert_int_eq(connect_status("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
                                    "eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0."), 401);
    e2e_token("alice", 3600, tok, sizeof(tok));
    tok[strlen(tok) - 2] = tok[strlen(tok) - 2] == 'A' ? 'B' : 'A';
    ck_assert_int_eq(connect_status(tok), 401);
    ck_assert_int_eq(connect_status("garbage"), 401);
    e2e_token("alice", 3600, tok, sizeof(tok));
    ck_assert_int_eq(connect_status(tok), 101);
}
END_TEST

static int close_code_after(const uint8_t *payload, size_t len, int opcode)
{
    char u[65];
    e2e_user("frames", u);
    client *cl = e2e_connect(u, E2E_GW1);
    client_send_frame(cl, opcode, payload, len, 1);
    int code = client_wait_close(cl, E2E_WAIT_MS);
    client_free(cl);
    return code;
}

START_TEST(frame_faults_close_with_the_right_code)
{
    ck_assert_int_eq(close_code_after((const uint8_t *)"\x01\x02", 2, CLIENT_OP_BINARY), 1003);
    ck_assert_int_eq(close_code_after((const uint8_t *)"{\"a\":\"\xff\"}", 9, CLIENT_OP_TEXT), 1007);
    size_t big = 131072 + 1;
    uint8_t *p = malloc(big);
    memset(p, 'a', big);
    ck_assert_int_eq(close_code_after(p, big, CLIENT_OP_TEXT), 1009);
    free(p);
}
END_TEST

struct bad_cmd {
    const char *json;
    const char *code;
    const char *ref;
};

START_TEST(bad_commands_get_errors_and_keep_the_connection)
{
    static const struct bad_cmd cases[] = {
        { "{not json", "bad_request", NULL },
        { "{\"type\":\"dance\",\"id\":\"u1\"}", "bad_request", "u1" },
        { "{\"type\":\"send\",\"id\":\"m1\",\"body\":\"x\"}", "bad_request", "m1" },
        { "{\"type\":\"send\",\"id\":\"m2\",\"to\":\"bob\"}", "bad_request", "m2" },
        { "{\"type\":\"send\",\"id\":\"m3\",\"to\":\"no such/user\",\"body\":\"x\"}", "bad_request", "m3" },
        { "{\"type\":\"send\",\"id\":\"m4\",\"to\":\"bob\",\"media\":\"M123\"}", "not_found", "m4" },
    };
    char u[65];
    e2e_user("bad", u);
    client *cl = e2e_connect(u, E2E_GW2);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        e2e_send_text(cl, cases[i].json);
        json_t *e = e2e_wait_type(cl, "error");
        ck_assert_msg(strcmp(e2e_str(e, "code"), cases[i].code) == 0, "%s -> %s", cases[i].json,
                      e2e_str(e, "code"));
        if (cases[i].ref)
            ck_assert_str_eq(e2e_str(e, "ref"), cases[i].ref);
        else
            ck_assert_ptr_null(json_object_get(e, "ref"));
        ck_assert(strlen(e2e_str(e, "message")) > 0);
        json_decref(e);
    }
    /* Body over PARLEY_MAX_BODY_BYTES (65536) but under the frame limit. */
    char *body = malloc(70000);
    memset(body, 'x', 69999);
    body[69999] = '\0';
    e2e_send_async(cl, "big", "bob", body);
    free(body);
    json_t *e = e2e_wait_type(cl, "error");
    ck_assert_str_eq(e2e_str(e, "code"), "too_large");
    ck_assert_str_eq(e2e_str(e, "ref"), "big");
    json_decref(e);
    /* Still open and serving. */
    e2e_send_text(cl, "{\"type\":\"ping\",\"id\":\"p1\"}");
    json_t *p = e2e_wait_type(cl, "pong");
    ck_assert_str_eq(e2e_str(p, "ref"), "p1");
    json_decref(p);
    client_close(cl, 1000);
}
END_TEST

static Suite *messaging_suite(void)
{
    Suite *s = suite_create("e2e-messaging");
    TCase *tc = tcase_create("1:1");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, a_sync_leaves_the_registry_for_after_the_first_push);
    tcase_add_test(tc, online_delivery_across_gateways);
    tcase_add_test(tc, a_user_who_moves_gateway_is_reached_there_at_once);
    tcase_add_test(tc, offline_delivery_on_connect_before_synced);
    tcase_add_test(tc, ack_stops_redelivery_and_no_ack_redelivers);
    tcase_add_test(tc, resend_is_idempotent);
    tcase_add_test(tc, resend_to_online_recipient_is_pushed_once);
    tcase_add_test(tc, thousand_messages_in_order);
    tcase_add_test(tc, live_while_the_registry_lags);
    tcase_add_test(tc, two_connections_of_one_user_both_receive);
    tcase_add_test(tc, a_push_held_during_a_sync_that_carried_it_is_written_once);
    tcase_add_test(tc, big_backlog_is_synced_in_pages);
    tcase_add_test(tc, a_backlog_of_pages_is_scanned_once);
    tcase_add_test(tc, slow_reader_gets_everything_without_1013);
    tcase_add_test(tc, unauthorized_upgrades_get_401);
    tcase_add_test(tc, frame_faults_close_with_the_right_code);
    tcase_add_test(tc, bad_commands_get_errors_and_keep_the_connection);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    /* Fetches of at most 64 KiB per partition (1 MiB by default), so the
     * 4.8 MB backlog reaches message-store in many pieces, with the other
     * partitions' records in between, as from a busy broker: a sync request
     * consumed ahead of the inbox records produced before it would show
     * (big_backlog_...: the build before the fix synced 57 and 43 of 600 in
     * two runs; a 1 MiB prefetch queue instead let it pass). */
    setenv("PARLEY_KAFKA_CONSUMER_CONFIG", "max.partition.fetch.bytes=65536", 0);
    return e2e_main(messaging_suite());
}
