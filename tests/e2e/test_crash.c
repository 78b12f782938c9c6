/* Crash safety end to end: kill -9 message-store and the sender's gateway
 * while thousands of messages are in flight, restart them, and check that
 * every message that was answered `sent` reaches its recipient (duplicates
 * on the wire are allowed and counted; clients dedupe by id), and in order
 * (first arrivals, across the kills and reconnects): messages never left
 * without an answer by a dead connection arrive in the order of their
 * `sent` answers, and every message after
 * each one whose `sent` alice had before she first sent it (a resend after
 * a lost answer may have been produced the first time, and then arrives
 * where that copy is, proto/PROTOCOL.md). Against
 * parleyd each kill is a kill -9 of the whole process: both clients lose
 * their connections and reconnect, as real clients do. */
#include "e2e.h"

#include <stdio.h>
#include <stdlib.h>

enum { N = 5000, WINDOW = 300 };

typedef struct flight {
    char msg_id[N][32];     /* "" until `sent` */
    int outstanding[N];     /* sent on the current connection, no answer yet */
    int retry[N];           /* answered rate_limited or unavailable: send again */
    int rank[N];            /* order of its `sent` answer */
    int before[N];          /* `sent` answers alice had when she first sent it, + 1 */
    int lost[N];            /* 1: a dead connection took its answer (maybe produced) */
    int arrived[N];         /* bob's first arrivals, as send indexes */
    int nsent, next;
    char *seen_ids;         /* msg ids bob has, "id\n" joined; for dedupe */
    int delivered, dups;
} flight;

static int bob_has(const flight *f, const char *id)
{
    char key[40];
    snprintf(key, sizeof(key), "\n%s\n", id);
    return f->seen_ids != NULL && strstr(f->seen_ids, key) != NULL;
}

static void bob_add(flight *f, const char *id)
{
    size_t old = f->seen_ids ? strlen(f->seen_ids) : 0;
    f->seen_ids = realloc(f->seen_ids, old + strlen(id) + 3);
    if (old == 0)
        strcpy(f->seen_ids, "\n");
    strcat(f->seen_ids, id);
    strcat(f->seen_ids, "\n");
}

/* Acks id; -1 if the connection is gone (a kill of parleyd). */
static int bob_ack(client *b, const char *id)
{
    json_t *o = json_pack("{s:s, s:[s]}", "type", "ack", "ids", id);
    int rc = client_send_json(b, o);
    json_decref(o);
    return rc;
}

/* Reads whatever bob has, acking it; returns -1 if his connection is gone. */
static int bob_drain(client *b, flight *f, int timeout_ms)
{
    json_t *m;
    int rc;
    while ((rc = client_next(b, NULL, NULL, timeout_ms, &m)) == PX_OK) {
        timeout_ms = 0;
        int acked = 0;
        if (strcmp(e2e_str(m, "type"), "message") == 0) {
            const char *id = e2e_str(m, "id");
            if (bob_has(f, id)) {
                f->dups++;
            } else {
                bob_add(f, id);
                /* "crash <i>"; a stray message fails the order check */
                f->arrived[f->delivered < N ? f->delivered : N - 1] =
                    atoi(e2e_str(m, "body") + 6);
                f->delivered++;
            }
            acked = bob_ack(b, id);
        }
        json_decref(m);
        if (acked != 0)
            return -1;
    }
    return rc == PX_AGAIN ? 0 : -1;
}

/* bob again after his connection died: the backlog comes by sync. */
static client *bob_reconnect(client *b, const char *bob)
{
    client_free(b);
    return e2e_connect(bob, E2E_GW2);
}

/* Reads alice's answers; returns -1 if her connection is gone. */
static int alice_drain(client *a, flight *f, int timeout_ms)
{
    json_t *m;
    int rc;
    while ((rc = client_next(a, NULL, NULL, timeout_ms, &m)) == PX_OK) {
        timeout_ms = 0;
        const char *ref = e2e_str(m, "ref");
        if (strcmp(e2e_str(m, "type"), "sent") == 0 && ref[0] == 'c') {
            int i = atoi(ref + 1);
            if (f->msg_id[i][0] == '\0')
                f->rank[i] = f->nsent++;
            snprintf(f->msg_id[i], sizeof(f->msg_id[i]), "%s", e2e_str(m, "msg_id"));
            f->outstanding[i] = 0;
        } else if (strcmp(e2e_str(m, "type"), "error") == 0 && ref[0] == 'c') {
            int i = atoi(ref + 1); /* rate_limited or unavailable: resent, same id */
            f->outstanding[i] = 0;
            f->retry[i] = 1;
        }
        json_decref(m);
    }
    return rc == PX_AGAIN ? 0 : -1;
}

static int in_window(const flight *f)
{
    int n = 0;
    for (int i = 0; i < f->next; i++)
        n += f->outstanding[i];
    return n;
}

