/* Write-behind end to end (issue 14): with message-store's store rounds
 * held back (PARLEY_MSGSTORE_HOLD_MS, 5 s here), an event acked or read by
 * every device that needs it while it waits is settled: its receipt
 * reaches the sender and it is never written (a resync does not bring it
 * back); an event another device still needs is stored and synced to that
 * device; a round larger than one store call is split and stored. Runs in
 * both modes: in the stack the one message-store process holds both the
 * writer and the acker. */
#include "e2e.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define WB_HOLD_MS "5000" /* far past an ack, even on a loaded CI box */
#define WB_SETTLED "parley_msgstore_settled_events_total"
#define WB_STORED "parley_msgstore_inbox_stored_total"
#define WB_LATE "parley_msgstore_acks_late_total"
#define WB_FOUND "parley_msgstore_ack_waits_total{result=\"found\"}"

static int wb_is_message(const json_t *m, void *arg)
{
    (void)arg;
    return strcmp(e2e_str(m, "type"), "message") == 0;
}

/* The next message cl gets; its id copied to id. */
static void wb_message(client *cl, char id[64])
{
    json_t *m = NULL;
    ck_assert_msg(client_next(cl, wb_is_message, NULL, E2E_WAIT_MS, &m) == PX_OK,
                  "no message: %s", client_errstr(cl));
    snprintf(id, 64, "%s", e2e_str(m, "id"));
    json_decref(m);
}

typedef struct wb_want {
    const char *msg_id, *status;
} wb_want;

static int wb_is_receipt(const json_t *m, void *arg)
{
    const wb_want *w = arg;
    return strcmp(e2e_str(m, "type"), "receipt") == 0 &&
           strcmp(e2e_str(m, "msg_id"), w->msg_id) == 0 &&
           strcmp(e2e_str(m, "status"), w->status) == 0;
}

static void wb_receipt(client *cl, const char *msg_id, const char *status)
{
    wb_want w = { msg_id, status };
    json_t *m = NULL;
    ck_assert_msg(client_next(cl, wb_is_receipt, &w, E2E_WAIT_MS, &m) == PX_OK,
                  "no %s receipt for %s: %s", status, msg_id, client_errstr(cl));
    json_decref(m);
}

/* Waits until the counter passes from (the writer's round comes after the
 * hold); its value. */
static long long wb_metric_past(const char *name, long long from)
{
    long long v;
    int64_t end = px_mono_ms() + E2E_WAIT_MS;
    while ((v = e2e_metric(E2E_STORE, name)) <= from && px_mono_ms() < end)
        usleep(50 * 1000);
    return v;
}

