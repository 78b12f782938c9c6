/* Receipts end to end: message-store's facts, the receipt service's
 * tracking and the `receipt` events in the sender's inbox, with every
 * service a real process on the real Kafka broker and MongoDB-wire server.
 * Covers the order sent -> delivered -> read, an offline sender, repeats,
 * kill -9 of the receipt service and of message-store, forged reads,
 * read-before-ack, per-member receipts of a group message and the expiry
 * sweep of tracking records. */
#include "e2e.h"
#include "store.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct want {
    const char *msg_id;
    const char *status;   /* NULL: any */
} want;

static int is_receipt(const json_t *m, void *arg)
{
    const want *w = arg;
    return strcmp(e2e_str(m, "type"), "receipt") == 0 &&
           (w->msg_id == NULL || strcmp(e2e_str(m, "msg_id"), w->msg_id) == 0) &&
           (w->status == NULL || strcmp(e2e_str(m, "status"), w->status) == 0);
}

/* The next receipt for msg_id (and status, if given); fails the test after
 * E2E_WAIT_MS. */
static json_t *wait_receipt(client *cl, const char *msg_id, const char *status)
{
    want w = { msg_id, status };
    json_t *m = NULL;
    int rc = client_next(cl, is_receipt, &w, E2E_WAIT_MS, &m);
    ck_assert_msg(rc == PX_OK, "no %s receipt for %s within %d ms: %s", status ? status : "",
                  msg_id, E2E_WAIT_MS, client_errstr(cl));
    return m;
}

/* Reads cl's receipts (acking each) until n_sentinel of them are for
 * sentinel, a message acked after everything whose effects are counted;
 * counts the delivered and read receipts for msg_id met on the way. */
static void receipts_until_sentinel(client *cl, const char *msg_id, const char *sentinel,
                                    int n_sentinel, int *delivered, int *read)
{
    want any = { NULL, NULL };
    *delivered = *read = 0;
    while (n_sentinel > 0) {
        json_t *m = NULL;
        ck_assert_msg(client_next(cl, is_receipt, &any, E2E_WAIT_MS, &m) == PX_OK,
                      "no receipt for the sentinel %s: %s", sentinel, client_errstr(cl));
        n_sentinel -= strcmp(e2e_str(m, "msg_id"), sentinel) == 0;
        if (strcmp(e2e_str(m, "msg_id"), msg_id) == 0) {
            *delivered += strcmp(e2e_str(m, "status"), "delivered") == 0;
            *read += strcmp(e2e_str(m, "status"), "read") == 0;
        }
        e2e_ack(cl, e2e_str(m, "id"));
        json_decref(m);
    }
}