/* A send that fails (the connection died with parleyd) is resent after the
 * reconnect like every other one without `sent`. */
static void alice_send(client *a, flight *f, const char *bob, int i)
{
    char cid[16], body[32];
    snprintf(cid, sizeof(cid), "c%d", i);
    snprintf(body, sizeof(body), "crash %d", i);
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "type", "send", "id", cid, "to", bob,
                          "body", body);
    client_send_json(a, o);
    json_decref(o);
    f->outstanding[i] = 1;
    if (f->before[i] == 0)
        f->before[i] = f->nsent + 1;
}

/* After a reconnect: everything without `sent` goes again, same ids. */
static void alice_resend(client *a, flight *f, const char *bob)
{
    for (int i = 0; i < f->next; i++)
        if (f->msg_id[i][0] == '\0')
            alice_send(a, f, bob, i);
}

START_TEST(kill9_store_and_gateway_loses_nothing_sent)
{
    static flight f;
    char alice[65], bob[65];
    e2e_user("alice", alice);
    e2e_user("bob", bob);
    client *b = e2e_connect(bob, E2E_GW2);
    json_decref(e2e_wait_type(b, "synced"));
    client *a = e2e_connect(alice, E2E_GW1);
    int killed_store = 0, killed_gw = 0;
    int64_t deadline = px_mono_ms() + 240000;
    while (f.nsent < N && px_mono_ms() < deadline) {
        while (f.next < N && in_window(&f) < WINDOW)
            alice_send(a, &f, bob, f.next++);
        for (int i = 0, w = in_window(&f); i < f.next && w < WINDOW; i++)
            if (f.retry[i] && f.msg_id[i][0] == '\0') {
                f.retry[i] = 0;
                alice_send(a, &f, bob, i);
                w++;
            }
        int gone = alice_drain(a, &f, 20);
        if (bob_drain(b, &f, 0) != 0)
            b = bob_reconnect(b, bob);
        if (!killed_store && f.nsent >= 1500) {
            e2e_kill9(E2E_STORE);
            ck_assert_int_eq(e2e_restart(E2E_STORE), 0);
            killed_store = 1;
        }
        if (!killed_gw && f.nsent >= 3000) {
            e2e_kill9(E2E_GW1);
            gone = 1;
            killed_gw = 1;
            ck_assert_int_eq(e2e_restart(E2E_GW1), 0);
        }
        if (gone) {
            client_free(a);
            a = e2e_connect(alice, E2E_GW1);
            for (int i = 0; i < f.next; i++)
                f.lost[i] |= f.outstanding[i];
            memset(f.outstanding, 0, sizeof(f.outstanding));
            alice_resend(a, &f, bob);
        }
    }
    ck_assert_msg(f.nsent == N, "only %d of %d sends answered", f.nsent, N);
    /* Every `sent` message must reach bob. */
    while (f.delivered < N && px_mono_ms() < deadline)
        if (bob_drain(b, &f, 500) != 0)
            b = bob_reconnect(b, bob);
    int missing = 0;
    for (int i = 0; i < N; i++)
        missing += !bob_has(&f, f.msg_id[i]);
    fprintf(stderr, "report: crash test: %d sent, %d delivered unique, %d duplicates on the wire, "
            "%d missing\n", f.nsent, f.delivered, f.dups, missing);
    ck_assert_int_eq(missing, 0);
    ck_assert_int_eq(f.delivered, N);
    /* latest[r]: the latest arrival among the messages answered #0..#r. */
    static int pos[N], latest[N];
    for (int k = 0; k < N; k++)
        pos[f.arrived[k]] = k;
    for (int i = 0; i < N; i++)
        latest[f.rank[i]] = pos[i];
    for (int r = 1; r < N; r++)
        latest[r] = PX_MAX(latest[r], latest[r - 1]);
    for (int j = 0; j < N; j++)
        ck_assert_msg(f.before[j] <= 1 || latest[f.before[j] - 2] < pos[j],
                      "message %d (arrived #%d) overtook one answered `sent` before it was sent",
                      j, pos[j]);
    int prev = -1, once = 0;
    for (int k = 0; k < N; k++) {
        int j = f.arrived[k];
        if (f.lost[j])
            continue;
        once++;
        ck_assert_msg(prev < 0 || f.rank[j] > f.rank[prev], "message %d (sent answer #%d) "
                      "arrived after %d (#%d)", j, f.rank[j], prev, f.rank[prev]);
        prev = j;
    }
    fprintf(stderr, "report: crash test: order checked for all %d; %d never lost an answer, "
            "in `sent` order\n", N, once);
    free(f.seen_ids);
    client_close(a, 1000);
    client_close(b, 1000);
}
END_TEST

static Suite *crash_suite(void)
{
    Suite *s = suite_create("e2e-crash");
    TCase *tc = tcase_create("kill9");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, kill9_store_and_gateway_loses_nothing_sent);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return e2e_main(crash_suite());
}