START_TEST(events_acked_or_read_while_held_are_never_stored)
{
    enum { N = 10 };
    char alice[65], bob[65], cid[16], mid[N][64], got[N][64];
    e2e_user("wb-alice", alice);
    e2e_user("wb-bob", bob);
    client *b = e2e_connect_device(bob, "phone", E2E_GW2);
    json_decref(e2e_wait_type(b, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    long long settled0 = e2e_metric(E2E_STORE, WB_SETTLED);
    ck_assert_int_ge(settled0, 0);
    for (int i = 0; i < N; i++) {
        snprintf(cid, sizeof(cid), "wb%d", i);
        e2e_send(a, cid, bob, "held", mid[i]);
    }
    /* The first half acked, the second read (read implies delivered). */
    json_t *ack = json_pack("{s:s, s:[]}", "type", "ack", "ids");
    json_t *read = json_pack("{s:s, s:[]}", "type", "read", "ids");
    for (int i = 0; i < N; i++) {
        wb_message(b, got[i]);
        json_array_append_new(json_object_get(i < N / 2 ? ack : read, "ids"),
                              json_string(got[i]));
    }
    ck_assert_int_eq(client_send_json(b, ack), 0);
    ck_assert_int_eq(client_send_json(b, read), 0);
    json_decref(ack);
    json_decref(read);
    for (int i = 0; i < N; i++)
        wb_receipt(a, mid[i], i < N / 2 ? "delivered" : "read");
    /* alice acks none of her receipts: those are stored after the hold. */
    long long settled = wb_metric_past(WB_SETTLED, settled0 + N - 1);
    ck_assert_msg(settled - settled0 == N, "%lld of %d acked events settled", settled - settled0,
                  N);
    client_close(b, 1000);
    b = e2e_connect_device(bob, "phone", E2E_GW2);
    json_t *ids = e2e_backlog_ids(b);
    for (int i = 0; i < N; i++)
        ck_assert_msg(!e2e_has_id(ids, got[i]), "settled event %s synced again", got[i]);
    json_decref(ids);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

START_TEST(an_event_another_device_needs_is_stored_for_it)
{
    char alice[65], bob[65], mid[64], id1[64], id2[64];
    e2e_user("wb-alice", alice);
    e2e_user("wb-bob", bob);
    client *d1 = e2e_connect_device(bob, "phone", E2E_GW2);
    json_decref(e2e_wait_type(d1, "synced"));
    client *d2 = e2e_connect_device(bob, "laptop", E2E_GW1);
    json_decref(e2e_wait_type(d2, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    long long settled0 = e2e_metric(E2E_STORE, WB_SETTLED);
    long long stored0 = e2e_metric(E2E_STORE, WB_STORED);
    e2e_send(a, "two", bob, "for both", mid);
    wb_message(d1, id1);
    wb_message(d2, id2);
    ck_assert_str_eq(id1, id2);
    e2e_ack(d1, id1);
    wb_receipt(a, mid, "delivered");
    client_close(d2, 1000); /* the laptop never acked it */
    wb_metric_past(WB_STORED, stored0);
    ck_assert_int_eq(e2e_metric(E2E_STORE, WB_SETTLED), settled0);
    d2 = e2e_connect_device(bob, "laptop", E2E_GW1);
    json_t *ids = e2e_backlog_ids(d2);
    ck_assert_msg(e2e_has_id(ids, id1), "the laptop's sync lacks %s", id1);
    json_decref(ids);
    client_close(a, 1000);
    client_close(d1, 1000);
    client_close(d2, 1000);
}
END_TEST

/* One ack naming events already stored (a backlog synced from the store)
 * and events still held: the held ones settle in the batch, the stored
 * ones are applied late, between batches (ack.c: ack_late), and all of
 * them get their receipt and are gone from the store. */
START_TEST(acks_of_stored_events_are_applied_late)
{
    enum { OLD = 6, LIVE = 4 };
    char alice[65], bob[65], cid[16], mid[OLD + LIVE][64], got[OLD + LIVE][64];
    e2e_user("wb-alice", alice);
    e2e_user("wb-bob", bob);
    client *a = e2e_connect(alice, E2E_GW1);
    json_decref(e2e_wait_type(a, "synced"));
    long long stored0 = e2e_metric(E2E_STORE, WB_STORED);
    for (int i = 0; i < OLD; i++) {
        snprintf(cid, sizeof(cid), "old%d", i);
        e2e_send(a, cid, bob, "stored", mid[i]);
    }
    /* bob is offline: they are written once the hold ends. */
    ck_assert_int_ge(wb_metric_past(WB_STORED, stored0 + OLD - 1), stored0 + OLD);
    client *b = e2e_connect_device(bob, "phone", E2E_GW2);
    json_t *ids = e2e_backlog_ids(b); /* up to synced */
    ck_assert_int_eq((int)json_array_size(ids), OLD);
    for (int i = 0; i < OLD; i++)
        snprintf(got[i], sizeof(got[i]), "%s", json_string_value(json_array_get(ids, (size_t)i)));
    json_decref(ids);
    long long settled0 = e2e_metric(E2E_STORE, WB_SETTLED);
    long long late0 = e2e_metric(E2E_STORE, WB_LATE);
    ck_assert_int_ge(late0, 0);
    for (int i = OLD; i < OLD + LIVE; i++) {
        snprintf(cid, sizeof(cid), "live%d", i);
        e2e_send(a, cid, bob, "held", mid[i]);
        wb_message(b, got[i]);
    }
    json_t *ack = json_pack("{s:s, s:[]}", "type", "ack", "ids");
    for (int i = 0; i < OLD + LIVE; i++)
        json_array_append_new(json_object_get(ack, "ids"), json_string(got[i]));
    ck_assert_int_eq(client_send_json(b, ack), 0);
    json_decref(ack);
    for (int i = 0; i < OLD + LIVE; i++)
        wb_receipt(a, mid[i], "delivered");
    ck_assert_int_eq(e2e_metric(E2E_STORE, WB_LATE) - late0, OLD);
    long long settled = wb_metric_past(WB_SETTLED, settled0 + LIVE - 1);
    ck_assert_msg(settled - settled0 == LIVE, "%lld of %d held events settled",
                  settled - settled0, LIVE);
    client_close(b, 1000);
    b = e2e_connect_device(bob, "phone", E2E_GW2);
    ids = e2e_backlog_ids(b);
    ck_assert_msg(json_array_size(ids) == 0, "%zu acked events synced again",
                  json_array_size(ids));
    json_decref(ids);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

/* Sends one `type` command naming ids [from, to) of ids. */
static void wb_name(client *cl, const char *type, json_t *ids, size_t from, size_t to)
{
    json_t *o = json_pack("{s:s, s:[]}", "type", type, "ids");
    for (size_t i = from; i < to; i++)
        json_array_append(json_object_get(o, "ids"), json_array_get(ids, i));
    ck_assert_int_eq(client_send_json(cl, o), 0);
    json_decref(o);
}

/* Late acks are applied ACK_CHUNK (1,000) at a time between the acker's
 * batches, so a `read` consumed after the first chunk applies (inline)
 * and deletes events whose late acks are still due. Those acks then find
 * nothing; they must leave as found at once (ackwait.c's memory of the ids
 * this acker applied), not wait out ACKWAIT_MS (30 s) with their
 * partitions' commits held. The read goes once every ack is counted late,
 * and reaches the acker while later chunks are still due when those take
 * a while (the stack's FerretDB); in parleyd they may all be applied
 * first, and the test then passes either way. */
START_TEST(late_acks_whose_events_a_read_took_leave_as_found)
{
    enum { N = 1500, HALF = N / 2 }; /* two senders: each stays in its send burst */
    char alice[2][65], bob[65];
    client *a[2];
    e2e_user("wb-bob", bob);
    long long stored0 = e2e_metric(E2E_STORE, WB_STORED);
    for (int s = 0; s < 2; s++) {
        e2e_user("wb-alice", alice[s]);
        a[s] = e2e_connect(alice[s], E2E_GW1);
        e2e_send_numbered(a[s], bob, HALF);
    }
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < HALF; i++)
            json_decref(e2e_wait_type(a[s], "sent"));
    ck_assert_int_ge(wb_metric_past(WB_STORED, stored0 + N - 1), stored0 + N);
    client *b = e2e_connect_device(bob, "phone", E2E_GW2);
    json_t *ids = e2e_backlog_ids(b);
    ck_assert_int_eq((int)json_array_size(ids), N);
    long long late0 = e2e_metric(E2E_STORE, WB_LATE);
    long long found0 = e2e_metric(E2E_STORE, WB_FOUND);
    wb_name(b, "ack", ids, 0, HALF);
    wb_name(b, "ack", ids, HALF, N);
    ck_assert_int_ge(wb_metric_past(WB_LATE, late0 + N - 1), late0 + N);
    wb_name(b, "read", ids, 0, HALF);
    wb_name(b, "read", ids, HALF, N);
    long long found = found0;
    for (int64_t end = px_mono_ms() + E2E_WAIT_MS; found < found0 + N && px_mono_ms() < end;) {
        usleep(100 * 1000);
        found = e2e_metric(E2E_STORE, WB_FOUND);
    }
    ck_assert_msg(found >= found0 + N, "%lld of %d late acks left as found in %d ms",
                  found - found0, N, E2E_WAIT_MS);
    json_decref(ids);
    client_close(a[0], 1000);
    client_close(a[1], 1000);
    client_close(b, 1000);
}
END_TEST

/* A store round larger than one store call (STORE_MAX_BATCH, 10,000):
 * parleyd's pipeline holds 65,536 events, so 11,000 sent to an offline
 * user within the hold reach the writer's first round together, and the
 * writer must split it (a round of 10,201 once failed the store's limit on
 * every retry: `sent` answers went on while nothing was stored or synced).
 * On the stack (8,192, half of which ends the hold) the rounds are
 * smaller; the outcome must be the same. */
START_TEST(a_round_larger_than_one_store_call_is_stored)
{
    enum { SENDERS = 11, EACH = 1000, N = SENDERS * EACH }; /* each in its send burst */
    char from[SENDERS][65], to[65];
    client *a[SENDERS];
    e2e_user("wb-big", to);
    long long stored0 = e2e_metric(E2E_STORE, WB_STORED);
    for (int s = 0; s < SENDERS; s++) {
        e2e_user("wb-many", from[s]);
        a[s] = e2e_connect(from[s], E2E_GW1);
    }
    for (int s = 0; s < SENDERS; s++)
        e2e_send_numbered(a[s], to, EACH);
    for (int s = 0; s < SENDERS; s++)
        for (int i = 0; i < EACH; i++)
            json_decref(e2e_wait_type(a[s], "sent"));
    ck_assert_int_ge(wb_metric_past(WB_STORED, stored0 + N - 1), stored0 + N);
    client *b = e2e_connect(to, E2E_GW2);
    json_t *ids = e2e_backlog_ids(b);
    ck_assert_int_eq((int)json_array_size(ids), N);
    json_decref(ids);
    for (int s = 0; s < SENDERS; s++)
        client_close(a[s], 1000);
    client_close(b, 1000);
}
END_TEST

static Suite *writebehind_suite(void)
{
    Suite *s = suite_create("writebehind");
    TCase *tc = tcase_create("held");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, events_acked_or_read_while_held_are_never_stored);
    tcase_add_test(tc, an_event_another_device_needs_is_stored_for_it);
    tcase_add_test(tc, acks_of_stored_events_are_applied_late);
    tcase_add_test(tc, late_acks_whose_events_a_read_took_leave_as_found);
    tcase_add_test(tc, a_round_larger_than_one_store_call_is_stored);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    setenv("PARLEY_MSGSTORE_HOLD_MS", WB_HOLD_MS, 1);
    return e2e_main(writebehind_suite());
}