static void send_read(client *cl, const char *id)
{
    json_t *o = json_pack("{s:s, s:[s]}", "type", "read", "ids", id);
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

/* A read or ack on a connection that may have died with a kill of parleyd;
 * returns 1 if it could not be sent. */
static int send_lossy(client *cl, const char *type, const char *id)
{
    json_t *o = json_pack("{s:s, s:[s]}", "type", type, "ids", id);
    int lost = client_send_json(cl, o) != 0;
    json_decref(o);
    return lost;
}

/* Every event up to `synced`, in arrival order. */
static json_t *until_synced(client *cl)
{
    json_t *got = json_array();
    for (;;) {
        json_t *m = client_recv_json(cl, E2E_WAIT_MS);
        ck_assert_msg(m != NULL, "no synced: %s", client_errstr(cl));
        if (strcmp(e2e_str(m, "type"), "synced") == 0) {
            json_decref(m);
            return got;
        }
        json_array_append_new(got, m);
    }
}

/* group: the group id a group message's receipt must carry; NULL for 1:1. */
static void check_group_receipt(const json_t *r, const char *msg_id, const char *status,
                                const char *by, const char *group)
{
    ck_assert_str_eq(e2e_str(r, "type"), "receipt");
    ck_assert_str_eq(e2e_str(r, "msg_id"), msg_id);
    ck_assert_str_eq(e2e_str(r, "status"), status);
    ck_assert_str_eq(e2e_str(r, "by"), by);
    ck_assert_int_eq((int)strlen(e2e_str(r, "id")), 26);
    ck_assert(json_integer_value(json_object_get(r, "ts")) > 0);
    if (group == NULL)
        ck_assert_ptr_null(json_object_get(r, "group"));
    else
        ck_assert_str_eq(e2e_str(r, "group"), group);
}

static void check_receipt(const json_t *r, const char *msg_id, const char *status, const char *by)
{
    check_group_receipt(r, msg_id, status, by, NULL);
}

/* A whole backlog acked at once: bob acks 5,000 synced events (five
 * senders, each within its send burst) in five frames of 1,000 ids. With
 * message-store stopped (microservices) while they go out, its acker
 * consumes the five records in one batch, a run larger than one part
 * (ACK_RUN_KEYS: parts of 4,000 and 1,000 ids). Every message must get its
 * one `delivered` receipt and every event must be deleted, whichever part
 * carried it. */
START_TEST(a_backlog_acked_at_once_gets_every_receipt)
{
    enum { SENDERS = 5, EACH = 1000, N = SENDERS * EACH, FRAME = 1000 };
    static const char *const frames = "parley_gateway_frames_received_total";
    char from[SENDERS][65], bob[65];
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
    client *b = e2e_connect(bob, E2E_GW2);
    json_t *ids = e2e_backlog_ids(b);
    ck_assert_int_eq(json_array_size(ids), N);
    pid_t ms = e2e_pid(E2E_STORE);
    int stopped = ms != e2e_pid(E2E_GW2);
    long long f0 = e2e_metric(E2E_GW2, frames);
    if (stopped)
        ck_assert_int_eq(kill(ms, SIGSTOP), 0);
    for (int f = 0; f < N / FRAME; f++) {
        json_t *part = json_array();
        for (size_t i = (size_t)f * FRAME; i < (size_t)(f + 1) * FRAME; i++)
            json_array_append(part, json_array_get(ids, i));
        json_t *o = json_pack("{s:s, s:o}", "type", "ack", "ids", part);
        ck_assert_int_eq(client_send_json(b, o), 0);
        json_decref(o);
    }
    for (int t = 0; t < 100 && e2e_metric(E2E_GW2, frames) < f0 + N / FRAME; t++)
        usleep(50 * 1000);
    usleep(300 * 1000); /* the gateway's acks linger (PARLEY_KAFKA_BULK_LINGER_MS) */
    if (stopped)
        ck_assert_int_eq(kill(ms, SIGCONT), 0);
    want delivered = { NULL, "delivered" };
    for (int s = 0; s < SENDERS; s++) {
        json_t *seen = json_object();
        while (json_object_size(seen) < EACH) {
            json_t *m = NULL;
            ck_assert_msg(client_next(a[s], is_receipt, &delivered, E2E_WAIT_MS, &m) == PX_OK,
                          "sender %d: %zu of %d delivered receipts: %s", s,
                          json_object_size(seen), EACH, client_errstr(a[s]));
            const char *mid = e2e_str(m, "msg_id");
            ck_assert_msg(e2e_has_id(ids, mid), "a receipt for %s, not one of bob's", mid);
            ck_assert_msg(json_object_get(seen, mid) == NULL, "a second delivered for %s", mid);
            json_object_set_new(seen, mid, json_true());
            json_decref(m);
        }
        json_decref(seen);
    }
    json_decref(ids);
    client_close(b, 1000);
    b = e2e_connect(bob, E2E_GW1);
    ids = e2e_backlog_ids(b);
    ck_assert_msg(json_array_size(ids) == 0, "%zu acked events still pending",
                  json_array_size(ids));
    json_decref(ids);
    client_close(b, 1000);
    for (int s = 0; s < SENDERS; s++)
        client_close(a[s], 1000);
}
END_TEST

/* One message alice -> bob, acked then read by bob; alice's wire must show
 * exactly sent, delivered, read in that order. Returns the ack->delivered
 * and read->read latencies in ms. */
static void sent_delivered_read(client *a, client *b, const char *bob, const char *cid,
                                int64_t lat[2])
{
    char mid[64];
    e2e_send_async(a, cid, bob, "read me");
    json_t *s = client_recv_json(a, E2E_WAIT_MS);
    ck_assert_msg(s != NULL && strcmp(e2e_str(s, "type"), "sent") == 0, "first event not sent");
    snprintf(mid, sizeof(mid), "%s", e2e_str(s, "msg_id"));
    json_decref(s);
    json_decref(e2e_wait_type(b, "message"));

    int64_t t0 = px_mono_ms();
    e2e_ack(b, mid);
    json_t *d = client_recv_json(a, E2E_WAIT_MS);
    ck_assert_msg(d != NULL, "no delivered receipt: %s", client_errstr(a));
    lat[0] = px_mono_ms() - t0;
    check_receipt(d, mid, "delivered", bob);

    t0 = px_mono_ms();
    send_read(b, mid);
    json_t *r = client_recv_json(a, E2E_WAIT_MS);
    ck_assert_msg(r != NULL, "no read receipt: %s", client_errstr(a));
    lat[1] = px_mono_ms() - t0;
    check_receipt(r, mid, "read", bob);
    ck_assert_str_ne(e2e_str(d, "id"), e2e_str(r, "id"));
    e2e_ack(a, e2e_str(d, "id"));
    e2e_ack(a, e2e_str(r, "id"));
    json_decref(d);
    json_decref(r);
}

START_TEST(online_sender_sees_sent_delivered_read_in_order)
{
    enum { ROUNDS = 5 };
    char alice[65], bob[65], cid[16];
    int64_t lat[ROUNDS][2];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect_synced(bob, E2E_GW2);
    client *a = e2e_connect_synced(alice, E2E_GW1);
    for (int i = 0; i < ROUNDS; i++) {
        snprintf(cid, sizeof(cid), "c%d", i);
        sent_delivered_read(a, b, bob, cid, lat[i]);
    }
    /* The first round may include the receipt consumer's first partition
     * assignment after start; the later ones are the steady state. */
    int64_t worst[2] = { 0, 0 };
    for (int i = 1; i < ROUNDS; i++)
        for (int k = 0; k < 2; k++)
            worst[k] = PX_MAX(worst[k], lat[i][k]);
    fprintf(stderr, "report: receipts (sanitized build, sender online): ack->delivered %lld ms, "
            "read->read %lld ms on the first message; worst of the next %d: %lld / %lld ms\n",
            (long long)lat[0][0], (long long)lat[0][1], ROUNDS - 1, (long long)worst[0],
            (long long)worst[1]);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* Index in arr of the receipt for msg_id with status, or -1. */
static int find_receipt(const json_t *arr, const char *msg_id, const char *status)
{
    size_t i;
    json_t *v;
    want w = { msg_id, status };
    json_array_foreach(arr, i, v) if (is_receipt(v, &w)) return (int)i;
    return -1;
}

START_TEST(offline_sender_gets_both_receipts_before_synced)
{
    char alice[65], bob[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "while you were out", mid);
    client_close(a, 1000);

    client *b = e2e_connect(bob, E2E_GW2);
    json_t *got = until_synced(b);
    ck_assert_int_eq(json_array_size(got), 1);
    json_decref(got);
    e2e_ack(b, mid);
    send_read(b, mid);
    client_close(b, 1000);

    /* The receipts travel ack -> message-store -> receipt -> inbox: poll. */
    int d = -1, r = -1;
    json_t *pending = NULL;
    for (int tries = 0; tries < 75 && (d < 0 || r < 0); tries++) {
        json_decref(pending);
        a = e2e_connect(alice, tries % 2 ? E2E_GW2 : E2E_GW1);
        pending = until_synced(a);
        d = find_receipt(pending, mid, "delivered");
        r = find_receipt(pending, mid, "read");
        if (d < 0 || r < 0) {
            client_close(a, 1000);
            usleep(200 * 1000);
        }
    }
    ck_assert_msg(d >= 0 && r >= 0, "receipts not pending for the offline sender after 15 s");
    ck_assert_msg(d < r, "read receipt before the delivered one");
    check_receipt(json_array_get(pending, (size_t)d), mid, "delivered", bob);
    check_receipt(json_array_get(pending, (size_t)r), mid, "read", bob);
    e2e_ack(a, e2e_str(json_array_get(pending, (size_t)d), "id"));
    e2e_ack(a, e2e_str(json_array_get(pending, (size_t)r), "id"));
    json_decref(pending);
    client_close(a, 1000);

    /* Acked receipts are gone from the inbox. */
    int empty = 0;
    for (int tries = 0; tries < 50 && !empty; tries++) {
        a = e2e_connect(alice, E2E_GW2);
        got = until_synced(a);
        empty = json_array_size(got) == 0;
        json_decref(got);
        client_close(a, 1000);
        if (!empty)
            usleep(200 * 1000);
    }
    ck_assert_msg(empty, "acked receipts still pending after 10 s");
}
END_TEST

START_TEST(duplicate_acks_and_reads_give_one_receipt_each)
{
    char alice[65], bob[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b1 = e2e_connect(bob, E2E_GW2);
    client *b2 = e2e_connect(bob, E2E_GW1);
    json_decref(e2e_wait_type(b1, "synced"));
    json_decref(e2e_wait_type(b2, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "say it twice", mid);
    json_decref(e2e_wait_type(b1, "message"));
    json_decref(e2e_wait_type(b2, "message"));
    /* Both of bob's connections ack and read, one id named twice. */
    json_t *o = json_pack("{s:s, s:[s,s]}", "type", "ack", "ids", mid, mid);
    ck_assert_int_eq(client_send_json(b1, o), 0);
    json_decref(o);
    e2e_ack(b2, mid);
    send_read(b1, mid);
    send_read(b2, mid);
    json_t *r = wait_receipt(a, mid, "read");
    e2e_ack(a, e2e_str(r, "id"));
    json_decref(r);
    /* Again, after the first ones were applied; then a sentinel acked from
     * b1 and read from b2, each behind its connection's repeat. */
    char sentinel[64];
    e2e_send(a, "c2", bob, "sentinel", sentinel);
    json_decref(e2e_wait_type(b1, "message"));
    json_decref(e2e_wait_type(b2, "message"));
    e2e_ack(b1, mid);
    send_read(b2, mid);
    e2e_ack(b1, sentinel);
    send_read(b2, sentinel);
    /* The read waited for above left the rest of the wire in the backlog:
     * count every receipt for mid that came besides it. */
    int delivered, read;
    receipts_until_sentinel(a, mid, sentinel, 2, &delivered, &read);
    ck_assert_int_eq(delivered, 1);
    ck_assert_int_eq(read, 0);
    client_close(a, 1000);
    client_close(b1, 1000);
    client_close(b2, 1000);
}
END_TEST

/* The sum of message-store's counters of claims and of events through a
 * store round, once it has not moved for a second (another test's round
 * may still be held, PARLEY_MSGSTORE_HOLD_MS). */
static long long store_rounds(long long *claims)
{
    long long last = -1, now = 0;
    for (int t = 0; t < 40; t++) {
        *claims = e2e_metric(E2E_STORE, "parley_msgstore_claims_total");
        now = *claims + e2e_metric(E2E_STORE, "parley_msgstore_inbox_stored_total") +
              e2e_metric(E2E_STORE, "parley_msgstore_settled_events_total");
        if (now == last)
            break;
        last = now;
        usleep(1000 * 1000);
    }
    return now - *claims;
}

/* Only what a client can resend is claimed against resends (inbox.c,
 * inbox_claimed): N messages and their N delivered receipts, every one
 * acked, go through store rounds and write N claims, not 2N. */
START_TEST(receipts_are_not_claimed)
{
    enum { N = 20 };
    char alice[65], bob[65], mid[N][64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect_synced(bob, E2E_GW2);
    client *a = e2e_connect_synced(alice, E2E_GW1);
    long long claims0, events0 = store_rounds(&claims0);
    for (int i = 0; i < N; i++) {
        char cid[16];
        snprintf(cid, sizeof(cid), "c%d", i);
        e2e_send(a, cid, bob, "claim me once", mid[i]);
    }
    for (int i = 0; i < N; i++) {
        json_t *m = e2e_wait_type(b, "message");
        e2e_ack(b, e2e_str(m, "id"));
        json_decref(m);
    }
    for (int i = 0; i < N; i++) {
        json_t *r = wait_receipt(a, mid[i], "delivered");
        e2e_ack(a, e2e_str(r, "id"));
        json_decref(r);
    }
    long long claims = 0, events = 0;
    for (int t = 0; t < 60 && events < events0 + 2 * N; t++) {
        usleep(250 * 1000);
        events = store_rounds(&claims);
    }
    ck_assert_msg(events >= events0 + 2 * N, "%lld of %d events through a store round",
                  events - events0, 2 * N);
    ck_assert_int_eq(claims - claims0, N);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

enum { KILL_N = 300 };

/* Alice's view of the receipts of the kill test, deduped by receipt id. */
typedef struct tally {
    char mid[KILL_N][32];
    int delivered[KILL_N], read[KILL_N];
    int unique, dups;
} tally;

static int tally_index(const tally *t, const char *mid)
{
    for (int i = 0; i < KILL_N; i++)
        if (strcmp(t->mid[i], mid) == 0)
            return i;
    return -1;
}

static void tally_drain(client *a, tally *t, int timeout_ms)
{
    json_t *m;
    want w = { NULL, NULL };
    while (client_next(a, is_receipt, &w, timeout_ms, &m) == PX_OK) {
        timeout_ms = 0;
        int i = tally_index(t, e2e_str(m, "msg_id"));
        ck_assert_msg(i >= 0, "receipt for an unknown message");
        int *slot = strcmp(e2e_str(m, "status"), "read") == 0 ? &t->read[i] : &t->delivered[i];
        if (*slot)
            t->dups++;
        else
            t->unique++;
        *slot = 1;
        e2e_ack(a, e2e_str(m, "id"));
        json_decref(m);
    }
}

START_TEST(kill9_receipt_service_and_store_loses_no_receipt)
{
    static tally t;
    char alice[65], bob[65], cid[16];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect_synced(bob, E2E_GW2);
    client *a = e2e_connect(alice, E2E_GW1);
    for (int i = 0; i < KILL_N; i++) {
        snprintf(cid, sizeof(cid), "k%d", i);
        e2e_send_async(a, cid, bob, "kill test");
    }
    for (int i = 0; i < KILL_N; i++) {
        snprintf(cid, sizeof(cid), "k%d", i);
        json_t *s = client_wait_ref(a, cid, E2E_WAIT_MS);
        ck_assert_msg(s != NULL && strcmp(e2e_str(s, "type"), "sent") == 0, "no sent for %s", cid);
        snprintf(t.mid[i], sizeof(t.mid[i]), "%s", e2e_str(s, "msg_id"));
        json_decref(s);
    }
    for (int i = 0; i < KILL_N; i++)
        json_decref(e2e_wait_type(b, "message"));
    /* Acks stream in; the receipt service dies while applying them; the
     * reads are made while it is down and need the tracking it wrote
     * before; message-store dies while turning the reads into facts. Every
     * fourth message is read without an ack (read implies delivered). */
    for (int i = 0; i < KILL_N; i++)
        if (i % 4 != 0)
            e2e_ack(b, t.mid[i]);
    usleep(150 * 1000);
    e2e_kill9(E2E_RECEIPT);
    int lost = 0;
    for (int i = 0; i < KILL_N; i++)
        lost |= send_lossy(b, "read", t.mid[i]);
    usleep(100 * 1000);
    e2e_kill9(E2E_STORE);
    ck_assert_int_eq(e2e_restart(E2E_STORE), 0);
    ck_assert_int_eq(e2e_restart(E2E_RECEIPT), 0);
    /* Against parleyd the kills took both connections: the clients come
     * back and bob repeats what may have been lost (acks and reads are
     * idempotent), as a real client does. */
    if (lost) {
        client_free(a);
        client_free(b);
        b = e2e_connect(bob, E2E_GW2);
        a = e2e_connect(alice, E2E_GW1);
        for (int i = 0; i < KILL_N; i++)
            if (i % 4 != 0)
                ck_assert_int_eq(send_lossy(b, "ack", t.mid[i]), 0);
        for (int i = 0; i < KILL_N; i++)
            ck_assert_int_eq(send_lossy(b, "read", t.mid[i]), 0);
    }
    int64_t deadline = px_mono_ms() + 90000;
    while (t.unique < 2 * KILL_N && px_mono_ms() < deadline)
        tally_drain(a, &t, 500);
    int missing = 0;
    for (int i = 0; i < KILL_N; i++)
        missing += !t.delivered[i] + !t.read[i];
    fprintf(stderr, "report: kill -9 of receipt and message-store: %d messages, %d receipts unique, %d duplicates on "
            "the wire, %d missing\n", KILL_N, t.unique, t.dups, missing);
    ck_assert_int_eq(missing, 0);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

START_TEST(forged_read_has_no_effect)
{
    char alice[65], bob[65], mallory[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("mallory", mallory);
    client *b = e2e_connect(bob, E2E_GW2);
    client *x = e2e_connect(mallory, E2E_GW1);
    json_decref(e2e_wait_type(b, "synced"));
    json_decref(e2e_wait_type(x, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "for bob only", mid);
    json_decref(e2e_wait_type(b, "message"));

    /* Before bob acks: mallory's read and ack name an id she never had.
     * Her ack of a sentinel from alice comes after them on the same path. */
    send_read(x, mid);
    e2e_ack(x, mid);
    int delivered, read;
    char sentinel[64];
    e2e_send(a, "s1", mallory, "sentinel", sentinel);
    json_decref(e2e_wait_type(x, "message"));
    e2e_ack(x, sentinel);
    receipts_until_sentinel(a, mid, sentinel, 1, &delivered, &read);
    ck_assert_msg(delivered + read == 0, "forged read before delivery told alice");

    /* Bob's inbox still holds it: his ack gives the one delivered receipt. */
    e2e_ack(b, mid);
    json_t *d = wait_receipt(a, mid, NULL);
    check_receipt(d, mid, "delivered", bob);
    e2e_ack(a, e2e_str(d, "id"));
    json_decref(d);

    /* After bob's ack the pair (bob, mid) is tracked; (mallory, mid) is not. */
    send_read(x, mid);
    e2e_send(a, "s2", mallory, "sentinel", sentinel);
    json_decref(e2e_wait_type(x, "message"));
    e2e_ack(x, sentinel);
    receipts_until_sentinel(a, mid, sentinel, 1, &delivered, &read);
    ck_assert_msg(delivered + read == 0, "forged read after delivery told alice");

    send_read(b, mid);
    json_t *r = wait_receipt(a, mid, NULL);
    check_receipt(r, mid, "read", bob);
    e2e_ack(a, e2e_str(r, "id"));
    json_decref(r);
    client_close(a, 1000);
    client_close(b, 1000);
    client_close(x, 1000);
}
END_TEST

START_TEST(read_before_ack_yields_delivered_and_read)
{
    char alice[65], bob[65], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect_synced(bob, E2E_GW2);
    client *a = e2e_connect(alice, E2E_GW1);
    e2e_send(a, "c1", bob, "read, never acked", mid);
    json_decref(e2e_wait_type(b, "message"));
    send_read(b, mid);
    json_t *d = wait_receipt(a, mid, NULL);
    check_receipt(d, mid, "delivered", bob);
    json_t *r = wait_receipt(a, mid, NULL);
    check_receipt(r, mid, "read", bob);
    e2e_ack(a, e2e_str(d, "id"));
    e2e_ack(a, e2e_str(r, "id"));
    json_decref(d);
    json_decref(r);
    client_close(b, 1000);
    /* The read also acked it: bob's next connection does not get it again. */
    b = e2e_connect(bob, E2E_GW1);
    json_t *got = until_synced(b);
    ck_assert_int_eq(json_array_size(got), 0);
    json_decref(got);
    client_close(b, 1000);
    client_close(a, 1000);
}
END_TEST

/* A group message gets one receipt per member and status, each naming the
 * member and the group: what "delivered to all" / "read by all" is built on. */
START_TEST(group_message_gets_one_receipt_per_member)
{
    char alice[65], bob[65], carol[65], gid[80], mid[64];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    e2e_user("carol", carol);
    client *a = e2e_connect(alice, E2E_GW1);
    client *b = e2e_connect(bob, E2E_GW2);
    client *c = e2e_connect(carol, E2E_GW1);
    json_decref(e2e_wait_type(b, "synced"));
    json_decref(e2e_wait_type(c, "synced"));
    json_t *o = json_pack("{s:s, s:s, s:s, s:[s, s]}", "type", "group_create", "id", "g1", "name",
                          "trio", "members", bob, carol);
    ck_assert_int_eq(client_send_json(a, o), 0);
    json_decref(o);
    json_t *g = client_wait_ref(a, "g1", E2E_WAIT_MS);
    ck_assert_msg(g != NULL && strcmp(e2e_str(g, "type"), "group") == 0, "no group");
    snprintf(gid, sizeof(gid), "%s", e2e_str(json_object_get(g, "group"), "id"));
    json_decref(g);
    e2e_join(b, gid);
    e2e_join(c, gid);

    o = json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", "m1", "group", gid, "body", "hi");
    ck_assert_int_eq(client_send_json(a, o), 0);
    json_decref(o);
    json_t *s = client_wait_ref(a, "m1", E2E_WAIT_MS);
    ck_assert_msg(s != NULL && strcmp(e2e_str(s, "type"), "sent") == 0, "group send not sent");
    snprintf(mid, sizeof(mid), "%s", e2e_str(s, "msg_id"));
    json_decref(s);
    client *members[2] = { b, c };
    for (int i = 0; i < 2; i++) {
        json_t *m = e2e_wait_type(members[i], "message");
        ck_assert_str_eq(e2e_str(m, "id"), mid);
        json_decref(m);
    }

    /* Both ack (bob twice), carol then reads: 2 delivered + 1 read. */
    e2e_ack(b, mid);
    e2e_ack(b, mid);
    e2e_ack(c, mid);
    int delivered_bob = 0, delivered_carol = 0;
    for (int i = 0; i < 2; i++) {
        json_t *r = wait_receipt(a, mid, "delivered");
        const char *by = e2e_str(r, "by");
        check_group_receipt(r, mid, "delivered", by, gid);
        delivered_bob += strcmp(by, bob) == 0;
        delivered_carol += strcmp(by, carol) == 0;
        e2e_ack(a, e2e_str(r, "id"));
        json_decref(r);
    }
    ck_assert_int_eq(delivered_bob, 1);
    ck_assert_int_eq(delivered_carol, 1);
    send_read(c, mid);
    json_t *r = wait_receipt(a, mid, "read");
    check_group_receipt(r, mid, "read", carol, gid);
    e2e_ack(a, e2e_str(r, "id"));
    json_decref(r);
    /* A second group message, acked by both after all of the above: no
     * receipt for the first may come before both of its receipts. */
    o = json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", "m2", "group", gid, "body",
                  "sentinel");
    ck_assert_int_eq(client_send_json(a, o), 0);
    json_decref(o);
    s = client_wait_ref(a, "m2", E2E_WAIT_MS);
    ck_assert_msg(s != NULL && strcmp(e2e_str(s, "type"), "sent") == 0, "sentinel not sent");
    char sentinel[64];
    snprintf(sentinel, sizeof(sentinel), "%s", e2e_str(s, "msg_id"));
    json_decref(s);
    for (int i = 0; i < 2; i++) {
        json_t *m = e2e_wait_type(members[i], "message");
        ck_assert_str_eq(e2e_str(m, "id"), sentinel);
        e2e_ack(members[i], sentinel);
        json_decref(m);
    }
    int delivered, read;
    receipts_until_sentinel(a, mid, sentinel, 2, &delivered, &read);
    ck_assert_msg(delivered + read == 0, "%d delivered and %d read receipts more than one per "
                  "member", delivered, read);
    client_close(a, 1000);
    client_close(b, 1000);
    client_close(c, 1000);
}
END_TEST

static int track_seen(void *arg, const store_track *t)
{
    (*(int *)arg)++;
    return PX_OK;
}

/* How many of the pairs (reader, msg_id) the store still tracks. */
static int tracked(store *st, const store_track *keys, size_t n)
{
    char err[PX_ERRLEN] = "";
    int found = 0;
    ck_assert_msg(store_track_get(st, keys, n, track_seen, &found, err, sizeof(err)) == PX_OK,
                  "track get: %s", err);
    return found;
}

/* The receipt service's retention sweep (PARLEY_SWEEP_MS is short here)
 * drops tracking older than PARLEY_RETENTION_DAYS and keeps the rest. */
START_TEST(expiry_sweep_removes_old_tracking)
{
    char err[PX_ERRLEN] = "", reader[65], sender[65];
    e2e_user("reader", reader);
    e2e_user("sender", sender);
    store *st = store_open(getenv("PARLEY_MONGO_URI"), getenv("PARLEY_MONGO_DB"), err,
                           sizeof(err));
    ck_assert_msg(st != NULL, "store: %s", err);
    int64_t now = px_now_ms(), day = 24LL * 3600 * 1000;
    store_track old = { reader, "old-msg", sender, NULL, now - 31 * day };
    store_track fresh = { reader, "fresh-msg", sender, NULL, now - day };
    ck_assert_int_eq(store_track_put(st, (store_track[]){ old, fresh }, 2, err, sizeof(err)),
                     PX_OK);
    int64_t deadline = px_mono_ms() + E2E_WAIT_MS;
    while (tracked(st, &old, 1) == 1 && px_mono_ms() < deadline)
        usleep(100 * 1000);
    ck_assert_msg(tracked(st, &old, 1) == 0, "31-day-old tracking not swept");
    ck_assert_int_eq(tracked(st, &fresh, 1), 1);
    store_close(st);
}
END_TEST

static Suite *receipts_suite(void)
{
    Suite *s = suite_create("e2e-receipts");
    TCase *tc = tcase_create("receipts");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, online_sender_sees_sent_delivered_read_in_order);
    tcase_add_test(tc, offline_sender_gets_both_receipts_before_synced);
    tcase_add_test(tc, duplicate_acks_and_reads_give_one_receipt_each);
    tcase_add_test(tc, receipts_are_not_claimed);
    tcase_add_test(tc, forged_read_has_no_effect);
    tcase_add_test(tc, read_before_ack_yields_delivered_and_read);
    tcase_add_test(tc, group_message_gets_one_receipt_per_member);
    tcase_add_test(tc, expiry_sweep_removes_old_tracking);
    tcase_add_test(tc, a_backlog_acked_at_once_gets_every_receipt);
    tcase_add_test(tc, kill9_receipt_service_and_store_loses_no_receipt);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    setenv("PARLEY_SWEEP_MS", "500", 0);
    return e2e_main(receipts_suite());
}
